"""The Detectron2 installer: repacks upstream's Python code as a proper `detectron2` wheel."""
import base64
import hashlib
import importlib.metadata
import importlib.util
import os
import zipfile

import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location("install_detectron2", REPO / "scripts" / "install_detectron2.py")
installer = importlib.util.module_from_spec(spec)
spec.loader.exec_module(installer)


def fake_source_wheel(path):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("detectron2/__init__.py", "__version__ = '0.7.2'\n")
        z.writestr("detectron2/layers/nms.py", "x = 1\n")
        z.writestr("detectron2/_C.cpython-310-x86_64-linux-gnu.so", b"\x7fELF")
        z.writestr("tools/train_net.py", "print('not ours')\n")
        z.writestr("sal_detectron2-0.7.2.dist-info/METADATA", "Name: sal-detectron2\n")
    return path


def test_repacked_wheel_is_detectron2_without_the_c_extension(tmp_path):
    wheel = installer.build_pure_python_wheel(fake_source_wheel(tmp_path / "src.whl"), str(tmp_path))
    assert wheel.endswith("detectron2-0.7.2+purepython-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        dist_info = "detectron2-0.7.2+purepython.dist-info"
        assert {"detectron2/__init__.py", "detectron2/layers/nms.py", f"{dist_info}/METADATA",
                f"{dist_info}/WHEEL", f"{dist_info}/RECORD"} <= names
        assert not any(n.endswith(".so") or n.startswith(("tools/", "sal_")) for n in names)
        metadata = z.read(f"{dist_info}/METADATA").decode()
        assert "Name: detectron2\n" in metadata and "Requires-Dist: fvcore>=0.1.5,<0.1.6" in metadata
        assert "Requires-Dist: setuptools<82" in metadata  # model_zoo imports pkg_resources
        # Every RECORD line hashes the file it names, as pip checks.
        for line in z.read(f"{dist_info}/RECORD").decode().splitlines():
            name, digest, size = line.split(",")
            if digest:
                data = z.read(name)
                expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                assert digest == f"sha256={expected}" and int(size) == len(data)


def test_an_importable_detectron2_is_kept(capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["install_detectron2.py"])
    monkeypatch.setattr(installer, "download_source_wheel", lambda dest: (_ for _ in ()).throw(AssertionError))
    installer.main()  # detectron2 imports in the test environment: nothing is downloaded
    assert "keeping it" in capsys.readouterr().out


def test_the_installed_detectron2_is_a_distribution():
    assert importlib.metadata.distribution("detectron2").metadata["Name"] == "detectron2"


def test_model_zoo_works_after_the_install():
    """The three model_zoo calls Detectron2 users make, offline: YAML path, LazyConfig, weights URL."""
    if "+purepython" not in importlib.metadata.version("detectron2"):
        pytest.skip("a Detectron2 of the user's own is installed: make install kept it as it is")
    from detectron2 import model_zoo

    path = model_zoo.get_config_file("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml")
    assert path.endswith("faster_rcnn_R_50_FPN_1x.yaml") and os.path.isfile(path)
    lazy = model_zoo.get_config("common/models/mask_rcnn_fpn.py")
    assert lazy.model.roi_heads.num_classes == 80
    yaml_cfg = model_zoo.get_config("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml", trained=True)
    url = model_zoo.get_checkpoint_url("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml")
    assert url.startswith("https://dl.fbaipublicfiles.com/detectron2/COCO-Detection/faster_rcnn_R_50_FPN_1x/")
    assert yaml_cfg.MODEL.WEIGHTS == url and url.endswith(".pkl")


def test_a_kept_detectron2_without_pkg_resources_gets_the_hint(capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["install_detectron2.py"])
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(installer.importlib.util, "find_spec",
                        lambda name, *a: None if name == "pkg_resources" else real_find_spec(name, *a))
    installer.main()
    assert "pip install 'setuptools<82'" in capsys.readouterr().out
