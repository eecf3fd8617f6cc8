"""Hard images: a training sampler that draws images by how hard the current model finds them.

Detectron2's ``RepeatFactorTrainingSampler`` repeats images by class rarity; nothing draws them by
difficulty. :class:`HardImageTrainingSampler` draws image i with probability

    p_i = FLOOR / N + (1 - FLOOR) * l_i ** (1 / TEMPERATURE) / sum_j l_j ** (1 / TEMPERATURE)

where ``l_i`` is a running average of image i's recent training loss, ``TEMPERATURE`` tempers it
(larger: flatter) and ``FLOOR`` keeps a share of uniform draws, so that every image goes on being
seen (an image whose loss fell is drawn again, and can show that it got hard again).

Where the losses come from: Detectron2 computes a step's losses as means over the batch, so an
image is credited with the total loss of the step it trained in; over many steps its batch mates
average out. The training hook ``ohem_d2.engine.hooks.HardImageFeedback`` combines every rank's
image indices (``all_gather``) and updates one running average per image (:func:`update`), in a
tensor in shared memory: Detectron2 iterates the sampler inside the data loader's worker
processes, which read that same memory. The running averages are the sampler's state, saved in
checkpoints (the hook's state) and restored on resume.

The draws are deterministic given the seed and the losses reported: each pass of N draws reads
the averages once, with a generator seeded like Detectron2's ``TrainingSampler``.
"""
import itertools

import torch
from torch.utils.data.sampler import Sampler

from detectron2.config import CfgNode as CN
from detectron2.utils import comm

SAMPLER_NAME = "HardImageTrainingSampler"
INDEX_KEY = "dataset_index"  # added to each training record: the sampler's index of the image


def add_hard_image_config(cfg):
    """``DATALOADER.HARD_IMAGES``: the sampler's settings, used when ``DATALOADER.SAMPLER_TRAIN``
    is ``"HardImageTrainingSampler"``."""
    cfg.DATALOADER.HARD_IMAGES = CN()
    cfg.DATALOADER.HARD_IMAGES.TEMPERATURE = 1.0  # p ~ loss ** (1 / T): larger is flatter
    cfg.DATALOADER.HARD_IMAGES.FLOOR = 0.2  # share of uniform draws: every image keeps >= FLOOR / N
    cfg.DATALOADER.HARD_IMAGES.MOMENTUM = 0.9  # running average: l = m * l + (1 - m) * new loss


def check_hard_image_config(cfg):
    """Raise ValueError naming the first bad ``DATALOADER.HARD_IMAGES`` value and what it expects."""
    h = cfg.DATALOADER.HARD_IMAGES
    for key, ok, expected in (
        ("TEMPERATURE", h.TEMPERATURE > 0, "a number > 0 (1.0: in proportion to the loss)"),
        ("FLOOR", 0.0 <= h.FLOOR <= 1.0, "a fraction in [0, 1] (the share of uniform draws)"),
        ("MOMENTUM", 0.0 <= h.MOMENTUM < 1.0, "a number in [0, 1) (the running average's memory)"),
    ):
        if not ok:
            raise ValueError(f"DATALOADER.HARD_IMAGES.{key} = {h[key]!r} is invalid: expected {expected}.")


def draw_probabilities(losses, temperature, floor):
    """(N,) probabilities of drawing each image, from its running loss (see the module docstring)."""
    hardness = losses.double().clamp(min=0) ** (1.0 / temperature)
    total = hardness.sum()
    share = hardness / total if total > 0 else torch.full_like(hardness, 1.0 / len(hardness))
    return (floor / len(hardness) + (1.0 - floor) * share).float()


class HardImageTrainingSampler(Sampler):
    """An infinite stream of image indices drawn by :func:`draw_probabilities` of ``losses``, a
    shared (N,) tensor of running losses; sharded across ranks as Detectron2's samplers are."""

    def __init__(self, losses, temperature=1.0, floor=0.2, seed=None):
        if losses.dim() != 1 or len(losses) == 0:
            raise ValueError(f"{SAMPLER_NAME} needs a 1-D tensor of running losses, one per image")
        self.losses = losses
        self.temperature, self.floor = float(temperature), float(floor)
        self._seed = int(comm.shared_random_seed() if seed is None else seed)
        self._rank, self._world_size = comm.get_rank(), comm.get_world_size()

    def __iter__(self):
        yield from itertools.islice(self._infinite_indices(), self._rank, None, self._world_size)

    def _infinite_indices(self):
        generator = torch.Generator()
        generator.manual_seed(self._seed)
        while True:
            p = draw_probabilities(self.losses.clone(), self.temperature, self.floor)
            yield from torch.multinomial(p, len(p), replacement=True, generator=generator).tolist()


def shared_losses(num_images):
    """Running losses of ``num_images`` images, all equal at first (uniform draws), in shared memory."""
    return torch.ones(num_images).share_memory_()


def update(losses, reports, momentum):
    """Apply ``reports``, [(image indices, total loss or None)] of every rank, to the running
    ``losses``: every image of the step is credited with the step's total loss, which Detectron2
    averages over the ranks and records on the main process only (the one report with a loss)."""
    step_losses = [loss for _, loss in reports if loss is not None]
    if not step_losses:
        return
    for indices, _ in reports:
        for i in indices:
            losses[i] = momentum * losses[i] + (1.0 - momentum) * float(step_losses[0])
