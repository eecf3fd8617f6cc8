#!/usr/bin/env python
"""Check the datasets of a run, as tools/train_net.py does before training, and time the check.

Takes train_net's arguments. Prints every problem that would stop the run (then exits with
status 1) or the warnings, and how long the check took: once as a run does it (reading the
image headers, or from the cache where the files are unchanged since the last check; one line
per dataset says which) and once more, from the cache.

    python tools/check_datasets.py --config-file configs/COCO-Detection/faster_rcnn_R_50_FPN_1x_ohem.yaml \
        --register-coco my_train train.json images/ DATASETS.TRAIN "('my_train',)" DATASETS.TEST "()"
    OHEM_D2_CACHE=$(mktemp -d) python tools/check_datasets.py ...    # a cold check: an empty cache
"""
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_net import USER_ERRORS, argument_parser, build_config  # noqa: E402

from ohem_d2.datasets import check_datasets  # noqa: E402


def main(argv=None):
    parser = argument_parser()
    parser.description = __doc__
    args = parser.parse_args(argv)
    progress = logging.getLogger("ohem_d2.datasets")  # one line per dataset: time, cold or cached
    handler = logging.StreamHandler(sys.stdout)
    progress.addHandler(handler)
    progress.setLevel(logging.INFO)
    try:
        start = time.perf_counter()
        try:
            cfg = build_config(args, check=False)  # the config and the registration, as a run makes them
            warnings = check_datasets(cfg)  # and the check, as a run does it
        except USER_ERRORS as e:
            print(f"checked in {time.perf_counter() - start:.3f} s")
            sys.exit(f"error: {e.args[0] if e.args else e}")
        first = time.perf_counter() - start
        start = time.perf_counter()
        check_datasets(cfg)
        again = time.perf_counter() - start
    finally:
        progress.removeHandler(handler)
    for warning in warnings:
        print(f"warning: {warning}")
    print(f"no problem stops the run ({len(warnings)} warning(s)); checked in {first:.3f} s "
          f"(with the config and registration), again from the cache in {again:.3f} s")
    return warnings


if __name__ == "__main__":
    main()
