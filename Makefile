# The two set-up commands of the README. Run them inside the Python environment (virtualenv or
# conda) you train with; PYTHON picks another interpreter.
PYTHON ?= python3

.PHONY: install test test-gpu test-oldest-torch

# Keeps a Detectron2 you already have (e.g. built from source with CUDA ops); otherwise installs
# Detectron2's pure-Python code from PyPI. Then ohem_d2 itself, editable, with pytest.
install:
	$(PYTHON) scripts/install_detectron2.py
	$(PYTHON) -m pip install -e ".[test]"

test:
	$(PYTHON) -m pytest -q tests

# The model-level tests (heads, per-RoI losses, selection, gradients, AMP, cascade, mask) on a
# CUDA GPU; skipped, with the reason, where there is none.
test-gpu:
	$(PYTHON) -m pytest -q -rs --device cuda tests

# The CPU suite on the oldest torch/torchvision that setup.py declares, in a venv of its own
# (output/venv_oldest_torch; about 3 GB the first time).
test-oldest-torch:
	scripts/test_oldest_torch.sh
