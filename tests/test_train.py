"""The training program end to end on the CPU: digits, the ann -> teacher -> tser chain, resume, kills,
CIFAR/ImageFolder loaders, DDP through torchrun, non-finite losses and bad input."""
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from fastsnn import checkpoint as ckpt
from fastsnn import models, train
from helpers import program, program_env, run_python

pytestmark = pytest.mark.slow


_env, _cli = program_env, program


def _weights(path):
    return ckpt.load(path)["model"]


def _same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_default_run_reaches_90_percent(tmp_path):
    proc = _cli(tmp_path)  # no arguments at all
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1
    summary = json.loads((runs[0] / "metrics.json").read_text())
    assert summary["student_acc"] >= 90.0
    assert summary["teacher_acc"] >= 90.0
    assert summary["method"] == "tser" and summary["epochs"] == train.DEFAULTS["digits"]["epochs"]
    assert len(summary["per_timestep_acc"]) == 4 and 0 < summary["firing_rate"] < 1
    assert len(summary["acc_at_t"]) == 4 and summary["acc_at_t"][-1] == summary["student_acc"]
    lines = (runs[0] / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == summary["epochs"]
    row = json.loads(lines[-1])
    for key in ("train_loss", "train_ce", "train_kl", "train_entropy", "test_acc", "per_timestep_acc",
                "acc_at_t", "firing_rate", "images_per_s", "peak_gpu_mem_mb"):
        assert key in row
    for name in ("last.pt", "best.pt", "curves.png", "per_timestep_acc.png"):
        assert (runs[0] / name).is_file()
    # the teacher is cached: a second run reuses it
    proc = _cli(tmp_path, "--epochs", "1", "--out", str(tmp_path / "again"))
    assert "reusing the cached digits teacher" in proc.stdout


def test_evaluate_writes_the_report_with_energy(tmp_path):
    assert _cli(tmp_path, "--epochs", "2", "--out", "run").returncode == 0
    proc = _cli(tmp_path, "--checkpoint", "run/best.pt", module="fastsnn.evaluate")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "eval-best.json").read_text())
    # the checkpoint evaluated is the one the run scored: the same test accuracy, above chance (10 classes)
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert report["student_acc"] == pytest.approx(summary["student_acc"]) and report["student_acc"] > 20
    assert len(report["per_timestep_acc"]) == 4
    assert report["acc_at_t"][-1] == report["student_acc"] and "at t = 1..T" in proc.stdout
    assert report["student_acc"] <= report["student_acc5"] <= 100
    assert set(report["per_layer_firing_rate"]) == {"sn1", "sn2"}
    energy = report["energy"]
    assert energy["layers"][0]["encoding"] and energy["encoding_macs"] == 16 * 64 * 9
    assert energy["energy_mJ"] == pytest.approx((4.6 * energy["encoding_macs"] + 0.9 * energy["acs"]) * 1e-9)
    # the report is never replaced unasked
    before = (tmp_path / "run" / "eval-best.json").read_text()
    proc = _cli(tmp_path, "--checkpoint", "run/best.pt", module="fastsnn.evaluate")
    assert proc.returncode == 2 and "eval-best.json exists; pass --overwrite" in proc.stderr
    assert (tmp_path / "run" / "eval-best.json").read_text() == before
    assert _cli(tmp_path, "--checkpoint", "run/best.pt", "--overwrite", module="fastsnn.evaluate").returncode == 0


def test_compiled_training_gives_the_eager_run(tmp_path):
    """--compile gives the run that eager execution gives (on the CPU, deterministic), up to the teacher's
    rounding: the compiled teacher's logits differ from the eager ones in the last bits (Inductor folds
    BatchNorm's arithmetic differently; 3e-6 on digits), and a spiking student turns such a difference into
    the odd flipped spike, so one training image in a thousand may be scored differently (here 20.03% against
    19.95%). Without a teacher (--method ce, measured once) the two runs gave the same accuracies and the loss
    to 1e-8."""
    rows, teacher_acc = {}, {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        proc = _cli(tmp_path, "--epochs", "1", "--out", name, "--quiet", *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows[name] = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1])
        teacher_acc[name] = json.loads((tmp_path / name / "metrics.json").read_text())["teacher_acc"]
    assert teacher_acc["compiled"] == teacher_acc["eager"]
    assert rows["compiled"]["train_loss"] == pytest.approx(rows["eager"]["train_loss"], rel=1e-4)
    assert rows["compiled"]["firing_rate"] == pytest.approx(rows["eager"]["firing_rate"], rel=1e-3)
    for key in ("train_acc", "test_acc", "per_timestep_acc"):  # in percent: within 0.5 points
        assert rows["compiled"][key] == pytest.approx(rows["eager"][key], abs=0.5), key

class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("flag", ["--resume", "--teacher-weights", "--checkpoint"])
def test_a_crafted_file_is_refused_and_runs_nothing(tmp_path, flag):
    marker = tmp_path / "code-ran"
    torch.save({"model": {}, "args": _RunsCode(marker)}, tmp_path / "evil.pt")
    module = "fastsnn.evaluate" if flag == "--checkpoint" else "fastsnn.train"
    extra = [] if flag == "--checkpoint" else ["--out", "never"]
    proc = _cli(tmp_path, flag, "evil.pt", *extra, module=module)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().count("\n") == 0 and f"{flag} evil.pt: refused" in proc.stderr
    assert not marker.exists() and not (tmp_path / "never").exists()


def test_checkpoints_are_checked_for_role_and_architecture(tmp_path):
    assert _cli(tmp_path, "--method", "ce", "--epochs", "1", "--out", "student").returncode == 0
    state = ckpt.load(tmp_path / "student" / "last.pt")
    assert (state["format"], state["role"], state["arch"]) == ("fastsnn-checkpoint", "student", "digits_snn")
    for args, words in [(["--teacher-weights", "student/best.pt"], "holds a student (digits_snn), but a teacher"),
                        (["--resume", "student/last.pt", "--arch", "spiking_vgg11"],
                         "holds the architecture 'digits_snn', but 'spiking_vgg11' is asked for"),
                        (["--resume", "student/last.pt", "--ann", "--arch", "digits_ann"], "but a teacher is needed")]:
        proc = _cli(tmp_path, *args, "--out", "never")
        assert proc.returncode == 2 and words in proc.stderr, proc.stderr[-3000:]
        assert proc.stderr.strip().count("\n") == 0 and not (tmp_path / "never").exists()


def test_flags_given_on_resume_are_found_by_argparse(tmp_path):
    assert _cli(tmp_path, "--epochs", "2", "--stop-after-epochs", "1", "--out", "run").returncode == 0
    assert ckpt.load(tmp_path / "run" / "last.pt")["config"]["ts_ce"] is True
    proc = _cli(tmp_path, "--resume", "run/last.pt", "--no-ts-ce", "--epo=2")  # negated and abbreviated flags
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ckpt.load(tmp_path / "run" / "last.pt")["config"]["ts_ce"] is False


def test_ann_checkpoint_is_a_teacher_for_tser(tmp_path):
    proc = _cli(tmp_path, "--ann", "--epochs", "3", "--out", "teacher")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "teacher" / "metrics.json").read_text())["method"] == "ann"
    # strict JSON: an ANN has no firing rate, written as null, never NaN
    def strict(text):
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    summary = strict((tmp_path / "teacher" / "metrics.json").read_text())
    rows = [strict(line) for line in (tmp_path / "teacher" / "metrics.jsonl").read_text().splitlines()]
    assert summary["firing_rate"] is None and all(r["firing_rate"] is None for r in rows)
    assert summary["selected_on"] == "validation" and all(r["val_acc"] is not None for r in rows)
    assert summary["best_epoch"] == 1 + max(range(len(rows)), key=lambda i: (rows[i]["val_acc"], -i))
    assert summary["student_acc"] == rows[summary["best_epoch"] - 1]["test_acc"]
    assert "teacher epoch 1/3: loss" in proc.stdout and "kl" not in proc.stdout and "firing" not in proc.stdout
    proc = _cli(tmp_path, "--teacher-weights", "teacher/best.pt", "--epochs", "2", "--out", "student",
                "--method", "tser", "--ts-ce", "--no-ts-kl")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "student" / "metrics.json").read_text())
    assert summary["teacher_acc"] > 50 and summary["teacher"] == "digits_ann"
    assert ckpt.load(tmp_path / "student" / "last.pt")["config"]["ts_kl"] is False


@pytest.mark.parametrize("method", ["ts", "skd", "ce"])
def test_methods(tmp_path, method):
    proc = _cli(tmp_path, "--method", method, "--epochs", "1", "--out", "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert (row["train_kl"] == 0) == (method == "ce")


def test_resume_is_bit_for_bit(tmp_path):
    assert _cli(tmp_path, "--epochs", "2", "--out", "full").returncode == 0
    assert _cli(tmp_path, "--epochs", "2", "--out", "split", "--stop-after-epochs", "1").returncode == 0
    assert len((tmp_path / "split" / "metrics.jsonl").read_text().splitlines()) == 1
    # the per-epoch files are there after the first epoch, not only when the run ends
    assert json.loads((tmp_path / "split" / "metrics.json").read_text())["epochs"] == 1
    assert (tmp_path / "split" / "curves.png").is_file() and (tmp_path / "split" / "metrics.csv").is_file()
    proc = _cli(tmp_path, "--resume", "split/last.pt")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _same_weights(_weights(tmp_path / "full" / "last.pt"), _weights(tmp_path / "split" / "last.pt"))
    assert (tmp_path / "full" / "metrics.jsonl").read_text().count("\n") == 2
    assert (tmp_path / "split" / "metrics.jsonl").read_text().count("\n") == 2


def test_killed_mid_epoch_resumes_to_the_same_weights(tmp_path):
    args = ["--epochs", "6", "--save-every", "4", "--batch-size", "32"]
    assert _cli(tmp_path, *args, "--out", "full").returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "fastsnn.train", *args, "--out", "killed"], cwd=tmp_path,
                            env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "killed" / "last.pt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if last.is_file() and (tmp_path / "killed" / "metrics.jsonl").is_file() and \
                len((tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    state = ckpt.load(last)  # whatever moment the kill came, last.pt is a whole checkpoint
    assert state["epoch"] < 6
    resumed = _cli(tmp_path, "--resume", "killed/last.pt")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _same_weights(_weights(tmp_path / "full" / "last.pt"), _weights(last))
    assert len((tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()) == 6


def _write_cifar(root, name, n_train=40, n_test=20, classes=10):
    rng = np.random.default_rng(0)
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True)
    label_key = "labels" if name == "cifar10" else "fine_labels"

    def dump(fname, n):
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 label_key: rng.integers(0, classes, n).tolist()}
        with open(folder / fname, "wb") as f:
            pickle.dump(batch, f)

    if name == "cifar10":
        for i in range(1, 6):
            dump(f"data_batch_{i}", n_train // 5)
        dump("test_batch", n_test)
        meta = {"label_names": [f"c{i}" for i in range(10)]}
        with open(folder / "batches.meta", "wb") as f:
            pickle.dump(meta, f)
    else:
        dump("train", n_train)
        dump("test", n_test)
        with open(folder / "meta", "wb") as f:
            pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f)


@pytest.mark.parametrize("name,classes,augment", [
    ("cifar10", 10, ["--autoaugment", "--cutout", "8"]),
    ("cifar100", 100, ["--randaugment", "2", "9", "--random-erasing", "0.5"])])
def test_cifar_loader_on_a_generated_pickle_directory(tmp_path, name, classes, augment):
    _write_cifar(tmp_path / "data", name, classes=classes)
    proc = _cli(tmp_path, "--dataset", name, "--data-dir", "data", "--arch", "spiking_vgg11", "--method", "ce",
                "--epochs", "1", "--batch-size", "8", "--T", "1", "--workers", "0", *augment, "--out", "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["dataset"] == name and summary["student_acc"] is not None
    assert ckpt.load(tmp_path / "run" / "last.pt")["num_classes"] == classes


@pytest.mark.parametrize("dataset", ["cifar10", "imagenet"])
def test_validation_split_reads_the_held_out_images_without_augmentation(tmp_path, dataset):
    """--val-fraction carves the validation set out of the training data: its images go through the test
    transforms (deterministic, as the test set), the remaining training images keep the augmentation."""
    from fastsnn import data

    if dataset == "cifar10":
        _write_cifar(tmp_path / "data", "cifar10", n_train=50)
        spec = data.load("cifar10", str(tmp_path / "data"), autoaugment=True, cutout=8)
    else:
        _write_imagefolder(tmp_path / "imagenet", train=5, val=1, size=(240, 260))
        spec = data.load("imagenet", str(tmp_path / "imagenet"))
    split = data.split_validation(spec, 0.2)
    assert len(split.val) + len(split.train) == len(spec.train)
    assert set(split.val.indices).isdisjoint(split.train.indices)
    test_tf = spec.test.transform
    torch.manual_seed(0)
    for i in range(len(split.val)):
        image, label = split.val[i]
        again, _ = split.val[i]
        assert torch.equal(image, again)  # no random crop, flip, AutoAugment or Cutout
        raw, raw_label = (data.with_transform(spec.train, None))[split.val.indices[i]]
        assert label == raw_label and torch.equal(image, test_tf(raw))
        assert image.shape == split.test[0][0].shape
    # the training images are still augmented: two reads of one image differ
    assert any(not torch.equal(split.train[i][0], split.train[i][0]) for i in range(len(split.train)))
    assert spec.train.transform is not test_tf  # the view is a copy: the training set's transform is untouched


def _write_imagefolder(root, *, train, val, size):
    """ImageNet's layout: root/{train,val}/{cat,dog}/<i>.png, `train`/`val` random images per class."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for cls in ("cat", "dog"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(d / f"{i}.png")


def test_imagefolder_loader(tmp_path):
    _write_imagefolder(tmp_path / "imagenet", train=3, val=2, size=(40, 48))
    proc = _cli(tmp_path, "--dataset", "imagenet", "--data-dir", "imagenet", "--arch", "sew_resnet18",
                "--method", "ce", "--epochs", "1", "--batch-size", "4", "--T", "1", "--workers", "0",
                "--trivialaugment", "--random-erasing", "0.25", "--out", "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ckpt.load(tmp_path / "run" / "last.pt")["num_classes"] == 2
    assert "trivialaugment: true" in (tmp_path / "run" / "config.yaml").read_text()


def test_ddp_on_cpu_keeps_ranks_identical(tmp_path):
    """Two ranks under torchrun, with --sync-bn (the student's BatchNorm statistics over both ranks' batches,
    inside the fused op; its correctness against one process is tests/test_sync_bn.py's)."""
    assert _cli(tmp_path, "--ann", "--epochs", "2", "--out", "teacher").returncode == 0
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "fastsnn.train", "--device", "cpu", "--epochs", "1", "--batch-size", "64",
                           "--teacher-weights", "teacher/best.pt", "--out", "ddp", "--quiet", "--sync-bn"],
                          capture_output=True, text=True, env=_env(tmp_path), cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert summary["world_size"] == 2
    sums = summary["rank_param_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    assert "sync_bn: true" in (tmp_path / "ddp" / "config.yaml").read_text()


_NAN_DRIVER = """
import sys, warnings, torch
import fastsnn.training as t
import fastsnn.training.loop as loop
real = loop.compute_loss
calls = {{"n": 0}}
def patched(*a, **k):
    loss, terms = real(*a, **k)
    calls["n"] += 1
    return (loss * float("nan"), terms) if {condition} else (loss, terms)
loop.compute_loss = patched
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    code = t.main({argv!r})
print("WARNINGS", sum("non-finite loss" in str(w.message) for w in caught))
sys.exit(code)
"""


def test_non_finite_losses(tmp_path):
    run_dir = str(tmp_path / "run")
    base = ["--epochs", "3", "--cache-dir", str(tmp_path / "cache"), "--quiet", "--out", run_dir]
    assert _cli(tmp_path, *base, "--stop-after-epochs", "1").returncode == 0
    resume = ["--resume", run_dir + "/last.pt"]
    # two bad steps: skipped with a warning each, and the run goes on
    proc = run_python(_NAN_DRIVER.format(condition='calls["n"] in (2, 3)', argv=resume + ["--stop-after-epochs", "1"]),
                      interpret=False, env_extra={"FASTSNN_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WARNINGS 2" in proc.stdout
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    good = (tmp_path / "run" / "last.pt").read_bytes()
    # every step bad: stops after --max-bad-steps with a clear error; the last checkpoint is untouched
    proc = run_python(_NAN_DRIVER.format(condition="True", argv=resume + ["--max-bad-steps", "3"]),
                      interpret=False, env_extra={"FASTSNN_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 1
    assert "3 non-finite losses in a row (--max-bad-steps 3); stopped" in proc.stderr
    assert (tmp_path / "run" / "last.pt").read_bytes() == good


@pytest.mark.parametrize("args,words", [
    (["--arch", "resnet50"], "--arch must be one of"),
    (["--dataset", "mnist"], "--dataset must be one of digits, mnist5k, cifar10, cifar100, imagenet"),
    (["--method", "kd"], "--method must be one of tser, ts, skd, ce"),
    (["--dataset", "cifar10", "--data-dir", "nowhere"], "--data-dir nowhere does not exist"),
    (["--dataset", "imagenet", "--data-dir", "."], "must hold ImageNet's train/ and val/ folders"),
    (["--dataset", "cifar100"], "--dataset cifar100 needs --data-dir"),
    (["--teacher-weights", "missing.pt"], "--teacher-weights missing.pt: no such file"),
    (["--alpha", "2"], "--alpha must be in [0, 1]"),
    (["--label-smoothing", "1"], "--label-smoothing must be in [0, 1)"),
    (["--mixup", "-0.2"], "--mixup must be >= 0 (0: off), got -0.2"),
    (["--cutmix", "nan"], "--cutmix must be a finite number"),
    (["--mix-prob", "1.5"], "--mix-prob must be in [0, 1], got 1.5"),
    (["--ann", "--arch", "digits_snn"], "--arch with --ann must be a teacher"),
    (["--surrogate", "relu"], "--surrogate must be one of atan, sigmoid, piecewise_quadratic, erf, got 'relu'"),
    (["--entropy-tau", "0"], "--entropy-tau must be in [0.05, 100.0], got 0.0"),
    (["--kd-tau", "-1"], "--kd-tau must be in [0.05, 100.0]"),
    (["--kd-tau", "nan"], "--kd-tau must be a finite number"),
    (["--membrane-tau", "inf"], "--membrane-tau must be a finite number"),
    (["--momentum", "-0.5"], "--momentum must be in [0, 1)"),
    (["--workers", "-1"], "--workers must be >= 0"),
    (["--threads", "-1"], "--threads must be >= 0"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, words):
    proc = _cli(tmp_path, *args, "--out", "never")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and words in proc.stderr
    assert not (tmp_path / "never").exists()


def test_batch_not_divisible_across_ranks(tmp_path):
    env = _env(tmp_path) | {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    proc = subprocess.run([sys.executable, "-m", "fastsnn.train", "--batch-size", "63", "--out", "never"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "--batch-size 63 is not divisible by the 2 ranks" in proc.stderr
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("classes,arch,words", [(5, "digits_ann", "has 5 classes, but digits has 10"),
                                                 (10, "resnet18", "does not fit --teacher digits_ann")])
def test_mismatched_teacher_is_reported_before_training(tmp_path, classes, arch, words):
    torch.save(models.create(arch, classes).state_dict(), tmp_path / "teacher.pt")
    proc = _cli(tmp_path, "--teacher-weights", "teacher.pt", "--out", "never")
    assert proc.returncode == 2 and words in proc.stderr, proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    assert not (tmp_path / "never").exists()


def test_a_folder_holding_a_run_is_never_started_into_unasked(tmp_path):
    assert _cli(tmp_path, "--method", "ce", "--epochs", "1").returncode == 0  # no --out: runs/<timestamp>
    (run,) = (tmp_path / "runs").iterdir()
    log = (run / "metrics.jsonl").read_text()
    proc = _cli(tmp_path, "--method", "ce", "--epochs", "1", "--out", str(run))
    assert proc.returncode == 2 and "already holds a run" in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert (run / "metrics.jsonl").read_text() == log
    # a resume continues in the original folder, the default one included
    proc = _cli(tmp_path, "--resume", str(run / "last.pt"), "--epochs", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((tmp_path / "runs").iterdir()) == [run] and len((run / "metrics.jsonl").read_text().splitlines()) == 2
    proc = _cli(tmp_path, "--method", "ce", "--epochs", "1", "--out", str(run), "--overwrite")
    assert proc.returncode == 0 and len((run / "metrics.jsonl").read_text().splitlines()) == 1
    (tmp_path / "afile").write_text("")
    proc = _cli(tmp_path, "--out", "afile")
    assert proc.returncode == 2 and "--out afile is a file" in proc.stderr


def test_a_second_run_on_a_busy_folder_is_refused(tmp_path):
    first = subprocess.Popen([sys.executable, "-m", "fastsnn.train", "--method", "ce", "--epochs", "30", "--out",
                              "run"],
                             cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "run" / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.1)
        proc = _cli(tmp_path, "--method", "ce", "--epochs", "1", "--out", "run", "--overwrite")
        assert proc.returncode == 2 and "is in use by another run" in proc.stderr, proc.stderr[-2000:]
    finally:
        first.kill()
        first.wait()


def test_ctrl_c_ends_with_how_to_resume(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "fastsnn.train", "--method", "ce", "--epochs", "50", "--out", "run"],
                            cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while not (tmp_path / "run" / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == ("fastsnn.train: interrupted; resume with: python -m fastsnn.train "
                                            "--resume run/last.pt")
    resumed = _cli(tmp_path, "--resume", "run/last.pt", "--epochs", "2")
    assert resumed.returncode == 0, resumed.stderr[-2000:]


def test_a_crafted_cifar_batch_is_refused_and_runs_nothing(tmp_path):
    _write_cifar(tmp_path / "data", "cifar10")
    marker = tmp_path / "code-ran"
    with open(tmp_path / "data" / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump({"data": _RunsCode(marker), "labels": [0]}, f)
    proc = _cli(tmp_path, "--dataset", "cifar10", "--data-dir", "data", "--method", "ce", "--epochs", "1",
                "--out", "never")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().count("\n") == 0 and "data_batch_3: refused" in proc.stderr
    assert not marker.exists() and not (tmp_path / "never").exists()


# ------------------------------------------------------------------------------------ the resume matrix

_INTERRUPT_DRIVER = """
import os, signal, sys
import torch
import fastsnn.training as t
import fastsnn.training.loop as loop
mode, at = {mode!r}, {at}
count = {{"n": 0}}
if mode == "kill-between-steps":  # SIGKILL before step `at` + 1 of the student (over the whole invocation)
    real_step = loop.train_step
    def step(session, *a, **k):
        count["n"] += not session.cfg.ann  # a digits teacher trained on the way does not count
        if count["n"] > at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_step(session, *a, **k)
    loop.train_step = step
else:  # "kill-in-write": SIGKILL halfway through the `at`-th checkpoint file written
    real_save = torch.save
    def save(obj, f, *a, **k):
        count["n"] += 1
        if count["n"] == at:
            real_save(obj, f, *a, **k)
            f.flush()
            f.truncate(f.tell() // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *a, **k)
    torch.save = save
sys.exit(t.main({argv!r}))
"""
_TIMING = ("images_per_s", "epoch_time_s")


def _rows(folder):
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in _TIMING} for row in rows]


# (how, at): 32-image batches make 45 steps per epoch, --save-every 10 saves at steps 10, 20, 30, 40
_POINTS = {"mid-epoch": ("kill-between-steps", 15),     # last.pt: epoch 1, step 10
           "end-of-epoch": ("kill-between-steps", 45),  # last.pt: the end of epoch 1
           "in-checkpoint-write": ("kill-in-write", 3)}  # killed writing step 30's: last.pt is step 20's


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix")
    # mixup/CutMix (their random draws) and a weight EMA (its state) ride along: both must resume exactly too
    args = ["--epochs", "2", "--batch-size", "32", "--save-every", "10", "--quiet", "--mixup", "0.2", "--cutmix", "1.0",
            "--mix-prob", "0.7", "--label-smoothing", "0.1", "--model-ema", "0.9", "--model-ema-warmup"]
    proc = subprocess.run([sys.executable, "-m", "fastsnn.train", *args, "--out", str(root / "full")],
                          capture_output=True, text=True, env=_env(root), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, args


@pytest.mark.parametrize("point", list(_POINTS))
def test_resume_matrix(uninterrupted, point):
    """Interrupted at each point, resumed with the same flags and with compatible changed ones: the same
    weights (last.pt and best.pt) and the same metrics rows (timings aside) as the uninterrupted run."""
    root, args = uninterrupted
    how, at = _POINTS[point]
    killed = root / point
    argv = args + ["--out", str(killed)]
    proc = run_python(_INTERRUPT_DRIVER.format(mode=how, at=at, argv=argv), interpret=False,
                      env_extra={"FASTSNN_CACHE": str(root / "cache")})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    state = ckpt.load(killed / "last.pt")  # a whole checkpoint, whatever the moment of the kill
    expected = {"mid-epoch": (0, 10), "end-of-epoch": (1, 0), "in-checkpoint-write": (0, 20)}[point]
    assert (state["epoch"], state["step_in_epoch"]) == expected
    if point == "in-checkpoint-write":
        assert any(p.name.startswith(".tmp-") for p in killed.iterdir())  # the torn file is only ever a temp
    for flags in ([], ["--save-every", "7", "--no-tensorboard", "--max-bad-steps", "4", "--workers", "0",
                       "--recompute"]):
        copy = root / f"{point}-{len(flags)}"
        shutil.copytree(killed, copy)
        proc = subprocess.run([sys.executable, "-m", "fastsnn.train", "--resume", str(copy / "last.pt"), *flags],
                              capture_output=True, text=True, env=_env(root), timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        if flags:
            changed = proc.stdout.split("; changed: ")[1].splitlines()[0].split(", ")
            assert sorted(changed) == ["max_bad_steps 10 -> 4", "recompute False -> True", "save_every 10 -> 7",
                                       "tensorboard True -> False"]
        for name in ("last.pt", "best.pt"):
            assert _same_weights(_weights(root / "full" / name), _weights(copy / name)), (point, flags, name)
            full, resumed = ckpt.load(root / "full" / name)["model_ema"], ckpt.load(copy / name)["model_ema"]
            assert full["updates"] == resumed["updates"] > 0 and _same_weights(full["module"], resumed["module"])
        assert _rows(copy) == _rows(root / "full"), (point, flags)
        assert not any(p.name.startswith(".tmp-") for p in copy.iterdir())
        assert (copy / "metrics.csv").read_text().count("\n") == 3


def test_incompatible_changes_on_resume_are_refused(tmp_path):
    args = ["--epochs", "3", "--batch-size", "32", "--save-every", "10", "--quiet"]
    proc = run_python(_INTERRUPT_DRIVER.format(mode="kill-between-steps", at=12, argv=args + ["--out", "run"]),
                      interpret=False, env_extra={"FASTSNN_CACHE": str(tmp_path / "cache")}, cwd=tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    before = (tmp_path / "run" / "last.pt").read_bytes()
    for flags, words in [(["--seed", "3"], "--seed cannot change on resume"),
                         (["--arch", "spiking_vgg11"], "holds the architecture 'digits_snn'"),
                         (["--batch-size", "64"], "--batch-size cannot change from 32 to 64 when resuming mid-epoch"),
                         (["--T", "2"], "--T cannot change on resume"),
                         (["--model-ema", "0.5"], "--model-ema cannot change on resume"),
                         (["--out", "elsewhere", "--seed", "1"], "--seed cannot change")]:
        proc = _cli(tmp_path, "--resume", "run/last.pt", *flags)
        assert proc.returncode == 2 and words in proc.stderr, (flags, proc.stderr[-2000:])
        assert proc.stderr.strip().count("\n") == 0
    assert (tmp_path / "run" / "last.pt").read_bytes() == before and not (tmp_path / "elsewhere").exists()
    proc = _cli(tmp_path, "--resume", "run/last.pt", "--epochs", "1", "--stop-after-epochs", "1")
    assert proc.returncode == 0 and "changed: epochs 3 -> 1" in proc.stdout, proc.stderr[-2000:]


def test_config_file_and_run_folder(tmp_path):
    (tmp_path / "exp.yaml").write_text("method: ce\nepochs: 5\nT: 2\n")
    proc = _cli(tmp_path, "--config", "exp.yaml", "--epochs", "2", "--out", "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert (written["method"], written["epochs"], written["T"]) == ("ce", 2, 2) and "resume" not in written
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:2] == ["epoch", "train_loss"] and "per_timestep_acc_2" in header
    assert len((run / "metrics.csv").read_text().splitlines()) == 3
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["best_epoch"] in (1, 2) and summary["final_acc"] is not None
    events = list((run / "tensorboard").iterdir())
    assert events and events[0].name.startswith("events.out.tfevents")
    # the run's own config.yaml starts the same run again
    proc = _cli(tmp_path, "--config", "run/config.yaml", "--out", "again")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _same_weights(_weights(run / "last.pt"), _weights(tmp_path / "again" / "last.pt"))
