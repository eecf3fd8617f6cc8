"""The declared oldest torch/torchvision: one minimum in setup.py, the import check and the
oldest-torch script, and a clear message for an older torch."""
import re
import subprocess
import sys

import pytest

from ohem_d2.requirements import MIN_TORCH, MIN_TORCHVISION, check_versions, release

from conftest import REPO


def declared_minimum(package):
    text = (REPO / "setup.py").read_text()
    return tuple(int(x) for x in re.search(rf'"{package}>=(\d+)\.(\d+)"', text).groups())


def test_setup_py_declares_the_minimum_the_import_checks():
    assert declared_minimum("torch") == MIN_TORCH == (2, 4)
    assert declared_minimum("torchvision") == MIN_TORCHVISION == (0, 19)


def test_the_oldest_torch_script_installs_exactly_the_minimum():
    done = subprocess.run([str(REPO / "scripts" / "test_oldest_torch.sh"), "--dry-run"], capture_output=True,
                          text=True, timeout=60, check=True)
    assert done.stdout.split() == ["torch==2.4.0", "torchvision==0.19.0"]


@pytest.mark.parametrize("torch_version, vision_version", [
    ("2.4.0+cu121", "0.19.0+cu121"), ("2.11.0", "0.26.0"), ("2.10.0a0+git1234", "0.25.0"), ("3.0.0", "1.0.0"),
])
def test_supported_versions_pass(torch_version, vision_version):
    check_versions(torch_version, vision_version)


@pytest.mark.parametrize("torch_version, vision_version, named", [
    ("2.3.1", "0.18.1", "torch >= 2.4, but torch 2.3.1"),
    ("1.13.1+cu117", "0.14.1", "torch >= 2.4, but torch 1.13.1+cu117"),
    ("2.4.0", "0.18.0", "torchvision >= 0.19, but torchvision 0.18.0"),
])
def test_older_versions_are_refused_with_what_to_install(torch_version, vision_version, named):
    with pytest.raises(ImportError, match=re.escape(named)) as e:
        check_versions(torch_version, vision_version)
    assert "pip install 'torch>=2.4' 'torchvision>=0.19'" in str(e.value)


def test_release_compares_numbers_not_strings():
    assert release("2.10.1") == (2, 10) > (2, 4)


def test_import_stops_on_an_older_torch_with_the_message():
    code = "import torch; torch.__version__ = '2.3.1'; import ohem_d2"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode != 0
    assert "ImportError: ohem_d2 needs torch >= 2.4, but torch 2.3.1 is installed" in done.stderr
