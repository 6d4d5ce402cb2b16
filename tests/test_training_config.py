"""fastsnn.training in-process: the typed configuration (CLI, --config YAML, defaults, validation, resume
merging), the checkpoint's keys (TrainState), the run folder's files and the schedule after a resume."""
import dataclasses
import json
import time

import pytest
import torch

from fastsnn import checkpoint as ckpt
from fastsnn import models
from fastsnn.spec import KINDS
from fastsnn.training import config as C
from fastsnn.training import report, setup, state as S


def _parse(*argv):
    cfg, given = C.parse(list(argv))
    C.resolve(cfg)
    C.validate(cfg)
    return cfg, given


def test_every_flag_is_a_typed_field():
    dests = {a.dest for a in C.build_parser()._actions} - {"help"}
    assert dests == {f.name for f in dataclasses.fields(C.TrainConfig)}
    cfg, _ = _parse()
    assert (cfg.arch, cfg.teacher, cfg.epochs, cfg.batch_size, cfg.ts_ce, cfg.ts_kl) == (
        "digits_snn", "digits_ann", 15, 64, True, True)
    cfg, _ = _parse("--method", "skd", "--dataset", "digits")
    assert (cfg.ts_ce, cfg.ts_kl, cfg.lam) == (False, False, 0.0)


def test_help_shows_choices_architectures_and_defaults():
    text = C.build_parser().format_help()
    for words in ("{digits,mnist5k,cifar10,cifar100,imagenet}", "{tser,ts,skd,ce}", "sew_resnet34", "spiking_vgg16",
                  "resnet34", "imagenet: lr=0.2", "--config YAML"):
        assert words in text


@pytest.mark.parametrize("argv,words", [
    (["--neuron", "alif"], "--neuron must be one of if, lif, lif_no_decay, plif, plif_no_decay, got 'alif'"),
    (["--dataset", "mnist"], "--dataset must be one of digits, mnist5k, cifar10, cifar100, imagenet, got 'mnist'"),
    (["--epochs", "ten"], "--epochs: invalid int value: 'ten'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--membrane-tau", "1"], "--membrane-tau must be > 1, got 1.0"),
    (["--v-reset", "2"], "--v-threshold must be > --v-reset for a hard reset, got 1.0"),
    (["--surrogate-alpha", "0"], "--surrogate-alpha must be > 0, got 0.0"),
    (["--lam", "-0.1"], "--lam must be >= 0"),
    (["--config", "missing.yaml"], "--config missing.yaml: cannot be read"),
    (["--teacher-weights", "."], "--teacher-weights .: is a folder; give a file (e.g. ./last.pt)"),
    (["--sync-bn"], "--sync-bn synchronises BatchNorm across the ranks of a distributed run"),
])
def test_bad_flags_are_one_usage_line(argv, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(C.UsageError) as e:
        _parse(*argv)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_resume_from_a_folder_names_the_file_to_give(tmp_path, monkeypatch):
    from fastsnn.training import prepare

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(C.UsageError, match=r"^--resume runs: is a folder; give a file \(e.g. runs/last.pt\)$"):
        prepare(["--resume", "runs"])


def test_config_file_sets_values_and_the_command_line_wins(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: ce\nepochs: 3\nbatch-size: 32\nmembrane_tau: 3.0\nts-ce: false\nseed: 7\n")
    cfg, given = _parse("--config", str(path), "--epochs", "5")
    assert (cfg.method, cfg.epochs, cfg.batch_size, cfg.membrane_tau, cfg.ts_ce, cfg.seed) == ("ce", 5, 32, 3.0, False,
                                                                                               7)
    assert {"method", "epochs", "batch_size", "membrane_tau", "ts_ce", "seed"} <= given


@pytest.mark.parametrize("text,words", [
    ("epoch: 3\n", "unknown setting 'epoch'; allowed:"),
    ("epochs: ten\n", "epochs must be a int, got 'ten'"),
    ("epochs: 1.5\n", "epochs must be a int, got 1.5"),
    ("ann: yes please\n", "ann must be true or false"),
    ("dataset: mnist\n", "dataset must be one of digits, mnist5k, cifar10, cifar100, imagenet, got 'mnist'"),
    ("tau: true\n", "tau must be a float, got True"),
    ("- 1\n- 2\n", "must hold a mapping of settings, got a list"),
    ("a: [\n", "not valid YAML"),
])
def test_a_bad_config_file_is_one_line(tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(C.UsageError) as e:
        _parse("--config", str(path))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_the_long_run_flags_round_trip_and_show_their_defaults(tmp_path):
    """issue 29's flags: each in --help with its default, each through config.yaml and back."""
    cfg, _ = _parse("--mixup", "0.8", "--cutmix", "1", "--mix-prob", "0.5", "--label-smoothing", "0.1",
                    "--model-ema", "0.9998", "--model-ema-warmup")
    (tmp_path / "config.yaml").write_text(C.to_yaml(cfg))
    again, _ = _parse("--config", str(tmp_path / "config.yaml"))
    assert again.saved() == cfg.saved()
    assert (again.mixup, again.cutmix, again.mix_prob, again.model_ema, again.model_ema_warmup) == (
        0.8, 1.0, 0.5, 0.9998, True)
    text = C.build_parser().format_help()
    for flag, default in (("--mixup", "default 0: off"), ("--cutmix", "default 0: off"), ("--mix-prob", "default 1"),
                          ("--model-ema DECAY", "default 0: off"), ("--model-ema-warmup", "default off"),
                          ("--label-smoothing", "default 0"), ("--sync-bn", "default off"),
                          ("--trivialaugment", "default off"), ("--random-erasing", "default 0")):
        start = text.index("\n  " + flag)  # the flag's own entry (not the usage line, nor another's help)
        assert default in " ".join(text[start:start + 500].split()), flag


def test_the_written_config_reproduces_the_run(tmp_path):
    cfg, _ = _parse("--method", "ts", "--T", "2", "--no-detach-reset", "--epochs", "4", "--lr", "1e-5",
                    "--lam", "1e20", "--weight-decay", "0", "--cache-dir", 'a "quoted": dir\\')
    (tmp_path / "config.yaml").write_text(C.to_yaml(cfg))  # written without PyYAML, read back with it
    again, _ = _parse("--config", str(tmp_path / "config.yaml"))
    assert again.saved() == cfg.saved()
    assert "resume" not in C.to_yaml(cfg) and "overwrite" not in C.to_yaml(cfg)


def test_resume_applies_compatible_changes_and_refuses_the_rest():
    saved, _ = _parse("--epochs", "4")
    saved = saved.saved()
    cfg, given = C.parse(["--epochs", "6", "--save-every", "3", "--no-ts-ce"])
    changes = C.merge_resumed(cfg, saved, given, mid_epoch=True)
    assert sorted(changes) == ["epochs 4 -> 6", "save_every 0 -> 3", "ts_ce True -> False"]
    assert cfg.lr == saved["lr"] and cfg.seed == saved["seed"]
    for argv, words in [(["--seed", "1"], "--seed cannot change on resume (the run was started with 0"),
                        (["--arch", "spiking_vgg11"], "--arch cannot change on resume"),
                        (["--lr", "0.5"], "--lr cannot change on resume"),
                        (["--batch-size", "32"], "--batch-size cannot change from 64 to 32 when resuming mid-epoch")]:
        cfg, given = C.parse(argv)
        with pytest.raises(C.UsageError, match=words.replace("(", r"\(")):
            C.merge_resumed(cfg, saved, given, mid_epoch=True)
    cfg, given = C.parse(["--batch-size", "32"])
    assert C.merge_resumed(cfg, saved, given, mid_epoch=False) == ["batch_size 64 -> 32"]
    cfg, given = C.parse(["--seed", "0"])  # given but unchanged: nothing to refuse
    assert C.merge_resumed(cfg, saved, given, mid_epoch=True) == []


def test_the_checkpoint_round_trips_the_state_through_weights_only(tmp_path):
    cfg, _ = _parse("--method", "ce")
    model = torch.nn.Linear(3, 2)
    optimizer, scheduler, scaler = setup.optimizer_for(cfg, model, torch.device("cpu"), steps_per_epoch=5)
    state = S.TrainState(epoch=1, step_in_epoch=3, best_acc=50.0, best_epoch=1,
                         history=[{"epoch": 1, "test_acc": 50.0, "firing_rate": float("nan")}],
                         sums=torch.tensor([1.5, 0.25, 0.0, 0.0, 7.0, 9.0], dtype=torch.float64), images_seen=9,
                         elapsed=0.5)
    obj = S.to_checkpoint(state, cfg=cfg, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                          ranks=[state.rank_part()], num_classes=2, in_channels=3)
    ckpt.save_atomic(obj, str(tmp_path / "last.pt"))
    loaded = S.read(str(tmp_path / "last.pt"), role="student", arch="digits_snn")
    other = torch.nn.Linear(3, 2)
    o2, s2, sc2 = setup.optimizer_for(cfg, other, torch.device("cpu"), steps_per_epoch=5)
    back = S.restore(loaded, rank=0, world=1, model=other, optimizer=o2, scheduler=s2, scaler=sc2, device="cpu",
                     path="last.pt")
    assert torch.equal(other.weight, model.weight) and torch.equal(back.sums, state.sums)
    assert (back.epoch, back.step_in_epoch, back.images_seen, back.elapsed, back.best_epoch) == (1, 3, 9, 0.5, 1)
    with pytest.raises(ckpt.CheckpointError, match="written mid-epoch by 1 ranks and cannot continue on 2"):
        S.restore(loaded, rank=0, world=2, model=other, optimizer=o2, scheduler=s2, scaler=sc2, device="cpu",
                  path="last.pt")
    del loaded["ranks"]
    ckpt.save_atomic(loaded, str(tmp_path / "partial.pt"))
    with pytest.raises(ckpt.CheckpointError, match="incomplete checkpoint, missing ranks"):
        S.read(str(tmp_path / "partial.pt"))


def test_the_schedule_is_realigned_only_in_value():
    cfg, _ = _parse("--epochs", "3", "--warmup-epochs", "1")
    model = torch.nn.Linear(2, 2)
    optimizer, scheduler, _ = setup.optimizer_for(cfg, model, torch.device("cpu"), steps_per_epoch=4)
    for _ in range(6):
        optimizer.step()
        scheduler.step()
    before = [g["lr"] for g in optimizer.param_groups]
    setup.align_schedule(scheduler, 6)  # unchanged schedule: identical learning rates
    assert [g["lr"] for g in optimizer.param_groups] == before
    longer = dataclasses.replace(cfg, epochs=6)
    scheduler.lr_lambdas = [setup.lr_factor(longer, 4)] * len(optimizer.param_groups)
    setup.align_schedule(scheduler, 6)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(cfg.lr * setup.lr_factor(longer, 4)(6))
    assert optimizer.param_groups[0]["lr"] > before[0]


def test_reports_are_strict_and_flat(tmp_path):
    rows = [{"epoch": 1, "test_acc": 50.0, "firing_rate": float("nan"), "per_timestep_acc": [40.0, 60.0]},
            {"epoch": 2, "test_acc": float("inf"), "firing_rate": 0.1, "per_timestep_acc": [45.0, 65.0]}]
    lines = [json.loads(report.json_line(r), parse_constant=pytest.fail) for r in rows]
    assert lines[0]["firing_rate"] is None and lines[1]["test_acc"] is None
    text = report.csv_text(rows)
    assert text.splitlines() == ["epoch,test_acc,firing_rate,per_timestep_acc_1,per_timestep_acc_2",
                                 "1,50.0,,40.0,60.0", "2,,0.1,45.0,65.0"]
    path = tmp_path / "x.json"
    report.write_text(str(path), "first")
    report.write_text(str(path), "second")
    assert path.read_text() == "second" and [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_tensorboard_is_optional(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were missing
    notes = []
    reporter = report.Reporter(str(tmp_path), enabled=True, tensorboard=True, log=notes.append)
    reporter.start("a: 1\n", [])
    assert reporter.writer is None and notes == ["note: tensorboard is not installed; no event files "
                                                 "(pip install tensorboard)"]
    row = {"epoch": 1, "train_loss": 1.0, "train_ce": 1.0, "train_kl": 0.0, "train_entropy": 0.0, "train_acc": 50.0,
           "test_acc": 40.0, "per_timestep_acc": [40.0]}
    reporter.epoch(row, [row], {"student_acc": 40.0, "per_timestep_acc": [40.0]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "curves.png", "metrics.csv", "metrics.json",
                                                          "metrics.jsonl", "per_timestep_acc.png"]
    quiet = report.Reporter(str(tmp_path / "rank1"), enabled=False, tensorboard=True, log=notes.append)
    quiet.start("a: 1\n", [])
    assert quiet.writer is None and not (tmp_path / "rank1").exists()


@pytest.mark.parametrize("last_epoch_logged", [True, False], ids=["logged", "checkpointed-not-logged"])
def test_tensorboard_after_a_resume_holds_each_epoch_once(tmp_path, last_epoch_logged):
    """A run stopped after epoch 2's checkpoint, with (or, stopped in between, without) epoch 2 in its
    TensorBoard events, resumed for epoch 3: TensorBoard reads epochs 1, 2, 3, once each, with epoch 2's
    values."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def row(epoch, loss):
        return {"epoch": epoch, "train_loss": loss, "train_ce": loss, "train_kl": 0.0, "train_entropy": 0.0,
                "train_acc": 50.0, "test_acc": 10.0 * epoch, "per_timestep_acc": [1.0, 2.0]}
    summary = {"student_acc": 1.0, "per_timestep_acc": [1.0, 2.0]}
    rows = [row(1, 3.0), row(2, 2.0), row(3, 1.0)]
    with report.Reporter(str(tmp_path), enabled=True, tensorboard=True, log=print) as first:
        first.start("a: 1\n", [])
        first.epoch(rows[0], rows[:1], summary)
        if last_epoch_logged:
            first.epoch(rows[1], rows[:2], summary)
    time.sleep(1.1)  # event files are named by the second they were opened
    with report.Reporter(str(tmp_path), enabled=True, tensorboard=True, log=print) as resumed:
        resumed.start("a: 1\n", rows[:2])
        resumed.epoch(rows[2], rows, summary)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train_loss")] == [(1, 3.0), (2, 2.0), (3, 1.0)]
    assert [e.step for e in events.Scalars("per_timestep_acc/t2")] == [1, 2, 3]


@pytest.mark.parametrize("neuron", list(KINDS))
@pytest.mark.parametrize("v_reset", ["none", "-0.25"])
def test_every_neuron_flag_round_trips_through_config_yaml(tmp_path, neuron, v_reset):
    argv = ["--neuron", neuron, "--membrane-tau", "3.5", "--v-threshold", "0.75", "--v-reset", v_reset,
            "--surrogate", "sigmoid", "--surrogate-alpha", "2.5", "--kd-tau", "4", "--no-detach-reset"]
    cfg, _ = C.parse(argv)
    C.resolve(cfg)
    C.validate(cfg)
    assert (cfg.neuron, cfg.membrane_tau, cfg.v_threshold, cfg.v_reset, cfg.surrogate_alpha, cfg.kd_tau,
            cfg.detach_reset) == (neuron, 3.5, 0.75, None if v_reset == "none" else -0.25, 2.5, 4.0, False)
    (tmp_path / "config.yaml").write_text(C.to_yaml(cfg))
    again, given = C.parse(["--config", str(tmp_path / "config.yaml")])
    C.resolve(again)
    assert again.saved() == cfg.saved()
    assert {"neuron", "membrane_tau", "v_threshold", "v_reset", "surrogate_alpha", "kd_tau"} <= given
    model = setup.build_model(again, 10, 1)
    neurons = list(models.spiking_neurons(model).values())
    assert neurons and all(n.spec.kind == neuron and n.v_threshold == 0.75 and n.alpha == 2.5
                           and n.v_reset == again.v_reset for n in neurons)
    assert all(("w" in dict(n.named_parameters())) == neuron.startswith("plif") for n in neurons)


def test_the_neuron_choices_are_the_specs_own():
    parser = C.build_parser()
    choices = {a.dest: a.choices for a in parser._actions}
    assert tuple(choices["neuron"]) == KINDS


def test_renamed_flags_and_settings_still_work_with_one_warning(tmp_path, capsys):
    cfg, given = C.parse(["--tau", "4", "--lif-tau", "3"])
    err = capsys.readouterr().err.splitlines()
    assert (cfg.kd_tau, cfg.membrane_tau) == (4.0, 3.0) and {"kd_tau", "membrane_tau"} <= given
    assert err == ["fastsnn.train: warning: --tau is deprecated; use --kd-tau",
                   "fastsnn.train: warning: --lif-tau is deprecated; use --membrane-tau"]
    (tmp_path / "old.yaml").write_text("tau: 3.0\nlif_tau: 2.5\nmethod: ce\n")  # a config.yaml of a previous version
    cfg, _ = C.parse(["--config", str(tmp_path / "old.yaml")])
    assert (cfg.kd_tau, cfg.membrane_tau) == (3.0, 2.5) and len(capsys.readouterr().err.splitlines()) == 2
    assert C.check_saved({"tau": 6.0, "lif_tau": 1.5, "T": 2}, "x") == {"kd_tau": 6.0, "membrane_tau": 1.5, "T": 2}


def test_recompute_round_trips_through_config_yaml_and_builds_the_student(tmp_path):
    cfg, _ = _parse("--recompute")
    assert cfg.recompute is True and "recompute" in C.RESUME_COMPATIBLE  # results do not change with it
    (tmp_path / "config.yaml").write_text(C.to_yaml(cfg))
    again, given = C.parse(["--config", str(tmp_path / "config.yaml")])
    C.resolve(again)
    assert again.recompute is True and "recompute" in given and again.saved() == cfg.saved()
    assert setup.build_model(again, 10, 1).recompute is True
    assert setup.build_model(_parse()[0], 10, 1).recompute is False
    with pytest.raises(C.UsageError, match="--recompute is for a spiking student"):
        _parse("--ann", "--arch", "digits_ann", "--recompute")
