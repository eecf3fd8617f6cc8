"""The hard-image sampler (ohem_d2.data.hard_images) and its loss feedback (ohem_d2.engine.hooks):
draw frequencies against the probabilities, the floor, determinism, the feedback reaching the
data loader's worker processes, several ranks' reports, and the state across a checkpoint."""
import itertools
import os
import subprocess
import sys

import pytest
import torch
from detectron2.data import build_detection_train_loader
from detectron2.engine import TrainerBase

from conftest import CONFIGS, FPN_OHEM, REPO, TINY
from ohem_d2.arms import UnknownArmError, apply_arm_to_lazy_model, arm_overrides
from ohem_d2.data.hard_images import (
    HardImageTrainingSampler,
    draw_probabilities,
    shared_losses,
    update,
)
from ohem_d2.data.synthetic import generate_synthetic_dataset
from ohem_d2.engine.hooks import HardImageFeedback, TrainingLoader


def test_probabilities_follow_the_tempered_loss_above_a_floor():
    p = draw_probabilities(torch.tensor([1.0, 2.0, 3.0, 4.0]), temperature=1.0, floor=0.2)
    torch.testing.assert_close(p, torch.tensor([0.05 + 0.08, 0.05 + 0.16, 0.05 + 0.24, 0.05 + 0.32]))
    flat = draw_probabilities(torch.tensor([1.0, 4.0]), temperature=2.0, floor=0.0)  # sqrt: 1 and 2
    torch.testing.assert_close(flat, torch.tensor([1 / 3, 2 / 3]))
    p = draw_probabilities(torch.tensor([0.0, 0.0, 0.0, 100.0]), temperature=1.0, floor=0.2)
    assert (p[:3] == pytest.approx(0.05)) and p.sum().item() == pytest.approx(1.0)  # every image keeps FLOOR / N


def test_draw_frequencies_match_the_probabilities():
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0])
    draws = list(itertools.islice(iter(HardImageTrainingSampler(losses, 1.0, 0.2, seed=0)), 40000))
    frequencies = torch.bincount(torch.tensor(draws), minlength=4).float() / len(draws)
    torch.testing.assert_close(frequencies, draw_probabilities(losses, 1.0, 0.2), atol=0.01, rtol=0)


def test_draws_are_determined_by_the_seed_and_the_losses():
    losses = torch.tensor([1.0, 5.0, 2.0])

    def first(seed, n=300):
        return list(itertools.islice(iter(HardImageTrainingSampler(losses.clone(), 1.0, 0.2, seed=seed)), n))

    assert first(3) == first(3) and first(3) != first(4)


def test_every_rank_reports_and_every_image_of_the_step_is_credited():
    losses = torch.ones(5)
    update(losses, [([0, 1], 3.0), ([3], None)], momentum=0.5)  # rank 0 holds the step's total loss
    torch.testing.assert_close(losses, torch.tensor([2.0, 2.0, 1.0, 2.0, 1.0]))
    update(losses, [([2], None)], momentum=0.5)  # no loss recorded this step: nothing changes
    assert losses[2] == 1.0


def test_the_loss_feedback_reaches_the_loaders_worker_processes():
    """Detectron2 iterates the sampler inside the worker processes: they read the shared losses."""
    losses = shared_losses(4)
    sampler = HardImageTrainingSampler(losses, temperature=1.0, floor=0.0, seed=0)
    records = [{"index": i} for i in range(4)]
    loader = build_detection_train_loader(dataset=records, mapper=lambda r: r, sampler=sampler, total_batch_size=2,
                                          aspect_ratio_grouping=False, num_workers=2)
    batches = iter(loader)
    before = {r["index"] for _ in range(10) for r in next(batches)}
    assert len(before) > 1
    losses.copy_(torch.tensor([0.0, 0.0, 0.0, 1.0]))  # the main process: image 3 is now the only hard one
    after = [r["index"] for _ in range(40) for r in next(batches)]
    assert set(after[-40:]) == {3}  # once the prefetched batches are used up


def test_the_running_losses_are_saved_and_restored_with_the_trainer_state():
    loader = TrainingLoader(loader=[], sampler=HardImageTrainingSampler(shared_losses(3), seed=0))
    trainer = TrainerBase()
    trainer.register_hooks([HardImageFeedback(loader)])
    loader.sampler.losses.copy_(torch.tensor([1.0, 7.0, 2.0]))
    state = trainer.state_dict()
    assert torch.equal(state["hooks"]["HardImageFeedback"]["losses"], torch.tensor([1.0, 7.0, 2.0]))

    resumed_loader = TrainingLoader(loader=[], sampler=HardImageTrainingSampler(shared_losses(3), seed=0))
    resumed = TrainerBase()
    resumed.register_hooks([HardImageFeedback(resumed_loader)])
    resumed.load_state_dict(state)
    assert torch.equal(resumed_loader.sampler.losses, torch.tensor([1.0, 7.0, 2.0]))
    assert resumed_loader.sampler.losses.is_shared()  # restored in place, where the workers read


def test_arms_and_bad_settings():
    assert arm_overrides("hard_images", "StandardROIHeads")[-2:] == ["DATALOADER.SAMPLER_TRAIN",
                                                                     "HardImageTrainingSampler"]
    from ohem_d2.model_zoo import get_config

    lazy = get_config("common/models/mask_rcnn_fpn_ohem.py")
    with pytest.raises(UnknownArmError, match="run it from a yacs"):
        apply_arm_to_lazy_model(lazy.model, "ohem_hard_images")


def train_net(*args):
    return subprocess.run([sys.executable, str(REPO / "tools" / "train_net.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return generate_synthetic_dataset(tmp_path_factory.mktemp("hard_images"), num_train=6, num_val=2, image_size=64)


def test_a_run_with_two_loader_workers_trains_and_resumes_its_sampler_state(synthetic, tmp_path):
    out = tmp_path / "run"
    common = ["--config-file", CONFIGS / FPN_OHEM, "--register-coco", "t_hard", synthetic.train_json,
              synthetic.train_images, *TINY, "DATASETS.TRAIN", "('t_hard',)", "DATASETS.TEST", "()",
              "DATALOADER.SAMPLER_TRAIN", "HardImageTrainingSampler", "DATALOADER.NUM_WORKERS", 2,
              "SOLVER.IMS_PER_BATCH", 2, "SOLVER.WARMUP_ITERS", 0,
              "SOLVER.BASE_LR", 0.001, "MODEL.RESNETS.NORM", "GN", "MODEL.FPN.NORM", "GN",
              "MODEL.ROI_HEADS.NUM_CLASSES", 3, "MODEL.BACKBONE.FREEZE_AT", 0, "OUTPUT_DIR", out]
    first = train_net(*common, "SOLVER.MAX_ITER", 2)
    assert first.returncode == 0, first.stderr[-3000:]
    state = torch.load(out / "model_final.pth", weights_only=False)["trainer"]["hooks"]["HardImageFeedback"]
    saved = state["losses"]
    assert len(saved) == 6 and not torch.equal(saved, torch.ones(6))  # fed back from the steps
    (out / "model_final.pth").rename(out / "model_0000001.pth")  # as if stopped after its checkpoint
    (out / "last_checkpoint").write_text("model_0000001.pth")
    second = train_net("--resume", *common, "SOLVER.MAX_ITER", 3)
    assert second.returncode == 0, second.stderr[-3000:]
    resumed = torch.load(out / "model_final.pth", weights_only=False)["trainer"]["hooks"]["HardImageFeedback"]
    changed = ~torch.isclose(resumed["losses"], saved)
    assert 1 <= changed.sum() <= 2  # the saved losses, updated by the one step after the resume


def test_bad_hard_image_settings_are_one_line(synthetic, tmp_path):
    done = train_net("--config-file", CONFIGS / FPN_OHEM, "--register-coco", "t_hard_bad", synthetic.train_json,
                     synthetic.train_images, *TINY, "DATASETS.TRAIN", "('t_hard_bad',)", "DATASETS.TEST", "()",
                     "DATALOADER.SAMPLER_TRAIN", "HardImageTrainingSampler", "DATALOADER.HARD_IMAGES.FLOOR", 1.5,
                     "MODEL.ROI_HEADS.NUM_CLASSES", 3, "OUTPUT_DIR", tmp_path)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "error: DATALOADER.HARD_IMAGES.FLOOR = 1.5 is invalid: expected a fraction in [0, 1]" in done.stderr


def test_two_gloo_processes_with_two_loader_workers_each_feed_every_ranks_images_back(tmp_path):
    """2 training processes (gloo on the CPU), each drawing in 2 loader workers: after 3 steps of 2
    images per rank, the running losses hold the reports of both ranks: more images were credited
    than one rank's 6 draws can name, and the state saved is the one both ranks kept."""
    data = generate_synthetic_dataset(tmp_path / "data", num_train=24, num_val=2, image_size=64)
    out = tmp_path / "run"
    done = train_net("--num-gpus", 2, "--config-file", CONFIGS / FPN_OHEM, "--register-coco", "t_hard_ddp",
                     data.train_json, data.train_images, *TINY, "DATASETS.TRAIN", "('t_hard_ddp',)", "DATASETS.TEST",
                     "()", "DATALOADER.SAMPLER_TRAIN", "HardImageTrainingSampler", "DATALOADER.NUM_WORKERS", 2,
                     "SOLVER.IMS_PER_BATCH", 4, "SOLVER.WARMUP_ITERS", 0, "SOLVER.MAX_ITER", 3, "SEED", 7,
                     "SOLVER.BASE_LR", 0.001, "MODEL.RESNETS.NORM", "GN", "MODEL.FPN.NORM", "GN",
                     "MODEL.ROI_HEADS.NUM_CLASSES", 3, "MODEL.BACKBONE.FREEZE_AT", 0, "OUTPUT_DIR", out)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = torch.load(out / "model_final.pth", weights_only=False)["trainer"]["hooks"]["HardImageFeedback"]["losses"]
    credited = int((~torch.isclose(losses, torch.ones(24))).sum())
    assert 6 < credited <= 12, credited
