"""ohem_d2.model_zoo: the configs found from the package, in a checkout and from a built wheel."""
import os
import shutil
import subprocess
import sys

import pytest

from ohem_d2 import model_zoo

from conftest import CONFIGS, REPO


def test_every_config_of_the_checkout_is_found_by_its_relative_path():
    for path in CONFIGS.rglob("*"):
        if path.suffix in (".yaml", ".py"):
            relative = str(path.relative_to(CONFIGS))
            assert os.path.samefile(model_zoo.get_config_file(relative), path)


def test_yaml_and_lazy_configs_load_and_an_unknown_name_lists_close_ones():
    cfg = model_zoo.get_config("COCO-Detection/faster_rcnn_R_50_FPN_1x_ohem.yaml")
    assert cfg.MODEL.ROI_HEADS.NAME == "OHEMROIHeads" and cfg.MODEL.OHEM.NMS_THRESH == 0.7
    lazy = model_zoo.get_config("common/models/mask_rcnn_fpn_ohem.py")
    assert lazy.model.roi_heads._target_.__name__ == "OHEMROIHeads"
    with pytest.raises(FileNotFoundError, match="did you mean COCO-Detection/faster_rcnn_R_50_FPN_1x_ohem.yaml"):
        model_zoo.get_config_file("COCO-Detection/faster_rcnn_R50_FPN_1x_ohem.yaml")


CHECK = """
import os, sys
import ohem_d2
from ohem_d2 import model_zoo
site = sys.argv[1]
assert ohem_d2.__file__.startswith(site), ohem_d2.__file__
path = model_zoo.get_config_file("COCO-Detection/faster_rcnn_R_50_FPN_1x_ohem.yaml")
assert os.path.realpath(path).startswith(site) and os.path.isfile(path), path
assert model_zoo.get_config("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_ohem.yaml").MODEL.MASK_ON
lazy = model_zoo.get_config("new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ_ohem.py")
assert lazy.model.roi_heads._target_.__name__ == "OHEMROIHeads"
print("found", path)
"""


def test_a_built_wheel_carries_the_configs(tmp_path):
    """Not the editable checkout: a wheel built from it, installed apart, used from elsewhere."""
    source = tmp_path / "source"  # built from a copy: a build leaves build/ and *.egg-info behind
    shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", "output", "datasets", "build", "*.egg-info", "__pycache__", "docs", ".whl", ".gpu_data"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("ohem_d2-*.whl")
    site = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                                str(wheel)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-2000:]
    done = subprocess.run([sys.executable, "-c", CHECK, str(site)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(site)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"found {site}" in done.stdout
