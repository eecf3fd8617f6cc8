"""A resumed run goes on as the uninterrupted run would have: the random generators' states come
back from the checkpoint and the sampler's stream continues where it was (ohem_d2.engine.hooks.
ExactResume). Detectron2 alone starts the data stream again and draws from fresh generators."""
import os
import shutil
import subprocess
import sys

import torch

from conftest import CONFIGS, REPO
from ohem_d2.data.synthetic import generate_synthetic_dataset

SYNTHETIC = CONFIGS / "Synthetic-Detection" / "faster_rcnn_R_18_FPN_scratch.yaml"


def train_net(*args):
    done = subprocess.run([sys.executable, str(REPO / "tools" / "train_net.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_a_run_resumed_from_its_checkpoint_ends_with_the_uninterrupted_runs_weights(tmp_path):
    data = generate_synthetic_dataset(tmp_path / "data", num_train=8, num_val=2, image_size=64)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    common = ["--config-file", SYNTHETIC, "--register-coco", "t_resume", data.train_json, data.train_images,
              "DATASETS.TRAIN", "('t_resume',)", "DATASETS.TEST", "()", "SOLVER.IMS_PER_BATCH", 2,
              "SOLVER.MAX_ITER", 6, "SOLVER.CHECKPOINT_PERIOD", 3, "SEED", 7, "MODEL.DEVICE", "cpu"]
    train_net(*common, "OUTPUT_DIR", whole)
    # The same run stopped right after its checkpoint of iteration 2: what a kill or a requeue leaves.
    shutil.copytree(whole, resumed)
    for name in ("model_final.pth", "model_0000005.pth", "metrics.json"):
        (resumed / name).unlink(missing_ok=True)
    (resumed / "last_checkpoint").write_text("model_0000002.pth")
    done = train_net("--resume", *common, "OUTPUT_DIR", resumed)
    assert "Starting training from iteration 3" in done.stdout + done.stderr
    expected = torch.load(whole / "model_final.pth", weights_only=False)["model"]
    actual = torch.load(resumed / "model_final.pth", weights_only=False)["model"]
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
