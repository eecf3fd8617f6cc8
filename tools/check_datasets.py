#!/usr/bin/env python
r"""Check the datasets of a run, and their classes against the model's, as tools/train_net.py does
before training, and time the check.

Takes a run's config, dataset registrations and overrides. Prints every problem that would stop
the run (then exits with status 1) or the warnings, and how long the check took: once as a run
does it (reading the image headers, or from the cache where the files are unchanged since the
last check; one line per dataset says which) and once more, from the cache.

    python tools/check_datasets.py --config-file configs/COCO-Detection/faster_rcnn_R_50_FPN_1x_ohem.yaml \
        --register-coco my_train train.json images/ DATASETS.TRAIN "('my_train',)" DATASETS.TEST "()"
    OHEM_D2_CACHE=$(mktemp -d) python tools/check_datasets.py ...    # a cold check: an empty cache
"""
import logging
import sys
import time

from ohem_d2.data import datasets
from ohem_d2.engine import USER_ERRORS, build_config, config_argument_parser, shown_on_console


def main(argv=None):
    args = config_argument_parser(__doc__).parse_args(argv)
    with shown_on_console(datasets.logger, logging.DEBUG):  # one line per dataset: time, cold or cached
        start = time.perf_counter()
        try:
            cfg = build_config(args, check=False)  # the config and the registration, as a run makes them
            warnings = datasets.check_datasets(cfg)  # and the check, as a run does it
        except USER_ERRORS as e:
            print(f"checked in {time.perf_counter() - start:.3f} s")
            sys.exit(f"error: {e.args[0] if e.args else e}")
        first = time.perf_counter() - start
        start = time.perf_counter()
        datasets.check_datasets(cfg)
        again = time.perf_counter() - start
    for warning in warnings:
        print(f"warning: {warning}")
    print(f"no problem stops the run ({len(warnings)} warning(s)); checked in {first:.3f} s "
          f"(with the config and registration), again from the cache in {again:.3f} s")
    return warnings


if __name__ == "__main__":
    main()
