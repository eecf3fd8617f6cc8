"""Hard-negative bootstrapping (issue 20): the round rules by hand on a fixed scored pool, the
settings' and pools' one-line errors, and tools/bootstrap.py end to end (2 rounds on tiny synthetic
data), killed between the rounds and resumed to the same result as a run that was not."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import CONFIGS, REPO
from ohem_d2.data.bootstrapping import (
    BootstrapError,
    BootstrapSettings,
    Score,
    initial_negatives,
    next_round,
    score_image,
)
from ohem_d2.engine.bootstrap import scoring_config

# ------------------------------------------------------------------------------------------------
# The rules, by hand

POOL = {  # file: (highest score, detections >= 0.5)
    "a": Score(0.95, 3), "b": Score(0.95, 1), "c": Score(0.7, 1), "d": Score(0.5, 1),
    "e": Score(0.49, 0), "f": Score(0.2, 0), "g": Score(0.05, 0), "h": Score(0.0, 0),
}


def test_hard_negatives_are_added_hardest_first_up_to_the_budget_and_easy_ones_removed():
    settings = BootstrapSettings(budget=3, score_thresh=0.5, drop_thresh=0.1, rounds=5)
    plan = next_round(["c", "f", "g", "h"], POOL, settings, rounds_done=0)
    # Outside the set, a, b, d fire (>= 0.5): a and b tie on score, a has more false positives.
    assert plan.added == ["a", "b", "d"]
    assert plan.removed == ["g", "h"]  # below 0.1; c (fires) and f (0.2) stay
    assert plan.negatives == ["a", "b", "c", "d", "f"] and plan.stop == ""
    # The budget cuts the hardest list; a tie on score and false positives goes by file name.
    tie = dict(POOL, b=Score(0.95, 3))
    assert next_round([], tie, BootstrapSettings(budget=1, rounds=5), 0).added == ["a"]


def test_the_control_adds_as_many_as_mining_drawn_at_random_from_outside_the_set():
    mined = next_round(["c", "f", "g", "h"], POOL, BootstrapSettings(budget=3, drop_thresh=0.1, rounds=5), 0)
    draws = set()
    for seed in range(30):
        settings = BootstrapSettings(budget=3, drop_thresh=0.1, rounds=5, choose="random", seed=seed)
        plan = next_round(["c", "f", "g", "h"], POOL, settings, rounds_done=0)
        assert len(plan.added) == len(mined.added) == 3 and set(plan.added) <= {"a", "b", "d", "e"}
        assert plan.removed == mined.removed and plan.stop == mined.stop  # the other rules are mining's
        assert plan.negatives == sorted({"c", "f"} | set(plan.added))
        assert next_round(["c", "f", "g", "h"], POOL, settings, rounds_done=0) == plan  # seeded
        draws.add(tuple(sorted(plan.added)))
    assert len(draws) == 4  # every 3 of the 4 outside images, "e" (which does not fire) among them
    one = BootstrapSettings(budget=3, rounds=5, choose="random")
    assert next_round([], POOL, one, 0).added != next_round([], POOL, one, 1).added  # each round draws anew
    with pytest.raises(BootstrapError, match="^--choose 'easiest': expected one of hardest, random$"):
        BootstrapSettings(choose="easiest")


def test_the_cap_limits_additions_and_stops_when_full():
    capped = BootstrapSettings(budget=3, max_negatives=4, initial_negatives=2, rounds=5)
    plan = next_round(["c", "f", "g"], POOL, capped, rounds_done=0)
    assert plan.added == ["a", "b"]  # c and f kept (g removed): room for 2 of the 3 hard ones
    full = BootstrapSettings(budget=3, max_negatives=2, initial_negatives=2, rounds=5)
    plan = next_round(["c", "f"], POOL, full, rounds_done=0)
    assert plan.added == [] and plan.stop == "the training set holds --max-negatives 2 negatives"


def test_a_negative_whose_file_left_the_pool_leaves_the_training_set():
    plan = next_round(["c", "gone"], POOL, BootstrapSettings(rounds=5), rounds_done=0)
    assert "gone" in plan.removed and "gone" not in plan.negatives and "c" in plan.negatives


def test_mining_stops_without_false_positives_or_after_the_last_round():
    quiet = {f: Score(min(s.max_score, 0.3), 0) for f, s in POOL.items()}
    plan = next_round(["a"], quiet, BootstrapSettings(rounds=5), rounds_done=1)
    assert plan.stop == "no false positives on the pool outside the training set" and plan.added == []
    assert next_round([], POOL, BootstrapSettings(rounds=2), rounds_done=1).stop == "2 mining round(s) done"
    assert next_round([], POOL, BootstrapSettings(rounds=2), rounds_done=0).stop == ""


def test_round_zero_draws_a_seeded_random_subset_and_scores_count_false_positives():
    pool = [f"img_{i}" for i in range(20)]
    first = initial_negatives(pool, 5, seed=3)
    assert first == initial_negatives(list(reversed(pool)), 5, seed=3) and len(first) == 5 and set(first) <= set(pool)
    assert first != initial_negatives(pool, 5, seed=4)
    assert initial_negatives(pool, 50, seed=0) == sorted(pool)
    assert score_image([0.2, 0.7, 0.5], 0.5) == Score(0.7, 2) and score_image([], 0.5) == Score(0.0, 0)


def test_pools_are_scored_down_to_the_lowest_threshold_a_rule_reads():
    """A negative whose best detection lay between --drop-thresh and the model's SCORE_THRESH_TEST
    read as 0 and was dropped; a --score-thresh below it was refused."""
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST, cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.5, 0.3
    scoring = scoring_config(cfg, 0.1)
    assert (scoring.MODEL.ROI_HEADS.SCORE_THRESH_TEST, scoring.MODEL.RETINANET.SCORE_THRESH_TEST) == (0.1, 0.1)
    scoring = scoring_config(cfg, 0.4)  # never raised
    assert (scoring.MODEL.ROI_HEADS.SCORE_THRESH_TEST, scoring.MODEL.RETINANET.SCORE_THRESH_TEST) == (0.4, 0.3)
    assert cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST == 0.5  # the test metrics' config is left as it was
    # The lowest score a rule reads: --drop-thresh, or --score-thresh when nothing is dropped.
    assert BootstrapSettings(drop_thresh=0.1).lowest_score_read == 0.1
    assert BootstrapSettings(drop_thresh=0.0, score_thresh=0.4).lowest_score_read == 0.4


@pytest.mark.parametrize("kwargs,message", [
    ({"score_thresh": 1.5}, "--score-thresh 1.5: expected a score in (0, 1]"),
    ({"score_thresh": float("nan")}, "--score-thresh nan"),
    ({"drop_thresh": 0.6}, "--drop-thresh 0.6: expected a score in [0, --score-thresh 0.5)"),
    ({"drop_thresh": -0.1}, "--drop-thresh -0.1"),
    ({"budget": 0}, "--budget 0: expected at least 1"),
    ({"rounds": -1}, "--rounds -1"),
    ({"max_negatives": 5, "initial_negatives": 10}, "--max-negatives 5: expected 0 (no cap) or at least"),
])
def test_settings_out_of_range_are_one_line(kwargs, message):
    with pytest.raises(BootstrapError, match="^" + message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]").replace("+", r"\+")):
        BootstrapSettings(**kwargs)


# ------------------------------------------------------------------------------------------------
# The tool, end to end


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from ohem_d2.data.synthetic import generate_synthetic_dataset

    root = tmp_path_factory.mktemp("boot")
    generate_synthetic_dataset(root / "pos", num_train=12, num_val=4, image_size=64)
    generate_synthetic_dataset(root / "neg", num_train=10, num_val=4, image_size=64, seed=1,
                               objects_per_image=(0, 0), distractor_prob=0.6, max_distractors=4)
    return root


def command(data, out, *extra, pool=None, opts=()):
    return [sys.executable, str(REPO / "tools" / "bootstrap.py"),
            "--config-file", str(CONFIGS / "Synthetic-Detection" / "faster_rcnn_R_18_FPN_scratch.yaml"),
            "--register-coco", "boot_pos", str(data / "pos" / "annotations" / "train.json"), str(data / "pos" / "train"),
            "--register-coco", "boot_val", str(data / "pos" / "annotations" / "val.json"), str(data / "pos" / "val"),
            "--register-negatives", "boot_pool", str(pool or data / "neg" / "train"),
            "--register-negatives", "boot_held", str(data / "neg" / "val"),
            "--pool", "boot_pool", "--held-out-pool", "boot_held", "--rounds", "1", "--initial-negatives", "3",
            "--budget", "4", "--score-thresh", "0.2", "--drop-thresh", "0.01", "--hard-positives", *extra,
            "DATASETS.TRAIN", "('boot_pos',)", "DATASETS.TEST", "('boot_val',)", "SOLVER.MAX_ITER", "6",
            "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "0", "SOLVER.STEPS", "()",
            "SOLVER.CHECKPOINT_PERIOD", "2", "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(out),
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "INPUT.MIN_SIZE_TEST", "64", *opts]


ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def uninterrupted(data):
    out = data / "whole"
    done = subprocess.run(command(data, out), capture_output=True, text=True, timeout=900, env=ENV)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return out, json.loads((out / "bootstrap.json").read_text()), done


def test_two_rounds_write_every_rounds_set_scores_checkpoint_and_metrics(uninterrupted, data):
    out, state, done = uninterrupted
    assert state["done"] and [r["round"] for r in state["rounds"]] == [0, 1]
    first, second = state["rounds"]
    assert first["end_iter"] == 3 and second["end_iter"] == 6 and second["final"]  # one schedule, cut in 2
    assert len(first["negatives"]) == 3
    scores = json.loads((out / "bootstrap" / "round_0" / "scores.json").read_text())
    assert len(scores) == 10  # every pool image
    fired = {f for f, (best, _) in scores.items() if best >= 0.2 and f not in first["negatives"]}
    assert set(second["added"]) <= fired and len(second["added"]) == min(4, len(fired))
    assert second["negatives"] == sorted(set(first["negatives"]) - set(second["removed"]) | set(second["added"]))
    assert second["hard_positives"] == first["missed_positives"]  # --hard-positives: repeated in round 1
    listed = (out / "bootstrap" / "round_1" / "negatives.txt").read_text().split()
    assert listed == second["negatives"]
    for r in state["rounds"]:
        assert "AP" in r["metrics"]["bbox"]
        # The round's weights, without the optimizer's state (that is in OUTPUT_DIR's checkpoints).
        assert set(torch.load(out / r["model"], weights_only=False)) == {"model", "iteration"}
        assert r["held_out"]["images"] == 4 and r["pool"]["images"] == 10
    assert json.loads((out / "eval_results.json").read_text()) == second["metrics"]
    assert "bootstrapping done after round 1" in done.stdout


def test_from_scratch_every_round_trains_the_whole_schedule_and_the_last_is_the_runs_model(data):
    out = data / "scratch"
    done = subprocess.run(command(data, out, "--from-scratch"), capture_output=True, text=True, timeout=900, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((out / "bootstrap.json").read_text())
    assert [r["end_iter"] for r in state["rounds"]] == [6, 6]
    assert (out / "bootstrap" / "round_0" / "train" / "model_final.pth").is_file()
    assert (out / "model_final.pth").read_bytes() == (out / state["rounds"][-1]["model"]).read_bytes()


def test_killed_between_rounds_it_resumes_to_the_same_result(uninterrupted, data):
    out = data / "killed"
    process = subprocess.Popen(command(data, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    second_round = out / "bootstrap" / "round_1" / "negatives.txt"
    deadline = time.time() + 600
    while not second_round.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    state = json.loads((out / "bootstrap.json").read_text())
    assert "model" not in state["rounds"][-1], "killed too late: round 1 had finished"
    again = subprocess.run(command(data, out), capture_output=True, text=True, timeout=600, env=ENV)
    assert again.returncode != 0 and "pass --resume to continue it" in again.stderr.strip().splitlines()[-1]
    resumed = subprocess.run(command(data, out, "--resume"), capture_output=True, text=True, timeout=900, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole_dir, whole, _ = uninterrupted
    state = json.loads((out / "bootstrap.json").read_text())
    for key in ("negatives", "added", "removed", "hard_positives", "end_iter"):
        assert [r[key] for r in state["rounds"]] == [r[key] for r in whole["rounds"]], key
    weights = torch.load(out / "bootstrap" / "round_1" / "model.pth", weights_only=False)["model"]
    reference = torch.load(whole_dir / "bootstrap" / "round_1" / "model.pth", weights_only=False)["model"]
    assert all(torch.equal(weights[k], reference[k]) for k in reference)


def test_a_run_from_before_a_setting_existed_resumes_as_its_default(uninterrupted, data, tmp_path):
    """bootstrap.json of a run started before --choose existed lacks the key: resuming it with the
    default is that run; with --choose random it is another run and refused."""
    whole_dir, whole, _ = uninterrupted
    out = tmp_path / "old"
    out.mkdir()
    state = dict(whole, settings={k: v for k, v in whole["settings"].items() if k != "choose"})
    (out / "bootstrap.json").write_text(json.dumps(state))
    other = subprocess.run(command(data, out, "--resume", "--choose", "random"), capture_output=True, text=True,
                           timeout=300, env=ENV)
    assert other.returncode != 0 and "holds a bootstrapping run with other settings" in other.stderr.splitlines()[-1]
    same = subprocess.run(command(data, out, "--resume"), capture_output=True, text=True, timeout=300, env=ENV)
    assert same.returncode == 0, same.stderr[-3000:]
    assert json.loads((out / "bootstrap.json").read_text())["settings"]["choose"] == "hardest"
    assert json.loads((out / "eval_results.json").read_text()) == whole["rounds"][-1]["metrics"]


def one_line_error(data, tmp_path, *extra, pool=None, opts=()):
    done = subprocess.run(command(data, tmp_path / "out", *extra, pool=pool, opts=opts), capture_output=True,
                          text=True, timeout=300, env=ENV)
    lines = [line for line in done.stderr.strip().splitlines() if line.startswith("error:")]
    assert done.returncode != 0 and "Traceback" not in done.stderr and len(lines) == 1, done.stderr[-2000:]
    assert not (tmp_path / "out" / "bootstrap.json").exists()
    return lines[0] + "\n" + done.stderr.split(lines[0])[1]


def test_bad_inputs_stop_before_round_zero_with_one_message(data, tmp_path):
    (tmp_path / "empty").mkdir()
    assert "holds no image files" in one_line_error(data, tmp_path, pool=tmp_path / "empty")
    assert "--drop-thresh 0.3: expected a score in [0, --score-thresh 0.2)" in one_line_error(
        data, tmp_path, "--drop-thresh", "0.3")
    overlap = tmp_path / "overlap"
    overlap.mkdir()
    for name in ("000001.png", "000002.png"):
        (overlap / name).write_bytes((data / "pos" / "train" / name).read_bytes())
    assert "2 of its 2 images are also training positives" in one_line_error(data, tmp_path, pool=overlap)
    assert "--pool 'nothing' is not a registered negative pool" in one_line_error(data, tmp_path, "--pool", "nothing")
    assert "--held-out-pool 'boot_held': 4 of its images are also in --pool 'boot_pool_too'" in one_line_error(
        data, tmp_path, "--register-negatives", "boot_pool_too", str(data / "neg" / "val"), "--pool", "boot_pool_too")
    assert "--rounds 6: the rounds share SOLVER.MAX_ITER 6 iterations" in one_line_error(data, tmp_path, "--rounds", "6")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "last_checkpoint").write_text("model_0000099.pth")  # another run's output folder
    assert "holds another run's checkpoints (last_checkpoint)" in one_line_error(data, tmp_path)
