"""Detectron2's ``TrainingSampler`` whose stream can continue where a checkpointed run left it."""
import itertools

from detectron2.data.samplers import TrainingSampler


class ResumableTrainingSampler(TrainingSampler):
    """The same infinite, seeded stream of shuffled indices as Detectron2's ``TrainingSampler``,
    without its first ``skip`` indices (this rank's): a resumed run sets ``skip`` to the images its
    finished iterations used (``ohem_d2.engine.hooks.ExactResume``) before the loader first iterates,
    where Detectron2 would start the stream again from its first index."""

    skip = 0

    def __iter__(self):
        yield from itertools.islice(super().__iter__(), self.skip, None)
