"""The comparison grid on a SLURM cluster, through submitit (``tools/run_experiment.py --launcher slurm``).

Each unfinished run of the grid is one task of a SLURM job array (``--max-in-flight`` at once),
submitted by submitit. The task trains as a local run does, with tools/train_net.py (or the
LazyConfig tool) and ``--resume``; a run on several nodes is one Detectron2 launch per node, whose
rendezvous (master address and port, machine rank, number of machines) comes from SLURM's
environment through submitit's ``JobEnvironment``.

Preemption and time limits: SLURM signals the job (USR2, 90 s before its limit, as submitit asks
for); submitit's handler calls :meth:`TrainingJob.checkpoint`, which requeues the same run. A job
requeued by ``scontrol requeue`` starts again the same way. Either way the training continues from
its last Detectron2 checkpoint (``--resume``): at most ``--checkpoint-period`` iterations are lost,
and the run goes on as it would have (``ohem_d2.engine.hooks.ExactResume``).

State: each run's ``run.json`` holds its job id; the job itself records its outcome there (the
launcher may be gone by then). Running the same command again re-attaches to the jobs still in
the queue, skips finished runs and resubmits failed ones, saying why they failed.
"""
import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from .run_state import last_iteration, run_state, seconds_per_iteration, write_run_state

# Iterations between checkpoints of a cluster run whose config keeps Detectron2's 5000: a requeued
# R50-FPN 1x run on 8 GPUs (about 0.25 s per iteration) then loses at most ~4 minutes.
DEFAULT_CHECKPOINT_PERIOD = 1000
# Folders that are local to each machine by convention: a compute node does not see the
# submitting machine's copy.
NODE_LOCAL = ("/tmp", "/var/tmp", "/dev/shm", "/run")
POLL_SECONDS = 5.0
IN_QUEUE = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING")


class SlurmError(Exception):
    """Bad input for a SLURM grid, or a cluster that cannot run it; reported as one line."""


@dataclass(frozen=True)
class Resources:
    """What each run of the grid asks SLURM for (sbatch's options of the same names)."""

    partition: str
    time_min: int
    nodes: int
    processes_per_node: int
    gpus_per_node: int
    cpus_per_task: int
    mem_gb: int
    account: str = None
    qos: str = None
    constraint: str = None
    comment: str = None
    max_in_flight: int = 0

    def executor_parameters(self, num_runs):
        """submitit SlurmExecutor parameters: one task per node, which launches that node's processes."""
        parameters = dict(partition=self.partition, time=self.time_min, nodes=self.nodes, ntasks_per_node=1,
                          cpus_per_task=self.cpus_per_task, mem=f"{self.mem_gb}G",
                          array_parallelism=self.max_in_flight or num_runs)
        if self.gpus_per_node:
            parameters["gpus_per_node"] = self.gpus_per_node
        for name in ("account", "qos", "constraint", "comment"):
            if getattr(self, name):
                parameters[name] = getattr(self, name)
        return parameters


def add_arguments(parser):
    """The options of ``--launcher slurm``, named as sbatch names them."""
    group = parser.add_argument_group("launcher; SLURM options (--launcher slurm: each run one task of a job array)")
    group.add_argument("--launcher", choices=("local", "slurm"), default="local",
                       help="local: runs on this machine (default); slurm: each run a SLURM job, via submitit")
    group.add_argument("--status", action="store_true",
                       help="print the grid's state (queued / running with iteration and ETA / done / failed) "
                            "and submit or train nothing")
    group.add_argument("--partition", help="SLURM partition (default: the cluster's default partition)")
    group.add_argument("--account", help="SLURM account to charge")
    group.add_argument("--qos", help="SLURM quality of service")
    group.add_argument("--time", type=int, default=24 * 60, metavar="MINUTES",
                       help="time limit of each job; a run that needs longer is requeued and resumes (default: 1440)")
    group.add_argument("--nodes", type=int, default=1, help="nodes per run (default: 1)")
    group.add_argument("--gpus-per-node", type=int,
                       help="GPUs per node (default: --num-gpus on a GPU run, 0 on the CPU)")
    group.add_argument("--cpus-per-task", type=int, default=None,
                       help="CPUs per node of a run (default: 10 per GPU, or one per process on the CPU)")
    group.add_argument("--mem", type=int, default=None, metavar="GB",
                       help="memory per node in GB (default: 60 per GPU, or 4 per process on the CPU)")
    group.add_argument("--constraint", help="SLURM node features (sbatch --constraint)")
    group.add_argument("--comment", help="SLURM job comment")
    group.add_argument("--max-in-flight", type=int, default=0,
                       help="most runs queued or running at once (the job array's parallelism; default: all)")
    group.add_argument("--checkpoint-period", type=int, default=DEFAULT_CHECKPOINT_PERIOD,
                       help="iterations between checkpoints of a cluster run, the most a preemption loses "
                            "(default: %(default)s; SOLVER.CHECKPOINT_PERIOD or train.checkpointer.period "
                            "among the overrides wins)")
    return parser


def resources_from(args, device):
    """The Resources of ``args``, checked for values no cluster accepts."""
    processes = max(args.num_gpus, 1)
    gpus = args.gpus_per_node if args.gpus_per_node is not None else (processes if device == "cuda" else 0)
    for name, value, least in (("--nodes", args.nodes, 1), ("--time", args.time, 1), ("--gpus-per-node", gpus, 0),
                               ("--max-in-flight", args.max_in_flight, 0), ("--checkpoint-period",
                                                                             args.checkpoint_period, 1)):
        if value < least:
            raise SlurmError(f"{name} {value} is invalid: expected an integer >= {least}")
    if device == "cuda" and gpus < processes:
        raise SlurmError(f"the runs train on cuda with --num-gpus {processes} processes per node, but ask for "
                         f"--gpus-per-node {gpus}; ask for {processes} (or train on the CPU: MODEL.DEVICE cpu)")
    cpus = args.cpus_per_task or (10 * gpus if gpus else processes)
    mem = args.mem or (60 * gpus if gpus else 4 * processes)
    return Resources(partition=args.partition, time_min=args.time, nodes=args.nodes, processes_per_node=processes,
                     gpus_per_node=gpus, cpus_per_task=cpus, mem_gb=mem, account=args.account, qos=args.qos,
                     constraint=args.constraint, comment=args.comment, max_in_flight=args.max_in_flight)


# ----------------------------------------------------------------------------------------------
# Checks before anything is submitted


def _command(argv):
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if done.returncode:
        raise SlurmError(f"{' '.join(argv)} failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    return done.stdout


def check_cluster(resources, paths):
    """Everything a submission needs, checked before any job is submitted: submitit installed,
    SLURM's commands on PATH, the partition and its GPUs, the paths the jobs read visible from the
    compute nodes. Returns ``resources`` with the partition filled in (the cluster's default)."""
    try:
        import submitit  # noqa: F401 (the launcher's only import of it)
    except ImportError:
        raise SlurmError("--launcher slurm needs submitit: pip install submitit (or pip install -e \".[slurm]\")") \
            from None
    missing = [c for c in ("sbatch", "squeue", "sinfo") if shutil.which(c) is None]
    if missing:
        raise SlurmError(f"--launcher slurm needs SLURM's {', '.join(missing)} on PATH, and {missing[0]} is not "
                         "there; run on a machine that can submit jobs (a login node)")
    partitions = {}
    for line in _command(["sinfo", "-h", "-o", "%P|%G|%N"]).splitlines():
        name, gres, nodes = line.split("|")
        entry = partitions.setdefault(name.rstrip("*"), {"default": name.endswith("*"), "gpus": 0, "nodes": []})
        entry["gpus"] = max(entry["gpus"], _gpus_in(gres))
        entry["nodes"] += _command(["scontrol", "show", "hostnames", nodes]).split() if nodes else []
    partition = resources.partition or next((p for p, e in partitions.items() if e["default"]), None)
    if partition not in partitions:
        raise SlurmError(f"--partition {partition!r} is not a partition of this cluster (sinfo lists "
                         f"{', '.join(sorted(partitions)) or 'none'})")
    if resources.gpus_per_node > partitions[partition]["gpus"]:
        raise SlurmError(f"--gpus-per-node {resources.gpus_per_node} is more than partition {partition!r} offers "
                         f"({partitions[partition]['gpus']} per node, sinfo %G); ask for at most that many")
    _check_visible(paths, partitions[partition]["nodes"])
    return Resources(**{**resources.__dict__, "partition": partition})


def _gpus_in(gres):
    """GPUs per node in an sinfo GRES string such as ``gpu:8``, ``gpu:a100:4(S:0-1)`` or ``(null)``."""
    count = 0
    for item in gres.split(","):
        fields = item.split("(")[0].split(":")
        if fields[0] == "gpu" and fields[-1].isdigit():
            count = max(count, int(fields[-1]))
    return count


def _check_visible(paths, nodes):
    """Refuse paths a compute node would not see: missing ones, and node-local folders unless the
    partition's only node is this machine."""
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise SlurmError(f"{len(missing)} path(s) the jobs read do not exist, e.g. {missing[0]}; fix them before "
                         "submitting")
    if set(nodes) <= {socket.gethostname(), socket.gethostname().split(".")[0]}:
        return
    local = [p for p in paths if any(p == d or p.startswith(d + "/") for d in NODE_LOCAL)]
    if local:
        raise SlurmError(f"{len(local)} path(s) the jobs read are in folders local to this machine "
                         f"({', '.join(NODE_LOCAL)}), e.g. {local[0]}; compute nodes do not see them: put the "
                         "data, config and --output on a shared filesystem")


# ----------------------------------------------------------------------------------------------
# The job


def rendezvous(job_env, environ):
    """(--num-machines, --machine-rank, --dist-url) of this node of a run, from SLURM's variables
    (submitit's JobEnvironment: the job's hostnames, this node's index) and the job id, which
    gives every job its own port."""
    port = 20000 + int(environ["SLURM_JOB_ID"]) % 20000
    return job_env.num_nodes, job_env.node, f"tcp://{job_env.hostnames[0]}:{port}"


def _ignore_preemption_signal():
    """The training process keeps training when SLURM warns the job (USR2): submitit's handler in
    the job's own process requeues it, and SLURM then stops the training at its last checkpoint."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class TrainingJob:
    """One run of the grid as a SLURM task: the training tool with ``--resume``, on this node.

    Callable by submitit; its ``checkpoint`` method makes submitit requeue the run when the job
    is preempted or reaches its time limit."""

    def __init__(self, tool, argv, run_dir, extra_opts, environ, processes_per_node):
        self.tool, self.argv, self.run_dir = tool, argv, run_dir
        self.extra_opts, self.environ, self.processes_per_node = extra_opts, environ, processes_per_node

    def command(self, job_env, environ):
        """This node's training command."""
        num_machines, machine_rank, dist_url = rendezvous(job_env, environ)
        launch = ["--num-machines", str(num_machines), "--machine-rank", str(machine_rank), "--dist-url", dist_url]
        multi_process = num_machines * self.processes_per_node > 1
        return [sys.executable, self.tool, "--resume", *(launch if multi_process else []), *self.argv,
                *self.extra_opts]

    def __call__(self):
        import submitit

        job_env = submitit.JobEnvironment()
        first = job_env.node == 0
        state = run_state(self.run_dir)
        started = time.time()
        if first:
            write_run_state(self.run_dir, **{**state, "status": "running", "job_id": job_env.job_id})
        log_name = "train_net.out" if first else f"train_net.node{job_env.node}.out"
        with open(os.path.join(self.run_dir, log_name), "a") as log:
            code = subprocess.call(self.command(job_env, os.environ), stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, **self.environ}, preexec_fn=_ignore_preemption_signal)
        if first:
            wall = state.get("wall_time_s", 0.0) + time.time() - started
            write_run_state(self.run_dir, **{**run_state(self.run_dir), "wall_time_s": wall,
                                             "status": "done" if code == 0 else f"failed (exit {code})"})
        if code:
            raise RuntimeError(f"training exited with {code}; see {os.path.join(self.run_dir, log_name)}")
        return code

    def checkpoint(self):
        """Requeue this run (it resumes from its last checkpoint)."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self)


# ----------------------------------------------------------------------------------------------
# The grid: submit, re-attach, follow, status


def queue_states(job_ids):
    """{job id: SLURM state} of those of ``job_ids`` still in the queue (array tasks one by one).

    Lists this user's jobs rather than asking for the ids: squeue refuses an id it has forgotten."""
    if not job_ids:
        return {}
    out = _command(["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i|%T"])
    states = dict(line.split("|") for line in out.splitlines() if "|" in line)
    return {j: states[j] for j in job_ids if states.get(j) in IN_QUEUE}


def why_failed(state):
    """A failed run's reason: the job's recorded exit, SLURM's own state where it still knows the
    job, and the tail of its log."""
    reasons = [state.get("status", "no status recorded")]
    job_id = state.get("job_id")
    if job_id and shutil.which("scontrol"):
        done = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=60)
        fields = dict(f.split("=", 1) for f in done.stdout.split() if "=" in f)
        if "JobState" in fields:
            reasons.append(f"SLURM: {fields['JobState']} {fields.get('Reason', '')}".strip())
    tail = _tail(state.get("slurm_stderr")) or _tail(os.path.join(state.get("run_dir", ""), "train_net.out"))
    return "; ".join(reasons) + (f"\n{tail}" if tail else "")


def _tail(path, lines=15):
    if not path or not os.path.isfile(path):
        return ""
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def plan_grid(runs):
    """Sort the runs of a grid into done, in the queue (re-attached), and to submit (with why a
    failed one is submitted again)."""
    states = {r.run_dir: run_state(r.run_dir) for r in runs}
    in_queue = queue_states([s["job_id"] for s in states.values() if s.get("job_id") and s.get("status") != "done"])
    done, attached, todo = [], [], []
    for r in runs:
        state = states[r.run_dir]
        if state.get("status") == "done":
            done.append(r)
        elif state.get("job_id") in in_queue:
            attached.append(r)
        else:
            if state.get("job_id"):
                print(f"[{r.arm} seed {r.seed}] job {state['job_id']} did not finish; submitting it again. Why: "
                      f"{why_failed({**state, 'run_dir': r.run_dir})}")
            todo.append(r)
    return done, attached, todo


def submit(todo, resources, folder, extra_opts, environ):
    """Submit ``todo`` as one job array; record each run's job id and log paths in its run.json and
    link its SLURM logs into its folder."""
    import submitit

    executor = submitit.SlurmExecutor(folder=os.path.join(folder, "%j"))
    executor.update_parameters(job_name="ohem_d2", **resources.executor_parameters(len(todo)))
    jobs = []
    with executor.batch():
        for r in todo:
            os.makedirs(r.run_dir, exist_ok=True)
            jobs.append(executor.submit(TrainingJob(r.tool_path, r.argv, r.run_dir, extra_opts, environ,
                                                    resources.processes_per_node)))
    for r, job in zip(todo, jobs):
        state = run_state(r.run_dir)
        # A job that started already (or finished) has recorded its own status: keep it.
        status = state.get("status") if state.get("job_id") == job.job_id else "submitted"
        state = {**state, "status": status, "argv": r.argv, "arm": r.arm, "seed": r.seed,
                 "launcher": "slurm", "job_id": job.job_id, "slurm_stdout": str(job.paths.stdout),
                 "slurm_stderr": str(job.paths.stderr)}
        write_run_state(r.run_dir, **state)
        for name, target in (("slurm.out", job.paths.stdout), ("slurm.err", job.paths.stderr)):
            link = os.path.join(r.run_dir, name)
            if os.path.lexists(link):
                os.remove(link)
            os.symlink(target, link)
        print(f"[{r.arm} seed {r.seed}] submitted as SLURM job {job.job_id}")


def status_lines(runs, max_iter):
    """One line per run: done / failed / queued / running with iteration and ETA / not submitted."""
    states = {r.run_dir: run_state(r.run_dir) for r in runs}
    in_queue = queue_states([s["job_id"] for s in states.values() if s.get("job_id")])
    lines = []
    for r in runs:
        state = states[r.run_dir]
        job = state.get("job_id")
        where = f" (job {job})" if job else ""
        slurm_state = in_queue.get(job)
        if state.get("status") == "done":
            text = "done"
        elif slurm_state == "PENDING":
            text = "queued"
        elif slurm_state or (state.get("status") == "running" and not job):  # in SLURM's queue, or a local run
            it = last_iteration(r.run_dir)
            per_it = seconds_per_iteration(r.run_dir)
            eta = f", ETA {(max_iter - it) * per_it / 60:.0f} min" if per_it else ""
            text = f"running, iteration {it}/{max_iter}{eta}"
        elif state.get("status"):
            text = f"not finished ({state['status']})"
        else:
            text = "not started"
        lines.append(f"{r.arm} seed {r.seed}: {text}{where}")
    return lines


def follow(runs, max_iter, poll_seconds=POLL_SECONDS):
    """Wait until no run of the grid is in the queue, printing progress; return the runs that did
    not finish."""
    last = None
    while True:
        states = {r.run_dir: run_state(r.run_dir) for r in runs}
        in_queue = queue_states([s["job_id"] for s in states.values() if s.get("job_id")])
        waiting = [r for r in runs if states[r.run_dir].get("job_id") in in_queue]
        progress = sum(max_iter if states[r.run_dir].get("status") == "done" else last_iteration(r.run_dir)
                       for r in runs)
        line = f"{len(waiting)} run(s) queued or running; {progress}/{max_iter * len(runs)} iterations done"
        if line != last:
            print(line, flush=True)
            last = line
        if not waiting:
            return [r for r in runs if run_state(r.run_dir).get("status") != "done"]
        time.sleep(poll_seconds)
