"""Training hooks ohem_d2's tools add to Detectron2's, and the training loader they read."""
import random

import numpy as np
import torch

from detectron2.engine import hooks
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from ..data.hard_images import INDEX_KEY, update


class PeakMemoryHook(hooks.HookBase):
    """Puts the peak GPU memory so far (MiB) into the EventStorage, hence into metrics.json.

    Only for a model on a GPU: a CPU run on a machine with a GPU has no GPU peak to report (torch
    would say 0, the report shows n/a) and leaves CUDA alone.
    """

    def after_step(self):
        device = next(self.trainer.model.parameters()).device
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / 2**20
            get_event_storage().put_scalar("peak_gpu_mem_mb", peak, smoothing_hint=False)


class TrainingLoader:
    """Detectron2's training data loader with its ``sampler`` at hand, for the hooks below.

    It remembers the dataset indices of the batch it last gave (:class:`HardImageFeedback`), and
    on a resume (:class:`ExactResume`) restores the random generators: numpy's and Python's
    before its first batch (the mapper's augmentations draw from them), torch's after it. Getting
    the first batch makes Detectron2's inner DataLoader draw its base seed from torch's generator,
    which an uninterrupted run did at its first iteration, before the checkpoint's states were taken.
    """

    def __init__(self, loader, sampler):
        self.loader, self.sampler = loader, sampler
        self.last = []
        self.resumed_states = None

    def __iter__(self):
        resumed, self.resumed_states = self.resumed_states, None
        if resumed is not None:
            set_host_random_states(resumed)
        for batch in self.loader:
            if resumed is not None:
                set_torch_random_states(resumed)
                resumed = None
            self.last = [record.get(INDEX_KEY) for record in batch]
            yield batch


def random_states():
    """The states of the generators a training step draws from: torch's (and CUDA's), numpy's,
    Python's; as tensors and plain numbers, which a checkpoint loads with ``weights_only``."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gauss)
    states = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_host_random_states(states):
    """Restore numpy's and Python's generators from :func:`random_states`."""
    kind, keys, position, has_gauss, cached_gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
    random.setstate(states["python"])


def set_torch_random_states(states):
    """Restore torch's (and CUDA's) generators from :func:`random_states`."""
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class ExactResume(hooks.HookBase):
    """What Detectron2's checkpoints leave out for a resumed run to continue as it would have gone
    on: the random generators' states (saved with every checkpoint, as this hook's state) and the
    position in the sampler's stream (Detectron2 starts the stream again from its first index).

    On resume the sampler skips the images of the iterations done; the resumed run then draws
    the same batches, flips and RoI samples as an uninterrupted one where every batch is the next
    ``IMS_PER_BATCH`` indices of the stream: data loading in the main process
    (``DATALOADER.NUM_WORKERS 0``; workers reseed from the loader's base seed) and all images in one
    aspect-ratio group (or ``DATALOADER.ASPECT_RATIO_GROUPING False``). Elsewhere the stream
    continues near where it was instead of starting again."""

    def __init__(self, loader, images_per_batch):
        self.loader, self.images_per_batch = loader, images_per_batch

    def state_dict(self):
        return random_states()

    def load_state_dict(self, state_dict):
        done = (self.trainer.iter + 1) * self.images_per_batch  # the checkpoint's iteration had finished
        self.loader.sampler.skip = done // comm.get_world_size()
        self.loader.resumed_states = state_dict


class HardImageFeedback(hooks.HookBase):
    """After each step of a :class:`HardImageTrainingSampler` run: every rank's (image indices, total loss)
    gathered, and each image's running
    loss updated in the shared tensor the sampler reads. Its state (the running losses) is saved
    in checkpoints and restored on resume."""

    def __init__(self, loader, momentum=0.9):
        self.loader, self.losses, self.momentum = loader, loader.sampler.losses, momentum

    def after_step(self):
        latest = self.trainer.storage.latest()
        loss = latest["total_loss"][0] if "total_loss" in latest else None  # the main process's
        update(self.losses, comm.all_gather((list(self.loader.last), loss)), self.momentum)

    def state_dict(self):
        return {"losses": self.losses.clone()}

    def load_state_dict(self, state_dict):
        self.losses.copy_(state_dict["losses"])  # in place: the workers read this memory
