#!/usr/bin/env python
"""The GPU evidence of ohem_d2 in short, resumable stages, all writing into one results folder.

Why stages: the GPU machines this project can borrow run one command for at most 10 minutes and
are held for about 25 minutes in all. Each stage here ends within ``--budget-minutes`` (default
9) of wall time; a stage stopped at its budget is resumed by running the same command again,
and a stage already finished is skipped.

    python scripts/gpu_stages.py tests       # make test-gpu: the model-level tests on CUDA
    python scripts/gpu_stages.py benchmark   # tools/benchmark.py --suite gpu: FPN, C4, then Mask (bitmask)
    python scripts/gpu_stages.py ops         # issue 18, <= 5 min: op/sync counts on CUDA, FPN and C4
                                             # stock vs two-pass timed in fp32, AMP and bf16 read-only
    python scripts/gpu_stages.py probe       # the study's runs for 100 iterations: speed, for sizing it
    python scripts/gpu_stages.py study       # the study (run it again to resume it)

Everything goes to ``--results`` (default ``output/gpu_stages``): ``stages.json`` (what ran, when,
for how long, on which device and torch, with which command, and how it ended) and one folder per
stage. ``--pack FILE.tgz`` writes that folder, without checkpoints, to one archive (what a
machine that is given back afterwards can return); ``--unpack FILE.tgz`` seeds an empty results
folder from such an archive on a fresh machine, keeping the finished parts and the finished
study runs (an unfinished run, whose checkpoints were not packed, starts again).

``--toy`` runs every stage at toy size on the CPU (the test suite does), so that GPU minutes go to
measuring, not debugging. Exit codes: 0 done, 3 stopped at the budget (run the same command
again), 1 failed (see ``stages.json`` and the stage's log).
"""
import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
DONE, STOPPED, FAILED = "done", "stopped at the budget", "failed"
EXIT_CODES = {DONE: 0, STOPPED: 3, FAILED: 1}
# Left to a stopped study to wind down: the runner stops its children and records them.
WIND_DOWN_S = 30
# Not packed: checkpoints, TensorBoard events and inference dumps (large, and not evidence).
UNPACKED_SUFFIXES = (".pth", ".pkl")
UNPACKED_NAMES = ("last_checkpoint", "inference")

# The study: arms compared with the same seeds, data, schedule and RoI budget (tools/run_experiment.py),
# all 9 runs at once on one GPU. Sized from the probe stage on one H100 (docs/RESULTS.md): 0.58-0.75
# s/iter with 9 runs sharing it, so 500 iterations and the evaluation fit one 9-minute command.
STUDY = dict(
    config="configs/Synthetic-Detection/faster_rcnn_R_18_FPN_scratch_gpu.yaml",
    arms=["stock", "fast_rcnn_heuristics", "ohem"],
    seeds=[0, 1, 2],
    synthetic=dict(num_train=1500, num_val=300, image_size=384, distractor_prob=0.6, max_distractors=4),
    max_iter=500,
    ims_per_batch=8,
)
PROBE_ITERS = 100
TOY_STUDY = dict(
    config="configs/Synthetic-Detection/faster_rcnn_R_18_FPN_scratch.yaml",
    arms=["stock", "ohem"],
    seeds=[0],
    synthetic=dict(num_train=8, num_val=4, image_size=64),
    max_iter=4,
    ims_per_batch=2,
)


class StageError(Exception):
    """Bad input, reported as one line."""


# ----------------------------------------------------------------------------------------------
# The ledger: stages.json


def environment():
    """Device and versions, read by a child process (this driver imports no torch)."""
    code = ("import json, platform, torch, detectron2; cuda = torch.cuda.is_available(); "
            "print(json.dumps({'device': torch.cuda.get_device_name(0) if cuda else platform.processor() or "
            "platform.machine(), 'cuda': torch.version.cuda if cuda else None, 'torch': torch.__version__, "
            "'detectron2': detectron2.__version__, 'python': platform.python_version()}))")
    done = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise StageError(f"cannot import torch and detectron2 with {PYTHON}: {done.stderr.strip().splitlines()[-1:]}"
                         " (install the wheels first: see docs/GPU_STAGES.md)")
    return json.loads(done.stdout.strip().splitlines()[-1])


class Ledger:
    """``stages.json``: one entry per stage part, rewritten atomically after every change."""

    def __init__(self, results, environment=None):
        self.path = results / "stages.json"
        self.entries = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.environment = environment or {}

    def done(self, key):
        return self.entries.get(key, {}).get("status") == DONE

    def record(self, key, **entry):
        previous = self.entries.get(key, {})
        entry["wall_s"] = round(previous.get("wall_s", 0.0) + entry.get("wall_s", 0.0), 1)
        entry["attempts"] = previous.get("attempts", 0) + 1
        self.entries[key] = {**previous, **entry, **self.environment}
        self.save()

    def save(self):
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.entries, indent=1) + "\n")
        os.replace(tmp, self.path)


@dataclass
class Budget:
    deadline: float

    def left(self):
        return self.deadline - time.time()


def run_part(ledger, key, command, log, budget, env=None, stop_signal=signal.SIGKILL):
    """Run ``command`` (a list) from the repository root, logging to ``log``, within the budget;
    record the outcome as ``key`` in the ledger and return it (DONE, STOPPED or FAILED).

    At the budget the command gets ``stop_signal`` (SIGINT lets the runner stop its children and
    keep their checkpoints) and ``WIND_DOWN_S`` seconds to end before it is killed.
    """
    if ledger.done(key):
        print(f"[{key}] done earlier: skipped", flush=True)
        return DONE
    if budget.left() <= 0:  # spent before this part began (e.g. by an earlier part, or a slow start)
        ledger.record(key, status=STOPPED, exit_code=None, command=shlex.join(command), wall_s=0.0,
                      finished=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
        print(f"[{key}] {STOPPED} before it started", flush=True)
        return STOPPED
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[{key}] {shlex.join(command)}", flush=True)
    start = time.time()
    with open(log, "a") as out:
        out.write(f"\n$ {shlex.join(command)}\n")
        out.flush()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                   env={**os.environ, **(env or {})})
        stopped = False
        try:
            process.wait(timeout=max(budget.left(), 1))
        except subprocess.TimeoutExpired:
            stopped = True
            process.send_signal(stop_signal)
            try:
                process.wait(timeout=WIND_DOWN_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    status = STOPPED if stopped else (DONE if process.returncode == 0 else FAILED)
    ledger.record(key, status=status, exit_code=process.returncode, command=shlex.join(command),
                  log=str(log.relative_to(ledger.path.parent)), wall_s=time.time() - start,
                  finished=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    print(f"[{key}] {status} after {time.time() - start:.0f} s (log: {log})", flush=True)
    return status


# ----------------------------------------------------------------------------------------------
# Stages


def stage_tests(args, ledger, budget):
    """``make test-gpu``: the model-level tests on CUDA (toy: one test file on the CPU)."""
    out = args.results / "tests"
    out.mkdir(parents=True, exist_ok=True)
    device, paths = ("cpu", ["tests/test_selection.py"]) if args.toy else ("cuda", ["tests"])
    command = [PYTHON, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--device", device, *paths,
               "--junitxml", str(out / "junit.xml")]
    return run_part(ledger, "tests", command, out / "pytest.log", budget)


def benchmark_parts(toy):
    """(name, arguments of tools/benchmark.py) of each part of the benchmark stage."""
    if toy:
        tiny = ["--suite", "cpu", "--iters", "1", "--warmup", "0", "INPUT.MIN_SIZE_TRAIN", "(96,)",
                "INPUT.MAX_SIZE_TRAIN", "128"]
        return [("fpn", ["--heads", "fpn", "--precisions", "fp32", *tiny]),
                ("mask", ["--heads", "mask", "--precisions", "fp32", *tiny])]
    return [("fpn", ["--suite", "gpu", "--heads", "fpn"]),
            ("c4", ["--suite", "gpu", "--heads", "c4"]),
            ("mask", ["--suite", "gpu", "--heads", "mask", "--precisions", "fp32,amp"])]


def stage_benchmark(args, ledger, budget):
    """tools/benchmark.py, one head per part, then the targets of docs/RESULTS.md checked."""
    out = args.results / "benchmark"
    status = DONE
    for name, bench_args in benchmark_parts(args.toy):
        images = [] if args.images is None else ["--images", str(args.images)]
        command = [PYTHON, "tools/benchmark.py", *images, "--out", str(out / name), *bench_args]
        status = run_part(ledger, f"benchmark/{name}", command, out / name / "benchmark.log", budget)
        if status != DONE:
            return status
    write_targets(out, [name for name, _ in benchmark_parts(args.toy)])
    return status


# The targets of issue 9: (head key, precisions, metric, bound), ratios to the stock arm of the
# same run; bound None: reported without a target (Mask R-CNN's memory, where all-candidate mask
# targets would show).
TARGETS = [
    ("fpn", ("fp32", "amp"), "time_ratio", 1.03),
    ("fpn", ("fp32", "amp"), "mem_ratio", 1.02),
    ("c4", ("fp32",), "time_ratio", 1.45),
    ("c4", ("amp", "fp32_bf16ro"), "time_ratio", 1.15),
    ("c4", ("fp32", "amp", "fp32_bf16ro"), "mem_ratio", 1.10),
    ("mask", ("fp32", "amp"), "mem_ratio", None),
]


def write_targets(out, parts):
    """``summary.md``: every part's table, and each two-pass target as met or missed."""
    rows, tables = [], []
    for name in parts:
        raw = json.loads((out / name / "benchmark.json").read_text())
        rows += raw["rows"]
        tables.append(f"### {name}\n\n`{raw['command']}`\n\n" + (out / name / "benchmark.md").read_text()
                      .split("\n\n", 2)[2])
    lines = ["| target | measured | met |", "|---|---|---|"]
    for head, precisions, metric, bound in TARGETS:
        for r in rows:
            if r["head_key"] == head and r["arm"] == "ohem" and r["precision"] in precisions:
                value = r[metric]
                what = "time" if metric == "time_ratio" else "peak memory"
                measured = "n/a" if value is None else f"{value:.3f}x"
                if bound is None:
                    target, met = f"{what} vs stock", "(no target)"
                else:
                    target = f"{what} <= {bound:.2f}x stock"
                    met = "n/a" if value is None else ("yes" if value <= bound else "**missed**")
                lines.append(f"| {r['head']} ohem {r['precision_label']}: {target} | {measured} | {met} |")
    (out / "summary.md").write_text("# Benchmark: OHEM two-pass against the stock sampler\n\n"
                                    + "\n".join(lines) + "\n\n" + "\n".join(tables))


def study_command(args, spec, output, max_iter):
    """tools/run_experiment.py for ``spec`` (STUDY or TOY_STUDY) stopped at ``max_iter``."""
    warmup = max(1, max_iter // 10)
    steps = sorted({s for s in (int(max_iter * 0.75), int(max_iter * 0.9)) if warmup < s < max_iter})
    steps = "(" + "".join(f"{s}," for s in steps) + ")"  # LR drops at 75% and 90%, as the configs
    opts = ["SOLVER.MAX_ITER", max_iter, "SOLVER.STEPS", steps, "SOLVER.WARMUP_ITERS", warmup,
            "SOLVER.CHECKPOINT_PERIOD", max(1, max_iter // 6), "SOLVER.IMS_PER_BATCH", spec["ims_per_batch"],
            "MODEL.DEVICE", "cpu" if args.toy else "cuda"]
    synthetic = [x for k, v in spec["synthetic"].items() for x in ("--synthetic", f"{k}={json.dumps(v)}")]
    return [PYTHON, "tools/run_experiment.py", "--config-file", spec["config"], "--arms", *spec["arms"],
            "--seeds", *map(str, spec["seeds"]), "--parallel", str(len(spec["arms"]) * len(spec["seeds"])),
            "--data-root", str(args.data_root), *synthetic, "--output", str(output), *map(str, opts)]


def stage_probe(args, ledger, budget):
    """The study's runs, all at once as in the study, for ``PROBE_ITERS`` iterations: how long an
    iteration and an evaluation take, to size the study (also generates its dataset)."""
    spec = TOY_STUDY if args.toy else STUDY
    out = args.results / "probe"
    command = study_command(args, spec, out, 6 if args.toy else PROBE_ITERS)  # Detectron2 times from iteration 4
    status = run_part(ledger, "probe", command, out / "run_experiment.log", budget, stop_signal=signal.SIGINT)
    if status == DONE:
        results = json.loads((out / "results.json").read_text())
        speed = {arm: {k: a["mean"].get(k) for k in ("s_per_iter", "wall_time_s")}
                 for arm, a in results["arms"].items()}
        (out / "speed.json").write_text(json.dumps(speed, indent=1) + "\n")
        print(json.dumps(speed, indent=1))
    return status


def stage_study(args, ledger, budget):
    """The study (``STUDY``): every arm and seed; stopped at the budget, resumed by the next call."""
    spec = TOY_STUDY if args.toy else STUDY
    out = args.results / "study"
    command = study_command(args, spec, out, spec["max_iter"])
    return run_part(ledger, "study", command, out / "run_experiment.log", budget, stop_signal=signal.SIGINT)


def ops_parts(toy):
    """(name, arguments of tools/benchmark.py) of each part of the ops stage: the op and sync
    counts of one step (on CUDA: also the syncs set_sync_debug_mode("warn") reports), then
    stock against two-pass, timed, with fewer iterations than the benchmark stage (5 minutes)."""
    if toy:
        small = ["--image-size", "128x192", "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "300",
                 "MODEL.RPN.POST_NMS_TOPK_TRAIN", "100", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32"]
        return [("counts", ["--suite", "ops", "--heads", "fpn", "--arms", "stock,ohem", *small]),
                ("time", ["--suite", "cpu", "--heads", "fpn", "--arms", "stock,ohem", "--precisions", "fp32",
                          "--iters", "1", "--warmup", "0", "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128"])]
    return [("counts", ["--suite", "ops", "--device", "cuda", "--arms", "stock,ohem"]),
            ("time", ["--suite", "gpu", "--heads", "fpn,c4", "--arms", "stock,ohem",
                      "--precisions", "fp32,amp,fp32_bf16ro,fp32_bf16ro_cl", "--warmup", "5", "--iters", "20"])]


def stage_ops(args, ledger, budget):
    """Issue 18's check: ``summary.md`` with the op/sync table and the timed table."""
    out = args.results / "ops"
    status = DONE
    for name, bench_args in ops_parts(args.toy):
        images = [] if args.images is None or name == "counts" else ["--images", str(args.images)]
        command = [PYTHON, "tools/benchmark.py", *images, "--out", str(out / name), *bench_args]
        status = run_part(ledger, f"ops/{name}", command, out / name / "benchmark.log", budget)
        if status != DONE:
            return status
    counts = json.loads((out / "counts" / "ops.json").read_text())
    timed = json.loads((out / "time" / "benchmark.json").read_text())
    lines = ["# Ops stage: OHEM two-pass against the stock sampler (issue 18)", "",
             f"`{counts['command']}` (torch {counts['torch']}, {counts['device']})", "",
             "| arm | head | non-view aten ops | vs stock | host syncs | vs stock | CUDA-reported syncs |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in counts["rows"]:
        ratio = "n/a" if r["op_ratio"] is None else f"{r['op_ratio']:.3f}x"
        lines.append(f"| {r['arm']} | {r['head']} | {r['ops']} | {ratio} | {r['syncs']} | {r['sync_delta']:+d} "
                     f"| {'n/a' if r['cuda_syncs'] is None else r['cuda_syncs']} |")
    lines += ["", f"`{timed['command']}`", "", (out / "time" / "benchmark.md").read_text().split("\n\n", 2)[2]]
    (out / "summary.md").write_text("\n".join(lines))
    return status


STAGES = {"tests": stage_tests, "benchmark": stage_benchmark, "probe": stage_probe, "study": stage_study,
          "ops": stage_ops}


# ----------------------------------------------------------------------------------------------
# Pack and unpack


def packable(member):
    parts = Path(member.name).parts
    if member.name.endswith(UNPACKED_SUFFIXES) or any(p in UNPACKED_NAMES for p in parts):
        return None
    if any(p.startswith("events.out.tfevents") for p in parts):
        return None
    return member


def pack(results, archive):
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(results, arcname=results.name, filter=packable)
    print(f"packed {results} into {archive} ({archive.stat().st_size / 2**20:.1f} MiB)", flush=True)


def unpack(archive, results):
    """Seed an empty ``results`` from ``archive``: finished stage parts and finished study runs."""
    if (results / "stages.json").is_file():
        print(f"{results} exists: --unpack ignored", flush=True)
        return
    if not archive.is_file():
        raise StageError(f"--unpack {archive}: no such file")
    results.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        unfinished = set()
        for m in members:  # run folders (ARM/seed_S) whose run.json says they did not finish
            if m.name.endswith("/run.json"):
                state = json.load(tar.extractfile(m))
                if state.get("status") != "done":
                    unfinished.add(str(Path(m.name).parent))
        root = Path(members[0].name).parts[0]
        keep = [m for m in members
                if not any(m.name == u or m.name.startswith(u + "/") for u in unfinished)]
        for m in keep:
            m.name = str(Path(*Path(m.name).parts[1:])) if m.name != root else "."
        tar.extractall(results, members=keep, filter="data")
    ledger = Ledger(results)
    for key, entry in list(ledger.entries.items()):
        if entry.get("status") != DONE:
            ledger.entries.pop(key)
    ledger.save()
    print(f"seeded {results} from {archive}: {len(unfinished)} unfinished run(s) left out", flush=True)


# ----------------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=list(STAGES))
    parser.add_argument("--results", type=Path, default=REPO / "output" / "gpu_stages",
                        help="the results folder all stages write into (default: %(default)s)")
    parser.add_argument("--budget-minutes", type=float, default=9.0,
                        help="wall-time budget of this command; a stage still running then stops and "
                             "resumes at the next call (default: %(default)s)")
    parser.add_argument("--data-root", type=Path, default=REPO / "datasets" / "ohem_synthetic_gpu",
                        help="where the study's synthetic dataset is generated (default: %(default)s)")
    parser.add_argument("--images", type=Path, default=None,
                        help="benchmark images (default: tools/benchmark.py's, the shared coco128)")
    parser.add_argument("--toy", action="store_true", help="toy size, on the CPU (for the test suite)")
    parser.add_argument("--pack", type=Path, help="afterwards, write the results folder without checkpoints here")
    parser.add_argument("--unpack", type=Path, help="first, seed an empty results folder from this archive")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    args.results, args.data_root = args.results.resolve(), args.data_root.resolve()
    budget = Budget(time.time() + args.budget_minutes * 60)
    try:
        if args.unpack:
            unpack(args.unpack, args.results)
        args.results.mkdir(parents=True, exist_ok=True)
        env = environment()
        print(f"stage {args.stage} on {env['device']} (torch {env['torch']}, detectron2 {env['detectron2']}, "
              f"Python {env['python']}, {platform.node()}); budget {args.budget_minutes} min", flush=True)
        status = STAGES[args.stage](args, Ledger(args.results, env), budget)
    except StageError as e:
        sys.exit(f"gpu_stages.py: error: {e}")
    finally:
        if args.pack and args.results.is_dir():
            pack(args.results, args.pack)
    print(f"stage {args.stage}: {status}" + (" (run the same command again to resume)" if status == STOPPED else ""))
    return EXIT_CODES[status]


if __name__ == "__main__":
    sys.exit(main())
