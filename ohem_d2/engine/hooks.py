"""Training hooks ohem_d2's tools add to Detectron2's."""
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


class HardImageLoader:
    """The training data loader of a :class:`HardImageTrainingSampler` run: it remembers the dataset
    indices of the batch it last gave (the records carry them as ``INDEX_KEY``) and holds the
    sampler's shared running ``losses``, for :class:`HardImageFeedback`."""

    def __init__(self, loader, losses):
        self.loader, self.losses = loader, losses
        self.last = []

    def __iter__(self):
        for batch in self.loader:
            self.last = [record[INDEX_KEY] for record in batch]
            yield batch


class HardImageFeedback(hooks.HookBase):
    """After each step of a :class:`HardImageLoader` run: every rank's (image indices, total loss)
    gathered, and each image's running
    loss updated in the shared tensor the sampler reads. Its state (the running losses) is saved
    in checkpoints and restored on resume."""

    def __init__(self, loader, momentum=0.9):
        self.loader, self.losses, self.momentum = loader, loader.losses, momentum

    def after_step(self):
        latest = self.trainer.storage.latest()
        loss = latest["total_loss"][0] if "total_loss" in latest else None  # the main process's
        update(self.losses, comm.all_gather((list(self.loader.last), loss)), self.momentum)

    def state_dict(self):
        return {"losses": self.losses.clone()}

    def load_state_dict(self, state_dict):
        self.losses.copy_(state_dict["losses"])  # in place: the workers read this memory
