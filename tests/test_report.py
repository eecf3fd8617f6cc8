"""The runner's report from run folders: resumed runs, cascade diagnostics, runs without a test set."""
import json
import math
import shutil
from pathlib import Path

import pytest

from ohem_d2.experiments.paired import paired_difference, t_critical
from ohem_d2.experiments.report import summarize_run, write_report


def make_run(path, records, evaluation=None, wall=60.0):
    path.mkdir(parents=True)
    (path / "metrics.json").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "run.json").write_text(json.dumps({"status": "done", "wall_time_s": wall}))
    if evaluation is not None:
        (path / "eval_results.json").write_text(json.dumps({"bbox": evaluation}))
    return path


def test_a_resumed_run_keeps_each_iteration_once_with_the_resumed_value(tmp_path):
    # Iterations 0-3 logged, a checkpoint at 2, a crash, then the resumed run logs 2-5 again.
    first = [{"iteration": i, "total_loss": 10.0 - i, "time": 0.5} for i in range(4)]
    resumed = [{"iteration": i, "total_loss": 1.0 - i / 10, "time": 0.5} for i in range(2, 6)]
    run = summarize_run(make_run(tmp_path / "r", first + resumed, {"AP": 40.0}))
    assert [it for it, _ in run["loss"]] == [0, 1, 2, 3, 4, 5]
    assert dict(run["loss"])[3] == 0.7 and dict(run["loss"])[1] == 9.0


def test_cascade_diagnostics_get_a_row_per_stage(tmp_path):
    records = [{"iteration": i, "total_loss": 1.0, **{f"stage{k}/ohem/fg_fraction_mined": 0.1 * (k + 1)
                                                       for k in range(3)}} for i in range(5)]
    stock = make_run(tmp_path / "stock" / "seed_0", [{"iteration": i, "total_loss": 1.0} for i in range(5)],
                     {"AP": 40.0})
    cascade = make_run(tmp_path / "ohem" / "seed_0", records, {"AP": 41.0})
    results, table, plots = write_report({}, {"stock": {0: str(stock)}, "ohem": {0: str(cascade)}}, str(tmp_path))
    rows = [line for line in table.split("Mining diagnostics")[1].splitlines() if line.startswith("| ohem")]
    assert [r.split(" | ")[0] for r in rows] == ["| ohem (stage 0)", "| ohem (stage 1)", "| ohem (stage 2)"]
    assert rows[2].split(" | ")[1] == "0.300"
    assert results["arms"]["stock"]["mean"]["ohem/fg_fraction_mined"] is None
    assert any(p.endswith("mining.png") for p in plots)


def test_a_run_without_a_test_set_is_reported_with_no_ap(tmp_path):
    run = make_run(tmp_path / "r", [{"iteration": i, "total_loss": 1.0} for i in range(3)])
    summary = summarize_run(run)
    assert summary["metrics"] == {} and summary["wall_time_s"] == 60.0
    results, table, _ = write_report({}, {"stock": {0: str(run)}}, str(tmp_path))
    assert table.splitlines()[2].startswith("| stock | 1 | n/a | n/a |")


# Paired differences: the AP of the GPU study in docs/RESULTS.md section 2 (seeds 0, 1, 2), whose
# interval was computed by hand there: ohem - stock = +2.27, +2.77, +4.28, mean +3.11 [+0.51, +5.70].
STOCK_AP = {0: 85.19, 1: 85.89, 2: 85.05}
OHEM_AP = {0: 87.46, 1: 88.66, 2: 89.33}
T_975_DF2 = 4.302652729911275


def test_t_critical_matches_the_t_table_and_the_closed_forms():
    assert t_critical(2) == pytest.approx(T_975_DF2, rel=1e-9)
    assert t_critical(2) == pytest.approx(math.sqrt(2 * 0.95**2 / (1 - 0.95**2)), rel=1e-12)  # df 2: t/sqrt(t²+2)
    assert t_critical(1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-12)  # df 1: Cauchy
    assert t_critical(10) == pytest.approx(2.228138851986274, rel=1e-9)
    assert t_critical(30) == pytest.approx(2.042272456301238, rel=1e-9)
    assert 1.96 < t_critical(1000) < 1.963  # approaches the normal 1.95996


def test_paired_differences_mean_and_t_interval_by_hand():
    paired = paired_difference(OHEM_AP, STOCK_AP)
    differences = [2.27, 2.77, 4.28]
    mean = sum(differences) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / 2)
    half_width = T_975_DF2 * sd / math.sqrt(3)
    assert paired["seeds"] == [0, 1, 2] and paired["n"] == 3 and paired["df"] == 2
    assert [paired["differences"][s] for s in ("0", "1", "2")] == pytest.approx(differences)
    assert paired["mean"] == pytest.approx(3.1067, abs=1e-4)
    assert paired["ci_low"] == pytest.approx(mean - half_width, rel=1e-9)
    assert paired["ci_high"] == pytest.approx(mean + half_width, rel=1e-9)
    assert (round(paired["ci_low"], 2), round(paired["ci_high"], 2)) == (0.51, 5.71)
    assert paired["verdict"] == "better" and paired["interval"] == "95% Student t, 2 df"


def test_the_verdict_says_whether_the_interval_excludes_zero_in_the_metrics_sense():
    assert paired_difference(STOCK_AP, OHEM_AP)["verdict"] == "worse"
    mixed = paired_difference({0: 1.0, 1: -1.0, 2: 0.5}, {0: 0.0, 1: 0.0, 2: 0.0})
    assert mixed["verdict"] == "no detectable difference"
    # Fewer false positives is better: a negative difference is "better" there.
    assert paired_difference(STOCK_AP, OHEM_AP, higher_is_better=False)["verdict"] == "better"


def test_one_seed_gives_a_difference_but_no_interval():
    paired = paired_difference({0: 41.0}, {0: 40.0})
    assert paired["n"] == 1 and paired["mean"] == 1.0 and paired["differences"] == {"0": 1.0}
    assert paired["ci_low"] is None and paired["ci_high"] is None and paired["interval"] is None
    assert paired["verdict"] == "one seed: no interval"


def test_only_the_seeds_both_arms_ran_are_paired():
    paired = paired_difference({0: 41.0, 1: 43.0, 2: 50.0}, {0: 40.0, 1: 41.0, 3: 30.0})
    assert paired["seeds"] == [0, 1] and paired["differences"] == {"0": 1.0, "1": 2.0}
    assert paired["mean"] == 1.5 and paired["df"] == 1
    assert paired_difference({0: None}, {0: 40.0})["verdict"] == "no paired seeds"


def make_lookalike_run(path, ap, false_positives, test_json, records=None):
    """A finished run of the synthetic test set ``synthetic_val`` at ``test_json``: AP ``ap``,
    and ``false_positives`` confident detections on image 1's look-alike (plus one on its object)."""
    make_run(path, records or [{"iteration": i, "total_loss": 1.0, "time": 0.1} for i in range(3)],
             {"AP": ap, "AP50": ap + 10, "AP75": ap + 5, "AP-square": ap})
    (path / "config.yaml").write_text(
        "DATASETS:\n  REGISTER_COCO:\n  - - synthetic_train\n    - /nowhere/train.json\n    - /nowhere/train\n"
        f"  - - synthetic_val\n    - {test_json}\n    - /nowhere/val\n  TEST:\n  - synthetic_val\n"
        "  TRAIN:\n  - synthetic_train\n")
    detections = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9}] * false_positives
    detections += [{"image_id": 1, "category_id": 1, "bbox": [40, 40, 10, 10], "score": 0.9},
                   {"image_id": 2, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.1}]
    inference = path / "inference" / "synthetic_val"
    inference.mkdir(parents=True)
    (inference / "coco_instances_results.json").write_text(json.dumps(detections))
    return str(path)


def write_test_set(path):
    """Two images: image 1 with a look-alike at (0, 0, 10, 10) and an object at (40, 40, 10, 10)."""
    path.write_text(json.dumps({
        "images": [{"id": 1, "distractors": [{"kind": "outline", "shape": "square", "bbox": [0, 0, 10, 10]}]},
                   {"id": 2, "distractors": []}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [40, 40, 10, 10]}],
    }))
    return path


@pytest.fixture
def lookalike_experiment(tmp_path):
    """stock and ohem over seeds 0-2 with the study's AP; stock fires on the look-alike 3, 4, 3
    times per seed, ohem 1, 2, 0 times (per image of two: 1.5, 2, 1.5 against 0.5, 1, 0)."""
    test_json = write_test_set(tmp_path / "val.json")
    stock_fp, ohem_fp = {0: 3, 1: 4, 2: 3}, {0: 1, 1: 2, 2: 0}
    run_dirs = {arm: {s: make_lookalike_run(tmp_path / arm / f"seed_{s}", ap[s], fp[s], test_json) for s in ap}
                for arm, ap, fp in (("stock", STOCK_AP, stock_fp), ("ohem", OHEM_AP, ohem_fp))}
    return tmp_path, run_dirs


def test_the_report_pairs_every_arm_with_the_reference_and_counts_lookalike_errors(lookalike_experiment):
    tmp_path, run_dirs = lookalike_experiment
    results, table, plots = write_report({}, run_dirs, str(tmp_path))
    assert results["reference"] == "stock" and results["arms"]["stock"]["paired"] is None
    paired = results["arms"]["ohem"]["paired"]
    assert paired["reference"] == "stock"
    assert list(paired["metrics"]) == ["AP", "AP50", "AP75", "fp_lookalikes_per_image", "fp_per_negative_image"]
    assert paired["metrics"]["fp_per_negative_image"]["n"] == 0  # no held-out negative pool was scored
    assert paired["metrics"]["AP"]["mean"] == pytest.approx(3.1067, abs=1e-4)
    fp = paired["metrics"]["fp_lookalikes_per_image"]
    assert fp["differences"] == pytest.approx({"0": -1.0, "1": -1.0, "2": -1.5}) and fp["verdict"] == "better"
    assert results["arms"]["stock"]["mean"]["fp_lookalikes_per_image"] == pytest.approx(5 / 3)
    run = results["arms"]["ohem"]["runs"]["1"]["lookalikes"]
    assert run["false_positives"] == 2 and run["images"] == 2 and run["lookalikes"] == 1 and run["per_image"] == 1.0
    assert results["lookalikes"]["score_threshold"] == 0.5
    assert json.loads((tmp_path / "results.json").read_text())["arms"]["ohem"]["paired"] == paired

    assert table.splitlines()[0] == ("| arm | seeds | AP | AP50 | AP75 | APs | APm | APl | FP on look-alikes / image "
                                     "| s/iter | peak GPU mem (MiB) | wall time (min) |")
    assert "| stock | 3 | 85.4 ± 0.5 | 95.4 ± 0.5 | 90.4 ± 0.5 | n/a | n/a | n/a | 1.667 ± 0.289 |" in table
    assert "| difference | metric | seeds | per seed (seed: difference) | mean | 95% interval | verdict |" in table
    assert "| ohem - stock | AP | 3 | 0: +2.27, 1: +2.77, 2: +4.28 | +3.11 | [+0.51, +5.71] | better |" in table
    # mean -7/6, sd 0.2887: -1.167 -+ 4.3027 * 0.2887 / sqrt(3) = [-1.884, -0.450]
    assert ("| ohem - stock | FP on look-alikes / image | 3 | 0: -1.000, 1: -1.000, 2: -1.500 | -1.167 "
            "| [-1.884, -0.450] | better |") in table
    assert (tmp_path / "results.md").read_text() == table
    assert str(tmp_path / "ap.png") in plots and (tmp_path / "ap.png").stat().st_size > 1000


def test_false_positives_on_a_held_out_negative_pool_are_a_column_and_paired(lookalike_experiment):
    tmp_path, run_dirs = lookalike_experiment
    per_image = {"stock": {0: 0.5, 1: 0.75, 2: 0.5}, "ohem": {0: 0.25, 1: 0.5, 2: 0.5}}
    for arm, seeds in run_dirs.items():
        for seed, run_dir in seeds.items():
            (Path(run_dir) / "held_out_negatives.json").write_text(json.dumps(
                {"pool": "/pool", "score_threshold": 0.5, "images": 4,
                 "false_positives_per_image": per_image[arm][seed], "images_with_false_positives": 1}))
    results, table, _ = write_report({}, run_dirs, str(tmp_path))
    assert "| FP on look-alikes / image | FP / held-out negative image | s/iter |" in table.splitlines()[0]
    assert "| 1.667 ± 0.289 | 0.583 ± 0.144 |" in table.splitlines()[2]  # stock
    paired = results["arms"]["ohem"]["paired"]["metrics"]["fp_per_negative_image"]
    assert paired["differences"] == pytest.approx({"0": -0.25, "1": -0.25, "2": 0.0}) and paired["n"] == 3
    assert "| ohem - stock | FP / held-out negative image | 3 | 0: -0.250, 1: -0.250, 2: +0.000 | -0.167 |" in table


def test_the_reference_arm_can_be_chosen(lookalike_experiment):
    tmp_path, run_dirs = lookalike_experiment
    results, table, _ = write_report({}, run_dirs, str(tmp_path), reference="ohem")
    assert results["arms"]["ohem"]["paired"] is None
    assert results["arms"]["stock"]["paired"]["metrics"]["AP"]["verdict"] == "worse"
    assert "| stock - ohem | AP | 3 |" in table and "| class | ohem | Δ stock |" in table
    with pytest.raises(ValueError, match="reference arm 'ohme' is not one of the arms"):
        write_report({}, run_dirs, str(tmp_path), reference="ohme")


def test_a_run_without_saved_detections_has_no_lookalike_count_and_says_why(lookalike_experiment):
    tmp_path, run_dirs = lookalike_experiment
    (Path(run_dirs["ohem"][1]) / "inference" / "synthetic_val" / "coco_instances_results.json").unlink()
    results, table, _ = write_report({}, run_dirs, str(tmp_path))
    assert results["arms"]["ohem"]["runs"]["1"]["lookalikes"] == {
        "unavailable": "no detections file inference/synthetic_val/coco_instances_results.json"}
    fp = results["arms"]["ohem"]["paired"]["metrics"]["fp_lookalikes_per_image"]
    assert fp["seeds"] == [0, 2] and fp["df"] == 1  # paired over the seeds that have a count
    assert ("FP on look-alikes / image is n/a for ohem seed 1: no detections file "
            "inference/synthetic_val/coco_instances_results.json.") in table


def test_counted_lookalikes_are_kept_beside_the_run_for_a_copy_without_detections(lookalike_experiment):
    """A published run folder keeps its small files only (docs/results): its look-alike counts,
    counted once from the detections, still reach the report; at another threshold they do not."""
    tmp_path, run_dirs = lookalike_experiment
    first, _, _ = write_report({}, run_dirs, str(tmp_path))
    for seeds in run_dirs.values():
        for run_dir in seeds.values():
            shutil.rmtree(Path(run_dir) / "inference")
    again, _, _ = write_report({}, run_dirs, str(tmp_path))
    assert again["arms"]["ohem"]["runs"]["1"]["lookalikes"] == first["arms"]["ohem"]["runs"]["1"]["lookalikes"]
    assert again["arms"]["ohem"]["paired"] == first["arms"]["ohem"]["paired"]
    other, _, _ = write_report({}, run_dirs, str(tmp_path), score_threshold=0.9)
    assert other["arms"]["ohem"]["runs"]["1"]["lookalikes"] == {
        "unavailable": "no detections file inference/synthetic_val/coco_instances_results.json"}


def test_arms_of_one_seed_are_paired_without_interval_and_plotted(tmp_path):
    test_json = write_test_set(tmp_path / "val.json")
    run_dirs = {arm: {0: make_lookalike_run(tmp_path / arm / "seed_0", ap, fp, test_json)}
                for arm, ap, fp in (("stock", 40.0, 2), ("ohem", 42.0, 1))}
    results, table, plots = write_report({}, run_dirs, str(tmp_path))
    assert "| ohem - stock | AP | 1 | 0: +2.00 | +2.00 | n/a | one seed: no interval |" in table
    assert (tmp_path / "ap.png").stat().st_size > 1000


def test_runs_without_a_test_set_get_no_paired_table_and_no_difference_plot(tmp_path):
    records = [{"iteration": i, "total_loss": 1.0} for i in range(3)]
    run_dirs = {arm: {0: str(make_run(tmp_path / arm / "seed_0", records))} for arm in ("stock", "ohem")}
    results, table, plots = write_report({}, run_dirs, str(tmp_path))
    assert results["arms"]["ohem"]["paired"]["metrics"]["AP"]["verdict"] == "no paired seeds"
    assert "Paired differences" not in table and not (tmp_path / "ap.png").exists()
    assert "FP on look-alikes / image is n/a for every run: no config.yaml in the run folder." in table


def test_the_per_class_table_follows_the_datasets_class_order(tmp_path):
    """COCOEvaluator writes AP-<class> in the order of the dataset's thing_classes; the table keeps it."""
    order = {"AP-zebra": 30.0, "AP-apple": 20.0, "AP-mango": 10.0}
    run_dirs = {arm: {0: str(make_run(tmp_path / arm / "seed_0", [{"iteration": 0, "total_loss": 1.0}],
                                      {"AP": 20.0, **{k: v + bonus for k, v in order.items()}}))}
                for arm, bonus in (("stock", 0.0), ("ohem", 1.0))}
    results, table, _ = write_report({}, run_dirs, str(tmp_path))
    rows = [line.split(" | ")[0] for line in table.split("Per-class AP")[1].splitlines() if line.startswith("| ")]
    assert rows == ["| class", "| zebra", "| apple", "| mango"]
    assert "| zebra | 30.0 | +1.0 |" in table
    assert [k for k in results["arms"]["ohem"]["mean"] if k.startswith("AP-")] == list(order)


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures the report saves, by file name, kept open to look at."""
    from matplotlib.figure import Figure

    saved, savefig = {}, Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kw: saved.update({Path(path).name: fig})
                        or savefig(fig, path, **kw))
    return saved


def test_a_short_run_marks_every_logged_point_and_says_why_there_are_few(tmp_path, figures):
    """A 20-iteration run logs once (iteration 19): its curves are single points, marked, and the
    picture says why."""
    records = [{"iteration": 19, "total_loss": 1.5, "ohem/fg_fraction_mined": 0.3, "ohem/loss_mined_mean": 0.9,
                "ohem/loss_all_mean": 0.5, "ohem/bg_below_bg_lo_share": 0.1, "ohem/nms_removed_per_image": 3.0}]
    run_dirs = {arm: {0: str(make_run(tmp_path / arm / "seed_0", records))} for arm in ("stock", "ohem")}
    write_report({}, run_dirs, str(tmp_path))
    note = ("Only 1 logged point per curve: Detectron2 writes metrics.json\nevery 20 iterations and at the last; a "
            "longer run draws a curve.")
    for name in ("loss.png", "mining.png"):
        fig = figures[name]
        lines = [line for ax in fig.axes for line in ax.get_lines()]
        assert lines and all(line.get_marker() == "o" for line in lines), name
        assert note in [text.get_text() for text in fig.texts], name

    many = [{**records[0], "iteration": i} for i in range(19, 200, 20)]
    run_dirs = {arm: {0: str(make_run(tmp_path / "long" / arm / "seed_0", many))} for arm in ("stock", "ohem")}
    write_report({}, run_dirs, str(tmp_path / "long"))
    assert not [text for name in ("loss.png", "mining.png") for text in figures[name].texts
                if text.get_text().startswith("Only ")]
