"""The weight EMA (--model-ema, fastsnn.training.ema.ModelEma): its update against the formula, with and without
timm's ModelEmaV3 warm-up; a run that keeps one evaluates it every epoch, picks best.pt on the better of the two,
says which in metrics.json, and evaluate reads the weights it is asked for. (Resume bit-exactness with an EMA is in
tests/test_train.py's resume matrix.)"""
import json

import pytest
import torch

from fastsnn import checkpoint as ckpt
from fastsnn import models
from fastsnn.training.ema import ModelEma
from test_train import _cli


def _model():
    torch.manual_seed(0)
    return models.create("digits_snn", 10, T=2, in_channels=1)


@pytest.mark.parametrize("warmup", [False, True], ids=["plain", "warmup"])
def test_update_is_the_moving_average_of_every_float_tensor(warmup):
    model = _model()
    ema = ModelEma(model, 0.9, warmup=warmup)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for n in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            for name, b in model.named_buffers():
                if b.is_floating_point():
                    b.mul_(1.5).add_(0.25)
                else:
                    b.add_(1)
        decay = min(0.9, 1 - (1 + n) ** (-2 / 3)) if warmup else 0.9
        for k, v in model.state_dict().items():
            expected[k] = decay * expected[k] + (1 - decay) * v if v.is_floating_point() else v.clone()
        ema.update(model)
    assert ema.updates == 4
    got = ema.module.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-6, msg=k)
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training


def test_state_round_trip_and_refusals():
    model = _model()
    ema = ModelEma(model, 0.99)
    ema.update(model)
    other = ModelEma(_model(), 0.99)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1
    for bad in ({"module": {}, "updates": 1}, {"module": ema.module.state_dict(), "updates": -1}, None):
        with pytest.raises((ValueError, RuntimeError)):
            other.load_state_dict(bad)
    for decay in (0.0, 1.0, 1):
        with pytest.raises(ValueError, match="decay must be a number in"):
            ModelEma(model, decay)


def test_a_run_with_an_ema_selects_reports_and_evaluates_the_better_weights(tmp_path):
    proc = _cli(tmp_path, "--epochs", "3", "--model-ema", "0.6", "--out", "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["ema_test_acc"] is not None and row["ema_val_acc"] is not None and len(row["ema_acc_at_t"]) == 4
        assert row["selected_model"] == ("ema" if row["ema_val_acc"] > row["val_acc"] else "raw")
    assert "ema_test_acc" in (run / "metrics.csv").read_text().splitlines()[0]
    summary = json.loads((run / "metrics.json").read_text())
    best = max(rows, key=lambda r: max(r["val_acc"], r["ema_val_acc"]))  # ties keep the earlier epoch
    assert summary["best_epoch"] == best["epoch"] and summary["best_model"] == best["selected_model"]
    prefix = "ema_" if best["selected_model"] == "ema" else ""
    assert summary["student_acc"] == best[prefix + "test_acc"]
    assert summary["raw_acc"] == best["test_acc"] and summary["ema_acc"] == best["ema_test_acc"]
    updates = ckpt.load(run / "last.pt")["model_ema"]["updates"]
    assert updates >= 3 and updates % 3 == 0  # one per optimiser step, the same number each epoch
    for weights, key in (("auto", prefix + "test_acc"), ("raw", "test_acc"), ("ema", "ema_test_acc")):
        proc = _cli(tmp_path, "--checkpoint", "run/best.pt", "--weights", weights, "--overwrite",
                    module="fastsnn.evaluate")
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = json.loads((run / "eval-best.json").read_text())
        assert report["student_acc"] == pytest.approx(best[key]), weights
        assert report["weights"] == (best["selected_model"] if weights == "auto" else weights)


def test_ema_weights_of_a_run_without_an_ema_are_refused(tmp_path):
    assert _cli(tmp_path, "--epochs", "1", "--out", "run").returncode == 0
    proc = _cli(tmp_path, "--checkpoint", "run/last.pt", "--weights", "ema", module="fastsnn.evaluate")
    assert proc.returncode == 2 and "holds no weight EMA" in proc.stderr and proc.stderr.strip().count("\n") == 0
