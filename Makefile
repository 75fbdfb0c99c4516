# convmae_det — two commands for a fresh machine:
#   make test   install everything into .venv (idempotent), check the import layers
#               (lint-imports, contracts in .importlinter) and run the test suite
#   make demo   install, then run the end-to-end demo on the embedded toy data (CPU)
#
# Overridable variables:
#   PYTHON              interpreter used to create .venv                (python3)
#   VENV                virtual environment folder                      (.venv)
#   TORCH_SPEC          torch / torchvision pins; GPU users may point pip at their CUDA index,
#                       e.g. make test PIP_EXTRA="--index-url https://download.pytorch.org/whl/cu124"
#   DETECTRON2_SOURCE   "wheel" (default: sal-detectron2 0.7.2, sha256 verified) or any pip
#                       requirement, e.g. DETECTRON2_SOURCE='git+https://github.com/facebookresearch/detectron2.git'
#   PYTEST_ARGS         extra arguments for pytest

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PIP_EXTRA ?=
DETECTRON2_SOURCE ?= wheel
PYTEST_ARGS ?=
STAMP := $(VENV)/.convmae_det-installed

.PHONY: install test lint-imports demo lint clean-venv readme-pictures

install: $(STAMP)

$(STAMP): setup.py requirements.txt scripts/install_env.sh scripts/install_detectron2.py
	PYTHON="$(PYTHON)" VENV="$(VENV)" TORCH_SPEC="$(TORCH_SPEC)" PIP_EXTRA="$(PIP_EXTRA)" \
		DETECTRON2_SOURCE="$(DETECTRON2_SOURCE)" bash scripts/install_env.sh
	touch $(STAMP)

test: install lint-imports
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

# The package's import layers (.importlinter): a broken contract fails the build.
lint-imports: install
	$(VENV)/bin/lint-imports --no-cache --no-logo

demo: install
	$(PY) tools/run_demo.py

# Regenerate the small pictures shown in the README from a fresh demo run.
readme-pictures: install
	$(PY) tools/run_demo.py --output-dir demo_output
	mkdir -p docs/pictures
	cp demo_output/pictures/detection_1.png demo_output/pictures/segmentation_0.png \
	   demo_output/pictures/recon_val_000000.png demo_output/pictures/detection_curves.png \
	   demo_output/pictures/classification.png docs/pictures/

lint: install
	$(PY) -m pip install -q black
	$(PY) -m black --check -l 100 convmae_det tools tests configs datasets scripts

clean-venv:
	rm -rf $(VENV)
