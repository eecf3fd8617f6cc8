#!/usr/bin/env python
"""One table and one plot across the experiments of a sweep (scripts/rarity_study.sh): for each
experiment folder (one look-alike rarity) and arm, the mean AP and look-alike false positives, and
the paired difference to the reference arm with its 95% t-interval and verdict, as each folder's
results.json has them (tools/run_experiment.py wrote them; nothing is recomputed here).

    python scripts/rarity_summary.py output/rarity_study/lookalikes_{0.05,0.2,0.6} --out output/rarity_study
"""
import argparse
import json
import os

METRICS = (("AP", "AP", 1), ("fp_lookalikes_per_image", "FP on look-alikes / image", 3))


def load(folders):
    """[(share of images with a look-alike, results)] in the order of ``folders``."""
    sweep = []
    for folder in folders:
        with open(os.path.join(folder, "results.json")) as f:
            results = json.load(f)
        synthetic = results["experiment"]["synthetic_dataset"]
        if synthetic["max_distractors"] != 1:
            raise SystemExit(f"error: {folder}: max_distractors is {synthetic['max_distractors']}; the share of "
                             "images with a look-alike is distractor_prob only with max_distractors 1")
        sweep.append((synthetic["distractor_prob"], results))
    return sweep


def _cell(paired, digits):
    if paired["n"] < 2:
        return f"{paired['mean']:+.{digits}f} (one seed)"
    return (f"{paired['mean']:+.{digits}f} [{paired['ci_low']:+.{digits}f}, {paired['ci_high']:+.{digits}f}] "
            f"{paired['verdict']}")


def markdown(sweep):
    lines = []
    for key, label, digits in METRICS:
        reference = sweep[0][1]["reference"]
        lines += [f"{label}: mean over seeds, and the paired difference to {reference} (mean, 95% Student t "
                  "interval, verdict).", "",
                  "| look-alikes in | arm | seeds | mean | paired difference to " + reference + " |",
                  "|---|---|---|---|---|"]
        for share, results in sweep:
            for arm, summary in results["arms"].items():
                paired = summary["paired"]["metrics"][key] if summary["paired"] else None
                lines.append(f"| {share:.0%} of images | {arm} | {len(summary['seeds'])} | "
                             f"{summary['mean'][key]:.{digits}f} | {_cell(paired, digits) if paired else 'reference'} |")
        lines.append("")
    return "\n".join(lines)


def plot(sweep, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = [share for share, _ in sweep]
    arms = [arm for arm, s in sweep[0][1]["arms"].items() if s["paired"]]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(6 * len(METRICS), 4))
    for ax, (key, label, _) in zip(axes, METRICS):
        for i, arm in enumerate(arms):
            offset = (i - (len(arms) - 1) / 2) * 0.012  # side by side at each share
            points = [(share + offset, results["arms"][arm]["paired"]["metrics"][key]) for share, results in sweep]
            x = [p for p, _ in points]
            mean = [d["mean"] for _, d in points]
            err = [[d["mean"] - d["ci_low"] for _, d in points], [d["ci_high"] - d["mean"] for _, d in points]]
            ax.errorbar(x, mean, yerr=err, marker="o", capsize=3, label=arm)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(shares, [f"{s:.0%}" for s in shares])
        ax.set_xlabel("images with an unlabelled look-alike")
        ax.set_ylabel(f"{label}, arm - {sweep[0][1]['reference']}")
        ax.set_title(f"paired difference in {label} (95% t-interval)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="experiment folders of tools/run_experiment.py")
    parser.add_argument("--out", required=True, help="where summary.md and summary.png go")
    args = parser.parse_args(argv)
    sweep = load(args.folders)
    os.makedirs(args.out, exist_ok=True)
    table = markdown(sweep)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(table)
    plot(sweep, os.path.join(args.out, "summary.png"))
    print(table)


if __name__ == "__main__":
    main()
