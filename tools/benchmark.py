#!/usr/bin/env python
"""Training-step speed and memory of OHEM against Detectron2's stock RoI sampler.

Full Detectron2 training steps (forward, loss, backward, optimizer) of each arm of ohem_d2/arms.py
on the same batches, interleaved; prints a table and, with --out, writes benchmark.md and
benchmark.json. The method (timing, weights, memory): docs/BENCHMARK.md.

Suites:
  --suite gpu   R50-FPN and R50-C4, 800 px, 2 images/batch, fp32 / AMP / fp32 with a bf16
                read-only pass; 10 warmup and 30 timed iterations per arm. Needs CUDA.
                --heads mask: Mask R-CNN R50-FPN with bitmask targets, on its own.
  --suite cpu   a smoke-size run for machines without a GPU (ResNet-18, 128 px, one thread);
                its ratios say little about a GPU, it checks that every arm runs.
  --suite ops   counts, on the CPU, the non-view aten ops and host syncs of one training step
                of each arm (slim R-50, 2 images of 320x480, the configs' RoI counts), with each
                sync's file:line; the ratio to stock predicts a launch-bound GPU's (docs/PERFORMANCE.md).
"""
import sys

from ohem_d2.experiments.benchmark import argument_parser, run_benchmark


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_benchmark(argument_parser(__doc__).parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
