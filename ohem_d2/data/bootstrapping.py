"""The rules of hard-negative bootstrapping, the offline mining that OHEM made online: which
negatives train in each round. The loop that trains and scores is
:mod:`ohem_d2.engine.bootstrap`; docs/HARD_IMAGES.md says when to use which.

Round 0 trains on the positives and a random subset of the negative pool. After each round the
model scores every pool image (the highest detection score on it, and how many detections reach
``score_thresh``: on an image without objects each one is a false positive). Then:

* **added**: pool images outside the training set with a detection >= ``score_thresh`` (hard
  negatives), hardest first (highest score, then most false positives, then file name), at most
  ``budget`` per round and up to ``max_negatives`` in the training set;
* **removed**: training negatives whose highest score fell below ``drop_thresh``: the model no
  longer fires on them. They go back to the pool and are added again if they turn hard again;
* **the control** (``choose="random"``): as many pool images as mining would add, drawn at random
  (seeded) from all those outside the training set, firing or not; the rest as above. The training
  set then grows on mining's schedule with images that were not chosen for being hard, which
  separates what the choice does from what a growing mixture of negatives does;
* **stop**: the next round is the last when no pool image outside the training set fires (zero
  false positives on the pool), when the training set is at ``max_negatives`` and none can be
  added, or when it is mining round ``rounds``.
"""
import random
from dataclasses import asdict, dataclass


CHOICES = ("hardest", "random")


class BootstrapError(ValueError):
    """Bad bootstrapping settings or pool: one line, before anything trains."""


@dataclass(frozen=True)
class BootstrapSettings:
    rounds: int = 3  # mining rounds after round 0
    initial_negatives: int = 100  # random pool images in round 0's training set
    budget: int = 100  # hard negatives added per round, at most
    max_negatives: int = 0  # cap on the training set's negatives; 0: no cap
    score_thresh: float = 0.5  # a detection this confident on a pool image is a false positive
    drop_thresh: float = 0.1  # a training negative whose highest score is below this is dropped
    hard_positives: bool = False  # repeat positives with missed objects in the next round
    positive_iou: float = 0.5  # a GT object is found by a detection of its class at this IoU ...
    from_scratch: bool = False  # each round trains the whole schedule anew (default: fine-tunes)
    seed: int = 0  # round 0's random subset (and the control's draws)
    choose: str = "hardest"  # which pool images a round adds: "hardest", or "random" (the control)

    def __post_init__(self):
        checks = [
            (self.rounds >= 0, f"--rounds {self.rounds}: expected 0 or more mining rounds"),
            (self.initial_negatives >= 0, f"--initial-negatives {self.initial_negatives}: expected 0 or more"),
            (self.budget >= 1, f"--budget {self.budget}: expected at least 1 hard negative per round"),
            (self.max_negatives == 0 or self.max_negatives >= self.initial_negatives,
             f"--max-negatives {self.max_negatives}: expected 0 (no cap) or at least --initial-negatives "
             f"({self.initial_negatives})"),
            (0 < self.score_thresh <= 1, f"--score-thresh {self.score_thresh}: expected a score in (0, 1]"),
            (0 <= self.drop_thresh < self.score_thresh,
             f"--drop-thresh {self.drop_thresh}: expected a score in [0, --score-thresh {self.score_thresh})"),
            (0 < self.positive_iou <= 1, f"--positive-iou {self.positive_iou}: expected an IoU in (0, 1]"),
            (self.choose in CHOICES, f"--choose {self.choose!r}: expected one of {', '.join(CHOICES)}"),
        ]
        for ok, message in checks:
            if not ok:  # NaN fails every comparison
                raise BootstrapError(message)

    def as_dict(self):
        return asdict(self)

    @property
    def lowest_score_read(self):
        """The lowest detection score a rule compares with: ``drop_thresh``, or ``score_thresh``
        when nothing is dropped. The pools are scored down to it."""
        return self.drop_thresh if self.drop_thresh > 0 else self.score_thresh


@dataclass(frozen=True)
class Score:
    """What the model does on one pool image."""

    max_score: float  # its most confident detection (0 without any)
    false_positives: int  # detections >= score_thresh


@dataclass(frozen=True)
class NextRound:
    negatives: list  # the next round's training negatives, sorted
    added: list  # hardest first
    removed: list
    stop: str  # why the next round is the last ("" if mining goes on after it)


def initial_negatives(pool, count, seed):
    """Round 0's negatives: ``count`` images of ``pool`` drawn at random (seeded), sorted."""
    pool = sorted(pool)
    return sorted(random.Random(seed).sample(pool, min(count, len(pool))))


def next_round(current, scores, settings, rounds_done):
    """The negatives of the next round, from ``current`` (this round's) and ``scores`` ({file:
    Score} of every pool image), by the rules of the module docstring; ``rounds_done`` counts the
    mining rounds so far (0 after round 0)."""
    current = set(current)
    # A negative no longer in the pool (its file removed since) has no score: it leaves as well.
    removed = sorted(f for f in current if f not in scores or scores[f].max_score < settings.drop_thresh)
    kept = current - set(removed)
    hard = sorted((f for f, s in scores.items() if f not in current and s.max_score >= settings.score_thresh),
                  key=lambda f: (-scores[f].max_score, -scores[f].false_positives, f))
    room = settings.budget if not settings.max_negatives else min(settings.budget, settings.max_negatives - len(kept))
    added = hard[:max(room, 0)]
    if settings.choose == "random":  # the control: as many, drawn from everything outside the set
        outside = sorted(f for f in scores if f not in current)
        added = random.Random(f"{settings.seed}:{rounds_done}").sample(outside, len(added))
    if not hard:
        stop = "no false positives on the pool outside the training set"
    elif not added:
        stop = f"the training set holds --max-negatives {settings.max_negatives} negatives"
    elif rounds_done + 1 >= settings.rounds:
        stop = f"{settings.rounds} mining round(s) done"
    else:
        stop = ""
    return NextRound(sorted(kept | set(added)), added, removed, stop)


def score_image(scores, score_thresh):
    """Score of one pool image from its detections' ``scores`` (a list of floats)."""
    return Score(max(scores, default=0.0), sum(s >= score_thresh for s in scores))
