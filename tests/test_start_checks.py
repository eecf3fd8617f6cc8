"""What the tools check before any worker starts, besides the datasets: the weights a run loads
(--eval-only with none, a path that does not exist), a ResNet trained from scratch with frozen
stages or FrozenBN, and, for a LazyConfig, the RoI heads' number of classes."""
import os
import subprocess
import sys

import pytest

from conftest import CONFIGS, FPN_OHEM, REPO, TINY
from ohem_d2.data.datasets import DatasetError
from ohem_d2.data.synthetic import generate_synthetic_dataset
from ohem_d2.engine import USER_ERRORS, build_config, exit_on, training_argument_parser
from ohem_d2.engine.lazy import LAZY_USER_ERRORS, build_lazy_config, lazy_argument_parser
from ohem_d2.engine.weights import WeightsError
from test_lazyconfig_tools import TINY_LAZY_CONFIG


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Three classes, two training images, one test image (32 px)."""
    return generate_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), num_train=2, num_val=1, image_size=32)


def yacs_args(synthetic, output, *extra, flags=()):
    return [*flags, "--config-file", str(CONFIGS / FPN_OHEM),
            "--register-coco", "start_train", synthetic.train_json, synthetic.train_images,
            *map(str, TINY), "MODEL.ROI_HEADS.NUM_CLASSES", "3", "DATASETS.TRAIN", "('start_train',)",
            "DATASETS.TEST", "()", "OUTPUT_DIR", str(output), *map(str, extra)]


def stop_line(args):
    """What tools/train_net.py says before launching any worker, as it says it."""
    with pytest.raises(SystemExit) as exit_info:
        exit_on(USER_ERRORS, build_config, training_argument_parser().parse_args(args))
    return str(exit_info.value)


def test_eval_only_without_weights_stops_before_anything_runs(synthetic, tmp_path):
    out = tmp_path / "eval"
    assert stop_line(yacs_args(synthetic, out, flags=["--eval-only"])) == (
        "error: --eval-only with no weights: MODEL.WEIGHTS is empty, so Detectron2 would evaluate a randomly "
        "initialised model; give the trained model, e.g. MODEL.WEIGHTS output/model_final.pth")
    assert stop_line(yacs_args(synthetic, out, flags=["--eval-only", "--resume"])) == (
        f"error: --eval-only with no weights: MODEL.WEIGHTS is empty and {out} has no checkpoint to resume from, so "
        "Detectron2 would evaluate a randomly initialised model; give the trained model, e.g. MODEL.WEIGHTS "
        "output/model_final.pth")
    # --resume evaluates the last checkpoint of OUTPUT_DIR, where there is one.
    out.mkdir()
    (out / "last_checkpoint").write_text("model_final.pth")
    build_config(training_argument_parser().parse_args(yacs_args(synthetic, out, flags=["--eval-only", "--resume"])))


@pytest.mark.parametrize("flags", [["--eval-only"], []])
def test_weights_that_do_not_exist_stop(synthetic, tmp_path, flags):
    assert stop_line(yacs_args(synthetic, tmp_path, "MODEL.WEIGHTS", "output/nope.pth", flags=flags)) == (
        f"error: MODEL.WEIGHTS output/nope.pth does not exist (relative to {os.getcwd()}); give the path of the "
        "checkpoint file, e.g. MODEL.WEIGHTS output/model_final.pth")
    # A URL is Detectron2's to fetch.
    build_config(training_argument_parser().parse_args(
        yacs_args(synthetic, tmp_path, "MODEL.WEIGHTS", "detectron2://ImageNetPretrained/MSRA/R-50.pkl", flags=flags)))


def test_the_tool_says_it_in_one_line_and_starts_nothing(synthetic, tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "tools" / "train_net.py"),
                           *yacs_args(synthetic, tmp_path / "eval", flags=["--eval-only"])],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        "error: --eval-only with no weights: MODEL.WEIGHTS is empty, so Detectron2 would evaluate a randomly "
        "initialised model; give the trained model, e.g. MODEL.WEIGHTS output/model_final.pth"]
    assert done.stdout == "" and not (tmp_path / "eval").exists()


def test_from_scratch_with_frozen_random_stages_and_frozen_bn_warns(synthetic, tmp_path, caplog):
    caplog.set_level("WARNING", logger="ohem_d2.engine.defaults")
    build_config(training_argument_parser().parse_args(yacs_args(synthetic, tmp_path)))  # TINY: MODEL.WEIGHTS ""
    assert [r.getMessage() for r in caplog.records if r.name == "ohem_d2.engine.defaults"] == [
        "warning: MODEL.WEIGHTS is empty (training from scratch) with MODEL.BACKBONE.FREEZE_AT 2: the randomly "
        "initialised stem and res2 of the backbone would stay frozen, never trained; set MODEL.BACKBONE.FREEZE_AT 0",
        "warning: MODEL.WEIGHTS is empty (training from scratch) with MODEL.RESNETS.NORM FrozenBN: frozen batch norm "
        "keeps the statistics of initialisation (mean 0, variance 1), which only pretrained weights replace, so the "
        "backbone trains unnormalised; use GroupNorm: MODEL.RESNETS.NORM GN MODEL.FPN.NORM GN",
    ]
    caplog.clear()
    build_config(training_argument_parser().parse_args(yacs_args(
        synthetic, tmp_path, "MODEL.BACKBONE.FREEZE_AT", 3, "MODEL.RESNETS.NORM", "GN", "MODEL.FPN.NORM", "GN")))
    (message,) = [r.getMessage() for r in caplog.records if r.name == "ohem_d2.engine.defaults"]
    assert "FREEZE_AT 3: the randomly initialised stem, res2 and res3 of the backbone" in message
    caplog.clear()
    for fixed in (["MODEL.BACKBONE.FREEZE_AT", 0, "MODEL.RESNETS.NORM", "GN"],
                  ["MODEL.WEIGHTS", "detectron2://ImageNetPretrained/MSRA/R-50.pkl"]):
        build_config(training_argument_parser().parse_args(yacs_args(synthetic, tmp_path, *fixed)))
    assert not [r for r in caplog.records if r.name == "ohem_d2.engine.defaults"]


def lazy_args(synthetic, tmp_path, *extra, flags=()):
    config = tmp_path / "tiny_ohem.py"
    config.write_text(TINY_LAZY_CONFIG)
    return lazy_argument_parser().parse_args([
        *flags, "--config-file", str(config), "--register-coco", "start_lazy", synthetic.train_json,
        synthetic.train_images, "dataloader.train.dataset.names=start_lazy", "dataloader.test.dataset.names=start_lazy",
        f"train.output_dir={tmp_path / 'out'}", *extra])


def test_a_lazy_config_checks_its_roi_heads_classes_and_its_weights(synthetic, tmp_path):
    with pytest.raises(DatasetError) as error:
        build_lazy_config(lazy_args(synthetic, tmp_path))
    assert ("it has 3 class(es), but model.roi_heads.num_classes is 80, its default (Detectron2's, for COCO), which "
            "the config leaves as it is: 77 of the model's output classes (ids 3-79) would never see an example; set "
            "model.roi_heads.num_classes=3") in str(error.value)
    build_lazy_config(lazy_args(synthetic, tmp_path, "model.roi_heads.num_classes=3"))
    with pytest.raises(WeightsError, match="^--eval-only with no weights: train.init_checkpoint is empty, so "):
        build_lazy_config(lazy_args(synthetic, tmp_path, "model.roi_heads.num_classes=3", flags=["--eval-only"]))
    assert issubclass(WeightsError, LAZY_USER_ERRORS)
