# The two set-up commands of the README. Run them inside the Python environment (virtualenv or
# conda) you train with; PYTHON picks another interpreter.
PYTHON ?= python3

.PHONY: install test

# Keeps a Detectron2 you already have (e.g. built from source with CUDA ops); otherwise installs
# Detectron2's pure-Python code from PyPI. Then ohem_d2 itself, editable, with pytest.
install:
	$(PYTHON) scripts/install_detectron2.py
	$(PYTHON) -m pip install -e ".[test]"

test:
	$(PYTHON) -m pytest -q tests
