"""tools/benchmark.py: a tiny CPU run whose table and JSON must agree, the GPU suite's plan, and
the one-line errors for bad input."""
import importlib.util
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
    spec = importlib.util.spec_from_file_location("ohem_benchmark_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------
# A real (tiny) run


TINY = [
    "--suite", "cpu", "--heads", "fpn", "--precisions", "fp32,fp32_bf16ro", "--warmup", "0", "--iters", "2",
    "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128",
]
EXPECTED = {("stock", "fp32"), ("two_pass", "fp32"), ("loss_zeroing", "fp32"), ("two_pass", "fp32_bf16ro")}


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
    assert arms[("two_pass", "fp32_bf16ro")]["config_overrides"].count(["MODEL.OHEM.READONLY_DTYPE", "bfloat16"])
    assert arms[("stock", "fp32")]["roi_heads"] == "StandardROIHeads"
    assert arms[("loss_zeroing", "fp32")]["roi_heads"] == "OHEMROIHeads"
    assert arms[("two_pass", "fp32")]["ohem_stats_mean"]["ohem/mined_per_image"] > 0


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
    plan = bench.make_plan(bench.parse_args(["--suite", "gpu", "--images", str(images)]))
    assert (plan.device, plan.warmup, plan.iters) == ("cuda", 10, 30)
    assert len(plan.combos) == 14  # per head: stock/two_pass/loss_zeroing x fp32/amp + two_pass bf16 read-only
    for head, prec, arm in plan.combos:
        cfg = bench.build_cfg(plan, head, prec, arm)[0]
        assert cfg.MODEL.RESNETS.DEPTH == 50 and cfg.MODEL.WEIGHTS == ""
        assert cfg.SOLVER.IMS_PER_BATCH == 2 and tuple(cfg.INPUT.MIN_SIZE_TRAIN) == (800,)
        assert cfg.INPUT.MAX_SIZE_TRAIN == 1333
        assert cfg.SOLVER.AMP.ENABLED == (prec == "amp")
        assert cfg.MODEL.ROI_HEADS.NAME.startswith("OHEM") == (arm != "stock")
        if arm != "stock":
            assert cfg.MODEL.OHEM.MODE == arm
            assert cfg.MODEL.OHEM.READONLY_DTYPE == ("bfloat16" if prec == "fp32_bf16ro" else "float32")


def test_mask_head_runs_alone_on_mask_annotations_with_bitmask_targets(bench, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    images = tmp_path / "train2017"
    images.mkdir()
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train2017_segm.json").write_text("{}")
    plan = bench.make_plan(bench.parse_args(["--suite", "gpu", "--heads", "mask", "--images", str(images)]))
    assert plan.annotations.name == "instances_train2017_segm.json"
    assert {arm for _, _, arm in plan.combos} == {"stock", "two_pass", "loss_zeroing"}
    for head, prec, arm in plan.combos:
        cfg = bench.build_cfg(plan, head, prec, arm)[0]
        assert cfg.MODEL.MASK_ON and cfg.INPUT.MASK_FORMAT == "bitmask"
        assert cfg.MODEL.ROI_HEADS.NAME == ("StandardROIHeads" if arm == "stock" else "OHEMROIHeads")
    line = error_line(bench, capsys, ["--suite", "gpu", "--heads", "fpn,mask", "--images", str(images)])
    assert "run it on its own (--heads mask)" in line


@needs_coco128
def test_bf16_readonly_alone_keeps_its_fp32_baseline(bench):
    plan = bench.make_plan(bench.parse_args(["--heads", "c4", "--precisions", "fp32_bf16ro"]))
    assert plan.combos == [("c4", "fp32", "stock"), ("c4", "fp32_bf16ro", "two_pass")]


# ------------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, no traceback


def error_line(bench, capsys, argv):
    assert bench.main(argv) == 2
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


def test_help(bench, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--suite" in text and "two_pass" in text and "fp32_bf16ro" in text
    assert "read-only" in bench.__doc__ and "backward" in bench.__doc__
