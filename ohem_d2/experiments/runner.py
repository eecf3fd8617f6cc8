"""The comparison runner: every arm of an experiment trained the same way, resumable, then the report.

Each arm is the base config with only its RoI-choosing keys changed (:mod:`ohem_d2.arms`), run with
the same seeds, data order, schedule and RoI budget by tools/train_net.py (a ``.py`` LazyConfig
base: tools/lazyconfig_train_net.py; :mod:`.config_kinds`) in a subprocess, in its own folder
OUTPUT/ARM/seed_S with its state in ``run.json``. Finished runs are skipped, an interrupted run
continues from its last checkpoint, and a folder that holds a run with other settings is never
overwritten. tools/run_experiment.py is the command line.
"""
import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import time

import torch
from tqdm import tqdm

from ..arms import ARMS, BOOTSTRAP_ARMS, DEFAULT_ARMS, UnknownArmError, describe
from ..data.bootstrapping import BootstrapError
from ..data.datasets import class_outputs
from ..data.synthetic import SyntheticDatasetError, generate_synthetic_dataset
from ..engine.bootstrap import settings_of as bootstrap_settings
from ..engine.defaults import USER_ERRORS as PICTURE_ERRORS
from ..engine.lazy import LAZY_USER_ERRORS
from . import slurm
from .config_kinds import LAZY, YACS, arm_kind, config_kind
from .mining_pictures import write_mining_pictures
from .negative_pools import HELD_OUT_POOL, TRAIN_POOL, check_pools, held_out_false_positives, synthetic_negatives
from .report import SCORE_THRESHOLD, choose_reference, write_report
from .run_state import last_iteration, run_state, write_run_state

# The training tools the runs are started with live in the checkout's tools/ (an editable install).
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOLS = os.path.join(REPO, "tools")
DEFAULT_CONFIG = os.path.join(REPO, "configs", "Synthetic-Detection", "faster_rcnn_R_18_FPN_scratch.yaml")
POLL_SECONDS = 2.0


class ExperimentError(Exception):
    pass


# Bad input of an experiment, reported as one line by tools/run_experiment.py.
USER_ERRORS = (ExperimentError, slurm.SlurmError, UnknownArmError, SyntheticDatasetError, BootstrapError,
               *LAZY_USER_ERRORS)


def argument_parser(description=None):
    """The options of an experiment (tools/run_experiment.py's command line)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", help="base config (default: the embedded synthetic experiment)")
    p.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), metavar="ARM",
                   help=f"arms to compare (known: {', '.join(ARMS)})")
    p.add_argument("--reference", metavar="ARM",
                   help="the arm the others are compared with, seed by seed (default: the first of --arms)")
    p.add_argument("--fp-score-threshold", type=float, default=SCORE_THRESHOLD,
                   help="score from which a detection on an unlabelled look-alike of the synthetic "
                        "data counts as a false positive (default: %(default)s)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds; every arm runs every seed")
    p.add_argument("--output", default=None, help="experiment folder (default: output/experiment_<config name>)")
    p.add_argument("--num-gpus", type=int, default=0,
                   help="GPUs (processes) per run; with MODEL.DEVICE cpu, that many gloo processes per run "
                        "(0: one process on MODEL.DEVICE of the config)")
    p.add_argument("--parallel", type=int, default=0,
                   help="runs at once (default: 1 on a GPU; on the CPU one run per core, each with one thread, "
                        "which is faster than threads per run). On GPUs each run at once gets its own --num-gpus "
                        "GPUs out of CUDA_VISIBLE_DEVICES (else all GPUs); single-GPU runs share GPUs round-robin "
                        "when there are more runs than GPUs (e.g. several small arms on one GPU); multi-GPU runs "
                        "never share, so --parallel x --num-gpus may not exceed the visible GPUs. Every "
                        "multi-process run gets its own free rendezvous port")
    p.add_argument("--register-coco", nargs=3, action="append", default=[], metavar=("NAME", "JSON", "IMAGE_ROOT"))
    p.add_argument("--register-voc", nargs=4, action="append", default=[], metavar=("NAME", "DIR", "SPLIT", "CLASSES"))
    p.add_argument("--synthetic", action="append", default=[], metavar="KEY=VALUE",
                   help="a generator setting of the embedded dataset (repeatable), e.g. "
                        "--synthetic num_train=2000 --synthetic image_size=256; with --config-file it "
                        "generates and registers synthetic_train/synthetic_val for that config too")
    p.add_argument("--negatives", metavar="DIR",
                   help="a negative pool (background images without objects, or a list file of them): every arm "
                        "trains on it as images without GT, except the bootstrap arm, which mines it round by round")
    p.add_argument("--held-out-negatives", metavar="DIR",
                   help="a negative pool no arm trains on: each run's false positives per image on it "
                        "(score >= --fp-score-threshold) are in the report")
    p.add_argument("--synthetic-negatives", type=int, default=0, metavar="N",
                   help="generate N pool and N held-out images of the embedded dataset's look-alikes and clutter, "
                        "without objects, as --negatives and --held-out-negatives")
    p.add_argument("--bootstrap-opts", default="", metavar="'OPTIONS'",
                   help="options of tools/bootstrap.py for the bootstrap arm, e.g. '--rounds 3 --budget 50'")
    p.add_argument("--data-root", default=os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "ohem_synthetic"),
                   help="where the embedded dataset is written")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from finished runs")
    slurm.add_arguments(p)
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                   help="KEY VALUE config overrides for every arm (e.g. SOLVER.MAX_ITER 100)")
    return p


def synthetic_registration(args):
    """Generate (or reuse) the embedded dataset and return its --register-coco entries."""
    settings = {}
    for item in args.synthetic:
        key, sep, value = item.partition("=")
        if not sep:
            raise ExperimentError(f"--synthetic expects KEY=VALUE, got {item!r}")
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value
    try:
        ds = generate_synthetic_dataset(args.data_root, **settings)
    except TypeError as e:
        raise ExperimentError(f"bad --synthetic setting: {e}") from None
    return [["synthetic_train", ds.train_json, ds.train_images], ["synthetic_val", ds.val_json, ds.val_images]], ds


def negative_pools(args, synthetic):
    """{dataset name: folder} of the experiment's negative pools (TRAIN_POOL, HELD_OUT_POOL): the
    given folders, or the ones generated beside the embedded dataset."""
    pools = {}
    if args.synthetic_negatives:
        if synthetic is None:
            raise ExperimentError("--synthetic-negatives draws the embedded dataset's look-alikes: it needs the "
                                  "embedded dataset (no --config-file, or --synthetic KEY=VALUE)")
        pools = synthetic_negatives(args.data_root + "_negatives", synthetic.settings, args.synthetic_negatives)
    for name, folder in ((TRAIN_POOL, args.negatives), (HELD_OUT_POOL, args.held_out_negatives)):
        if folder:
            pools[name] = os.path.abspath(folder)
    return pools


def processes_per_run(args):
    """Training processes of each run: one per GPU, or per gloo worker on the CPU."""
    return max(args.num_gpus, 1)


def plan_runs(args):
    """The runs of the experiment: {(arm, seed): (run_dir, training argv)}, and the experiment spec."""
    config = os.path.abspath(args.config_file or DEFAULT_CONFIG)
    kind = config_kind(config)
    # The children run in the repository root: every path they get is made absolute here, against
    # the caller's directory, where it was meant (and where build_config checks it).
    register_coco = [[name, os.path.abspath(json_file), os.path.abspath(image_root)]
                     for name, json_file, image_root in args.register_coco]
    register_voc = [[name, os.path.abspath(dirname), split, classes]
                    for name, dirname, split, classes in args.register_voc]
    synthetic = None
    if not args.config_file or args.synthetic:  # the embedded dataset, at the requested settings
        entries, synthetic = synthetic_registration(args)
        register_coco += entries
    pools = negative_pools(args, synthetic)
    if any(arm in BOOTSTRAP_ARMS for arm in args.arms) and TRAIN_POOL not in pools:
        raise ExperimentError("the bootstrap arm mines a negative pool: give one with --negatives DIR (or "
                              "--synthetic-negatives N)")
    common = ["--config-file", config, "--num-gpus", str(processes_per_run(args))]
    opts = list(args.opts)
    if kind.device_of(opts) is None:  # train where this machine can: the GPU if there is one
        opts = kind.device_opts("cuda" if torch.cuda.is_available() else "cpu") + opts
    for entry in register_coco:
        common += ["--register-coco", *entry]
    for entry in register_voc:
        common += ["--register-voc", *entry]
    for name, folder in pools.items():
        common += ["--register-negatives", name, folder]
    base = kind.build_config(kind.argument_parser().parse_args(common + opts))
    if pools:  # no base dataset list holds them, so build_config did not check them
        check_pools(kind.schedule(base)["train"], pools)
    if any(arm in BOOTSTRAP_ARMS for arm in args.arms) and processes_per_run(args) > 1:
        raise ExperimentError(f"the bootstrap arm runs in one process (tools/bootstrap.py); --num-gpus "
                              f"{args.num_gpus} would start {processes_per_run(args)}: compare it with --num-gpus 1")
    # Every arm but the bootstrap arms trains on the pool as well (the bootstrap arms mine it).
    with_pool = kind.schedule(base)["train"] + [TRAIN_POOL] if TRAIN_POOL in pools else None
    output = os.path.abspath(args.output or os.path.join("output", "experiment_" + os.path.splitext(os.path.basename(config))[0]))
    runs, arms = {}, {}
    for arm in args.arms:
        run_kind = arm_kind(kind, arm)
        if arm in BOOTSTRAP_ARMS and run_kind is kind:
            raise ExperimentError(f"arm {arm!r} trains with tools/bootstrap.py, from a yacs (.yaml) base config")
        flags, overrides = run_kind.arm_args(arm, base)
        if arm in BOOTSTRAP_ARMS:
            flags = ["--pool", TRAIN_POOL] + shlex.split(args.bootstrap_opts) + BOOTSTRAP_ARMS[arm] + flags
        elif with_pool:
            overrides = overrides + ["DATASETS.TRAIN", str(tuple(with_pool))]
        arms[arm] = {"description": describe(arm), "overrides": flags + overrides}
        for seed in args.seeds:
            run_dir = os.path.join(output, arm, f"seed_{seed}")
            argv = common + flags + opts + overrides + run_kind.run_opts(seed, run_dir)
            # Every arm's config is valid; its datasets are the base's, checked once above.
            try:
                parsed = run_kind.argument_parser().parse_args(argv)
            except SystemExit:  # argparse has printed why (a bad --bootstrap-opts)
                raise ExperimentError(f"bad --bootstrap-opts {args.bootstrap_opts!r} (see above)") from None
            built = run_kind.build_config(parsed, check=False)
            if run_kind is not LAZY:  # look-alikes are counted for yacs runs
                check_fp_score_threshold(arm, built, args.fp_score_threshold)
            if arm in BOOTSTRAP_ARMS:
                bootstrap_settings(parsed)  # its thresholds and counts, checked before any run starts
            runs[(arm, seed)] = (run_dir, argv)
    experiment = {
        "base_config": config,
        "arms": arms,
        "seeds": args.seeds,
        "opts": opts,
        "device": kind.device_of(opts),
        **kind.schedule(base),
        "synthetic_dataset": synthetic.settings if synthetic else None,
        "negative_pools": pools,
    }
    return output, runs, experiment


def check_fp_score_threshold(arm, cfg, threshold):
    """Refuse an ``--fp-score-threshold`` below the test score threshold of a yacs arm's detecting
    heads: its saved detections stop there, so the look-alike false positives between the two
    would go uncounted, silently."""
    for head in (output.key.split(".")[1] for output in class_outputs(cfg)):
        key = f"MODEL.{head}.SCORE_THRESH_TEST"
        if "SCORE_THRESH_TEST" in cfg.MODEL[head] and threshold < cfg.MODEL[head].SCORE_THRESH_TEST:
            raise ExperimentError(
                f"--fp-score-threshold {threshold} is below arm {arm!r}'s {key} {cfg.MODEL[head].SCORE_THRESH_TEST}: "
                "its saved detections stop there, so the false positives between the two would go uncounted; "
                f"raise --fp-score-threshold or lower {key}")


def check_same_settings(run_dir, argv):
    """Refuse to resume a run folder that was started with other settings."""
    state = run_state(run_dir)
    if state and state.get("argv") != argv:
        raise ExperimentError(
            f"{run_dir} holds a run started with other settings:\n  was: {shlex.join(state['argv'])}\n"
            f"  now: {shlex.join(argv)}\nUse another --output, or delete that folder to redo the run."
        )


class Run:
    """One arm and seed, trained by tools/train_net.py in a subprocess (resumable)."""

    def __init__(self, arm, seed, run_dir, argv, max_iter, kind):
        self.arm, self.seed, self.run_dir, self.argv, self.max_iter = arm, seed, run_dir, argv, max_iter
        self.tool = kind.tool
        self.tool_path = os.path.join(TOOLS, kind.tool)
        self.num_processes = kind.argument_parser().parse_args(argv).num_gpus
        self.port = None
        self.process = None
        self.started = None
        self.previous_wall = run_state(run_dir).get("wall_time_s", 0.0)

    @property
    def done(self):
        """Trained (and evaluated, if the config has a test set): train_net.py exited with 0."""
        return run_state(self.run_dir).get("status") == "done"

    def start(self, env, port=None):
        """Start training in ``env``; a multi-process run meets its processes at ``port``, which is
        chosen anew at every start and so kept out of ``argv``, the settings a resume compares."""
        os.makedirs(self.run_dir, exist_ok=True)
        self.log = open(os.path.join(self.run_dir, "train_net.out"), "a")
        self.port = port
        rendezvous = ["--dist-url", f"tcp://127.0.0.1:{port}"] if port else []
        command = [sys.executable, self.tool_path, "--resume", *rendezvous] + self.argv
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        self.started = time.time()
        self.save("running")

    def save(self, status):
        wall = self.previous_wall + (time.time() - self.started if self.started else 0.0)
        write_run_state(self.run_dir, status=status, argv=self.argv, wall_time_s=wall,
                        arm=self.arm, seed=self.seed)

    def poll(self):
        """None while running, else the exit code (recorded in run.json)."""
        code = self.process.poll()
        if code is None:
            self.save("running")
            return None
        self.log.close()
        self.save("done" if code == 0 else f"failed (exit {code})")
        return code

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait()
            self.save("interrupted")

    def tail(self, lines=20):
        with open(os.path.join(self.run_dir, "train_net.out")) as f:
            return "".join(f.readlines()[-lines:])


def default_parallel(device, num_runs):
    """One run at a time on a GPU; on the CPU one single-threaded run per core."""
    return 1 if device != "cpu" else max(1, min(os.cpu_count() or 1, num_runs))


def visible_gpus(environ):
    """The GPUs a child may use, named as CUDA_VISIBLE_DEVICES names them: the caller's list if set."""
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(torch.cuda.device_count())]
    return [name.strip() for name in listed.split(",") if name.strip()]


def gpu_slots(parallel, gpus_per_run, gpus):
    """CUDA_VISIBLE_DEVICES of each of the ``parallel`` runs at once, carved out of ``gpus``.

    Each run gets its own ``gpus_per_run`` GPUs. Single-GPU runs may share: with more of them than
    GPUs they go round-robin over the GPUs (small arms that fit one GPU together). Multi-GPU runs
    never share, as their DDP processes would crowd each other's GPUs.
    """
    if not gpus:
        raise ExperimentError("MODEL.DEVICE is cuda but no GPU is visible; make one visible "
                              "(CUDA_VISIBLE_DEVICES) or train on the CPU with MODEL.DEVICE cpu")
    if gpus_per_run == 1:
        return [gpus[slot % len(gpus)] for slot in range(parallel)]
    if parallel * gpus_per_run > len(gpus):
        visible = f"{len(gpus)} is visible" if len(gpus) == 1 else f"{len(gpus)} are visible"
        if len(gpus) >= gpus_per_run:
            way_on = f"--parallel {len(gpus) // gpus_per_run}"
        else:
            way_on = f"--parallel 1 --num-gpus {len(gpus)}"
        raise ExperimentError(
            f"--parallel {parallel} runs of --num-gpus {gpus_per_run} need {parallel * gpus_per_run} GPUs, but "
            f"{visible} ({','.join(gpus)}); use {way_on} (multi-GPU runs do not share GPUs)"
        )
    return [",".join(gpus[slot * gpus_per_run:(slot + 1) * gpus_per_run]) for slot in range(parallel)]


def slot_environments(env, device, parallel, gpus_per_run):
    """The environment of each of the ``parallel`` runs at once: on CUDA, with its own GPUs."""
    if device != "cuda":
        return [env] * parallel
    return [dict(env, CUDA_VISIBLE_DEVICES=gpus) for gpus in gpu_slots(parallel, gpus_per_run, visible_gpus(env))]


def free_port(taken=()):
    """A TCP port that nothing listens on now and that is not in ``taken``.

    ``taken`` holds the ports of the runs still going: a run's processes listen on its port only
    once they are up, and until then the OS may offer the same port again.
    """
    while True:
        with socket.socket() as probe:
            probe.bind(("", 0))
            port = probe.getsockname()[1]
        if port not in taken:
            return port


def child_environment(parallel):
    """Split the CPU cores among the concurrent runs, unless the user chose OMP_NUM_THREADS; and
    Detectron2's builtin datasets looked up where the caller would find them (the children run in
    the repository root, so a relative ``DETECTRON2_DATASETS``, or its default ``datasets``, is
    made absolute against the caller's directory)."""
    env = dict(os.environ)
    env["DETECTRON2_DATASETS"] = os.path.abspath(os.path.expanduser(env.get("DETECTRON2_DATASETS", "datasets")))
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))
    env["PYTHONPATH"] = os.pathsep.join(p for p in [REPO, env.get("PYTHONPATH")] if p)
    return env


def train_all(runs, environments):
    """Run every unfinished run, one per slot at a time, with progress bars; return the failures.

    Slot k runs in ``environments[k]`` (its GPUs); a multi-process run gets its own rendezvous port.
    """
    todo = [r for r in runs if not r.done]
    for r in runs:
        if r.done:
            print(f"[{r.arm} seed {r.seed}] finished earlier: skipped")
    overall = tqdm(total=sum(r.max_iter for r in runs), desc="all runs", position=0, unit="it", dynamic_ncols=True)
    overall.update(sum(r.max_iter if r.done else last_iteration(r.run_dir) for r in runs))
    active, bars, failures = {}, {}, []  # active: slot -> the run in it
    try:
        while todo or active:
            for slot, env in enumerate(environments):
                if todo and slot not in active:
                    r = todo.pop(0)
                    ports_in_use = {a.port for a in active.values()}
                    r.start(env, free_port(ports_in_use) if r.num_processes > 1 else None)
                    bars[r] = tqdm(total=r.max_iter, initial=last_iteration(r.run_dir), position=slot + 1,
                                   desc=f"{r.arm} seed {r.seed}", unit="it", leave=False, dynamic_ncols=True)
                    active[slot] = r
            time.sleep(POLL_SECONDS)
            for slot, r in list(active.items()):
                progress = min(last_iteration(r.run_dir), r.max_iter)
                overall.update(progress - bars[r].n)
                bars[r].update(progress - bars[r].n)
                code = r.poll()
                if code is not None:
                    del active[slot]
                    bars.pop(r).close()
                    if code != 0:
                        failures.append(r)
                        tqdm.write(f"[{r.arm} seed {r.seed}] failed (exit {code}); last lines of "
                                   f"{r.run_dir}/train_net.out:\n{r.tail()}")
    except KeyboardInterrupt:
        for r in active.values():
            r.stop()
        raise ExperimentError("interrupted: re-run the same command to resume from the last checkpoints")
    finally:
        overall.close()
    return failures


def mining_pictures(run_dirs, out_dir, num_images=3):
    """Side-by-side pictures (:mod:`ohem_d2.experiments.mining_pictures`) of what Detectron2's sampler would train
    on and what OHEM mines, on the first training images, from the checkpoint of the first seed
    of the ohem arm (else of the first arm whose head has an OHEM counterpart). Returns the PNG
    paths; none, with a note, where no arm has such a head or drawing fails: the pictures
    illustrate the report and never stop it."""
    arms = sorted(run_dirs, key=lambda arm: arm != "ohem")
    arms = [arm for arm in arms if ARMS[arm][1] in ("ohem", "stock", "heuristics")]
    if not arms:
        return []
    run_dir = run_dirs[arms[0]][min(run_dirs[arms[0]])]
    try:
        return write_mining_pictures(os.path.join(run_dir, "config.yaml"), os.path.join(run_dir, "model_final.pth"),
                                     out_dir, num_images)
    except PICTURE_ERRORS as e:
        print(f"note: no mining pictures from {run_dir}: {e.args[0] if e.args else e}")
        return []


def paths_read(argv, output):
    """The files and folders a run's command reads or writes: its config, its datasets, its output."""
    paths = [output]
    for flag, positions in (("--config-file", (1,)), ("--register-coco", (2, 3)), ("--register-voc", (2,)),
                            ("--register-negatives", (2,))):
        paths += [argv[i + k] for i, word in enumerate(argv) if word == flag for k in positions]
    return paths


def train_on_slurm(args, runs, experiment, kind, output, device):
    """The grid on SLURM: check the cluster and every path before submitting anything, re-attach
    to the runs still queued, submit the rest, wait for all. Raises ExperimentError naming the
    runs that did not finish."""
    resources = slurm.check_cluster(slurm.resources_from(args, device), paths_read(runs[0].argv, output))
    done, attached, todo = slurm.plan_grid(runs)
    print(f"SLURM grid of {len(runs)} runs on partition {resources.partition!r}: {len(done)} done, "
          f"{len(attached)} queued or running (re-attached), {len(todo)} to submit")
    opts = experiment["opts"]
    user_sets_period = any(str(o) == "SOLVER.CHECKPOINT_PERIOD" or str(o).startswith("train.checkpointer.period=")
                           for o in opts)
    extra_opts = [] if user_sets_period else kind.checkpoint_opts(args.checkpoint_period)
    environ = dict(child_environment(1))
    if "OMP_NUM_THREADS" not in os.environ:
        environ["OMP_NUM_THREADS"] = str(max(1, resources.cpus_per_task // resources.processes_per_node))
    if todo:
        slurm.submit(todo, resources, os.path.join(output, "slurm"), extra_opts, environ)
    unfinished = slurm.follow(runs, experiment["max_iter"])
    if unfinished:
        raise ExperimentError(f"{len(unfinished)} run(s) did not finish: "
                              f"{', '.join(f'{r.arm} seed {r.seed}' for r in unfinished)}; their logs are linked "
                              "from their folders (slurm.out, slurm.err); re-run the same command to resubmit them")


def run_experiment(args):
    """Plan, check, train (what is not finished), and report the experiment of ``args`` (the
    options of tools/run_experiment.py). Returns (output folder, the report's table, plot paths).

    Raises ExperimentError (or a config, dataset or arm error) with a one-line message, before
    any run starts where the input is bad."""
    choose_reference(args.arms, args.reference)  # a typo stops here, not after training
    output, planned, experiment = plan_runs(args)
    for run_dir, run_argv in planned.values():
        check_same_settings(run_dir, run_argv)
    os.makedirs(output, exist_ok=True)
    kind = config_kind(experiment["base_config"])
    runs = [Run(arm, seed, d, a, experiment["max_iter"], arm_kind(kind, arm)) for (arm, seed), (d, a) in planned.items()]
    if args.status:
        return output, "\n".join(slurm.status_lines(runs, experiment["max_iter"])), []
    device = experiment["device"].split(":")[0]
    if args.launcher == "slurm" and not args.report_only:
        train_on_slurm(args, runs, experiment, kind, output, device)
    elif not args.report_only:
        parallel = min(args.parallel or default_parallel(device, len(runs)), len(runs))
        environments = slot_environments(child_environment(parallel), device, parallel, processes_per_run(args))
        failures = train_all(runs, environments)
        if failures:
            raise ExperimentError(f"{len(failures)} run(s) failed; fix the cause and re-run to resume")
    unfinished = [f"{r.arm} seed {r.seed}" for r in runs if not r.done]
    if unfinished:
        raise ExperimentError(f"no results yet for: {', '.join(unfinished)}")
    run_dirs = {}
    for r in runs:
        run_dirs.setdefault(r.arm, {})[r.seed] = r.run_dir
    held_out = experiment["negative_pools"].get(HELD_OUT_POOL)
    if held_out:
        for r in runs:
            held_out_false_positives(r.run_dir, held_out, args.fp_score_threshold)
    _, table, plots = write_report(experiment, run_dirs, output, reference=args.reference,
                                   score_threshold=args.fp_score_threshold)
    if kind is YACS:  # the visualiser reads yacs configs
        plots += mining_pictures(run_dirs, os.path.join(output, "mining_pictures"))
    return output, table, plots
