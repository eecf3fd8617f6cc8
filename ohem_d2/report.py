"""Results of a comparison: gathered from each run's files, summarised, tabulated, plotted.

Each run (one arm, one seed) is a Detectron2 output folder: ``metrics.json`` (losses, time per
iteration, ``ohem/*`` diagnostics, or ``stage{k}/ohem/*`` for each stage of a cascade,
``peak_gpu_mem_mb``), ``eval_results.json`` (final AP; absent for a run without a test set) and
``run.json`` (wall time, written by the runner). Nothing here trains or evaluates; the report
can be rebuilt from those files at any time.
"""
import json
import math
import os
import statistics
from collections import OrderedDict

AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# Mining diagnostics shown in the table and plots, with their labels.
DIAGNOSTICS = OrderedDict(
    [
        ("ohem/fg_fraction_mined", "fg share of mined RoIs"),
        ("ohem/bg_below_bg_lo_share", "share of mined bg with IoU < 0.1"),
        ("ohem/nms_removed_per_image", "RoIs removed by NMS / image"),
        ("ohem/candidates_per_image", "candidate RoIs / image"),
        ("ohem/loss_mined_mean", "mean loss, mined RoIs"),
        ("ohem/loss_all_mean", "mean loss, all RoIs"),
    ]
)
WARMUP_ITERS_IGNORED = 5  # first iterations' times include start-up costs


def read_metrics(path):
    """The records of a Detectron2 ``metrics.json`` (one JSON object per line)."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def training_records(path):
    """The per-iteration records of a ``metrics.json``, one per iteration, in iteration order.

    A run resumed from a checkpoint repeats the iterations it had logged after that checkpoint;
    the later record of an iteration (the one the resumed run trained on) replaces the earlier.
    """
    by_iteration = {r["iteration"]: r for r in read_metrics(path) if "iteration" in r}
    return [by_iteration[it] for it in sorted(by_iteration)]


def mining_scopes(records):
    """The prefixes the mining diagnostics are logged under: "" for one box stage, "stage{k}/"
    for each stage of a cascade."""
    suffix = "ohem/fg_fraction_mined"
    return sorted({k[: -len(suffix)] for r in records for k in r if k.endswith(suffix)})


def scope_label(arm, scope):
    """``arm`` in tables and plots, with the cascade stage of ``scope`` if any."""
    return f"{arm} ({scope.rstrip('/').replace('stage', 'stage ')})" if scope else arm


def summarize_run(run_dir):
    """One run's numbers: final AP metrics, loss curve, diagnostics, speed, memory, wall time."""
    records = training_records(os.path.join(run_dir, "metrics.json"))
    eval_file = os.path.join(run_dir, "eval_results.json")
    evaluation = {}
    if os.path.isfile(eval_file):
        with open(eval_file) as f:
            evaluation = json.load(f)
    boxes = evaluation.get("bbox", {})
    with open(os.path.join(run_dir, "run.json")) as f:
        run = json.load(f)
    times = [r["time"] for r in records if "time" in r and r["iteration"] >= WARMUP_ITERS_IGNORED]
    times = times or [r["time"] for r in records if "time" in r]
    peaks = [r["peak_gpu_mem_mb"] for r in records if "peak_gpu_mem_mb" in r]
    return {
        "metrics": {k: boxes[k] for k in AP_KEYS if k in boxes},
        "per_class_ap": {k[3:]: v for k, v in boxes.items() if k.startswith("AP-")},
        "loss": [(r["iteration"], r["total_loss"]) for r in records if "total_loss" in r],
        "diagnostics": {
            scope + key: [(r["iteration"], r[scope + key]) for r in records if scope + key in r]
            for scope in mining_scopes(records) for key in DIAGNOSTICS
        },
        "s_per_iter": statistics.median(times) if times else None,
        "peak_gpu_mem_mb": max(peaks) if peaks else None,
        "wall_time_s": run.get("wall_time_s"),
    }


def mean_std(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _tail_mean(series, fraction=0.2):
    """Mean of the last ``fraction`` of a (iteration, value) series: the diagnostic at the end."""
    if not series:
        return None
    tail = series[-max(1, int(len(series) * fraction)) :]
    return statistics.fmean(v for _, v in tail)


def summarize_arm(runs):
    """Mean and std over seeds of every scalar of ``runs`` (seed -> summarize_run output)."""
    seeds = list(runs.values())
    out = {"seeds": sorted(runs), "mean": {}, "std": {}}
    scalars = {k: [r["metrics"].get(k) for r in seeds] for k in AP_KEYS}
    scalars.update({k: [r[k] for r in seeds] for k in ("s_per_iter", "peak_gpu_mem_mb", "wall_time_s")})
    diagnostics = sorted(set(DIAGNOSTICS) | {k for r in seeds for k in r["diagnostics"]})
    scalars.update({k: [_tail_mean(r["diagnostics"].get(k)) for r in seeds] for k in diagnostics})
    classes = sorted({c for r in seeds for c in r["per_class_ap"]})
    scalars.update({f"AP-{c}": [r["per_class_ap"].get(c) for r in seeds] for c in classes})
    for key, values in scalars.items():
        out["mean"][key], out["std"][key] = mean_std(values)
    return out


def _fmt(mean, std=None, digits=1, n=1):
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f}" if n < 2 or std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(results):
    """The comparison as Markdown: AP table, per-class AP deltas, mining diagnostics."""
    arms = results["arms"]
    names = list(arms)
    lines = [
        "| arm | seeds | " + " | ".join(AP_KEYS) + " | s/iter | peak GPU mem (MiB) | wall time (min) |",
        "|---" * (len(AP_KEYS) + 5) + "|",
    ]
    for name in names:
        m, s, n = arms[name]["mean"], arms[name]["std"], len(arms[name]["seeds"])
        cells = [_fmt(m[k], s[k], 1, n) for k in AP_KEYS]
        cells += [_fmt(m["s_per_iter"], s["s_per_iter"], 3, n), _fmt(m["peak_gpu_mem_mb"], None, 0),
                  _fmt(None if m["wall_time_s"] is None else m["wall_time_s"] / 60, None, 1)]
        lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")

    classes = sorted({k[3:] for a in arms.values() for k in a["mean"] if k.startswith("AP-")})
    reference = names[0]
    if classes and len(names) > 1:
        lines += ["", f"Per-class AP: {reference}, and the other arms' difference to it.", "",
                  f"| class | {reference} | " + " | ".join(f"Δ {n}" for n in names[1:]) + " |",
                  "|---" * (len(names) + 1) + "|"]
        for c in classes:
            ref = arms[reference]["mean"].get(f"AP-{c}")
            deltas = [
                "n/a" if ref is None or arms[n]["mean"].get(f"AP-{c}") is None
                else f"{arms[n]['mean'][f'AP-{c}'] - ref:+.1f}"
                for n in names[1:]
            ]
            lines.append(f"| {c} | {_fmt(ref)} | " + " | ".join(deltas) + " |")

    mining = [(n, scope) for n in names for scope in _arm_scopes(arms[n])]
    if mining:
        lines += ["", "Mining diagnostics (mean of the last 20% of logged iterations).", "",
                  "| arm | " + " | ".join(DIAGNOSTICS.values()) + " |", "|---" * (len(DIAGNOSTICS) + 1) + "|"]
        for n, scope in mining:
            m, s, k = arms[n]["mean"], arms[n]["std"], len(arms[n]["seeds"])
            cells = [_fmt(m.get(scope + d), s.get(scope + d), 3, k) for d in DIAGNOSTICS]
            lines.append(f"| {scope_label(n, scope)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _arm_scopes(arm_summary):
    """The mining scopes an arm's summary has values for ("" or "stage{k}/")."""
    suffix = "ohem/fg_fraction_mined"
    return sorted(k[: -len(suffix)] for k, v in arm_summary["mean"].items() if k.endswith(suffix) and v is not None)


def _mean_curve(series_per_seed):
    """Average (iteration, value) series over seeds at the iterations they share."""
    by_iter = {}
    for series in series_per_seed:
        for it, v in series:
            by_iter.setdefault(it, []).append(v)
    common = sorted(it for it, vs in by_iter.items() if len(vs) == len(series_per_seed))
    return common, [statistics.fmean(by_iter[it]) for it in common]


def plot(results, runs, out_dir):
    """loss.png, ap.png and mining.png in ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for arm, seeds in runs.items():
        its, values = _mean_curve([r["loss"] for r in seeds.values()])
        ax.plot(its, values, label=arm)
    ax.set(xlabel="iteration", ylabel="total training loss", title="Training loss (mean over seeds)")
    ax.legend()
    paths.append(_save(fig, out_dir, "loss.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    arms = list(results["arms"])
    means = [results["arms"][a]["mean"]["AP"] or 0.0 for a in arms]
    stds = [results["arms"][a]["std"]["AP"] or 0.0 for a in arms]
    ax.bar(arms, means, yerr=stds, capsize=4, color="tab:blue")
    for i, m in enumerate(means):
        ax.text(i, m, f"{m:.1f}", ha="center", va="bottom")
    ax.set(ylabel="AP (COCO, IoU .50:.95)", title="AP per arm (mean ± std over seeds)")
    ax.tick_params(axis="x", labelrotation=20)
    paths.append(_save(fig, out_dir, "ap.png"))

    mining = [(arm, scope, seeds) for arm, seeds in runs.items() for scope in _arm_scopes(results["arms"][arm])]
    if mining:
        keys = ["ohem/fg_fraction_mined", "ohem/bg_below_bg_lo_share", "ohem/nms_removed_per_image",
                "ohem/loss_mined_mean"]
        fig, axes = plt.subplots(2, 2, figsize=(10, 7))
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for ax, key in zip(axes.flat, keys):
            for i, (arm, scope, seeds) in enumerate(mining):
                colour = colours[i % len(colours)]
                its, values = _mean_curve([r["diagnostics"].get(scope + key, []) for r in seeds.values()])
                ax.plot(its, values, label=scope_label(arm, scope), color=colour)
                if key == "ohem/loss_mined_mean":  # against the mean over all candidates, dashed
                    all_rois = scope + "ohem/loss_all_mean"
                    its, values = _mean_curve([r["diagnostics"].get(all_rois, []) for r in seeds.values()])
                    ax.plot(its, values, linestyle="--", color=colour)
            ax.set(xlabel="iteration", title=DIAGNOSTICS[key] + (" (dashed: all RoIs)" if key.endswith("mined_mean") else ""))
        axes.flat[0].legend()
        fig.suptitle("What the miner picks, over training")
        paths.append(_save(fig, out_dir, "mining.png"))
    return paths


def _save(fig, out_dir, name):
    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def write_report(experiment, run_dirs, out_dir):
    """Summarise ``run_dirs`` ({arm: {seed: dir}}) into results.json, results.md and plots."""
    runs = {arm: {seed: summarize_run(d) for seed, d in seeds.items()} for arm, seeds in run_dirs.items()}
    results = {"experiment": experiment, "arms": {arm: summarize_arm(r) for arm, r in runs.items()}}
    for arm, seeds in runs.items():
        results["arms"][arm]["runs"] = {str(s): {k: r[k] for k in ("metrics", "per_class_ap", "s_per_iter",
                                                                   "peak_gpu_mem_mb", "wall_time_s")}
                                        for s, r in seeds.items()}
    table = markdown_table(results)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(table)
    plots = plot(results, runs, out_dir)
    return results, table, plots
