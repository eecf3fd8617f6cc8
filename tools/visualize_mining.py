#!/usr/bin/env python
r"""Draw, side by side, what Detectron2's sampler and OHEM would train on, for a config, a
checkpoint and a dataset: OUTPUT/<image id>.png and OUTPUT/mining.json (what the colours and
fields mean: ohem_d2/experiments/mining_pictures.py).

    python tools/visualize_mining.py --config-file configs/COCO-Detection/faster_rcnn_R_50_FPN_1x_ohem.yaml \
        --weights output/model_final.pth --num-images 8 --output output/mining_vis
"""
from ohem_d2.engine import USER_ERRORS, build_config, config_argument_parser, exit_on
from ohem_d2.experiments.mining_pictures import MAX_ROIS, mining_model, write_pictures


def parse_args(argv=None):
    parser = config_argument_parser(__doc__)
    parser.add_argument("--weights", default=None, help="checkpoint to load (default: MODEL.WEIGHTS)")
    parser.add_argument("--dataset", default=None, help="registered dataset (default: DATASETS.TRAIN[0])")
    parser.add_argument("--num-images", type=int, default=4, help="pictures of the first N images (default: %(default)s)")
    parser.add_argument("--max-rois", type=int, default=MAX_ROIS, metavar="N",
                        help="RoIs drawn per panel: the N hardest mined, and N of the sampled ones in their "
                             "foreground/background shares; 0 draws all (default: %(default)s)")
    parser.add_argument("--output", default="output/mining_vis", help="folder of the pictures (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    args.opts += ["DATASETS.TEST", "()"]  # nothing is evaluated: do not require the test sets
    if args.weights is not None:  # the checkpoint the pictures load, checked as MODEL.WEIGHTS
        args.opts += ["MODEL.WEIGHTS", args.weights]
    cfg, model, dataset = exit_on(USER_ERRORS, lambda: mining_model(build_config(args), args.weights, args.dataset))
    paths = write_pictures(cfg, model, dataset, args.output, args.num_images, args.max_rois)
    print(f"wrote {len(paths)} images to {args.output}")


if __name__ == "__main__":
    main()
