"""A dataset check done once: its result kept on disk until one of the files it read changes.

Checking a large dataset reads the header of every image; running the same check again (the next
run of an experiment runner, every DDP process that needs the corrected image sizes) costs only
a ``stat`` of every file whose name, size and modification time went into the fingerprint.

One cache file per dataset location (annotation file and image folder), overwritten when the
files change, in ``$OHEM_D2_CACHE``, else ``$XDG_CACHE_HOME/ohem_d2``, else ``~/.cache/ohem_d2``.
"""
import hashlib
import json
import logging
import os
import stat
import tempfile
import time

import PIL
from PIL import ImageFile

logger = logging.getLogger(__name__)

# Bump when a check changes what it finds, so that results of the older code are not reused.
CHECK_VERSION = 2
# A cache file unused this long is deleted when another is written: datasets in temporary
# folders (tests, generated sets) would otherwise leave their files behind forever.
_UNUSED_SECONDS = 30 * 24 * 3600


class FileStamps:
    """Name, size and ``mtime_ns`` of the files a check reads, in the order it reads them."""

    def __init__(self, base):
        self.base = os.path.abspath(base)
        self.names = []
        self._digest = hashlib.sha256()

    def stat(self, name):
        """``os.stat`` of ``base/name`` (None if it is not a file), recorded in the fingerprint."""
        try:
            st = os.stat(os.path.join(self.base, name))
        except (OSError, ValueError):  # ValueError: a name with a NUL byte
            st = None
        if st is not None and not stat.S_ISREG(st.st_mode):
            st = None
        self.names.append(name)
        stamp = f"{st.st_size}:{st.st_mtime_ns}" if st else "-"
        self._digest.update(f"{name}\0{stamp}\n".encode("utf-8", "surrogateescape"))
        return st

    def digest(self):
        return self._digest.hexdigest()


def cached_check(kind, annotation_file, base, check):
    """``check(stamps)`` for the dataset of ``annotation_file`` and the files under ``base``, or
    its result from the cache if none of the files it stamped has changed since.

    ``check`` must stamp (``stamps.stat``) every file whose content its result depends on, and
    return something JSON can hold. Returns ``(result, from_cache)``.
    """
    try:
        st = os.stat(annotation_file)
    except OSError:
        st = None
    if st is None or not os.path.isdir(base):  # nothing to fingerprint, and the check is quick
        return _through_json(check(FileStamps(base))), False
    location = f"{kind}\0{os.path.abspath(annotation_file)}\0{os.path.abspath(base)}"
    path = os.path.join(cache_dir(), f"{kind}-{hashlib.sha256(location.encode()).hexdigest()[:32]}.json")
    inputs = {"annotation_file": [st.st_size, st.st_mtime_ns], "outcome_affecting": _environment()}

    entry = _read(path)
    if entry and entry.get("inputs") == inputs:
        stamps = FileStamps(base)
        for name in entry["files"]:
            stamps.stat(name)
        if stamps.digest() == entry["digest"]:
            _touch(path)
            return entry["result"], True

    stamps = FileStamps(base)
    result = _through_json(check(stamps))
    _write(path, {"inputs": inputs, "files": stamps.names, "digest": stamps.digest(), "result": result})
    return result, False


def cache_dir():
    """Where checks are cached: ``$OHEM_D2_CACHE``, else ``$XDG_CACHE_HOME/ohem_d2``, else
    ``~/.cache/ohem_d2``."""
    if os.environ.get("OHEM_D2_CACHE"):
        return os.environ["OHEM_D2_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ohem_d2")


def _through_json(result):
    # As it comes back from the cache, so that a fresh and a cached result are equal (lists,
    # string keys).
    return json.loads(json.dumps(result))


def _environment():
    # What else decides a result: this code, the Pillow that reads the headers, and whether PIL
    # decodes truncated files (a global switch that Detectron2's read_image obeys too).
    return [CHECK_VERSION, PIL.__version__, bool(ImageFile.LOAD_TRUNCATED_IMAGES)]


def _read(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write(path, entry):
    """Write ``entry`` to ``path`` atomically (concurrent runs see the old or the new file); a
    cache that cannot be written only costs the next check its speed."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(entry, f)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        _remove_unused(os.path.dirname(path))
    except OSError as e:
        logger.debug("dataset check not cached in %s: %s", path, e)


def _touch(path):
    try:
        os.utime(path)  # the modification time says when a cache file was last used
    except OSError:
        pass


def _remove_unused(directory):
    unused_since = time.time() - _UNUSED_SECONDS
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.endswith(".json") and entry.stat().st_mtime < unused_since:
                os.unlink(entry.path)
