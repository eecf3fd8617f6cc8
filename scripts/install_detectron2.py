#!/usr/bin/env python
"""Make sure the running Python has a Detectron2, without ever replacing one.

Detectron2 is not published on PyPI; its official install builds it from GitHub.
This script therefore

* keeps any Detectron2 that already imports (for example one built from source
  with its CUDA ops): it prints where it lives and exits;
* otherwise downloads PyPI's ``sal-detectron2`` wheel (pinned by version and
  SHA-256), which carries upstream Detectron2's Python code, drops its compiled
  ``_C`` extension (built for CPython 3.10 and another torch, so it cannot load
  here) and the unrelated top-level ``tools`` package, and installs the rest as
  a proper wheel named ``detectron2``, so that ``pip show detectron2`` and
  ``importlib.metadata`` see it and pip resolves its dependencies.

Without ``_C`` Detectron2 lacks rotated boxes, deformable convolution and the
fast COCO evaluator (it falls back to pycocotools' own); ohem_d2 needs none.
"""
import argparse
import base64
import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile

SOURCE_DIST = "sal-detectron2"
SOURCE_VERSION = "0.7.2"
SOURCE_SHA256 = "491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561"
# PEP 440 local label: says this is upstream's Python code without the C extension.
TARGET_VERSION = SOURCE_VERSION + "+purepython"
# Upstream Detectron2's setup.py dependencies (the sal wheel omits fvcore and iopath
# and pins numpy<2, which upstream does not).
REQUIRES = [
    "Pillow>=7.1",
    "matplotlib",
    "pycocotools>=2.0.2",
    "termcolor>=1.1",
    "yacs>=0.1.8",
    "tabulate",
    "cloudpickle",
    "tqdm>4.29.0",
    "tensorboard",
    "fvcore>=0.1.5,<0.1.6",
    "iopath>=0.1.7,<0.1.10",
    "omegaconf>=2.1,<2.4",
    "hydra-core>=1.1",
    "black",
    "packaging",
    # detectron2.model_zoo imports pkg_resources (for its bundled configs), which setuptools
    # removed in 82 (Detectron2 issue 5494). Declared here, as a requirement of the code we
    # install, rather than patched out of upstream's code: pip then keeps a setuptools that has it.
    "setuptools<82",
]


def installed_detectron2():
    """Return the path of an importable Detectron2, or None."""
    spec = importlib.util.find_spec("detectron2")
    return os.path.dirname(spec.origin) if spec is not None and spec.origin else None


def download_source_wheel(dest):
    subprocess.check_call(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
         "--only-binary=:all:", "--python-version", "3.10", "-d", dest,
         f"{SOURCE_DIST}=={SOURCE_VERSION}"]
    )
    (name,) = [f for f in os.listdir(dest) if f.endswith(".whl")]
    path = os.path.join(dest, name)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != SOURCE_SHA256:
        sys.exit(f"error: {name} has SHA-256 {digest}, expected {SOURCE_SHA256}; refusing to install it.")
    return path


def _record_line(name, data):
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def build_pure_python_wheel(source_wheel, dest):
    """Repack the ``detectron2/`` package of ``source_wheel`` as ``detectron2-<ver>-py3-none-any.whl``."""
    dist_info = f"detectron2-{TARGET_VERSION}.dist-info"
    metadata = "\n".join(
        ["Metadata-Version: 2.1", "Name: detectron2", f"Version: {TARGET_VERSION}",
         "Summary: Detectron2's Python code (no _C extension), repacked from "
         f"{SOURCE_DIST}=={SOURCE_VERSION} by ohem_d2",
         "Home-page: https://github.com/facebookresearch/detectron2",
         "License: Apache-2.0", "Requires-Python: >=3.8"]
        + [f"Requires-Dist: {r}" for r in REQUIRES]
    ) + "\n"
    wheel_meta = "Wheel-Version: 1.0\nGenerator: ohem_d2\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    out = os.path.join(dest, f"detectron2-{TARGET_VERSION}-py3-none-any.whl")
    record = []
    with zipfile.ZipFile(source_wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            name = item.filename
            if not name.startswith("detectron2/") or name.endswith((".so", ".pyd")) or item.is_dir():
                continue
            data = src.read(item)
            dst.writestr(name, data)
            record.append(_record_line(name, data))
        for name, text in [(f"{dist_info}/METADATA", metadata), (f"{dist_info}/WHEEL", wheel_meta),
                           (f"{dist_info}/top_level.txt", "detectron2\n")]:
            dst.writestr(name, text)
            record.append(_record_line(name, text.encode()))
        record.append(f"{dist_info}/RECORD,,")
        dst.writestr(f"{dist_info}/RECORD", "\n".join(record) + "\n")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true",
                        help="install the pure-Python build even if a Detectron2 already imports")
    args = parser.parse_args()
    existing = installed_detectron2()
    if existing and not args.force:
        print(f"Detectron2 found at {existing}: keeping it.")
        if importlib.util.find_spec("pkg_resources") is None:
            print("note: its detectron2.model_zoo needs pkg_resources, which setuptools >= 82 no longer "
                  "has; to use model_zoo, pip install 'setuptools<82'")
        return
    with tempfile.TemporaryDirectory() as tmp:
        wheel = build_pure_python_wheel(download_source_wheel(tmp), tmp)
        subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", wheel])
    print(f"Installed detectron2 {TARGET_VERSION} (upstream Python code from {SOURCE_DIST}=={SOURCE_VERSION}, no _C).")


if __name__ == "__main__":
    main()
