#!/usr/bin/env python
"""Hard-negative bootstrapping, the offline mining that OHEM made online: train on the positives and
a random part of a negative pool (background images), score the rest of the pool, add the images
the model fires on, drop those it no longer fires on, train again; round by round
(ohem_d2.engine.bootstrap; the rules: ohem_d2.data.bootstrapping; when to use it: docs/HARD_IMAGES.md).

    python tools/bootstrap.py --config-file configs/COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml \\
        --register-negatives backgrounds /data/backgrounds --pool backgrounds --rounds 3 --budget 500
    python tools/bootstrap.py ... --resume      # after a kill: continue at the round and iteration reached
"""
# ohem_d2 before Detectron2: it imports Detectron2 without the start-up warnings (ohem_d2/__init__.py).
from ohem_d2.engine import exit_on
from ohem_d2.engine.bootstrap import BOOTSTRAP_ERRORS, argument_parser, prepare, run


def main(argv=None):
    args = argument_parser(__doc__).parse_args(argv)
    state = run(exit_on(BOOTSTRAP_ERRORS, prepare, args))  # bad input stops before round 0 trains
    last = state["rounds"][-1]
    print(f"bootstrapping done after round {last['round']}: {len(last['negatives'])} negatives in the last training "
          f"set; {state['stop'] or 'every round ran'}")


if __name__ == "__main__":
    main()
