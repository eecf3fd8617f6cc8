#!/usr/bin/env bash
# The CPU test suite on the oldest torch and torchvision that ohem_d2 declares
# (ohem_d2/requirements.py, setup.py), in a virtual environment of their own: what keeps that
# minimum true. Downloads torch's CUDA build (about 3 GB) the first time; the environment is kept
# in $OLDEST_TORCH_VENV (default output/venv_oldest_torch) and reused.
#   scripts/test_oldest_torch.sh             # or: make test-oldest-torch
#   scripts/test_oldest_torch.sh --dry-run   # print the versions it would install
set -euo pipefail
cd "$(dirname "$0")/.."
versions=$(python3 - <<'PY'
import ast
tree = ast.parse(open("ohem_d2/requirements.py").read())
found = {t.id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
         for t in node.targets if isinstance(t, ast.Name)}
print("torch==%d.%d.0 torchvision==%d.%d.0" % (*found["MIN_TORCH"], *found["MIN_TORCHVISION"]))
PY
)
if [ "${1:-}" = "--dry-run" ]; then echo "$versions"; exit 0; fi
venv="${OLDEST_TORCH_VENV:-output/venv_oldest_torch}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
constraints="$(mktemp)"
tr ' ' '\n' <<<"$versions" >"$constraints"
export PIP_CONSTRAINT="$constraints"  # also holds for the pip calls of install_detectron2.py
"$venv/bin/python" -m pip install -q $versions
"$venv/bin/python" scripts/install_detectron2.py
"$venv/bin/python" -m pip install -q -e ".[test]"
"$venv/bin/python" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests
