"""The training program against hostile use: two runs into one folder, flags that would be dropped silently,
numbers out of range, foreign checkpoints and configuration files, an unwritable cache, --overwrite of a folder
with more than a run in it. Each gives the right result or one line with exit code 2, and writes nothing."""
import importlib
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from fastsnn import rundir
from fastsnn.training import config as C
from fastsnn.training import report
from helpers import program, program_env

run_mod = importlib.import_module("fastsnn.training.run")  # the package exports its function run()


_env, _cli = program_env, program


def _one_line(proc, words):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert words in proc.stderr, proc.stderr


# ------------------------------------------------------------------------------------------ the run folder

def test_the_folder_is_checked_again_once_locked(tmp_path, monkeypatch):
    """A run that finished in the folder after this run's first check (while it loaded its data or trained its
    teacher) is found when the lock is taken, before any work, and nothing of it is touched."""
    monkeypatch.chdir(tmp_path)
    cfg, changes = run_mod.prepare(["--method", "ce", "--epochs", "1", "--out", "run", "--cache-dir", "cache"])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text("{}")  # the other run, finished meanwhile
    loaded = []
    monkeypatch.setattr(run_mod.datasets, "load", lambda *a, **k: loaded.append(1))
    with pytest.raises(rundir.RunFolderError, match="run already holds a run"):
        run_mod.run(cfg, changes=changes)
    assert not loaded and sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock", "metrics.json"]
    assert (tmp_path / "run" / "metrics.json").read_text() == "{}"


_HOLDER = textwrap.dedent("""
    import sys, time
    from fastsnn import rundir
    with rundir.RunLock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(120)
""")


@pytest.mark.slow
def test_a_busy_folder_is_refused_before_any_work(tmp_path):
    """The lock is taken first: a run into a folder another run holds is refused at once, before training the
    (uncached) teacher it would need."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path / "run")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        proc = _cli(tmp_path, "--epochs", "1", "--out", "run")
        _one_line(proc, f"run is in use by another run (pid {holder.pid})")
        assert time.monotonic() - started < 60
        assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*.pt"))
    finally:
        holder.kill()
        holder.wait()


def test_default_folders_never_collide(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(rundir.time, "strftime", lambda fmt: "20261204-120000")  # runs started in one second
    with rundir.claim(None, resuming=False, overwrite=False) as first:
        with rundir.claim(None, resuming=False, overwrite=False) as second:
            (tmp_path / second / "metrics.json").write_text("{}")
    assert (first, second) == (os.path.join("runs", "20261204-120000"), os.path.join("runs", "20261204-120000-2"))
    # the first left nothing but its lock: its folder is gone again; the second holds a run
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["20261204-120000-2"]
    assert rundir.fresh_folder() == os.path.join("runs", "20261204-120000")


def test_a_claimed_folder_left_unused_is_removed_and_a_given_one_kept(tmp_path):
    for existed in (False, True):
        folder = tmp_path / f"run-{existed}"
        if existed:
            folder.mkdir()
        with pytest.raises(RuntimeError, match="stopped"):
            with rundir.claim(str(folder), resuming=False, overwrite=False):
                raise RuntimeError("stopped before writing")
        assert folder.exists() == existed


def test_overwrite_removes_everything_of_the_previous_run(tmp_path):
    folder = tmp_path / "run"
    (folder / "tensorboard").mkdir(parents=True)
    (folder / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"old")
    names = ["last.pt", "best.pt", "metrics.json", "metrics.jsonl", "metrics.csv", "config.yaml", "curves.png",
             "per_timestep_acc.png", "eval-best.json", "eval-last.json", ".tmp-abc.pt"]
    for name in names + ["notes.txt"]:
        (folder / name).write_text("old")
    said = []
    with rundir.claim(str(folder), resuming=False, overwrite=True, log=said.append):
        assert sorted(p.name for p in folder.iterdir()) == [".lock", "notes.txt"]  # the user's own file stays
    assert "eval-best.json" in said[0] and "tensorboard" in said[0]
    with pytest.raises(rundir.RunFolderError, match="already holds a run"):  # without --overwrite: refused
        (folder / "last.pt").write_text("new")
        with rundir.claim(str(folder), resuming=False, overwrite=False):
            pass
    assert (folder / "last.pt").read_text() == "new"


# ---------------------------------------------------------------------------------------- flags and files

@pytest.mark.parametrize("argv,words", [
    (["--method", "ts", "--lam", "0.1"], "--lam 0.1 applies to --method tser only"),
    (["--method", "skd", "--lam", "0.05"], "this run's method is skd"),
    (["--T", "100000000000000000000"], "--T must be <= 1024"),
    (["--T", "2000"], "--T must be <= 1024"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--seed", "99999999999"], "--seed must be <= 4294967295"),
    (["--threads", "100000000"], "--threads must be <= 4096"),
    (["--batch-size", "99999999999"], "--batch-size must be <= 16777216"),
    (["--epochs", "10000000"], "--epochs must be <= 100000"),
])
def test_out_of_range_and_dropped_flags_are_refused(tmp_path, argv, words):
    proc = _cli(tmp_path, *argv, "--out", "never")
    _one_line(proc, words)
    assert not (tmp_path / "never").exists() and not (tmp_path / "runs").exists()


def test_lam_with_a_method_without_entropy_is_accepted_at_zero():
    cfg, given = C.parse(["--method", "ts", "--lam", "0"])
    C.check_method_settings(cfg, given)
    cfg, given = C.parse(["--method", "ts"])  # the default λ is not given: resolved to 0, nothing to refuse
    C.check_method_settings(cfg, given)
    C.resolve(cfg)
    assert cfg.lam == 0.0


@pytest.mark.parametrize("text,words", [
    (b"method: ce\nnote: caf\xe9\n", "not UTF-8 text (byte 0xe9"),
    (b"T: 1e20\n", "--T must be <= 1024"),
    (b"T: .inf\n", "T must be a int"),
    (b"lr: abc\n", "lr must be a float, got 'abc'"),
    (b"- 1\n- 2\n", "must hold a mapping of settings"),
    (b"method: [\n", "not valid YAML"),
])
def test_bad_config_files_are_one_line(tmp_path, text, words):
    (tmp_path / "exp.yaml").write_bytes(text)
    _one_line(_cli(tmp_path, "--config", "exp.yaml", "--out", "never"), words)
    assert not (tmp_path / "never").exists()


def test_yaml_numbers_without_a_dot_are_numbers(tmp_path):
    """PyYAML reads 1e-3 (YAML 1.1) as a string; a float setting takes it as the number it is."""
    (tmp_path / "exp.yaml").write_text("lr: 1e-3\nweight_decay: 5E-4\nalpha: +.5\nepochs: 3\n")
    parser = C.build_parser()
    assert C.read_yaml(str(tmp_path / "exp.yaml"), parser) == dict(lr=1e-3, weight_decay=5e-4, alpha=0.5, epochs=3)


def test_the_epoch_line_gives_slow_rates_their_digits():
    assert [report.rate(v) for v in (4429.4, 123.4, 12.5, 0.333, 0.0)] == ["4429", "123", "12.5", "0.333", "0"]
    row = dict(epoch=1, train_loss=1.0, train_ce=1.0, train_kl=0.0, train_entropy=0.0, train_acc=10.0, test_acc=10.0,
               per_timestep_acc=[10.0], firing_rate=0.1, lr=0.1, images_per_s=18 / 54)
    assert report.epoch_line("student", True, 1, row).endswith(" 0.333 img/s")


# ------------------------------------------------------------------------------------------ the cache

@pytest.mark.slow
def test_an_unwritable_cache_is_one_line_and_a_bad_cached_teacher_is_named(tmp_path):
    (tmp_path / "afile").write_text("")
    env = _env(tmp_path) | {"FASTSNN_CACHE": str(tmp_path / "afile" / "cache")}
    _one_line(_cli(tmp_path, "--epochs", "1", "--out", "never", env=env), "--cache-dir")
    assert not (tmp_path / "never").exists()
    # a truncated cached teacher: named as the cache's, with the way out, never as a --teacher-weights
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "digits_ann-seed0-val0.1.pt").write_bytes(b"PK\x03\x04 truncated")
    proc = _cli(tmp_path, "--epochs", "1", "--out", "never")
    _one_line(proc, "the cached teacher")
    assert "--teacher-weights" not in proc.stderr.split("; delete it")[0] and "delete it" in proc.stderr
    assert not (tmp_path / "never").exists()


# -------------------------------------------------------------------------------- foreign checkpoints

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A one-epoch --method ce run: its last.pt, to be damaged."""
    tmp = tmp_path_factory.mktemp("finished")
    proc = _cli(tmp, "--method", "ce", "--epochs", "1", "--out", "run", "--no-tensorboard")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run" / "last.pt"


def _set(path, value):
    def change(obj):
        *parents, key = path
        for p in parents:
            obj = obj[p]
        obj[key] = value
    return change


def _drop(key):
    return lambda obj: obj.pop(key)


FOREIGN = {
    "a weight of another shape": lambda o: o["model"].update(
        {k: torch.zeros(3) for k in list(o["model"])[:1]}),
    "a weight missing": lambda o: o["model"].pop(next(iter(o["model"]))),
    "model not a dict": _set(["model"], [1, 2]),
    "config not a dict": _set(["config"], "digits"),
    "config T a string": _set(["config", "T"], "four"),
    "config lr a bool": _set(["config", "lr"], True),
    "empty ranks": _set(["ranks"], []),
    "ranks not a list": _set(["ranks"], {"0": 1}),
    "a rank without rng": lambda o: o["ranks"][0].pop("rng"),
    "bad python rng state": lambda o: o["ranks"][0]["rng"].update(python=[3, [1, 2], None]),
    "bad torch rng state": lambda o: o["ranks"][0]["rng"].update(torch=torch.zeros(3, dtype=torch.uint8)),
    "numpy rng state of strings": lambda o: o["ranks"][0]["rng"].update(numpy="MT19937"),
    "optimizer state of another model": lambda o: o["optimizer"].update(
        param_groups=[dict(o["optimizer"]["param_groups"][0], params=[0])]),
    "optimizer not a dict": _set(["optimizer"], 3),
    "scheduler state garbage": _set(["scheduler"], {"base_lrs": "x", "last_epoch": "y"}),
    "scaler state garbage": _set(["scaler"], {"scale": "big"}),
    "negative epoch": _set(["epoch"], -3),
    "epoch a float": _set(["epoch"], 1.5),
    "history of strings": _set(["history"], ["epoch 1"]),
    "history shorter than the epochs": _set(["epoch"], 4),
    "num_classes zero": _set(["num_classes"], 0),
    "running sums of another length": lambda o: o["ranks"][0].update(sums=torch.zeros(2, dtype=torch.float64)),
    "best_epoch a string": _set(["best_epoch"], "one"),
    "no history": _drop("history"),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(FOREIGN))
def test_a_foreign_checkpoint_is_one_line_and_writes_nothing(tmp_path, finished, kind):
    obj = torch.load(finished, weights_only=True)
    FOREIGN[kind](obj)
    run = tmp_path / "run"
    run.mkdir()
    torch.save(obj, run / "last.pt")
    before = sorted(p.name for p in run.iterdir())
    proc = _cli(tmp_path, "--resume", "run/last.pt", "--epochs", "2")
    _one_line(proc, "run/last.pt")
    assert sorted(p.name for p in run.iterdir()) in (before, sorted(before + [".lock"]))
    proc = _cli(tmp_path, "--checkpoint", "run/last.pt", module="fastsnn.evaluate")
    if proc.returncode == 0:  # evaluation reads the model and config only: what it does not read may differ
        assert kind not in ("a weight of another shape", "a weight missing", "model not a dict", "config not a dict",
                            "config T a string", "config lr a bool", "num_classes zero")
    else:
        _one_line(proc, "run/last.pt")
        assert not list(run.glob("eval-*.json"))


def test_evaluate_refuses_an_unusable_out_before_evaluating(tmp_path, monkeypatch):
    from fastsnn import evaluate

    (tmp_path / "afile").write_text("")
    (tmp_path / "last.pt").write_bytes(b"")
    monkeypatch.setattr(evaluate.ckpt, "load", lambda *a, **k: {"config": {}, "model": {}})
    monkeypatch.setattr(evaluate.ckpt, "check_training_checkpoint", lambda obj, *a, **k: obj)
    monkeypatch.setattr(evaluate, "measure", lambda *a, **k: pytest.fail("evaluated before checking --out"))
    for out, words in ((tmp_path / "afile", "is a file"), (tmp_path / "afile" / "sub", "cannot be created")):
        code = evaluate.main(["--checkpoint", str(tmp_path / "last.pt"), "--out", str(out)])
        assert code == 2
    assert json.dumps({})  # nothing else to check: no report was written
    assert not list(tmp_path.glob("**/eval-*.json"))
