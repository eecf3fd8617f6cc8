"""tools/benchmark.py: a tiny CPU run whose table and JSON must agree, the GPU suite's plan, and
the one-line errors for bad input."""
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "benchmark.py"
COCO128 = REPO.parent / "shared" / "data" / "coco128" / "train2017"

needs_coco128 = pytest.mark.skipif(not COCO128.is_dir(), reason=f"COCO128 images not found at {COCO128}")


@pytest.fixture(scope="module")
def bench():
    from ohem_d2.experiments import benchmark

    return benchmark


def plan_of(bench, argv):
    return bench.make_plan(bench.argument_parser().parse_args(argv))


# ------------------------------------------------------------------------------------------------
# A real (tiny) run


TINY = [
    "--suite", "cpu", "--heads", "fpn", "--precisions", "fp32,fp32_bf16ro", "--warmup", "0", "--iters", "2",
    "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128",
]
EXPECTED = {("stock", "fp32"), ("ohem", "fp32"), ("ohem_loss_zeroing", "fp32"), ("ohem", "fp32_bf16ro")}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    if not COCO128.is_dir():
        pytest.skip(f"COCO128 images not found at {COCO128}")
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, str(TOOL), *TINY[:-4], "--out", str(out), *TINY[-4:]],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, out


def parse_table(text):
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert set(lines[1].replace("|", "").replace("-", "").replace(":", "")) <= {""}
    return [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


def test_tiny_run_table_matches_json(tiny_run, bench):
    proc, out = tiny_run
    md, raw = (out / "benchmark.md").read_text(), json.loads((out / "benchmark.json").read_text())
    table = parse_table(proc.stdout)
    assert table == parse_table(md)
    arms = {(a["arm"], a["precision"]): a for a in raw["arms"]}
    assert set(arms) == EXPECTED and len(table) == len(EXPECTED)

    labels = {name: p.label for name, p in bench.PRECISIONS.items()}
    for row in table:
        prec = next(k for k, v in labels.items() if v == row["precision"])
        a = arms[(row["arm"], prec)]
        times = a["times_s"]
        assert len(times) == 2 and all(t > 0 for t in times) and len(a["warmup_times_s"]) == 0
        assert row["head"] == a["head"] == "R18-FPN"
        assert row["images/batch"] == str(a["images_per_batch"]) == "2"
        med = statistics.median(times)
        assert row["median s/iter (min-max)"] == f"{med:.4f} ({min(times):.4f}-{max(times):.4f})"
        ref = arms[("stock", "fp32")]  # the baseline of fp32 and of fp32 + bf16 read-only
        assert row["time vs stock"] == f"{med / statistics.median(ref['times_s']):.2f}x"
        assert row["peak memory (MiB)"] == "n/a" and row["memory vs stock"] == "n/a"  # CPU
        assert a["batch_ids"] == ref["batch_ids"]  # same inputs for every arm
    assert arms[("ohem", "fp32_bf16ro")]["config_overrides"].count(["MODEL.OHEM.READONLY_DTYPE", "bfloat16"])
    assert arms[("stock", "fp32")]["roi_heads"] == "StandardROIHeads"
    assert arms[("ohem_loss_zeroing", "fp32")]["roi_heads"] == "OHEMROIHeads"
    assert arms[("ohem", "fp32")]["ohem_stats_mean"]["ohem/mined_per_image"] > 0


def test_tiny_run_records_environment(tiny_run):
    proc, out = tiny_run
    raw = json.loads((out / "benchmark.json").read_text())
    env = raw["environment"]
    assert env["device"] == "cpu" and env["device_name"] and env["torch"] and env["detectron2"]
    assert env["torch_num_threads"] == 1  # the cpu suite's default
    assert raw["command"].startswith("python tools/benchmark.py --suite cpu")
    assert ["INPUT.MIN_SIZE_TRAIN", "(96,)"] in raw["overrides"]  # trailing KEY VALUE overrides
    assert all(min(s) <= 128 for batch in raw["batch_image_sizes"] for s in batch)
    assert len(raw["schedule"]) == 2  # 2 rounds of 1 iteration per arm, interleaved
    assert {tuple(r["order"]) for r in raw["schedule"]} != {tuple(raw["schedule"][0]["order"])}
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------------
# Plans (no model is built)


def test_gpu_suite_plan(bench, monkeypatch, tmp_path):
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    images = tmp_path / "train2017"
    images.mkdir()
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train2017.json").write_text("{}")
    plan = plan_of(bench, ["--suite", "gpu", "--images", str(images)])
    assert (plan.device, plan.warmup, plan.iters) == ("cuda", 10, 30)
    # per head: stock/ohem/ohem_loss_zeroing x fp32/amp + ohem bf16 read-only; C4: + bf16 channels_last
    assert len(plan.combos) == 15 and ("c4", "fp32_bf16ro_cl", "ohem") in plan.combos
    for head, prec, arm in plan.combos:
        cfg = bench.build_cfg(plan, head, prec, arm)[0]
        assert cfg.MODEL.RESNETS.DEPTH == 50 and cfg.MODEL.WEIGHTS == ""
        assert cfg.SOLVER.IMS_PER_BATCH == 2 and tuple(cfg.INPUT.MIN_SIZE_TRAIN) == (800,)
        assert cfg.INPUT.MAX_SIZE_TRAIN == 1333
        assert cfg.SOLVER.AMP.ENABLED == (prec == "amp")
        assert cfg.MODEL.ROI_HEADS.NAME.startswith("OHEM") == (arm != "stock")
        if arm != "stock":
            assert cfg.MODEL.OHEM.MODE == ("loss_zeroing" if arm == "ohem_loss_zeroing" else "two_pass")
            assert cfg.MODEL.OHEM.READONLY_DTYPE == ("bfloat16" if prec.startswith("fp32_bf16ro") else "float32")
            assert cfg.MODEL.OHEM.READONLY_CHANNELS_LAST == (prec == "fp32_bf16ro_cl")


def test_mask_head_runs_alone_on_mask_annotations_with_bitmask_targets(bench, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    images = tmp_path / "train2017"
    images.mkdir()
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train2017_segm.json").write_text("{}")
    plan = plan_of(bench, ["--suite", "gpu", "--heads", "mask", "--images", str(images)])
    assert plan.annotations.name == "instances_train2017_segm.json"
    assert {arm for _, _, arm in plan.combos} == {"stock", "ohem", "ohem_loss_zeroing"}
    for head, prec, arm in plan.combos:
        cfg = bench.build_cfg(plan, head, prec, arm)[0]
        assert cfg.MODEL.MASK_ON and cfg.INPUT.MASK_FORMAT == "bitmask"
        assert cfg.MODEL.ROI_HEADS.NAME == ("StandardROIHeads" if arm == "stock" else "OHEMROIHeads")
    line = error_line(bench, capsys, ["--suite", "gpu", "--heads", "fpn,mask", "--images", str(images)])
    assert "run it on its own (--heads mask)" in line


@needs_coco128
def test_bf16_readonly_alone_keeps_its_fp32_baseline(bench):
    plan = plan_of(bench, ["--heads", "c4", "--precisions", "fp32_bf16ro"])
    assert plan.combos == [("c4", "fp32", "stock"), ("c4", "fp32_bf16ro", "ohem")]


# ------------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, no traceback


def error_line(bench, capsys, argv):
    assert bench.run_benchmark(bench.argument_parser().parse_args(argv), argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("benchmark.py: error: "), err
    return err[0]


def test_unknown_arm(bench, capsys):
    assert "unknown arm 'bogus'" in error_line(bench, capsys, ["--arms", "stock,bogus"])
    assert "unknown precision 'fp8'" in error_line(bench, capsys, ["--precisions", "fp8"])
    assert "unknown head 'r101'" in error_line(bench, capsys, ["--heads", "r101"])


def test_missing_images(bench, capsys, tmp_path):
    line = error_line(bench, capsys, ["--images", str(tmp_path / "nowhere")])
    assert "images folder not found" in line and "nowhere" in line
    (tmp_path / "train2017").mkdir()
    line = error_line(bench, capsys, ["--images", str(tmp_path / "train2017")])
    assert "annotations file not found" in line


def test_odd_overrides(bench, capsys, tmp_path):
    assert "KEY VALUE pairs" in error_line(bench, capsys, ["SOLVER.IMS_PER_BATCH"])


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_gpu(bench, capsys):
    assert "needs CUDA" in error_line(bench, capsys, ["--suite", "gpu"])
    assert "needs CUDA" in error_line(bench, capsys, ["--device", "cuda"])
    assert "needs CUDA" in error_line(bench, capsys, ["--precisions", "amp"])


def test_help():
    done = subprocess.run([sys.executable, str(TOOL), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert "--suite" in done.stdout and "ohem_loss_zeroing" in done.stdout and "fp32_bf16ro" in done.stdout
    assert "read-only" in (REPO / "docs" / "BENCHMARK.md").read_text()


# ------------------------------------------------------------------------------------------------
# One arm vocabulary: the benchmark's arms are the runner's, and give the configs it measured before


def frozen_benchmark_cfg(plan, head, prec, arm):
    """How the benchmark built an arm's config before it took its arms from ohem_d2.arms (a frozen
    copy): the stock or _ohem model-zoo YAML, the arm's MODE, then precision and overrides."""
    from detectron2.config import get_cfg

    import ohem_d2
    from ohem_d2 import model_zoo

    suffix, mode = {"stock": ("", None), "ohem": ("_ohem", "two_pass"),
                    "ohem_loss_zeroing": ("_ohem", "loss_zeroing")}[arm]
    head_cfg = {"fpn": ("COCO-Detection/faster_rcnn_R_50_FPN_1x{}.yaml", []),
                "c4": ("COCO-Detection/faster_rcnn_R_50_C4_1x{}.yaml", []),
                "mask": ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x{}.yaml", ["INPUT.MASK_FORMAT", "bitmask"])}
    path, head_overrides = head_cfg[head]
    amp = prec == "amp"
    applied = ["MODEL.DEVICE", plan.device, "SOLVER.AMP.ENABLED", amp, "DATALOADER.NUM_WORKERS", 0, *head_overrides]
    if mode:
        applied += ["MODEL.OHEM.MODE", mode, "MODEL.OHEM.READONLY_DTYPE",
                    "bfloat16" if prec == "fp32_bf16ro" else "float32"]
    cfg = get_cfg()
    ohem_d2.add_ohem_config(cfg)
    cfg.merge_from_file(model_zoo.get_config_file(path.format(suffix)))
    cfg.merge_from_list(applied + plan.overrides)
    return cfg


@pytest.mark.parametrize("head", ["fpn", "c4", "mask"])
def test_each_arm_config_equals_what_the_benchmark_measured_before(bench, monkeypatch, tmp_path, head):
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    images = tmp_path / "train2017"
    images.mkdir()
    (tmp_path / "annotations").mkdir()
    for name in ("instances_train2017.json", "instances_train2017_segm.json"):
        (tmp_path / "annotations" / name).write_text("{}")
    plan = plan_of(bench, ["--suite", "gpu", "--heads", head, "--images", str(images)])
    before = [c for c in plan.combos if c[1] != "fp32_bf16ro_cl"]  # the precisions the frozen copy knew
    assert len(before) == 7 and len(plan.combos) == 7 + (head == "c4")
    for _, prec, arm in before:
        assert bench.build_cfg(plan, head, prec, arm)[0].dump() == frozen_benchmark_cfg(plan, head, prec, arm).dump()


def test_an_arm_of_another_meta_architecture_is_one_line(bench):
    plan = plan_of(bench, ["--suite", "cpu", "--heads", "fpn", "--precisions", "fp32"])
    with pytest.raises(bench.BenchmarkError, match="^arm 'retinanet_ohem' does not apply to MODEL.META_ARCHITECTURE "
                                                   "'GeneralizedRCNN'[^\n]*the benchmark's models"):
        bench.build_cfg(plan, "fpn", "fp32", "retinanet_ohem")


# ------------------------------------------------------------------------------------------------
# Anchor-level mining: the RetinaNet and RPN arms, each against its own meta-architecture's stock


def fake_images(tmp_path):
    images = tmp_path / "train2017"
    images.mkdir()
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train2017.json").write_text("{}")
    return str(images)


def test_anchor_arms_run_beside_their_stock_arm_in_one_plan(bench, tmp_path):
    images = fake_images(tmp_path)
    plan = plan_of(bench, ["--heads", "fpn,retinanet", "--precisions", "fp32", "--images", images,
                           "--arms", "ohem,ohem_rpn,retinanet_ohem,retinanet_ssd"])
    assert plan.combos == [("fpn", "fp32", "stock"), ("fpn", "fp32", "ohem"), ("fpn", "fp32", "ohem_rpn"),
                           ("retinanet", "fp32", "retinanet_focal"), ("retinanet", "fp32", "retinanet_ohem"),
                           ("retinanet", "fp32", "retinanet_ssd")]
    cfgs = {(h, a): bench.build_cfg(plan, h, p, a)[0] for h, p, a in plan.combos}
    assert cfgs["fpn", "ohem_rpn"].MODEL.PROPOSAL_GENERATOR.NAME == "OHEMRPN"
    assert cfgs["fpn", "ohem"].MODEL.PROPOSAL_GENERATOR.NAME == "RPN"
    assert cfgs["retinanet", "retinanet_focal"].MODEL.META_ARCHITECTURE == "RetinaNet"
    assert cfgs["retinanet", "retinanet_ssd"].MODEL.OHEM.ANCHOR_SELECTION == "hard_negative_ratio"
    default = plan_of(bench, ["--heads", "retinanet", "--precisions", "fp32", "--images", images])
    assert [arm for _, _, arm in default.combos] == list(bench.RETINANET_ARMS)


def test_an_arm_no_chosen_model_takes_is_one_line(bench, capsys, tmp_path):
    line = error_line(bench, capsys, ["--heads", "retinanet", "--arms", "ohem", "--images", fake_images(tmp_path)])
    assert "no arm of --arms ohem applies to head 'retinanet'" in line


def test_op_counts_of_retinanet_arms_are_against_retinanet_focal(tmp_path):
    from ohem_d2.experiments.op_count import count_arms

    rows = count_arms(heads=("retinanet",), arms=["retinanet_ohem"], image_size=(64, 96))
    assert [r["arm"] for r in rows] == ["retinanet_focal", "retinanet_ohem"]
    assert rows[0]["op_ratio"] == 1.0 and rows[1]["op_ratio"] == rows[1]["ops"] / rows[0]["ops"]
    assert rows[1]["sync_delta"] == rows[1]["syncs"] - rows[0]["syncs"] > 0
    assert any("anchor_mining.py" in s["where"] for s in rows[1]["sync_sites"])


def test_readonly_suite_counts_how_often_a_faster_read_only_pass_selects_other_rois():
    from ohem_d2.experiments.readonly_agreement import VARIANTS, agreement, format_table

    rows = agreement("fpn", num_batches=1, image_size=(64, 96), overrides=["MODEL.OHEM.BATCH_SIZE_PER_IMAGE", 8])
    assert [r["variant"] for r in rows] == list(VARIANTS)
    assert rows[0]["shared_with_fp32"] == 1.0 and rows[0]["identical_batches"] == 1  # fp32 against itself
    assert all(0.0 <= r["shared_with_fp32"] <= 1.0 and r["selected_per_image"] <= 8 < r["candidates_per_image"]
               for r in rows)
    assert "| bf16 | R50-FPN | 1 | 8 / " in format_table(rows)
