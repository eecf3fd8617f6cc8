"""tools/check_datasets.py: the pre-training check alone, with its warnings, errors and timings."""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from conftest import CONFIGS, FPN_OHEM, REPO


@pytest.fixture(autouse=True)
def check_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OHEM_D2_CACHE", str(tmp_path / "check_cache"))


def write_coco(root, boxes):
    os.makedirs(root / "images")
    Image.new("RGB", (40, 30)).save(root / "images" / "a.jpg")
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30}],
            "categories": [{"id": 1, "name": "thing"}],
            "annotations": [{"id": i + 1, "image_id": 1, "bbox": b, "category_id": 1} for i, b in enumerate(boxes)]}
    (root / "train.json").write_text(json.dumps(coco))
    return [str(root / "train.json"), str(root / "images")]


def run(tmp_path, name, boxes):
    """tools/check_datasets.py on a one-image COCO dataset with ``boxes``, as a user runs it."""
    return subprocess.run([sys.executable, str(REPO / "tools" / "check_datasets.py"), "--config-file",
                           str(CONFIGS / FPN_OHEM), "--register-coco", name, *write_coco(tmp_path, boxes),
                           "DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", "()", "MODEL.ROI_HEADS.NUM_CLASSES", "1"],
                          capture_output=True, text=True, timeout=300)


def test_warnings_and_the_time_of_a_cold_and_a_cached_check(tmp_path):
    done = run(tmp_path, "t_tool_warn", [[2, 2, 10, 10], [2, 2, 0, 10]])
    out = done.stdout
    assert done.returncode == 0, done.stderr[-2000:]
    warnings = [line for line in out.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "zero width or height" in warnings[0]
    assert "dataset 't_tool_warn': 1 images checked in" in out and "s per 1000), from their headers" in out
    assert "unchanged since the last check (cached)" in out
    assert " s: t_tool_warn (1 images); no problem stops the run, 1 warning(s)" in out
    assert "no problem stops the run (1 warning(s)); checked in" in out and "again from the cache in" in out


def test_a_stopping_problem_is_one_error_and_exit_status_1(tmp_path):
    done = run(tmp_path, "t_tool_stop", [[2, 2, float("nan"), 10]])
    assert done.returncode == 1 and "Traceback" not in done.stderr
    error = done.stderr[done.stderr.index("error: "):]
    assert error.startswith("error: 1 dataset(s) of this run cannot be used:") and "NaN or infinite coordinate" in error
    assert "checked in" in done.stdout
