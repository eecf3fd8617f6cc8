"""The runner's report from run folders: resumed runs, cascade diagnostics, runs without a test set."""
import json

from ohem_d2.report import markdown_table, summarize_run, write_report


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
