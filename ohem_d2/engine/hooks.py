"""Training hooks ohem_d2's tools add to Detectron2's."""
import torch

from detectron2.engine import hooks
from detectron2.utils.events import get_event_storage


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
