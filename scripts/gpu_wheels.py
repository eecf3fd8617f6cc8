#!/usr/bin/env python
"""Build the folder of wheels (default ``.whl/``) that an offline GPU machine installs to run ohem_d2.

The GPU machine is x86-64 Linux with CPython 3.12, torch 2.11 and torchvision 0.26 and a long
list of common packages already installed (PREINSTALLED below), and it has no network. What
it lacks travels as wheels in this folder:

* the pinned packages in PINS, downloaded as cp312 manylinux x86_64 wheels (``pip download
  --no-deps --only-binary=:all:``), or, for the two that PyPI ships only as source
  distributions, built here as pure-Python wheels (``pip wheel --no-deps``);
* Detectron2's Python code, repacked by scripts/install_detectron2.py from PyPI's
  ``sal-detectron2`` wheel as ``detectron2-<version>+purepython-py3-none-any.whl``.

Re-running reuses every wheel already in the folder and replaces a pinned package's wheel
of another version. The script ends by checking the folder (each wheel's tags install on
cp312 manylinux x86_64; every Requires-Dist, and ohem_d2's own install_requires, is met by
the folder or by the GPU machine's preinstalled packages; no package twice; none that the
GPU machine already has), lists it with its size, and prints the line that installs it there.
``--check`` runs only that final check on an existing folder.
"""
import argparse
import ast
import email.parser
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import namedtuple
from pathlib import Path

try:
    from packaging.markers import default_environment
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.tags import compatible_tags, cpython_tags
    from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
    from packaging.version import Version
except ImportError:  # pip always carries a copy
    from pip._vendor.packaging.markers import default_environment
    from pip._vendor.packaging.requirements import InvalidRequirement, Requirement
    from pip._vendor.packaging.specifiers import SpecifierSet
    from pip._vendor.packaging.tags import compatible_tags, cpython_tags
    from pip._vendor.packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
    from pip._vendor.packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / ".whl"
DEFAULT_PYTHON = "3.12"

Pin = namedtuple("Pin", "name version sdist")  # sdist: PyPI has no wheel of it; build one here
# The same versions as the CPU test environment, where they pass the test suite together.
PINS = [
    # Detectron2 asks for >=0.1.5,<0.1.6; every fvcore release is an sdist (pure Python).
    Pin("fvcore", "0.1.5.post20221221", sdist=True),
    # Detectron2 asks for <0.1.10 (and 0.1.10 is sdist-only).
    Pin("iopath", "0.1.9", sdist=False),
    Pin("yacs", "0.1.8", sdist=False),
    Pin("termcolor", "3.3.0", sdist=False),
    # A cp312-abi3 manylinux wheel, built against NumPy 2 (the GPU machine has NumPy 2.x).
    Pin("pycocotools", "2.0.11", sdist=False),
    # Detectron2 and hydra-core 1.3 both ask for <2.4.
    Pin("omegaconf", "2.3.1", sdist=False),
    Pin("hydra-core", "1.3.8", sdist=False),
    # omegaconf 2.3 and hydra-core 1.3 ask for ==4.9.*, which PyPI has only as an sdist (pure Python).
    Pin("antlr4-python3-runtime", "4.9.3", sdist=True),
]

# Requirements not carried on purpose: name -> why. They are reported, not treated as missing.
OPTIONAL = {
    # black (with its own platformdirs and pytokens) would add ~2.5 MB.
    "black": "only detectron2's LazyConfig.to_py imports it, to pretty-print lazy configs; "
             "ohem_d2 uses yacs configs",
}

# The GPU machine's image ('cuda'), package names as read on 2026-11-17 (the workplace's
# KINDS.md, "Python packages already there"). Versions are not known here and not checked.
PREINSTALLED = frozenset(canonicalize_name(n) for n in """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops
equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio
h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig
interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas
pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow
pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark
pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex
requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn
sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision
tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop
wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())

# `pip download` accepts exactly these platform tags; the check below accepts what they cover.
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]
MAX_GLIBC_MINOR = 28
# The folder travels inside the working tree, which may be at most 64 MiB in all.
SIZE_LIMIT = 32 * 2 ** 20

INSTALL_LINE = ("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
                "--target /tmp/site {folder}/*.whl && export PYTHONPATH=/tmp/site:$PWD")


def _load_detectron2_installer():
    spec = importlib.util.spec_from_file_location("install_detectron2", Path(__file__).with_name("install_detectron2.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def detectron2_wheel_name(installer):
    return f"detectron2-{installer.TARGET_VERSION}-py3-none-any.whl"


# --------------------------------------------------------------------------- the final check

def python_tuple(python_version):
    major, minor = python_version.split(".")[:2]
    return int(major), int(minor)


def supported_tags(python_version=DEFAULT_PYTHON, max_glibc_minor=MAX_GLIBC_MINOR):
    """The wheel tags a CPython ``python_version`` on manylinux x86-64 (glibc 2.<max>) installs."""
    version = python_tuple(python_version)
    platforms = [f"manylinux_2_{minor}_x86_64" for minor in range(max_glibc_minor, 4, -1)]
    # The legacy names of manylinux_2_17, 2_12 and 2_5.
    platforms += [p for p, minor in [("manylinux2014_x86_64", 17), ("manylinux2010_x86_64", 12),
                                      ("manylinux1_x86_64", 5)] if minor <= max_glibc_minor]
    interpreter = f"cp{version[0]}{version[1]}"
    tags = set(cpython_tags(version, abis=[interpreter], platforms=platforms))
    tags |= set(compatible_tags(version, interpreter=interpreter, platforms=platforms))
    return tags


def target_environment(python_version=DEFAULT_PYTHON):
    """Marker variables of the GPU machine, for evaluating Requires-Dist markers."""
    env = dict(default_environment())
    version = python_tuple(python_version)
    env.update(python_version=f"{version[0]}.{version[1]}", python_full_version=f"{version[0]}.{version[1]}.0",
               implementation_name="cpython", implementation_version=f"{version[0]}.{version[1]}.0",
               platform_python_implementation="CPython", sys_platform="linux", platform_system="Linux",
               platform_machine="x86_64", os_name="posix", extra="")
    return env


def read_metadata(wheel):
    """The METADATA of a wheel file, as an email message."""
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
        if len(names) != 1:
            raise ValueError(f"{len(names)} .dist-info/METADATA files")
        return email.parser.Parser().parsestr(z.read(names[0]).decode("utf-8"))


def project_requirements(setup_py=REPO / "setup.py"):
    """ohem_d2's own ``install_requires``, read from setup.py without running it."""
    tree = ast.parse(Path(setup_py).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            return list(ast.literal_eval(node.value))
    raise ValueError(f"no literal install_requires in {setup_py}")


def check_folder(folder, python_version=DEFAULT_PYTHON, preinstalled=PREINSTALLED, optional=OPTIONAL,
                 roots=(), max_glibc_minor=MAX_GLIBC_MINOR):
    """Check that the wheels in ``folder`` install and import on the GPU machine.

    ``roots`` are requirements of the code run from the working tree (ohem_d2's own).
    Returns ``(problems, notes)``, lists of one-line strings; no problems means ready.
    """
    problems, notes = [], []
    tags_ok = supported_tags(python_version, max_glibc_minor)
    env = target_environment(python_version)
    target = Version(env["python_full_version"])
    where = f"CPython {python_version} manylinux_2_{max_glibc_minor} x86_64"

    found = {}  # canonical name -> (version, file name, metadata)
    for path in sorted(Path(folder).glob("*.whl")):
        try:
            name, version, _, tags = parse_wheel_filename(path.name)
        except InvalidWheelFilename as e:
            problems.append(f"{path.name}: not a valid wheel file name ({e})")
            continue
        if not tags & tags_ok:
            problems.append(f"{path.name}: its tags ({', '.join(sorted(map(str, tags)))}) "
                            f"do not install on {where}")
        try:
            metadata = read_metadata(path)
        except (zipfile.BadZipFile, ValueError, UnicodeDecodeError) as e:
            problems.append(f"{path.name}: unreadable wheel ({e}); delete it and re-run")
            continue
        requires_python = metadata.get("Requires-Python")
        if requires_python and not SpecifierSet(requires_python).contains(target, prereleases=True):
            problems.append(f"{path.name}: needs Python {requires_python}, the GPU machine has {python_version}")
        if name in preinstalled:
            problems.append(f"{path.name}: {name} is preinstalled on the GPU machine; a second copy "
                            "can break the install or shadow it: remove it from the folder")
        if name in found:
            problems.append(f"{path.name}: {name} is already in the folder as {found[name][1]}; "
                            "two versions stop the install: remove one")
            continue
        found[name] = (version, path.name, metadata)

    def require(requirer, text):
        try:
            req = Requirement(text)
        except InvalidRequirement as e:
            problems.append(f"{requirer}: unparsable requirement {text!r} ({e})")
            return
        if req.marker is not None and not req.marker.evaluate(env):
            return
        name = canonicalize_name(req.name)
        if name in found:
            version, filename = found[name][:2]
            if not req.specifier.contains(version, prereleases=True):
                problems.append(f"{requirer} needs {text}, but the folder has {filename}")
        elif name in preinstalled:
            pass  # the GPU machine's version is not known here
        elif name in optional:
            notes.append(f"{requirer} lists {req.name}, not carried on purpose: {optional[name]}")
        else:
            problems.append(f"{requirer} needs {text}, which is neither in the folder nor preinstalled "
                            "on the GPU machine: pin it in scripts/gpu_wheels.py")

    for name, (version, filename, metadata) in found.items():
        for text in metadata.get_all("Requires-Dist") or []:
            require(filename, text)
    for text in roots:
        require("ohem_d2 (setup.py)", text)
    return problems, notes


# --------------------------------------------------------------------------- building the folder

def fail(what, why, how):
    """Stop with one line: what failed, why, and how to go on."""
    sys.exit(f"error: {what}: {why}; {how}")


def pip_error(result):
    """The most telling line of a failed pip run."""
    lines = [l.strip() for l in (result.stderr + "\n" + result.stdout).splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("ERROR")]
    return (errors or lines or [f"pip exited with status {result.returncode}"])[-1]


def wheels_of(folder, name):
    """``{Version: Path}`` of the wheels of project ``name`` in ``folder``."""
    out = {}
    for path in Path(folder).glob("*.whl"):
        try:
            wheel_name, version, _, _ = parse_wheel_filename(path.name)
        except InvalidWheelFilename:
            continue
        if wheel_name == canonicalize_name(name):
            out[version] = path
    return out


def _usable(path):
    return zipfile.is_zipfile(path)


def pip_command(pin, dest, python_version):
    if pin.sdist:
        return [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-binary", pin.name,
                "-w", str(dest), f"{pin.name}=={pin.version}"]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--python-version", python_version, "--implementation", "cp"]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    return command + ["-d", str(dest), f"{pin.name}=={pin.version}"]


def ensure_pin(pin, folder, python_version=DEFAULT_PYTHON):
    """Put the wheel of ``pin`` into ``folder``, reusing one already there. Returns its path."""
    folder = Path(folder)
    wanted = Version(pin.version)
    for version, path in wheels_of(folder, pin.name).items():
        if version == wanted and _usable(path):
            print(f"  reuse     {path.name}")
            return path
        why = "unreadable" if version == wanted else f"the pin is {pin.version}"
        print(f"  remove    {path.name} ({why})")
        path.unlink()
    verb = "build" if pin.sdist else "download"
    # Into a scratch folder first, so an interrupted run leaves no half-written wheel behind.
    with tempfile.TemporaryDirectory(prefix=".partial-", dir=folder) as tmp:
        result = subprocess.run(pip_command(pin, tmp, python_version), capture_output=True, text=True)
        made = sorted(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or len(made) != 1:
            fail(f"could not {verb} {pin.name}=={pin.version} for CPython {python_version} manylinux x86_64",
                 pip_error(result) if result.returncode else f"pip left {len(made)} wheels",
                 "check that PyPI is reachable and the pin exists "
                 f"(pip index versions {pin.name}), fix PINS if needed, then re-run: "
                 "wheels already in the folder are kept")
        path = folder / made[0].name
        os.replace(made[0], path)
    print(f"  {verb:9} {path.name}")
    return path


def ensure_detectron2(folder, installer=None):
    """Put the repacked pure-Python Detectron2 wheel into ``folder``, reusing one already there."""
    installer = installer or _load_detectron2_installer()
    folder = Path(folder)
    path = folder / detectron2_wheel_name(installer)
    for other in wheels_of(folder, "detectron2").values():
        if other != path or not _usable(other):
            print(f"  remove    {other.name} ({'unreadable' if other == path else 'the wanted one is ' + path.name})")
            other.unlink()
    if path.exists():
        print(f"  reuse     {path.name}")
        return path
    with tempfile.TemporaryDirectory(prefix=".partial-", dir=folder) as tmp:
        try:
            source = installer.download_source_wheel(tmp)
        except subprocess.CalledProcessError as e:
            fail(f"could not download {installer.SOURCE_DIST}=={installer.SOURCE_VERSION} (Detectron2's code)",
                 f"pip exited with status {e.returncode} (its message is above)",
                 "check that PyPI is reachable, then re-run: wheels already in the folder are kept")
        built = installer.build_pure_python_wheel(source, tmp)
        os.replace(built, path)
    print(f"  repack    {path.name} (from {installer.SOURCE_DIST}=={installer.SOURCE_VERSION})")
    return path


def folder_for_install_line(folder):
    folder = Path(folder).resolve()
    try:
        return folder.relative_to(REPO.resolve()).as_posix()
    except ValueError:
        return str(folder)


def list_folder(folder):
    wheels = sorted(Path(folder).glob("*.whl"))
    total = sum(p.stat().st_size for p in wheels)
    print(f"\n{folder}: {len(wheels)} wheels")
    for p in wheels:
        print(f"  {p.stat().st_size / 1024:9.1f} KiB  {p.name}")
    print(f"  total {total / 2 ** 20:.2f} MiB (limit {SIZE_LIMIT / 2 ** 20:.0f} MiB)")
    return total


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="the wheel folder (default: .whl in the repo)")
    parser.add_argument("--python-version", default=DEFAULT_PYTHON, help="the GPU machine's Python (default 3.12)")
    parser.add_argument("--check", action="store_true", help="only check an existing folder")
    args = parser.parse_args(argv)
    folder = Path(args.out)

    if not args.check:
        folder.mkdir(parents=True, exist_ok=True)
        for leftover in folder.glob(".partial-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        print(f"Wheels for CPython {args.python_version} manylinux x86_64 into {folder}:")
        for pin in PINS:
            ensure_pin(pin, folder, args.python_version)
        ensure_detectron2(folder)
    elif not folder.is_dir():
        fail(f"no folder {folder}", "nothing to check", "build it first: python scripts/gpu_wheels.py")

    try:
        roots = project_requirements()
    except (OSError, SyntaxError, ValueError) as e:
        roots = []
        print(f"note: ohem_d2's own requirements not checked ({e})")
    total = list_folder(folder)
    problems, notes = check_folder(folder, args.python_version, roots=roots)
    if total > SIZE_LIMIT:
        problems.append(f"the folder holds {total / 2 ** 20:.1f} MiB, over {SIZE_LIMIT / 2 ** 20:.0f} MiB: "
                        "it travels inside the working tree (64 MiB at most)")
    for note in notes:
        print(f"note: {note}")
    if problems:
        print(f"\n{len(problems)} problem(s): the GPU machine could not use this folder as it is:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    print(f"\nCheck passed: every wheel installs on CPython {args.python_version} manylinux x86_64 and every "
          "requirement is in the folder or preinstalled there.")
    where = folder_for_install_line(folder)
    if os.path.isabs(where):
        print(f"note: {folder} is outside the repository, which is all that reaches the GPU machine: "
              "build into .whl (the default) to send it")
    print("On the GPU machine, from the repository root (the folder is git-ignored: carry it along):")
    print(INSTALL_LINE.format(folder=where))
    return 0


if __name__ == "__main__":
    sys.exit(main())
