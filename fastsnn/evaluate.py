"""python -m fastsnn.evaluate --checkpoint PATH: re-evaluate a fastsnn.train checkpoint.

Writes the same report as training (accuracy of the time-mean logits, per-timestep accuracy, firing
rate) plus per-layer firing rates and the paper's energy estimate (Table 4): synaptic operations of the
spiking layers as accumulates (input firing rate × MACs) and the encoding layer's MACs, with
E = 0.9 pJ per AC + 4.6 pJ per MAC (45 nm).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import nullcontext

import torch

from . import checkpoint as ckpt
from . import data as datasets
from . import models, rundir
from .training import TrainConfig, evaluate
from .training.config import UsageError, check_saved
from .training.report import strict_json, write_text
from .training.setup import autocast, build_model, device_for

def build_parser():
    p = argparse.ArgumentParser(prog="python -m fastsnn.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by fastsnn.train (last.pt, best.pt)")
    p.add_argument("--dataset", choices=datasets.DATASETS, help="default: the checkpoint's")
    p.add_argument("--data-dir", help="default: the checkpoint's")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--out", help="report directory (default: beside the checkpoint); the report is "
                                 "eval-<checkpoint name>.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report of this checkpoint")
    p.add_argument("--weights", default="auto", choices=("auto", "raw", "ema"),
                   help="raw: the trained weights; ema: the weight EMA of a run with --model-ema; auto (default): "
                        "the one the checkpoint's epoch selected (the better on the selection split), raw without "
                        "an EMA")
    return p


def chosen_weights(state: dict, asked: str) -> tuple[str, dict]:
    """("raw" or "ema", the state_dict) of a checkpoint for --weights `asked`, or _Refused."""
    ema = state.get("model_ema")
    if asked == "auto":
        history, epoch = state.get("history") or [], state.get("epoch") or 0
        row = history[epoch - 1] if 0 < epoch <= len(history) and isinstance(history[epoch - 1], dict) else {}
        asked = "ema" if ema is not None and row.get("selected_model") == "ema" else "raw"
    if asked == "raw":
        return "raw", state["model"]
    if not isinstance(ema, dict) or not isinstance(ema.get("module"), dict):
        raise _Refused("--weights ema: the checkpoint holds no weight EMA (train with --model-ema DECAY)")
    return "ema", ema["module"]


class _Refused(Exception):
    pass


def _checked(args) -> tuple[dict, TrainConfig, str]:
    """(checkpoint, its training configuration, report path), or _Refused with one line."""
    try:
        state = ckpt.check_training_checkpoint(ckpt.load(args.checkpoint, what="--checkpoint"), args.checkpoint,
                                               what="--checkpoint")
    except ckpt.CheckpointError as e:
        raise _Refused(str(e)) from None
    out = args.out or os.path.dirname(os.path.abspath(args.checkpoint))
    problem = rundir.check(out, resuming=True, overwrite=False, flag="--out")  # a folder that can be written
    if problem:
        raise _Refused(problem)
    report_path = os.path.join(out, f"eval-{os.path.splitext(os.path.basename(args.checkpoint))[0]}.json")
    if os.path.exists(report_path) and not args.overwrite:
        raise _Refused(f"{report_path} exists; pass --overwrite to replace it or --out for another folder")
    try:
        cfg = TrainConfig(**check_saved(state["config"], f"--checkpoint {args.checkpoint}"))
    except UsageError as e:
        raise _Refused(str(e)) from None
    cfg.dataset = args.dataset or cfg.dataset
    cfg.data_dir = args.data_dir or cfg.data_dir
    if cfg.dataset not in datasets.DATASETS:
        raise _Refused(f"--checkpoint {args.checkpoint}: its data set {cfg.dataset!r} is none of "
                       f"{', '.join(datasets.DATASETS)}; give --dataset")
    problem = datasets.check_data_dir(cfg.dataset, cfg.data_dir, False)
    if problem:
        raise _Refused(problem)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise _Refused("--device cuda was asked for, but CUDA is not available")
    if args.batch_size < 1:
        raise _Refused(f"--batch-size must be >= 1, got {args.batch_size}")
    cfg.channels_last = False
    return state, cfg, report_path


def measure(model, loader, device, cfg: TrainConfig, num_images: int) -> dict:
    """Accuracy, per-timestep accuracy, firing rates (mean and per layer) and the energy estimate."""
    result = evaluate(model, loader, device, cfg)
    per_layer = {}
    meter = models.LayerActivity(model)
    with torch.no_grad(), (models.record_firing_rates(model) if cfg.spiking else nullcontext()) as rates:
        for images, _ in loader:
            with autocast(cfg, device):
                model(images.to(device))
        if cfg.spiking:
            per_layer = rates.per_layer()
    meter.remove()
    return {"student_acc": result["acc"], "student_acc5": result["acc5"],
            "per_timestep_acc": result["per_timestep_acc"], "acc_at_t": result["acc_at_t"],
            "firing_rate": result["firing_rate"],
            "per_layer_firing_rate": per_layer, "energy": meter.energy(num_images)}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        state, cfg, report_path = _checked(args)
        which, weights = chosen_weights(state, args.weights)
    except _Refused as e:
        print(f"fastsnn.evaluate: error: {e}", file=sys.stderr)
        return 2
    device = device_for(TrainConfig(device=args.device))
    spec = datasets.load(cfg.dataset, cfg.data_dir)
    try:
        model = build_model(cfg, state["num_classes"], state["in_channels"])
        model.load_state_dict(weights)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        print(f"fastsnn.evaluate: error: --checkpoint {args.checkpoint}: its model does not fit its configuration "
              f"({reason})", file=sys.stderr)
        return 2
    model.to(device).eval()
    loader = torch.utils.data.DataLoader(spec.test, batch_size=args.batch_size, shuffle=False)
    report = measure(model, loader, device, cfg, len(spec.test))
    report.update(arch=cfg.arch, dataset=cfg.dataset, T=cfg.T if cfg.spiking else None,
                  checkpoint=os.path.abspath(args.checkpoint), epoch=state.get("epoch"), weights=which)
    os.makedirs(os.path.dirname(report_path), exist_ok=True)
    write_text(report_path, json.dumps(strict_json(report), indent=2, allow_nan=False) + "\n")
    energy = report["energy"]
    print(f"{cfg.arch} on {cfg.dataset} ({which} weights): accuracy {report['student_acc']:.2f}% "
          f"(top-5 {report['student_acc5']:.2f}%), "
          f"per-timestep {' '.join(f'{a:.1f}' for a in report['per_timestep_acc'])}, "
          f"at t = 1..T {' '.join(f'{a:.1f}' for a in report['acc_at_t'])}, firing rate "
          f"{report['firing_rate']:.4f}, energy {energy['energy_mJ']:.4g} mJ per image ({energy['acs']:.3g} ACs, "
          f"{energy['encoding_macs']:.3g} encoding MACs); report {report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
