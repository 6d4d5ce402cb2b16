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
from . import models
from .train import _autocast, evaluate

def build_parser():
    p = argparse.ArgumentParser(prog="python -m fastsnn.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by fastsnn.train (last.pt, best.pt)")
    p.add_argument("--dataset", help="default: the checkpoint's")
    p.add_argument("--data-dir", help="default: the checkpoint's")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--out", help="report directory (default: beside the checkpoint); the report is "
                                 "eval-<checkpoint name>.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report of this checkpoint")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        state = ckpt.check_training_checkpoint(ckpt.load(args.checkpoint, what="--checkpoint"), args.checkpoint,
                                               what="--checkpoint")
    except ckpt.CheckpointError as e:
        print(f"fastsnn.evaluate: error: {e}", file=sys.stderr)
        return 2
    out = args.out or os.path.dirname(os.path.abspath(args.checkpoint))
    report_path = os.path.join(out, f"eval-{os.path.splitext(os.path.basename(args.checkpoint))[0]}.json")
    if os.path.exists(report_path) and not args.overwrite:
        print(f"fastsnn.evaluate: error: {report_path} exists; pass --overwrite to replace it or --out for "
              f"another folder", file=sys.stderr)
        return 2
    train_args = argparse.Namespace(**state["args"])
    dataset = args.dataset or train_args.dataset
    data_dir = args.data_dir or train_args.data_dir
    problem = datasets.check_data_dir(dataset, data_dir, False)
    if problem:
        print(f"fastsnn.evaluate: error: {problem}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    spec = datasets.load(dataset, data_dir)
    from .train import _build_student

    model = _build_student(train_args, state["num_classes"], state["in_channels"])
    model.load_state_dict(state["model"])
    model.to(device).eval()
    spiking = not train_args.ann
    loader = torch.utils.data.DataLoader(spec.test, batch_size=args.batch_size, shuffle=False)
    train_args.channels_last = False
    result = evaluate(model, loader, device, train_args, 1, spiking=spiking)
    per_layer = {}
    meter = models.LayerActivity(model)
    with torch.no_grad(), (models.record_firing_rates(model) if spiking else nullcontext()) as rates:
        for images, _ in loader:
            with _autocast(train_args, device):
                model(images.to(device))
        if spiking:
            per_layer = rates.per_layer()
    meter.remove()
    energy = meter.energy(len(spec.test))
    report = {"student_acc": result["acc"], "student_acc5": result["acc5"],
              "per_timestep_acc": result["per_timestep_acc"],
              "firing_rate": result["firing_rate"], "per_layer_firing_rate": per_layer, "energy": energy,
              "arch": train_args.arch, "dataset": dataset, "T": None if not spiking else train_args.T,
              "checkpoint": os.path.abspath(args.checkpoint), "epoch": state.get("epoch")}
    os.makedirs(out, exist_ok=True)
    with open(report_path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"{train_args.arch} on {dataset}: accuracy {result['acc']:.2f}% (top-5 {result['acc5']:.2f}%), per-timestep "
          f"{' '.join(f'{a:.1f}' for a in result['per_timestep_acc'])}, firing rate {result['firing_rate']:.4f}, "
          f"energy {energy['energy_mJ']:.4g} mJ per image ({energy['acs']:.3g} ACs, "
          f"{energy['encoding_macs']:.3g} encoding MACs); report {report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
