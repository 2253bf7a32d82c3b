# Two commands: `make test` and `make demo`. Each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Demo: ResNet18 from scratch on the synthetic set (data/demo/, generated on first use).
DEMO_EPOCHS ?= 8

.PHONY: test demo clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --progress-bar off -r requirements.txt
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q

demo: $(VENV)/.installed
	$(PY) train.py --model resnet18 --epochs $(DEMO_EPOCHS)
	$(PY) evaluate.py checkpoints/resnet18_scratch/best.pt
	$(PY) plot.py logs/

clean:
	rm -rf checkpoints logs figures data/demo
