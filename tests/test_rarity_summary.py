"""scripts/rarity_summary.py: the sweep's table and plot from made-up results.json files."""
import json
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import rarity_summary  # noqa: E402


def paired(mean, low, high, verdict, n=5):
    return {"n": n, "mean": mean, "ci_low": low, "ci_high": high, "verdict": verdict}


def write_results(folder, share, ohem_ap, ohem_fp, max_distractors=1):
    folder.mkdir()
    arms = {
        "stock": {"seeds": [0, 1, 2, 3, 4], "mean": {"AP": 50.0, "fp_lookalikes_per_image": 0.2}, "paired": None},
        "ohem": {"seeds": [0, 1, 2, 3, 4], "mean": {"AP": 50.0 + ohem_ap[0], "fp_lookalikes_per_image": 0.2 + ohem_fp[0]},
                 "paired": {"reference": "stock", "metrics": {"AP": paired(*ohem_ap), "fp_lookalikes_per_image": paired(*ohem_fp)}}},
    }
    experiment = {"synthetic_dataset": {"distractor_prob": share, "max_distractors": max_distractors}}
    (folder / "results.json").write_text(json.dumps({"experiment": experiment, "reference": "stock", "arms": arms}))
    return str(folder)


def test_table_and_plot_of_a_sweep(tmp_path):
    rare = write_results(tmp_path / "rare", 0.05, (-1.0, -3.0, 1.0, "no detectable difference"),
                         (0.0, -0.01, 0.01, "no detectable difference"))
    common = write_results(tmp_path / "common", 0.6, (2.5, 0.5, 4.5, "better"), (-0.1, -0.15, -0.05, "better"))
    rarity_summary.main([rare, common, "--out", str(tmp_path / "out")])
    table = (tmp_path / "out" / "summary.md").read_text()
    assert "| 5% of images | stock | 5 | 50.0 | reference |" in table
    assert "| 60% of images | ohem | 5 | 52.5 | +2.5 [+0.5, +4.5] better |" in table
    assert "| 60% of images | ohem | 5 | 0.100 | -0.100 [-0.150, -0.050] better |" in table
    assert "| 5% of images | ohem | 5 | 49.0 | -1.0 [-3.0, +1.0] no detectable difference |" in table
    assert (tmp_path / "out" / "summary.png").stat().st_size > 1000


def test_a_sweep_with_several_look_alikes_per_image_is_refused(tmp_path):
    folder = write_results(tmp_path / "many", 0.6, (0, 0, 0, "x"), (0, 0, 0, "x"), max_distractors=4)
    with pytest.raises(SystemExit, match="max_distractors is 4"):
        rarity_summary.main([folder, "--out", str(tmp_path / "out")])
