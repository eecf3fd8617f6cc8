"""tools/train_net.py on real coco128 images: train, resume after an interruption, eval-only,
user COCO and VOC-layout datasets, diagnostics in metrics.json, bad input, 2-process DDP (also
on a GPU machine), and the peak-memory hook."""
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from types import SimpleNamespace

import pytest
import torch
from detectron2.utils.events import EventStorage

from conftest import FPN_OHEM, REPO, TINY, CONFIGS, require_coco128
from ohem_d2.data.synthetic import generate_synthetic_dataset

from ohem_d2.engine import PeakMemoryHook, USER_ERRORS, build_config, exit_on, launch_workers, training_argument_parser
from ohem_d2.engine import launch as engine_launch

TRAIN_NET = str(REPO / "tools" / "train_net.py")


def train_net(args, timeout=600):
    """tools/train_net.py ``args`` in a subprocess, as a user runs it; fails the test if it fails."""
    done = subprocess.run([sys.executable, TRAIN_NET, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def checked_config(args):
    """What tools/train_net.py does before launching any worker: build and check the config,
    exiting with one line on bad input."""
    return exit_on(USER_ERRORS, build_config, training_argument_parser().parse_args(args))

# From scratch, FrozenBN diverges; GroupNorm and a small LR keep a few iterations finite.
STABLE = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0, "MODEL.RESNETS.NORM", "GN", "MODEL.FPN.NORM", "GN", "SOLVER.BASE_LR", 0.001,
          "SOLVER.WARMUP_ITERS", 0, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32,
          "MODEL.RPN.POST_NMS_TOPK_TRAIN", 100, "TEST.DETECTIONS_PER_IMAGE", 20]
VOC_CLASSES = ["person", "car"]


def opts(*extra):
    return [str(v) for v in TINY + STABLE + list(extra)]


@pytest.fixture(scope="module")
def coco_subset(tmp_path_factory):
    """6 train and 4 val coco128 images as COCO JSON files (keeps evaluation fast)."""
    root = require_coco128()
    out = tmp_path_factory.mktemp("coco_subset")
    paths = {}
    for split, count in (("train", 6), ("val", 4)):
        with open(root / "annotations" / f"instances_{split}2017.json") as f:
            coco = json.load(f)
        images = coco["images"][:count]
        ids = {im["id"] for im in images}
        coco.update(images=images, annotations=[a for a in coco["annotations"] if a["image_id"] in ids])
        paths[split] = (str(out / f"{split}.json"), str(root / f"{split}2017"))
        with open(paths[split][0], "w") as f:
            json.dump(coco, f)
    return paths


def coco_args(coco_subset, *extra, flags=(), config=FPN_OHEM, output):
    (train_json, train_root), (val_json, val_root) = coco_subset["train"], coco_subset["val"]
    return [
        *map(str, flags),
        "--config-file", str(CONFIGS / config),
        "--register-coco", "t_train", train_json, train_root,
        "--register-coco", "t_val", val_json, val_root,
        *opts("DATASETS.TRAIN", "('t_train',)", "DATASETS.TEST", "('t_val',)", "OUTPUT_DIR", str(output)),
        *map(str, extra),
    ]


def metrics(output):
    with open(output / "metrics.json") as f:
        return [json.loads(line) for line in f]


def test_train_then_eval_only_with_diagnostics_in_metrics(coco_subset, tmp_path):
    out = tmp_path / "run"
    done = train_net(coco_args(coco_subset, "SOLVER.MAX_ITER", 2, output=out))
    assert (out / "model_final.pth").is_file()
    # The check of the datasets said that it ran, on the console, before Detectron2's logging.
    assert done.stdout.startswith("datasets checked in ") and done.stdout.splitlines()[0].endswith(
        " s: t_train (6 images), t_val (4 images); no problem stops the run, 0 warning(s)")
    results = json.loads((out / "eval_results.json").read_text())
    assert {"AP", "AP50", "AP75"} <= results["bbox"].keys()
    # The diagnostics are recorded on iterations 0, 20, 40, ... (ohem_d2.modeling.diagnostics.LOG_PERIOD).
    first = next(r for r in metrics(out) if r["iteration"] == 0)
    for key in ("ohem/candidates_per_image", "ohem/nms_removed_per_image", "ohem/fg_fraction_mined",
                "ohem/loss_mined_mean", "ohem/loss_all_mean", "ohem/bg_below_bg_lo_share"):
        assert key in first, key

    eval_out = tmp_path / "eval"
    train_net(coco_args(coco_subset, "MODEL.WEIGHTS", out / "model_final.pth", flags=["--eval-only"], output=eval_out))
    assert json.loads((eval_out / "eval_results.json").read_text())["bbox"] == results["bbox"]


def test_resume_after_an_interruption(coco_subset, tmp_path):
    out = tmp_path / "run"
    args = coco_args(coco_subset, "SOLVER.MAX_ITER", 6, "SOLVER.CHECKPOINT_PERIOD", 2,
                     "DATASETS.TEST", "()", output=out)
    command = [sys.executable, str(REPO / "tools" / "train_net.py")] + args
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "model_0000003.pth").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert (out / "model_0000003.pth").exists() and not (out / "model_final.pth").exists()

    second = subprocess.run(command[:2] + ["--resume"] + command[2:], capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert (out / "model_final.pth").exists()
    assert "model_0000003.pth" in second.stdout + second.stderr  # loaded the last checkpoint
    iterations = [r["iteration"] for r in metrics(out)]
    assert min(iterations) >= 4 and max(iterations) == 5  # continued at 4, not from 0


def write_voc_from_coco(coco_json, image_root, out, image_count=4):
    """A Pascal-VOC-layout folder of coco128 images whose objects are in VOC_CLASSES."""
    with open(coco_json) as f:
        coco = json.load(f)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    for d in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (out / d).mkdir(parents=True, exist_ok=True)
    ids = []
    for image in coco["images"]:
        objects = [a for a in coco["annotations"]
                   if a["image_id"] == image["id"] and names[a["category_id"]] in VOC_CLASSES]
        if not objects:
            continue
        stem = os.path.splitext(image["file_name"])[0]
        os.symlink(os.path.join(image_root, image["file_name"]), out / "JPEGImages" / f"{stem}.jpg")
        root = ET.Element("annotation")
        size = ET.SubElement(root, "size")
        ET.SubElement(size, "width").text, ET.SubElement(size, "height").text = str(image["width"]), str(image["height"])
        for a in objects:
            x, y, w, h = a["bbox"]
            obj = ET.SubElement(root, "object")
            ET.SubElement(obj, "name").text = names[a["category_id"]]
            for tag, value in (("pose", "Unspecified"), ("truncated", "0"), ("difficult", "0")):
                ET.SubElement(obj, tag).text = value
            box = ET.SubElement(obj, "bndbox")
            for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), (x + 1, y + 1, x + w, y + h)):
                ET.SubElement(box, tag).text = str(int(round(value)))
        ET.ElementTree(root).write(out / "Annotations" / f"{stem}.xml")
        ids.append(stem)
        if len(ids) == image_count:
            break
    (out / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(ids) + "\n")
    return out


def test_voc_layout_dataset_with_its_own_classes(tmp_path):
    root = require_coco128()
    voc = write_voc_from_coco(str(root / "annotations" / "instances_val2017.json"), str(root / "val2017"), tmp_path / "voc")
    out = tmp_path / "run"
    train_net([
        "--config-file", str(CONFIGS / "PascalVOC-Detection/faster_rcnn_R_50_FPN_ohem.yaml"),
        "--register-voc", "t_voc", str(voc), "trainval", ",".join(VOC_CLASSES),
        *opts("MODEL.ROI_HEADS.NUM_CLASSES", 2, "DATASETS.TRAIN", "('t_voc',)", "DATASETS.TEST", "('t_voc',)",
              "SOLVER.MAX_ITER", 2, "SOLVER.STEPS", "()", "OUTPUT_DIR", str(out)),
    ])
    assert {"AP", "AP50", "AP75"} <= json.loads((out / "eval_results.json").read_text())["bbox"].keys()


@pytest.mark.parametrize(
    "change, message",
    [
        (["--config-file", "configs/nope.yaml"], "config file 'configs/nope.yaml' not found"),
        (["DATASETS.TRAIN", "('coco_2017_trian',)"], "'coco_2017_trian'"),
        (["MODEL.OHEM.NMS_THRESH", "1.5"], "MODEL.OHEM.NMS_THRESH = 1.5 is invalid"),
        (["MODEL.NOT_A_KEY", "1"], "Non-existent key: MODEL.NOT_A_KEY"),
        (["--eval-only"], "options such as --eval-only go before the overrides"),
        (["DATASETS.TRAIN", "('t_bad',)"], "missing.json"),
    ],
)
def test_bad_input_is_one_clear_line(coco_subset, tmp_path, change, message):
    args = ["--register-coco", "t_bad", "missing.json", "imgs"] + coco_args(coco_subset, output=tmp_path)
    if change[0] == "--config-file":
        args[args.index("--config-file") + 1] = change[1]
    else:
        args += change
    with pytest.raises(SystemExit) as exit_info:
        checked_config(args)
    assert str(exit_info.value).startswith("error: ") and message in str(exit_info.value)


def test_bad_json_is_reported_before_training(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [}')
    with pytest.raises(SystemExit) as exit_info:
        checked_config(["--config-file", str(CONFIGS / FPN_OHEM), "--register-coco", "t_badjson", str(bad), str(tmp_path),
                        *opts("DATASETS.TRAIN", "('t_badjson',)", "DATASETS.TEST", "()")])
    assert "bad.json" in str(exit_info.value) and "line 1" in str(exit_info.value)


def test_two_process_ddp_training_on_cpu_with_ohem(coco_subset, tmp_path):
    out = tmp_path / "ddp"
    args = coco_args(coco_subset, "SOLVER.MAX_ITER", 2, "DATASETS.TEST", "()", flags=["--num-gpus", 2], output=out)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(REPO / "tools" / "train_net.py")] + args,
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "model_final.pth").is_file()
    assert "world size: 2" in (done.stdout + done.stderr).lower()


@pytest.mark.parametrize("device, workers_see", [("cpu", ""), ("cuda", None)])
def test_cpu_ddp_workers_see_no_gpu(tmp_path, monkeypatch, device, workers_see):
    """Detectron2's launch gives its workers NCCL whenever they see a GPU, which a CPU run cannot use."""
    data = generate_synthetic_dataset(tmp_path / "data", num_train=2, num_val=1, image_size=32)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    seen = []
    monkeypatch.setattr(engine_launch, "launch", lambda *a, **k: seen.append(os.environ.get("CUDA_VISIBLE_DEVICES")))
    args = training_argument_parser().parse_args([
        "--num-gpus", "2", "--config-file", str(CONFIGS / FPN_OHEM),
        "--register-coco", f"t_syn_{device}", data.train_json, data.train_images,
        *opts("DATASETS.TRAIN", f"('t_syn_{device}',)", "DATASETS.TEST", "()", "MODEL.DEVICE", device,
              "MODEL.ROI_HEADS.NUM_CLASSES", 3)])
    launch_workers(print, args, build_config(args).MODEL.DEVICE)
    assert seen == [workers_see]
    assert "CUDA_VISIBLE_DEVICES" not in os.environ  # only the workers' environment


class FakeCudaModel(torch.nn.Module):
    """Says its parameters are on the first GPU, so the hook's CUDA path runs on a machine without one."""

    def parameters(self, recurse=True):
        yield SimpleNamespace(device=torch.device("cuda", 0))


@pytest.mark.parametrize("model, cuda_calls", [(torch.nn.Linear(2, 2), 0), (FakeCudaModel(), 1)])
def test_peak_memory_hook_touches_cuda_only_for_a_model_on_cuda(monkeypatch, model, cuda_calls):
    """A MODEL.DEVICE cpu run on a GPU machine neither asks CUDA nor records a GPU peak."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    calls = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *args, **kwargs: calls.append(args) or 3 * 2**20)
    hook = PeakMemoryHook()
    hook.trainer = SimpleNamespace(model=model)
    with EventStorage() as storage:
        hook.after_step()
    assert len(calls) == cuda_calls
    assert storage.latest().get("peak_gpu_mem_mb", (None,))[0] == (3.0 if cuda_calls else None)
