"""The oldest torch and torchvision ohem_d2 runs on, checked when it is imported.

torch 2.4 is the first with ``torch.is_autocast_enabled(device_type)`` and
``torch.get_autocast_dtype(device_type)``, which the read-only pass uses to follow (and
re-enter) the training autocast; torchvision 0.19 is the release paired with it. Older versions
would fail deep inside a training step, so the import stops with the fix instead. setup.py
declares the same versions (a test keeps them equal), and ``make test-oldest-torch`` runs the
model-level tests on exactly these versions.
"""
import re

MIN_TORCH = (2, 4)
MIN_TORCHVISION = (0, 19)


def release(version):
    """(major, minor) of a version string such as '2.4.0+cu121' or '2.6.0a0+git1234'."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if not match:
        raise ValueError(f"cannot read a version number from {version!r}")
    return int(match.group(1)), int(match.group(2))


def check_versions(torch_version, torchvision_version):
    """Raise ImportError, saying what to install, if either version is older than the minimum."""
    for name, version, minimum in (("torch", torch_version, MIN_TORCH),
                                   ("torchvision", torchvision_version, MIN_TORCHVISION)):
        if release(version) < minimum:
            want = ".".join(map(str, minimum))
            raise ImportError(
                f"ohem_d2 needs {name} >= {want}, but {name} {version} is installed; install torch >= "
                f"{'.'.join(map(str, MIN_TORCH))} with the matching torchvision (>= "
                f"{'.'.join(map(str, MIN_TORCHVISION))}), e.g. pip install 'torch>={'.'.join(map(str, MIN_TORCH))}' "
                f"'torchvision>={'.'.join(map(str, MIN_TORCHVISION))}'"
            )
