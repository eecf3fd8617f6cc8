"""Shared helpers: small configs, hand-made proposals, the coco128 location, and ``--device``.

``pytest --device cuda`` (``make test-gpu``) runs the model-level tests (those marked ``model``)
on the GPU and deselects the rest; without a GPU they are skipped with the reason. The helpers
below build tensors, configs and heads on ``device()``, the CPU by default.
"""
import os
import tempfile
from pathlib import Path

import pytest
import torch

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances

from ohem_d2 import add_ohem_config

# The dataset check's cache (ohem_d2/data/scan_cache.py) of this test session, also for the tools the
# tests start: a clean one, and none left in the user's ~/.cache.
os.environ.setdefault("OHEM_D2_CACHE", tempfile.mkdtemp(prefix="ohem_d2_test_cache_"))

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
COCO128 = Path(os.environ.get("OHEM_D2_COCO128", REPO.parent / "shared" / "data" / "coco128"))

FPN_OHEM = "COCO-Detection/faster_rcnn_R_50_FPN_1x_ohem.yaml"
C4_OHEM = "COCO-Detection/faster_rcnn_R_50_C4_1x_ohem.yaml"
MASK_OHEM = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_ohem.yaml"

_SESSION = {"device": "cpu"}


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", choices=("cpu", "cuda"),
                     help="where the model-level tests (marker 'model') run; with cuda only they run")


def pytest_configure(config):
    config.addinivalue_line("markers", "model: a model-level test that runs on --device (cpu or cuda)")
    _SESSION["device"] = config.getoption("--device")
    if device() == "cuda":
        # The tests compare fp32 computations that must agree (two-pass against loss-zeroing
        # gradients, chunked against whole passes); TF32, which cuDNN uses for fp32 convolutions by
        # default, rounds products to 10 mantissa bits, differently for different batch sizes.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def pytest_collection_modifyitems(config, items):
    if device() == "cpu":
        return
    selected = [item for item in items if item.get_closest_marker("model")]
    config.hook.pytest_deselected(items=[item for item in items if item not in selected])
    items[:] = selected
    if not torch.cuda.is_available():
        reason = (f"--device cuda: no CUDA device (torch {torch.__version__}, "
                  f"torch.cuda.is_available() is False); run without --device for the CPU suite")
        for item in items:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _forget_datasets_the_test_registered():
    """Dataset names are process-wide in Detectron2, and the tests register the same names
    (``synthetic_train``, ...) for their own temporary folders: each test starts with the names
    registered before it."""
    before = set(DatasetCatalog.list())
    yield
    for name in set(DatasetCatalog.list()) - before:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


@pytest.fixture(scope="module", autouse=True)
def _checkpoints_removed_after_the_module(tmp_path_factory):
    """The suite trains dozens of models and their checkpoints (50-100 MB each) would outgrow a small
    CI disk: once a module's tests are done, no test reads its checkpoints again, so they go (logs,
    metrics and configs stay for a failure's post-mortem). With ``tmp_path_retention_policy = failed``
    (setup.cfg) a passing test's own folder goes as soon as it ends."""
    yield
    for checkpoint in tmp_path_factory.getbasetemp().rglob("*.pth"):
        checkpoint.unlink()


def device():
    """The device of the model-level tests: ``--device``, the CPU by default."""
    return _SESSION["device"]


# A ResNet-18 at ~128 px: the same code paths as the configs' R-50, at CPU-test cost.
TINY = [
    "MODEL.WEIGHTS", "",
    "MODEL.DEVICE", "cpu",
    "MODEL.RESNETS.DEPTH", 18,
    "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", 200,
    "MODEL.RPN.POST_NMS_TOPK_TEST", 100,
    "INPUT.MIN_SIZE_TRAIN", (128,),
    "INPUT.MAX_SIZE_TRAIN", 192,
    "INPUT.MIN_SIZE_TEST", 128,
    "INPUT.MAX_SIZE_TEST", 192,
    "SOLVER.IMS_PER_BATCH", 2,
    "DATALOADER.NUM_WORKERS", 0,
]


def load_cfg(config_file, opts=(), tiny=True):
    """A config from ``configs/`` with OHEM keys added, weights off, on ``device()``."""
    cfg = get_cfg()
    add_ohem_config(cfg)
    cfg.merge_from_file(str(CONFIGS / config_file))
    cfg.merge_from_list((TINY if tiny else ["MODEL.WEIGHTS", ""]) + ["MODEL.DEVICE", device()] + list(opts))
    return cfg


def require_coco128():
    if not (COCO128 / "annotations" / "instances_train2017.json").is_file():
        pytest.skip(f"real-image tests need {COCO128} (the shared coco128 folder); it is absent here")
    return COCO128


def instances(image_size, boxes, **fields):
    """Instances of one image on ``device()`` with ``proposal_boxes`` (or other Boxes fields) from lists."""
    inst = Instances(image_size)
    for name, value in {"proposal_boxes": boxes, **fields}.items():
        if value is None:
            continue
        if name.endswith("boxes"):
            value = Boxes(torch.as_tensor(value, dtype=torch.float32).reshape(-1, 4))
        else:
            value = torch.as_tensor(value)
        inst.set(name, value)
    return inst.to(device())


def random_fpn_features(num_images=2, size=64, channels=256, seed=0):
    """Random p2..p6 FPN features (on ``device()``) for ``num_images`` images of ``size`` x ``size``."""
    g = torch.Generator().manual_seed(seed)
    return {
        f"p{level}": torch.randn(num_images, channels, size // 2**level, size // 2**level, generator=g).to(device())
        for level in range(2, 7)
    }


def random_proposals(num_images=2, num=40, size=64, seed=0):
    """Random proposals (with objectness, on ``device()``) in ``size`` x ``size`` images."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_images):
        xy = torch.rand(num, 2, generator=g) * (size - 16)
        wh = 6 + torch.rand(num, 2, generator=g) * (size / 2)
        boxes = torch.cat([xy, (xy + wh).clamp(max=size)], dim=1)
        out.append(instances((size, size), boxes, objectness_logits=torch.rand(num, generator=g)))
    return out
