# Two commands: `make test` and `make demo`. Each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A prefix for each demo command: CI sets STEP="timeout 300", so that a hang fails in minutes.
STEP ?=
# Demo: ResNet18 on the synthetic set (data/demo/, drawn on first use), from scratch and, when
# torchvision's ImageNet file is cached or can be downloaded, from ImageNet too: the lab's comparison.
# AdamW: the lab's SGD at lr 1e-3 stays at the majority grade for longer than a CPU demo lasts.
# --val-fraction 0.1: best.pt, the screening operating points and the kappa thresholds are chosen on a
# held-out tenth of the training patients, never on the test split they are reported on.
# --resume auto: a second `make demo` goes on from the first (to more DEMO_EPOCHS) instead of refusing.
# The two-eye stage (train.py --two-eye) on the single-eye best.pt trains in seconds on cached features; it is
# made afresh (--overwrite) each time, since its encoder may have trained on.
DEMO_EPOCHS ?= 8
DEMO_FLAGS ?= --optimizer adamw --lr 1e-3 --val-fraction 0.1 --resume auto

.PHONY: test demo clean

# -e . in compat mode: the repo folder goes on the venv's path, so that data/prepare.py imports fundus.py
# and every module added later, without a reinstall
# requirements-deploy.txt (onnx, onnxruntime: export.py, evaluate.py on an .onnx file) too, so that the tests
# and the demo cover the export; a user who only trains can install requirements.txt alone
$(VENV)/.installed: requirements.txt requirements-deploy.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --progress-bar off -r requirements.txt -r requirements-deploy.txt
	$(PY) -m pip install --quiet --progress-bar off --no-deps -e . --config-settings editable_mode=compat
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q

demo: $(VENV)/.installed
	$(STEP) $(PY) train.py --model resnet18 --epochs $(DEMO_EPOCHS) $(DEMO_FLAGS)
	$(STEP) $(PY) evaluate.py checkpoints/resnet18_scratch/best.pt --cam-per-grade 4
	$(STEP) $(PY) evaluate.py checkpoints/resnet18_scratch/best.pt --tta
	$(STEP) $(PY) export.py checkpoints/resnet18_scratch/best.pt
	$(STEP) $(PY) evaluate.py checkpoints/resnet18_scratch/best.onnx
	$(STEP) $(PY) train.py --two-eye checkpoints/resnet18_scratch/best.pt --overwrite --quiet
	$(STEP) $(PY) evaluate.py checkpoints/resnet18_scratch_two_eye/best.pt
	@if $(STEP) $(PY) models.py --fetch resnet18; then \
	  $(STEP) $(PY) train.py --model resnet18 --pretrained --epochs $(DEMO_EPOCHS) $(DEMO_FLAGS) && \
	  $(STEP) $(PY) evaluate.py checkpoints/resnet18_pretrained/best.pt; \
	else echo "make demo: skipped the pretrained half of the lab's comparison (the line above says why)"; fi
	$(STEP) $(PY) plot.py logs/

clean:
	rm -rf checkpoints logs figures data/demo
