"""Results of a comparison: gathered from each run's files, summarised, tabulated, plotted.

Each run (one arm, one seed) is a Detectron2 output folder: ``metrics.json`` (losses, time per
iteration, ``ohem/*`` diagnostics, or ``stage{k}/ohem/*`` for each stage of a cascade,
``peak_gpu_mem_mb``), ``eval_results.json`` (final AP; absent for a run without a test set) and
``run.json`` (wall time, written by the runner). Where the run's test set records its unlabelled
look-alikes (the synthetic generator does), the detections the COCO evaluator saved
(``inference/<test set>/coco_instances_results.json``) give the false positives on them
(``ohem_d2/experiments/lookalikes.py``); ``config.yaml`` says which test set and JSON file that is. Nothing
here trains or evaluates; the report can be rebuilt from those files at any time.

Arms are compared paired: runs of the same seed share initialisation and data order, so the
per-seed difference to a reference arm removes what the seed alone changes, and the mean
difference gets a Student t confidence interval over the seeds both arms ran.
"""
import json
import os
import statistics
from collections import OrderedDict

import yaml

from .lookalikes import IOU_THRESHOLD, SCORE_THRESHOLD, lookalike_false_positives, records_lookalikes
from .paired import BETTER, CONFIDENCE, NO_DIFFERENCE, NO_PAIRS, ONE_SEED, WORSE, is_number, paired_difference

AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
FP_KEY = "fp_lookalikes_per_image"  # false positives on look-alikes per test image
FP_LABEL = "FP on look-alikes / image"
# False positives per image of the held-out negative pool, from each run's NEGATIVES_FILE
# (experiments/negative_pools.py writes it).
NEGATIVES_FILE = "held_out_negatives.json"
# Each run's look-alike counts, kept beside it when counted: a run folder without its detections
# (a published copy keeps the small files only) still reports them.
LOOKALIKES_FILE = "lookalikes.json"
NEGATIVES_KEY = "fp_per_negative_image"
NEGATIVES_LABEL = "FP / held-out negative image"
# The metrics compared paired against the reference arm, and how many decimals they are shown with.
PAIRED_DIGITS = OrderedDict([("AP", 2), ("AP50", 2), ("AP75", 2), (FP_KEY, 3), (NEGATIVES_KEY, 3)])
LOWER_IS_BETTER = {FP_KEY, NEGATIVES_KEY}
LABELS = {FP_KEY: FP_LABEL, NEGATIVES_KEY: NEGATIVES_LABEL}
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
# Detectron2's trainers write metrics.json every 20 iterations and at the last (PeriodicWriter of
# DefaultTrainer; a LazyConfig's train.log_period, 20 in its common config), so a short run has
# few points per curve. A picture with fewer than FEW_POINTS says so, and each point is marked.
WRITER_PERIOD = 20
FEW_POINTS = 5


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


def read_json(path):
    """The content of a JSON file (a test set, or the detections saved by the COCO evaluator)."""
    with open(path) as f:
        return json.load(f)


def json_reader():
    """``read_json`` that reads each file once: all runs of an experiment share one test set."""
    loaded = {}

    def read(path):
        if path not in loaded:
            loaded[path] = read_json(path)
        return loaded[path]

    return read


class LookalikesUnavailable(Exception):
    """Why a run has no count of false positives on look-alikes (said in results.json)."""


class NoDetections(LookalikesUnavailable):
    """The run's detections file is not there (deleted, or never written)."""


def lookalike_inputs(run_dir):
    """The detections file and test-set JSON of a run's first test set, from its config.yaml.

    Raises ``LookalikesUnavailable`` when the run has no test set, no saved detections, or a
    test set that is not a ``DATASETS.REGISTER_COCO`` entry (Detectron2's builtin datasets
    record no look-alikes).
    """
    config_file = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(config_file):
        raise LookalikesUnavailable("no config.yaml in the run folder")
    try:
        with open(config_file) as f:
            datasets = (yaml.safe_load(f) or {}).get("DATASETS", {})
    except yaml.YAMLError:  # a LazyConfig's config.yaml holds Python objects
        raise LookalikesUnavailable("config.yaml is not a yacs config (look-alikes are counted for yacs runs)") from None
    if not datasets.get("TEST"):
        raise LookalikesUnavailable("no test set")
    name = datasets["TEST"][0]
    detections = os.path.join("inference", name, "coco_instances_results.json")
    if not os.path.isfile(os.path.join(run_dir, detections)):
        raise NoDetections(f"no detections file {detections}")
    json_files = {entry[0]: entry[1] for entry in datasets.get("REGISTER_COCO", [])}
    if name not in json_files:
        raise LookalikesUnavailable(f"test set {name!r} is not a DATASETS.REGISTER_COCO entry")
    if not os.path.isfile(json_files[name]):
        raise LookalikesUnavailable(f"test set JSON {json_files[name]} not found")
    return os.path.join(run_dir, detections), json_files[name]


def summarize_lookalikes(run_dir, read_test_set=read_json, score_threshold=SCORE_THRESHOLD):
    """The run's false positives on look-alikes (``lookalike_false_positives``, plus the test-set
    JSON they were counted against), or ``{"unavailable": why}``. Counted from the run's detections
    and kept in ``run_dir/``:data:`LOOKALIKES_FILE`; read from there where the detections are gone
    (at the same score threshold)."""
    kept = os.path.join(run_dir, LOOKALIKES_FILE)
    try:
        detections_file, test_json = lookalike_inputs(run_dir)
        coco = read_test_set(test_json)
        if not records_lookalikes(coco):
            raise LookalikesUnavailable("the test set JSON records no look-alikes")
        counts = lookalike_false_positives(read_json(detections_file), coco, score_threshold)
    except NoDetections as e:
        known = read_json(kept) if os.path.isfile(kept) else {}
        return known if known.get("score_threshold") == score_threshold else {"unavailable": str(e)}
    except (LookalikesUnavailable, ValueError) as e:  # ValueError: unreadable or mismatched files
        return {"unavailable": str(e)}
    summary = {"test_json": test_json, **counts}
    with open(kept, "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def summarize_run(run_dir, read_test_set=read_json, score_threshold=SCORE_THRESHOLD):
    """One run's numbers: final AP metrics, loss curve, diagnostics, speed, memory, wall time,
    false positives on look-alikes (detections scoring at least ``score_threshold``)."""
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
        "lookalikes": summarize_lookalikes(run_dir, read_test_set, score_threshold),
        "negatives": held_out_negatives(run_dir),
    }


def held_out_negatives(run_dir):
    """The run's false positives per held-out negative image, None where it was not scored."""
    path = os.path.join(run_dir, NEGATIVES_FILE)
    return read_json(path)["false_positives_per_image"] if os.path.isfile(path) else None


def mean_std(values):
    values = [v for v in values if is_number(v)]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired_value(run, key):
    """A run's value of a paired metric: an AP metric, its look-alike false positives per image, or
    its false positives per held-out negative image."""
    if key == NEGATIVES_KEY:
        return run["negatives"]
    return run["lookalikes"].get("per_image") if key == FP_KEY else run["metrics"].get(key)


def choose_reference(arms, reference=None):
    """The arm the others are compared with: ``reference``, or the first of ``arms`` if None.

    Raises ``ValueError`` for a reference that is not one of the arms.
    """
    arms = list(arms)
    if reference is None:
        return arms[0]
    if reference not in arms:
        raise ValueError(f"reference arm {reference!r} is not one of the arms ({', '.join(arms)})")
    return reference


def compare_to_reference(runs, reference):
    """{arm: {metric: paired_difference against ``reference``}} for every arm but the reference
    (``runs``: {arm: {seed: summarize_run output}})."""
    reference_runs = runs[reference]
    return {
        arm: {key: paired_difference({s: paired_value(r, key) for s, r in seeds.items()},
                                     {s: paired_value(r, key) for s, r in reference_runs.items()},
                                     higher_is_better=key not in LOWER_IS_BETTER)
              for key in PAIRED_DIGITS}
        for arm, seeds in runs.items() if arm != reference
    }


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
    scalars[FP_KEY] = [r["lookalikes"].get("per_image") for r in seeds]
    scalars[NEGATIVES_KEY] = [r["negatives"] for r in seeds]
    diagnostics = sorted(set(DIAGNOSTICS) | {k for r in seeds for k in r["diagnostics"]})
    scalars.update({k: [_tail_mean(r["diagnostics"].get(k)) for r in seeds] for k in diagnostics})
    classes = _class_order(r["per_class_ap"] for r in seeds)
    scalars.update({f"AP-{c}": [r["per_class_ap"].get(c) for r in seeds] for c in classes})
    for key, values in scalars.items():
        out["mean"][key], out["std"][key] = mean_std(values)
    return out


def _class_order(per_class):
    """The classes of the dicts ``per_class`` in their order, the dataset's (COCOEvaluator writes
    AP-<class> in the order of thing_classes), each once."""
    return list(dict.fromkeys(c for classes in per_class for c in classes))


def _fmt(mean, std=None, digits=1, n=1):
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f}" if n < 2 or std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(results):
    """The comparison as Markdown: AP table, paired differences to the reference arm, per-class
    AP deltas, mining diagnostics."""
    sections = [_ap_table(results), _lookalike_notes(results), _paired_table(results),
                _per_class_table(results), _mining_table(results)]
    return "\n\n".join("\n".join(lines) for lines in sections if lines) + "\n"


def _ap_table(results):
    """Absolute numbers per arm: mean ± std over seeds."""
    arms = results["arms"]
    negatives = any(arm["mean"][NEGATIVES_KEY] is not None for arm in arms.values())  # a held-out pool scored
    lines = [
        "| arm | seeds | " + " | ".join(AP_KEYS) + f" | {FP_LABEL} | " + (f"{NEGATIVES_LABEL} | " if negatives else "")
        + "s/iter | peak GPU mem (MiB) | wall time (min) |",
        "|---" * (len(AP_KEYS) + 6 + negatives) + "|",
    ]
    for name, arm in arms.items():
        m, s, n = arm["mean"], arm["std"], len(arm["seeds"])
        cells = [_fmt(m[k], s[k], 1, n) for k in AP_KEYS] + [_fmt(m[FP_KEY], s[FP_KEY], 3, n)]
        if negatives:
            cells.append(_fmt(m[NEGATIVES_KEY], s[NEGATIVES_KEY], 3, n))
        cells += [_fmt(m["s_per_iter"], s["s_per_iter"], 3, n), _fmt(m["peak_gpu_mem_mb"], None, 0),
                  _fmt(None if m["wall_time_s"] is None else m["wall_time_s"] / 60, None, 1)]
        lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
    return lines


def _lookalike_notes(results):
    """Why runs have no look-alike count (one line per distinct reason), if any has none."""
    missing = {}
    for name, arm in results["arms"].items():
        for seed, run in arm["runs"].items():
            if "unavailable" in run["lookalikes"]:
                missing.setdefault(run["lookalikes"]["unavailable"], []).append(f"{name} seed {seed}")
    if not missing:
        return []
    total = sum(len(arm["runs"]) for arm in results["arms"].values())
    return [f"{FP_LABEL} is n/a for " + "; ".join(
        f"{'every run' if len(runs) == total else ', '.join(runs)}: {why}" for why, runs in missing.items()) + "."]


def _paired_table(results):
    """Each arm minus the reference, seed by seed: mean, t-interval and verdict per metric.

    Metrics no arm could be paired on (no test set, no look-alikes) get no rows.
    """
    reference = results["reference"]
    others = [(name, arm["paired"]["metrics"]) for name, arm in results["arms"].items() if arm["paired"]]
    keys = [k for k in PAIRED_DIGITS if any(metrics[k]["n"] for _, metrics in others)]
    if not keys:
        return []
    lines = [f"Paired differences, arm - {reference}, over the seeds both ran (a seed gives both arms the "
             f"same initialisation and data order): per seed, mean and {CONFIDENCE:.0%} t-interval (Student t, "
             f"n-1 degrees of freedom). Verdict: better or worse where the interval excludes 0; for "
             f"{FP_LABEL} (score >= {results['lookalikes']['score_threshold']}) fewer is better.", "",
             "| difference | metric | seeds | per seed (seed: difference) | mean "
             f"| {CONFIDENCE:.0%} interval | verdict |",
             "|---" * 7 + "|"]
    for name, metrics in others:
        for key in keys:
            lines.append(_paired_row(f"{name} - {reference}", key, metrics[key]))
    return lines


def _paired_row(label, key, paired):
    digits = PAIRED_DIGITS[key]
    per_seed = ", ".join(f"{s}: {d:+.{digits}f}" for s, d in paired["differences"].items()) or "n/a"
    mean = "n/a" if paired["mean"] is None else f"{paired['mean']:+.{digits}f}"
    interval = ("n/a" if paired["ci_low"] is None
                else f"[{paired['ci_low']:+.{digits}f}, {paired['ci_high']:+.{digits}f}]")
    metric = LABELS.get(key, key)
    return f"| {label} | {metric} | {paired['n']} | {per_seed} | {mean} | {interval} | {paired['verdict']} |"


def _per_class_table(results):
    """Per-class AP of the reference arm and the other arms' difference to it (means over seeds)."""
    arms, reference = results["arms"], results["reference"]
    others = [n for n in arms if n != reference]
    classes = _class_order([k[3:] for k in a["mean"] if k.startswith("AP-")] for a in arms.values())
    if not classes or not others:
        return []
    lines = [f"Per-class AP: {reference}, and the other arms' difference to it.", "",
             f"| class | {reference} | " + " | ".join(f"Δ {n}" for n in others) + " |",
             "|---" * (len(others) + 2) + "|"]
    for c in classes:
        ref = arms[reference]["mean"].get(f"AP-{c}")
        deltas = [
            "n/a" if ref is None or arms[n]["mean"].get(f"AP-{c}") is None
            else f"{arms[n]['mean'][f'AP-{c}'] - ref:+.1f}"
            for n in others
        ]
        lines.append(f"| {c} | {_fmt(ref)} | " + " | ".join(deltas) + " |")
    return lines


def _mining_table(results):
    """The mining diagnostics of each arm (and cascade stage) that logged them."""
    arms = results["arms"]
    mining = [(n, scope) for n in arms for scope in _arm_scopes(arms[n])]
    if not mining:
        return []
    lines = ["Mining diagnostics (mean of the last 20% of logged iterations).", "",
             "| arm | " + " | ".join(DIAGNOSTICS.values()) + " |", "|---" * (len(DIAGNOSTICS) + 1) + "|"]
    for n, scope in mining:
        m, s, k = arms[n]["mean"], arms[n]["std"], len(arms[n]["seeds"])
        cells = [_fmt(m.get(scope + d), s.get(scope + d), 3, k) for d in DIAGNOSTICS]
        lines.append(f"| {scope_label(n, scope)} | " + " | ".join(cells) + " |")
    return lines


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
    """loss.png, ap.png (paired differences, if any arm pairs with the reference) and mining.png
    (if any arm mines) in ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    points = []
    for arm, seeds in runs.items():
        its, values = _mean_curve([r["loss"] for r in seeds.values()])
        ax.plot(its, values, marker="o", markersize=5, label=arm)
        points.append(len(its))
    ax.set(xlabel="iteration", ylabel="total training loss", title="Training loss (mean over seeds)")
    ax.legend()
    paths.append(_save(fig, out_dir, "loss.png", _few_points_note(points)))

    paired = _paired_plot(results, plt)
    if paired:
        paths.append(_save(paired, out_dir, "ap.png"))

    mining = [(arm, scope, seeds) for arm, seeds in runs.items() for scope in _arm_scopes(results["arms"][arm])]
    if mining:
        keys = ["ohem/fg_fraction_mined", "ohem/bg_below_bg_lo_share", "ohem/nms_removed_per_image",
                "ohem/loss_mined_mean"]
        fig, axes = plt.subplots(2, 2, figsize=(10, 7))
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        points = []
        for ax, key in zip(axes.flat, keys):
            for i, (arm, scope, seeds) in enumerate(mining):
                colour = colours[i % len(colours)]
                its, values = _mean_curve([r["diagnostics"].get(scope + key, []) for r in seeds.values()])
                ax.plot(its, values, marker="o", markersize=5, label=scope_label(arm, scope), color=colour)
                points.append(len(its))
                if key == "ohem/loss_mined_mean":  # against the mean over all candidates, dashed
                    all_rois = scope + "ohem/loss_all_mean"
                    its, values = _mean_curve([r["diagnostics"].get(all_rois, []) for r in seeds.values()])
                    ax.plot(its, values, linestyle="--", marker="o", markersize=5, markerfacecolor="none",
                            color=colour)
            ax.set(xlabel="iteration", title=DIAGNOSTICS[key] + (" (dashed: all RoIs)" if key.endswith("mined_mean") else ""))
        axes.flat[0].legend()
        fig.suptitle("What the miner picks, over training")
        paths.append(_save(fig, out_dir, "mining.png", _few_points_note(points)))
    return paths


def _few_points_note(points):
    """Why the curves are short, where one has fewer than FEW_POINTS logged points (``points``:
    the count of each curve); else None."""
    fewest = min(points, default=FEW_POINTS)
    if fewest >= FEW_POINTS:
        return None
    return (f"Only {fewest} logged point{'s' if fewest != 1 else ''} per curve: Detectron2 writes metrics.json\n"
            f"every {WRITER_PERIOD} iterations and at the last; a longer run draws a curve.")


def _paired_plot(results, plt):
    """The paired differences to the reference arm: per arm and metric a point at the mean with
    its t-interval (no bar: one seed), around a zero line, scaled to the differences so that a
    difference of a point or two shows. AP metrics share a panel; look-alike false positives, in
    other units, get their own. None if no arm pairs with the reference on any metric."""
    reference = results["reference"]
    others = [(name, arm["paired"]["metrics"]) for name, arm in results["arms"].items() if arm["paired"]]
    threshold = results["lookalikes"]["score_threshold"]
    panels = [(keys, title) for keys, title in ((("AP", "AP50", "AP75"), "AP points (higher is better)"),
                                                ((FP_KEY,), f"{FP_LABEL}, score >= {threshold} (lower is better)"))
              if any(metrics[k]["n"] for _, metrics in others for k in keys)]
    if not panels:
        return None
    # Wide enough per arm for three labelled points side by side; one panel above the other.
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 1.5 + 2.4 * len(others)), 0.5 + 3.5 * len(panels)),
                             squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (keys, title) in zip(axes[:, 0], panels):
        for j, key in enumerate(keys):
            offset = (j - (len(keys) - 1) / 2) * 0.28
            points = [(i + offset, metrics[key]) for i, (_, metrics) in enumerate(others) if metrics[key]["n"]]
            _draw_differences(ax, points, colours[j % len(colours)], FP_LABEL if key == FP_KEY else key,
                              PAIRED_DIGITS[key])
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(others)), [f"{name} - {reference}" for name, _ in others])
        ax.tick_params(axis="x", labelrotation=20)
        ax.set(title=title, ylabel=f"arm - {reference}", xlim=(-0.6, len(others) - 0.4))
        ax.margins(y=0.1)
        ax.legend(fontsize=8)
    fig.suptitle(f"Paired differences to {reference}: mean over seeds and {CONFIDENCE:.0%} t-interval\n"
                 "(hollow: one seed, no interval)", fontsize=11)
    return fig


def _draw_differences(ax, points, colour, label, digits):
    """Points (x, paired_difference) of one metric: error bars where there is an interval,
    hollow markers where there is none (one seed), each labelled with its mean."""
    with_interval = [(x, p) for x, p in points if p["ci_low"] is not None]
    if with_interval:
        xs, ps = zip(*with_interval)
        ax.errorbar(xs, [p["mean"] for p in ps], capsize=4, fmt="o", color=colour, label=label,
                    yerr=[[p["mean"] - p["ci_low"] for p in ps], [p["ci_high"] - p["mean"] for p in ps]])
    single = [(x, p) for x, p in points if p["ci_low"] is None]
    if single:
        ax.plot([x for x, _ in single], [p["mean"] for _, p in single], "o", markerfacecolor="none", color=colour,
                label=None if with_interval else label)
    for x, p in points:
        ax.annotate(f"{p['mean']:+.{digits}f}", (x, p["mean"]), xytext=(3, 0), textcoords="offset points",
                    fontsize=7, va="center")


def _save(fig, out_dir, name, note=None):
    """``fig`` as ``out_dir/name``, with ``note`` (lines of text) under its plots if given."""
    path = os.path.join(out_dir, name)
    bottom = 0.0
    if note:
        fig.text(0.5, 0.01, note, ha="center", va="bottom", fontsize=9, color="dimgray")
        bottom = (note.count("\n") + 1) * 9 * 1.5 / 72 / fig.get_figheight()  # its lines' height, 9 pt text
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def write_report(experiment, run_dirs, out_dir, reference=None, score_threshold=SCORE_THRESHOLD):
    """Summarise ``run_dirs`` ({arm: {seed: dir}}) into results.json, results.md and plots.

    Every arm is compared paired with ``reference`` (default: the first arm); an unknown
    reference raises ``ValueError``. False positives on look-alikes count the detections that
    score at least ``score_threshold``.
    """
    reference = choose_reference(run_dirs, reference)
    read_test_set = json_reader()
    runs = {arm: {seed: summarize_run(d, read_test_set, score_threshold) for seed, d in seeds.items()}
            for arm, seeds in run_dirs.items()}
    paired = compare_to_reference(runs, reference)
    results = {
        "experiment": experiment,
        "reference": reference,
        "paired": {"reference": reference, "metrics": list(PAIRED_DIGITS), "confidence": CONFIDENCE,
                   "interval": "Student t with n-1 degrees of freedom over the n seeds both arms ran",
                   "verdicts": [BETTER, WORSE, NO_DIFFERENCE, ONE_SEED, NO_PAIRS]},
        "lookalikes": {"metric": FP_KEY, "score_threshold": score_threshold, "iou_threshold": IOU_THRESHOLD,
                       "definition": "detections per test image with score >= score_threshold whose box has "
                                     "IoU >= iou_threshold with an unlabelled look-alike of the image and "
                                     "IoU < iou_threshold with every annotated object of it"},
        "arms": {arm: summarize_arm(r) for arm, r in runs.items()},
    }
    for arm, seeds in runs.items():
        results["arms"][arm]["paired"] = {"reference": reference, "metrics": paired[arm]} if arm in paired else None
        results["arms"][arm]["runs"] = {str(s): {k: r[k] for k in ("metrics", "per_class_ap", "s_per_iter",
                                                                   "peak_gpu_mem_mb", "wall_time_s", "lookalikes",
                                                                   "negatives")}
                                        for s, r in seeds.items()}
    table = markdown_table(results)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(table)
    plots = plot(results, runs, out_dir)
    return results, table, plots
