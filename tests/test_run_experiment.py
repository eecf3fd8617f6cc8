"""The comparison runner end to end on a tiny schedule, and its resume."""
import json
import os
import subprocess
import sys

import pytest

from conftest import CONFIGS, REPO, load_cfg, require_coco128

TINY_RUN = ["--synthetic", "num_train=8", "--synthetic", "num_val=4", "--synthetic", "image_size=64",
            "SOLVER.MAX_ITER", "5", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "0",
            "SOLVER.STEPS", "()", "MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]


def run_tool(tool, *args, env=None, timeout=900):
    return subprocess.run([sys.executable, str(REPO / "tools" / tool), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("experiment")
    out = tmp / "exp"
    done = run_tool("run_experiment.py", "--output", out, "--data-root", tmp / "data", "--parallel", 2, *TINY_RUN)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return tmp, out, done


def test_runner_writes_results_table_and_plots(experiment):
    _, out, done = experiment
    results = json.loads((out / "results.json").read_text())
    assert list(results["arms"]) == ["stock", "fast_rcnn_heuristics", "ohem"]
    table = (out / "results.md").read_text()
    assert table in done.stdout  # the table is printed as well
    for arm, summary in results["arms"].items():
        row = next(line for line in table.splitlines() if line.startswith(f"| {arm} |"))
        assert f"| {summary['mean']['AP']:.1f} |" in row and f"{summary['mean']['s_per_iter']:.3f}" in row
        assert summary["seeds"] == [0] and summary["mean"]["wall_time_s"] > 0
    assert results["arms"]["ohem"]["mean"]["ohem/fg_fraction_mined"] is not None
    assert results["arms"]["stock"]["mean"]["ohem/fg_fraction_mined"] is None
    assert "Mining diagnostics" in table and "| ohem |" in table.split("Mining diagnostics")[1]
    for plot in ("loss.png", "ap.png", "mining.png"):
        assert (out / plot).stat().st_size > 1000
    # Beside the plots, side-by-side pictures from the ohem arm's checkpoint (tools/visualize_mining.py).
    pictures = sorted((out / "mining_pictures").glob("*.png"))
    assert len(pictures) == 3 and all(str(p) in done.stdout for p in pictures)
    assert json.loads((out / "mining_pictures" / "mining.json").read_text())
    # All arms ran the same base config, seed and schedule; only the RoI choice differs.
    argvs = [json.loads((out / arm / "seed_0" / "run.json").read_text())["argv"] for arm in results["arms"]]
    def without_roi_choice(argv):
        flags, opts = argv[: argv.index("SOLVER.MAX_ITER")], argv[argv.index("SOLVER.MAX_ITER"):]
        pairs = [(k, v) for k, v in zip(opts[::2], opts[1::2])
                 if not k.startswith("MODEL.ROI_HEADS.") and k != "OUTPUT_DIR"]
        return flags, pairs

    assert all(without_roi_choice(a) == without_roi_choice(argvs[0]) for a in argvs)


def test_rerun_skips_finished_arms_and_refuses_other_settings(experiment):
    tmp, out, _ = experiment
    before = (out / "ohem" / "seed_0" / "model_final.pth").stat().st_mtime
    again = run_tool("run_experiment.py", "--output", out, "--data-root", tmp / "data", *TINY_RUN)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier: skipped") == 3
    assert (out / "ohem" / "seed_0" / "model_final.pth").stat().st_mtime == before
    changed = run_tool("run_experiment.py", "--output", out, "--data-root", tmp / "data", *TINY_RUN,
                       "SOLVER.BASE_LR", "0.001")
    assert changed.returncode != 0
    assert "holds a run started with other settings" in changed.stderr and "Traceback" not in changed.stderr


def test_runner_unknown_arm_is_one_line(tmp_path):
    done = run_tool("run_experiment.py", "--output", tmp_path, "--data-root", tmp_path / "data",
                    "--arms", "stock", "ohme", *TINY_RUN)
    assert done.returncode != 0 and "unknown arm 'ohme'" in done.stderr and "Traceback" not in done.stderr


def coco128_subset(root, split, count, out, segm=False):
    """The first ``count`` images of a coco128 split (with masks: ``segm``) as a COCO JSON file at ``out``."""
    coco = json.loads((root / "annotations" / f"instances_{split}2017{'_segm' if segm else ''}.json").read_text())
    coco["images"] = coco["images"][:count]
    ids = {im["id"] for im in coco["images"]}
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in ids]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(coco))


def test_runner_started_elsewhere_resolves_relative_paths_in_the_callers_directory(tmp_path):
    """--register-coco paths and DETECTRON2_DATASETS, relative to where the runner was started,
    mean the same files in its children (which run in the repository root)."""
    root = require_coco128()
    caller = tmp_path / "caller"
    builtin = caller / "builtin" / "coco"  # Detectron2's layout for its builtin coco_2017_val_100
    coco128_subset(root, "train", 4, builtin / "annotations" / "instances_val2017_100.json")
    (builtin / "val2017").symlink_to(root / "train2017")
    coco128_subset(root, "val", 2, caller / "data" / "val.json")
    (caller / "data" / "images").symlink_to(root / "val2017")
    args = ["--config-file", CONFIGS / "Synthetic-Detection/faster_rcnn_R_18_FPN_scratch.yaml",
            "--register-coco", "rel_val", "data/val.json", "data/images", "--arms", "stock",
            "--output", "exp", "--parallel", 1, *TINY_RUN[6:], "SOLVER.MAX_ITER", 2,
            "DATASETS.TRAIN", "('coco_2017_val_100',)", "DATASETS.TEST", "('rel_val',)",
            "MODEL.ROI_HEADS.NUM_CLASSES", 80]
    done = subprocess.run([sys.executable, str(REPO / "tools" / "run_experiment.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=900, cwd=caller,
                          env=dict(os.environ, OMP_NUM_THREADS="1", DETECTRON2_DATASETS="builtin"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    argv = json.loads((caller / "exp" / "stock" / "seed_0" / "run.json").read_text())["argv"]
    assert str(caller / "data" / "val.json") in argv and str(caller / "data" / "images") in argv
    assert (caller / "exp" / "stock" / "seed_0" / "eval_results.json").is_file()


def test_a_run_without_a_test_set_finishes_and_is_skipped_next_time(tmp_path):
    args = ["--output", tmp_path / "exp", "--data-root", tmp_path / "data", "--arms", "stock", "--parallel", 1,
            *TINY_RUN, "SOLVER.MAX_ITER", 2, "DATASETS.TEST", "()"]
    done = run_tool("run_experiment.py", *args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| stock | 1 | n/a |" in (tmp_path / "exp" / "results.md").read_text()
    again = run_tool("run_experiment.py", *args)
    assert again.returncode == 0 and "[stock seed 0] finished earlier: skipped" in again.stdout, again.stderr[-2000:]


def test_an_unknown_reference_arm_stops_before_training(tmp_path):
    done = run_tool("run_experiment.py", "--output", tmp_path / "exp", "--data-root", tmp_path / "data",
                    "--arms", "stock", "ohem", "--reference", "stokc", *TINY_RUN)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "reference arm 'stokc' is not one of the arms (stock, ohem)" in done.stderr
    assert not (tmp_path / "exp").exists()


def test_an_fp_score_threshold_below_an_arms_test_threshold_stops_before_training(tmp_path):
    """The look-alike false positives are counted in the saved detections, which stop at the arm's
    SCORE_THRESH_TEST: a lower --fp-score-threshold undercounted them, silently."""
    done = run_tool("run_experiment.py", "--output", tmp_path / "exp", "--data-root", tmp_path / "data",
                    "--arms", "stock", "ohem", *TINY_RUN, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.6")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "error: --fp-score-threshold 0.5 is below arm 'stock''s MODEL.ROI_HEADS.SCORE_THRESH_TEST 0.6: its saved "
        "detections stop there, so the false positives between the two would go uncounted; raise "
        "--fp-score-threshold or lower MODEL.ROI_HEADS.SCORE_THRESH_TEST")
    assert not (tmp_path / "exp").exists()


def test_the_fp_score_threshold_is_checked_against_the_heads_that_detect():
    from ohem_d2.experiments.runner import ExperimentError, check_fp_score_threshold

    cfg = load_cfg("Synthetic-Detection/retinanet_R_18_FPN_scratch.yaml", ["MODEL.META_ARCHITECTURE", "OHEMRetinaNet"])
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST, cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.9, 0.3
    check_fp_score_threshold("retinanet_ohem", cfg, 0.5)  # RetinaNet's threshold counts, not the RoI heads'
    with pytest.raises(ExperimentError, match="below arm 'retinanet_ohem''s MODEL.RETINANET.SCORE_THRESH_TEST 0.3"):
        check_fp_score_threshold("retinanet_ohem", cfg, 0.2)


def test_the_datasets_are_checked_once_per_experiment_not_per_run_or_process(tmp_path, monkeypatch):
    """The runner checks the base config's datasets once, not again for every arm and seed; a
    training process of train_net (main) does not check them: its launcher (cli) did."""
    from ohem_d2.engine import defaults, training_argument_parser
    from ohem_d2.experiments import runner

    checked = []
    monkeypatch.setattr(defaults, "check_datasets", lambda cfg: checked.append(list(cfg.DATASETS.TRAIN)) or [])
    args = runner.argument_parser().parse_args(["--output", str(tmp_path / "exp"), "--data-root",
                                                str(tmp_path / "data"), "--seeds", "0", "1", *TINY_RUN])
    _, runs, _ = runner.plan_runs(args)
    assert len(runs) == 6 and checked == [["synthetic_train"]]
    argv = next(iter(runs.values()))[1]
    # What each training process of tools/train_net.py builds (its main's setup: check=False).
    defaults.build_config(training_argument_parser().parse_args(argv), check=False)
    assert len(checked) == 1


def test_retinanet_arms_train_evaluate_and_report_from_the_runner(tmp_path):
    """The anchor-mining arms end to end on the synthetic RetinaNet config: every arm's run passes
    the dataset checks before training (OHEMRetinaNet's classes are RetinaNet's head's), trains,
    evaluates, and the report has their AP and mining diagnostics."""
    out = tmp_path / "exp"
    done = run_tool("run_experiment.py", "--config-file", CONFIGS / "Synthetic-Detection" / "retinanet_R_18_FPN_scratch.yaml",
                    "--output", out, "--data-root", tmp_path / "data", "--parallel", 2,
                    "--arms", "retinanet_focal", "retinanet_ohem", "retinanet_ssd", *TINY_RUN)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert list(results["arms"]) == ["retinanet_focal", "retinanet_ohem", "retinanet_ssd"]
    for arm in results["arms"]:
        config = (out / arm / "seed_0" / "config.yaml").read_text()
        assert ("META_ARCHITECTURE: OHEMRetinaNet" in config) == (arm != "retinanet_focal")
        assert "AP" in json.loads((out / arm / "seed_0" / "eval_results.json").read_text())["bbox"]
    assert results["arms"]["retinanet_ohem"]["mean"]["ohem/fg_fraction_mined"] is not None
    assert results["arms"]["retinanet_focal"]["mean"]["ohem/fg_fraction_mined"] is None


def test_negative_pools_and_the_bootstrap_arm_from_the_runner(tmp_path):
    """--synthetic-negatives: every arm trains on the pool (the bootstrap arm mines it with
    tools/bootstrap.py), and each run's false positives per held-out negative image are reported."""
    out = tmp_path / "exp"
    done = run_tool("run_experiment.py", "--output", out, "--data-root", tmp_path / "data", "--parallel", 2,
                    "--arms", "stock", "bootstrap", "bootstrap_random", "--synthetic-negatives", 6,
                    "--bootstrap-opts", "--rounds 1 --initial-negatives 2 --budget 2 --score-thresh 0.05 --drop-thresh 0.01",
                    *TINY_RUN)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["experiment"]["negative_pools"]) == {"negatives_train", "negatives_held_out"}
    stock_argv = json.loads((out / "stock" / "seed_0" / "run.json").read_text())["argv"]
    assert stock_argv[stock_argv.index("DATASETS.TRAIN") + 1] == "('synthetic_train', 'negatives_train')"
    boot_argv = json.loads((out / "bootstrap" / "seed_0" / "run.json").read_text())["argv"]
    assert "DATASETS.TRAIN" not in boot_argv and boot_argv[boot_argv.index("--pool") + 1] == "negatives_train"
    state = json.loads((out / "bootstrap" / "seed_0" / "bootstrap.json").read_text())
    assert state["done"] and len(state["rounds"][0]["negatives"]) == 2 and state["settings"]["choose"] == "hardest"
    control = json.loads((out / "bootstrap_random" / "seed_0" / "bootstrap.json").read_text())
    assert control["done"] and control["settings"]["choose"] == "random"
    assert control["rounds"][0]["negatives"] == state["rounds"][0]["negatives"]  # the same round 0
    for arm in ("stock", "bootstrap", "bootstrap_random"):
        held_out = json.loads((out / arm / "seed_0" / "held_out_negatives.json").read_text())
        assert held_out["images"] == 6 and held_out["score_threshold"] == 0.5
        assert results["arms"][arm]["mean"]["fp_per_negative_image"] == held_out["false_positives_per_image"]
    assert "FP / held-out negative image" in (out / "results.md").read_text()


def test_the_bootstrap_arm_without_a_pool_is_one_line(tmp_path):
    done = run_tool("run_experiment.py", "--output", tmp_path / "exp", "--data-root", tmp_path / "data",
                    "--arms", "stock", "bootstrap", *TINY_RUN)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == ("error: the bootstrap arm mines a negative pool: give one with "
                                                    "--negatives DIR (or --synthetic-negatives N)")
    done = run_tool("run_experiment.py", "--output", tmp_path / "exp", "--data-root", tmp_path / "data",
                    "--arms", "stock", "bootstrap", "--synthetic-negatives", 4, "--bootstrap-opts", "--drop-thresh 0.9",
                    *TINY_RUN)
    assert done.stderr.strip().splitlines()[-1] == "error: --drop-thresh 0.9: expected a score in [0, --score-thresh 0.5)"
    assert not (tmp_path / "exp" / "stock").exists()  # nothing started
    (tmp_path / "empty").mkdir()
    done = run_tool("run_experiment.py", "--output", tmp_path / "exp", "--data-root", tmp_path / "data",
                    "--arms", "stock", "--negatives", tmp_path / "empty", *TINY_RUN)
    assert "Traceback" not in done.stderr and done.stderr.strip().splitlines()[-1].startswith(
        f"- --negatives {tmp_path / 'empty'}: {tmp_path / 'empty'} holds no image files")
    assert not (tmp_path / "exp" / "stock").exists()
    done = run_tool("run_experiment.py", "--output", tmp_path / "exp", "--data-root", tmp_path / "data",
                    "--arms", "stock", "bootstrap", "--synthetic-negatives", 4, "--num-gpus", 2, *TINY_RUN)
    assert "error: the bootstrap arm runs in one process" in done.stderr.strip().splitlines()[-1]
