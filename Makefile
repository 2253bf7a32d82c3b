# Two commands: `make test` and `make demo`. Each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A prefix for each demo command: CI sets STEP="timeout 300", so that a hang fails in minutes.
STEP ?=
# Demo: ResNet18 from scratch on the synthetic set (data/demo/, generated on first use). AdamW:
# the lab's SGD at lr 1e-3 stays at the majority grade for longer than a CPU demo lasts.
DEMO_EPOCHS ?= 8
DEMO_FLAGS ?= --optimizer adamw --lr 1e-3

.PHONY: test demo clean

# -e .: the repo's modules become importable from anywhere (data/prepare.py imports fundus.py)
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --progress-bar off -r requirements.txt
	$(PY) -m pip install --quiet --progress-bar off --no-deps -e .
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q

demo: $(VENV)/.installed
	$(STEP) $(PY) train.py --model resnet18 --epochs $(DEMO_EPOCHS) $(DEMO_FLAGS)
	$(STEP) $(PY) evaluate.py checkpoints/resnet18_scratch/best.pt --cam-per-grade 4
	$(STEP) $(PY) evaluate.py checkpoints/resnet18_scratch/best.pt --tta
	$(STEP) $(PY) plot.py logs/

clean:
	rm -rf checkpoints logs figures data/demo
