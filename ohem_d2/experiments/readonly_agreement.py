"""How often a faster read-only pass selects other RoIs than the fp32 one: the ``readonly`` suite
of tools/benchmark.py.

``MODEL.OHEM.READONLY_DTYPE`` "bfloat16" and ``READONLY_CHANNELS_LAST`` (fixed chunk shapes, res5 in
channels_last) change the read-only pass's outputs by rounding only, and so the ranking only among
RoIs whose hardness differs by about that rounding. This counts it: on random batches of the ops
suite's model (:mod:`.op_count`), one training step per variant from the same weights and inputs,
the share of the fp32 pass's selected RoIs each variant selects too, and the batches where it
selects exactly the same set.
"""
import dataclasses
import json
import os
import sys
from types import SimpleNamespace

import torch

from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from .benchmark import BenchmarkError, build_cfg, calibrate_frozen_bn, head_name
from .op_count import SLIM_R50, synthetic_batch

# variant -> the OHEMSettings fields it changes
VARIANTS = {
    "fp32": {},
    "bf16": {"readonly_dtype": "bfloat16"},
    "channels_last": {"readonly_channels_last": True},
    "bf16+channels_last": {"readonly_dtype": "bfloat16", "readonly_channels_last": True},
}


def selections(model, batch, settings):
    """(the indices the two-pass step of ``model`` selects on ``batch`` with ``settings``, how
    many candidates it selected them from)."""
    heads = model.roi_heads
    heads.ohem, kept = settings, {}
    select = heads.select

    def capture(hardness, proposals):
        out = select(hardness, proposals)
        kept["selected"], kept["candidates"] = out[0], len(hardness)
        return out

    heads.select = capture
    torch.manual_seed(0)
    try:
        with EventStorage():
            model(batch)
    finally:
        heads.select = select
    return set(kept["selected"].tolist()), kept["candidates"]


def agreement(head="c4", num_batches=10, image_size=(160, 240), overrides=()):
    """Rows: per variant, the mean share of fp32's selected RoIs it selects too, and how many
    batches it selects exactly fp32's set on."""
    plan = SimpleNamespace(device="cpu", overrides=SLIM_R50 + list(overrides))
    cfg, _, _ = build_cfg(plan, head, "fp32", "ohem")
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batches = [synthetic_batch(height=image_size[0], width=image_size[1], seed=s) for s in range(num_batches)]
    calibrate_frozen_bn(model, batches[0])
    base = model.roi_heads.ohem
    shared = {name: [] for name in VARIANTS}
    candidates, selected = [], []
    for batch in batches:
        reference = None
        for name, changes in VARIANTS.items():
            picked, among = selections(model, batch, dataclasses.replace(base, **changes))
            if reference is None:
                candidates.append(among / len(batch))
                selected.append(len(picked) / len(batch))
            reference = picked if reference is None else reference
            shared[name].append(len(picked & reference) / max(len(reference), 1))
        print(f"[benchmark] batch {len(shared['fp32'])}/{num_batches}", file=sys.stderr, flush=True)
    model.roi_heads.ohem = base
    return [{"variant": name, "head": head_name(cfg, head), "batches": num_batches,
             "candidates_per_image": sum(candidates) / len(candidates),
             "selected_per_image": sum(selected) / len(selected),
             "changes": VARIANTS[name], "shared_with_fp32": sum(v) / len(v),
             "identical_batches": sum(x == 1.0 for x in v), "per_batch": v} for name, v in shared.items()]


def format_table(rows):
    lines = ["| read-only pass | head | batches | RoIs selected / candidates per image "
             "| share of fp32's selected RoIs also selected | batches with the same set |",
             "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['variant']} | {r['head']} | {r['batches']} | {r['selected_per_image']:.0f} / "
              f"{r['candidates_per_image']:.0f} | {100 * r['shared_with_fp32']:.2f}% | {r['identical_batches']} |"
              for r in rows]
    return "\n".join(lines)


def run_readonly_suite(args, argv):
    """tools/benchmark.py --suite readonly: print the table; with --out, write readonly.json."""
    try:
        heads = [h.strip() for h in (args.heads or "c4").split(",") if h.strip()]
        if any(h not in ("fpn", "c4") for h in heads):
            raise BenchmarkError(f"--suite readonly measures the R-CNN heads fpn and c4, not {args.heads}")
        size = tuple(int(v) for v in args.image_size.lower().split("x") if v.isdigit())
        if len(size) != 2 or min(size) < 32:
            raise BenchmarkError(f"--image-size {args.image_size!r}: expected HxW of at least 32x32")
        torch.set_num_threads(args.threads or 1)
        rows = [row for head in heads for row in agreement(head, args.iters or 10, size, list(args.opts))]
    except BenchmarkError as e:
        print(f"benchmark.py: error: {e}", file=sys.stderr)
        return 2
    print(format_table(rows))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "readonly.json"), "w") as f:
            json.dump({"command": "python tools/benchmark.py " + " ".join(argv), "torch": torch.__version__,
                       "image_size": size, "overrides": SLIM_R50 + list(args.opts), "rows": rows}, f, indent=1)
            f.write("\n")
    return 0
