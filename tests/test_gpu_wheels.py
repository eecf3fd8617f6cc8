"""The GPU machine's wheel folder: its final check, its pins, and re-use without the network."""
import importlib.util
import subprocess
import zipfile

import pytest
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import REPO

spec = importlib.util.spec_from_file_location("gpu_wheels", REPO / "scripts" / "gpu_wheels.py")
gpu_wheels = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_wheels)


def fake_wheel(folder, filename, requires=(), requires_python=None):
    """A tiny wheel: just a module and the METADATA the check reads."""
    name, version = filename.split("-")[:2]
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    lines += [f"Requires-Python: {requires_python}"] if requires_python else []
    lines += [f"Requires-Dist: {r}" for r in requires]
    path = folder / filename
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/__init__.py", "")
        z.writestr(f"{name}-{version}.dist-info/METADATA", "\n".join(lines) + "\n")
    return path


def check(folder, **kw):
    kw.setdefault("preinstalled", {"numpy", "pyyaml", "torch"})
    kw.setdefault("optional", {})
    return gpu_wheels.check_folder(folder, "3.12", **kw)


@pytest.mark.parametrize("filename", [
    "puremod-1.0-py3-none-any.whl",
    "puremod-1.0-py2.py3-none-any.whl",
    "abimod-1.0-cp312-abi3-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl",
    "abimod-1.0-cp38-abi3-manylinux_2_17_x86_64.whl",  # abi3 from an older CPython
    "extmod-1.0-cp312-cp312-manylinux_2_28_x86_64.whl",
    "extmod-1.0-cp312-cp312-manylinux1_x86_64.whl",
])
def test_tags_that_install_on_cp312_manylinux_x86_64(tmp_path, filename):
    fake_wheel(tmp_path, filename)
    assert check(tmp_path) == ([], [])


@pytest.mark.parametrize("filename", [
    "extmod-1.0-cp311-cp311-manylinux_2_17_x86_64.whl",  # another CPython
    "extmod-1.0-cp312-cp312-linux_x86_64.whl",  # a local build, not manylinux
    "extmod-1.0-cp312-cp312-manylinux_2_34_x86_64.whl",  # a newer glibc than downloads allow
    "extmod-1.0-cp312-cp312-manylinux_2_17_aarch64.whl",
    "extmod-1.0-cp312-cp312-macosx_11_0_x86_64.whl",
    "extmod-1.0-py2-none-any.whl",
])
def test_tags_that_do_not(tmp_path, filename):
    fake_wheel(tmp_path, filename)
    problems, _ = check(tmp_path)
    assert len(problems) == 1 and "do not install on CPython 3.12" in problems[0]


def test_requirements_met_by_the_folder_or_the_machine(tmp_path):
    fake_wheel(tmp_path, "app-1.0-py3-none-any.whl", requires=[
        "lib>=1.0,<2", "NumPy", "PyYAML>=5.1", "dataclasses; python_version < '3.7'",
        "pywin32; sys_platform == 'win32'", "shapely; extra == 'all'"])
    fake_wheel(tmp_path, "lib-1.5+local-py3-none-any.whl", requires_python=">=3.10")
    assert check(tmp_path, roots=["app", "torch>=1.13"]) == ([], [])


def test_a_requirement_found_nowhere_is_reported(tmp_path):
    fake_wheel(tmp_path, "app-1.0-py3-none-any.whl", requires=["numpy", "missing-lib>=2"])
    problems, _ = check(tmp_path, roots=["app", "other-missing"])
    assert len(problems) == 2
    assert problems[0].startswith("app-1.0-py3-none-any.whl needs missing-lib>=2, which is neither")
    assert problems[1].startswith("ohem_d2 (setup.py) needs other-missing, which is neither")


def test_wrong_version_python_preinstalled_and_duplicates_are_reported(tmp_path):
    fake_wheel(tmp_path, "app-1.0-py3-none-any.whl", requires=["lib>=2"], requires_python=">=3.13")
    fake_wheel(tmp_path, "lib-1.0-py3-none-any.whl")
    fake_wheel(tmp_path, "lib-1.1-py3-none-any.whl")
    fake_wheel(tmp_path, "numpy-2.0-cp312-cp312-manylinux_2_17_x86_64.whl")
    problems = "\n".join(check(tmp_path)[0])
    assert "needs Python >=3.13" in problems
    assert "app-1.0-py3-none-any.whl needs lib>=2, but the folder has lib-1.0-py3-none-any.whl" in problems
    assert "two versions stop the install" in problems
    assert "numpy is preinstalled on the GPU machine" in problems


def test_an_optional_requirement_is_a_note(tmp_path):
    fake_wheel(tmp_path, "app-1.0-py3-none-any.whl", requires=["black"])
    problems, notes = check(tmp_path, optional={"black": "formatting only"})
    assert problems == [] and notes == ["app-1.0-py3-none-any.whl lists black, not carried on purpose: formatting only"]


def test_pins_are_exact_unique_and_not_on_the_gpu_machine():
    names = [canonicalize_name(p.name) for p in gpu_wheels.PINS]
    assert len(names) == len(set(names))
    assert not set(names) & gpu_wheels.PREINSTALLED
    assert {"torch", "torchvision", "numpy", "pillow", "pyyaml", "matplotlib"} <= gpu_wheels.PREINSTALLED
    assert "detectron2" not in names  # repacked separately, see install_detectron2.py
    for pin in gpu_wheels.PINS:
        Version(pin.version)  # a single exact version
    assert not set(map(canonicalize_name, gpu_wheels.OPTIONAL)) & set(names)


def test_the_projects_own_requirements_are_read_from_setup_py():
    roots = gpu_wheels.project_requirements()
    assert any(r.startswith("detectron2") for r in roots) and any(r.startswith("fvcore") for r in roots)


def test_wheels_in_the_folder_are_reused_and_stale_ones_replaced(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("pip was run although the wheel was there")
    monkeypatch.setattr(subprocess, "run", no_network)
    pin = gpu_wheels.Pin("yacs", "0.1.8", sdist=False)
    there = fake_wheel(tmp_path, "yacs-0.1.8-py3-none-any.whl")
    assert gpu_wheels.ensure_pin(pin, tmp_path) == there

    installer = gpu_wheels._load_detectron2_installer()
    repacked = fake_wheel(tmp_path, gpu_wheels.detectron2_wheel_name(installer))
    stale = fake_wheel(tmp_path, "detectron2-0.6-py3-none-any.whl")
    monkeypatch.setattr(installer, "download_source_wheel", no_network)
    assert gpu_wheels.ensure_detectron2(tmp_path, installer) == repacked and not stale.exists()


def test_a_failed_download_stops_with_one_line(tmp_path, monkeypatch):
    fake_wheel(tmp_path, "iopath-0.1.8-py3-none-any.whl")  # another version than the pin: replaced
    failed = subprocess.CompletedProcess([], 1, stdout="", stderr=(
        "ERROR: Could not find a version that satisfies the requirement iopath==0.1.9\n"
        "ERROR: No matching distribution found for iopath==0.1.9\n"))
    monkeypatch.setattr(subprocess, "run", lambda *a, **kw: failed)
    with pytest.raises(SystemExit) as exit_:
        gpu_wheels.ensure_pin(gpu_wheels.Pin("iopath", "0.1.9", sdist=False), tmp_path)
    message = str(exit_.value.code)
    assert "\n" not in message and message.startswith("error: could not download iopath==0.1.9")
    assert "No matching distribution found" in message and "re-run" in message
    assert list(tmp_path.iterdir()) == []  # the stale wheel went, and no scratch folder is left


def test_the_install_line():
    assert gpu_wheels.INSTALL_LINE.format(folder=gpu_wheels.folder_for_install_line(gpu_wheels.DEFAULT_OUT)) == (
        "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
        "--target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD")
