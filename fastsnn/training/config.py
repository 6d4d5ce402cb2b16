"""The training program's one configuration: a typed dataclass built from the command line and an optional
``--config file.yaml`` (the command line wins), filled with per-data-set defaults and validated completely
before anything is written.

Bad input raises :class:`UsageError` with one line naming the flag and what it allows (the entry point turns
it into exit code 2). A resumed run starts from the configuration saved in its checkpoint; the flags given
now (found by argparse itself, see :func:`given_flags`) are applied when they are compatible with the run so
far (:data:`RESUME_COMPATIBLE`), refused otherwise.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field

from .. import data as datasets
from .. import models, rundir
from ..spec import KINDS
from ..surrogate import SURROGATES

METHODS = ("tser", "ts", "skd", "ce")
# per data set: the defaults a flag left unset takes
DEFAULTS = {
    "digits": dict(lr=0.05, weight_decay=5e-4, batch_size=64, epochs=15, arch="digits_snn", teacher="digits_ann",
                   workers=0, warmup_epochs=0.0, val_fraction=0.1),
    "mnist5k": dict(lr=0.05, weight_decay=5e-4, batch_size=64, epochs=15, arch="mnist_snn", teacher="mnist_ann",
                    workers=0, warmup_epochs=0.0, val_fraction=0.1),
    "cifar10": dict(lr=0.1, weight_decay=5e-4, batch_size=128, epochs=300, arch="spiking_resnet19",
                    teacher="resnet19", workers=8, warmup_epochs=5.0, val_fraction=0.0),
    "cifar100": dict(lr=0.1, weight_decay=5e-4, batch_size=128, epochs=300, arch="spiking_resnet19",
                     teacher="resnet19", workers=8, warmup_epochs=5.0, val_fraction=0.0),
    "imagenet": dict(lr=0.2, weight_decay=1e-4, batch_size=256, epochs=100, arch="sew_resnet34",
                     teacher="resnet34", workers=8, warmup_epochs=5.0, val_fraction=0.0),
}
BUNDLED_TEACHER_EPOCHS = 30  # the cached teacher of a bundled data set (digits, mnist5k)
# what a resumed run may change: applied and logged (the rest defines the run and is refused)
RESUME_COMPATIBLE = frozenset({
    "epochs", "save_every", "workers", "stop_after_epochs", "quiet", "max_bad_steps", "threads", "device", "amp",
    "compile", "channels_last", "data_dir", "download", "cache_dir", "tensorboard", "grad_clip", "ts_ce", "ts_kl",
    "alpha", "kd_tau", "lam", "entropy_tau", "label_smoothing", "autoaugment", "cutout", "recompute", "randaugment",
    "trivialaugment", "random_erasing", "mixup", "cutmix", "mix_prob"})
# compatible at an epoch boundary only: mid-epoch they would re-train or skip samples
RESUME_EPOCH_BOUNDARY = frozenset({"batch_size"})
# invocation controls, never taken from a checkpoint or written to config.yaml
CONTROLS = ("resume", "overwrite", "config", "stop_after_epochs", "quiet")
# settings renamed since a previous version: their old names still load from a config.yaml or a checkpoint
RENAMED = {"tau": "kd_tau", "lif_tau": "membrane_tau"}


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
# the largest value of each integer setting: beyond it a number is a mistake (and some reach C code that
# cannot take it: 1e20 timesteps)
INT_LIMITS = {"T": 1024, "epochs": 100_000, "batch_size": 1 << 24, "workers": 256, "threads": 4096,
              "seed": (1 << 32) - 1, "cutout": 4096, "save_every": 1 << 31, "max_bad_steps": 1 << 31,
              "stop_after_epochs": 100_000}


class UsageError(Exception):
    """Bad input found before anything was written: one line, exit code 2."""


@dataclass
class TrainConfig:
    """Every setting of a training run; ``None`` means "the data set's default" until :func:`resolve`."""
    # what to train
    arch: str | None = None
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    ann: bool = False
    imagenet_stem: bool = False
    # distillation (paper eq. 7-11)
    method: str = "tser"
    alpha: float = 0.5
    kd_tau: float = 5.0
    lam: float = 0.01
    entropy_tau: float | None = None
    ts_ce: bool | None = None
    ts_kl: bool | None = None
    teacher: str | None = None
    teacher_weights: str | None = None
    # student neuron
    T: int = 4
    neuron: str = "lif"
    membrane_tau: float = 2.0
    v_threshold: float = 1.0
    v_reset: float | None = 0.0
    surrogate: str = "atan"
    surrogate_alpha: float | None = None
    detach_reset: bool = True
    sew_connect: str = "ADD"
    # optimisation
    epochs: int | None = None
    val_fraction: float | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    optimizer: str = "sgd"
    momentum: float = 0.9
    warmup_epochs: float | None = None
    label_smoothing: float = 0.0
    grad_clip: float = 0.0
    autoaugment: bool = False
    randaugment: str | None = None  # "N M": RandAugment's number of ops and magnitude
    trivialaugment: bool = False
    random_erasing: float = 0.0
    cutout: int = 0
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_prob: float = 1.0
    model_ema: float = 0.0  # the EMA's decay (0: off)
    model_ema_warmup: bool = False
    # machine
    device: str = "auto"
    workers: int | None = None
    amp: str = "bf16"
    channels_last: bool = False
    compile: bool = False
    recompute: bool = False
    sync_bn: bool = False
    seed: int = 0
    threads: int = 0
    # run
    out: str | None = None
    overwrite: bool = False
    save_every: int = 0
    resume: str | None = None
    max_bad_steps: int = 10
    stop_after_epochs: int = 0
    cache_dir: str = field(default_factory=lambda: os.environ.get(
        "FASTSNN_CACHE", os.path.expanduser("~/.cache/fastsnn")))
    tensorboard: bool = True
    quiet: bool = False
    config: str | None = None

    @property
    def role(self) -> str:
        return "teacher" if self.ann else "student"

    @property
    def spiking(self) -> bool:
        return not self.ann

    @property
    def uses_teacher(self) -> bool:
        return not self.ann and self.method != "ce"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def saved(self) -> dict:
        """The settings that define the run (what config.yaml and the checkpoint hold)."""
        return {k: v for k, v in self.to_dict().items() if k not in CONTROLS}


def _defaults_epilog() -> str:
    names = models.available()
    rows = [f"  {name}: " + ", ".join(f"{k}={v}" for k, v in d.items()) for name, d in DEFAULTS.items()]
    return ("per-data-set defaults (a flag left unset):\n" + "\n".join(rows)
            + f"\nstudents: {', '.join(names['students'])}\nteachers: {', '.join(names['teachers'])}")


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one :class:`UsageError` line ("--flag must be one of a, b, got 'c'")."""

    def error(self, message):
        m = re.match(r"argument (\S+?)(?:/\S+)?: invalid choice: '?(.*?)'? \(choose from (.*)\)$", message)
        if m:
            allowed = ", ".join(c.strip().strip("'") for c in m.group(3).split(","))
            message = f"{m.group(1)} must be one of {allowed}, got {m.group(2)!r}"
        elif message.startswith("argument "):
            message = message[len("argument "):]
        raise UsageError(message)


_DEPRECATED: dict = {}  # old name -> new name, of the deprecated names the current parse met (see parse)


class _Renamed(argparse.Action):
    """A flag's previous name: still taken; parse() prints one warning line naming the new one."""

    def __call__(self, parser, namespace, values, option_string=None):
        _DEPRECATED[option_string] = "--" + self.dest.replace("_", "-")
        setattr(namespace, self.dest, values)


def randaugment_setting(value, flag: str = "--randaugment") -> str:
    """RandAugment's "N M" (ops, magnitude) from a pair or a string "N M" (config.yaml), checked: N in 1..16,
    M in 0..30 (torchvision's 31 magnitude bins)."""
    parts = value.replace(",", " ").split() if isinstance(value, str) else list(value)
    try:
        n, m = (int(p) if not isinstance(p, bool) and float(p) == int(float(p)) else None for p in parts)
    except (TypeError, ValueError):
        n = m = None
    if n is None or m is None or not (1 <= n <= 16 and 0 <= m <= 30):
        raise UsageError(f"{flag} takes N M, the number of ops in 1..16 and the magnitude in 0..30, got "
                         f"{' '.join(map(str, parts)) if isinstance(value, (list, tuple)) else value!r}")
    return f"{n} {m}"


class _RandAugment(argparse.Action):
    """--randaugment N M, kept as the string "N M" (one setting, one config.yaml line)."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            setattr(namespace, self.dest, randaugment_setting(values, option_string))
        except UsageError as e:
            parser.error(str(e))


def _v_reset(text: str):
    """--v-reset: a number, or none (soft reset)."""
    if text.strip().lower() in ("none", "null", "soft"):
        return None
    return float(text)


def build_parser() -> argparse.ArgumentParser:
    names = models.available()
    p = _Parser(prog="python -m fastsnn.train", epilog=_defaults_epilog(),
                                description="Distil an ANN teacher into a spiking student with the TSER loss.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="YAML", help="settings from a YAML file (a run's config.yaml works); "
                                                    "flags given on the command line win")
    _what_to_train(p.add_argument_group("what to train"), names)
    _distillation(p.add_argument_group("distillation (paper eq. 7-11)"), names)
    _neuron(p.add_argument_group("student neuron"))
    _optimisation(p.add_argument_group("optimisation"))
    _machine(p.add_argument_group("machine"))
    _run(p.add_argument_group("run"))
    return p


def _what_to_train(g, names) -> None:
    g.add_argument("--arch", metavar="NAME", help="student (with --ann: teacher); default per data set; one of "
                   + ", ".join(names["students"] + names["teachers"]))
    g.add_argument("--dataset", default="digits", choices=datasets.DATASETS,
                   help="(default digits; digits and mnist5k are offline)")
    g.add_argument("--data-dir", help="data location (CIFAR: torchvision's folder; ImageNet: train/ and val/)")
    g.add_argument("--download", action="store_true", help="download CIFAR into --data-dir when missing")
    g.add_argument("--ann", action="store_true", help="train an ANN (a teacher) with plain cross-entropy")
    g.add_argument("--imagenet-stem", action="store_true", help="7x7 stride-2 stem with max-pool for resnet18/34")


def _distillation(g, names) -> None:
    g.add_argument("--method", default="tser", choices=METHODS, help="(default tser; ce: no teacher)")
    g.add_argument("--alpha", type=float, default=0.5, help="KL weight in [0, 1] (default 0.5)")
    g.add_argument("--kd-tau", type=float, default=5.0, help="distillation temperature τ (default 5)")
    g.add_argument("--tau", dest="kd_tau", type=float, action=_Renamed, help="deprecated: --kd-tau")
    g.add_argument("--lam", type=float, default=0.01, help="entropy weight for tser (default 0.01)")
    g.add_argument("--entropy-tau", type=float, help="entropy temperature (default: --kd-tau)")
    g.add_argument("--ts-ce", action=argparse.BooleanOptionalAction, default=None,
                   help="per-timestep CE (ablation switch; default from --method)")
    g.add_argument("--ts-kl", action=argparse.BooleanOptionalAction, default=None,
                   help="per-timestep KL (ablation switch; default from --method)")
    g.add_argument("--teacher", metavar="NAME", help="teacher architecture (default: the student's counterpart); "
                   "one of " + ", ".join(names["teachers"]))
    g.add_argument("--teacher-weights", help="teacher state_dict or fastsnn.train teacher checkpoint")


def _neuron(g) -> None:
    g.add_argument("--T", type=int, default=4, help="timesteps (default 4)")
    g.add_argument("--neuron", default="lif", choices=KINDS,
                   help="(default lif; lif_no_decay: decay_input=False; plif: a learnable time constant per layer)")
    g.add_argument("--membrane-tau", type=float, default=2.0,
                   help="membrane time constant > 1 (default 2; plif: its initial value)")
    g.add_argument("--lif-tau", dest="membrane_tau", type=float, action=_Renamed, help="deprecated: --membrane-tau")
    g.add_argument("--v-threshold", type=float, default=1.0, help="firing threshold (default 1)")
    g.add_argument("--v-reset", type=_v_reset, default=0.0, metavar="V|none",
                   help="hard-reset membrane value, or none for a soft reset (default 0)")
    g.add_argument("--surrogate", default="atan", help="one of " + ", ".join(tuple(SURROGATES)) + " (default atan)")
    g.add_argument("--surrogate-alpha", type=float, default=None,
                   help="the surrogate's alpha (default: the surrogate's own: "
                        + ", ".join(f"{k} {v.default_alpha:g}" for k, v in SURROGATES.items()) + ")")
    g.add_argument("--detach-reset", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--sew-connect", default="ADD", choices=("ADD", "AND", "IAND"))


def _optimisation(g) -> None:
    g.add_argument("--epochs", type=int)
    g.add_argument("--val-fraction", type=float, help="share of the training data held out to pick the best "
                   "epoch (best.pt); default 0.1 on digits/mnist5k, 0 elsewhere (then the test set picks it)")
    g.add_argument("--batch-size", type=int, help="global batch, split across ranks")
    g.add_argument("--lr", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"))
    g.add_argument("--momentum", type=float, default=0.9, help="in [0, 1) (default 0.9)")
    g.add_argument("--warmup-epochs", type=float, default=None, help="linear warm-up before the cosine decay")
    g.add_argument("--label-smoothing", type=float, default=0.0,
                   help="in [0, 1) (default 0); with --method tser/ts/skd the CE term takes the smoothed one-hots as "
                        "soft targets")
    g.add_argument("--grad-clip", type=float, default=0.0, help="max gradient norm (0: off)")
    g.add_argument("--model-ema", type=float, default=0.0, metavar="DECAY",
                   help="keep an EMA of the student's weights with this decay in (0, 1), e.g. 0.9998 (default 0: "
                        "off); evaluated every epoch beside the raw weights, best.pt picked on the better one")
    g.add_argument("--model-ema-warmup", action="store_true",
                   help="the EMA's decay ramps up as timm's ModelEmaV3 warm-up: min(DECAY, 1 - (1 + n)^(-2/3)) "
                        "(default off)")
    g.add_argument("--autoaugment", action="store_true",
                   help="AutoAugment, the data set's policy (CIFAR, ImageNet; default off)")
    g.add_argument("--randaugment", nargs=2, metavar=("N", "M"), action=_RandAugment, default=None,
                   help="RandAugment with N ops of magnitude M (0..30) (CIFAR, ImageNet; default off)")
    g.add_argument("--trivialaugment", action="store_true", help="TrivialAugmentWide (CIFAR, ImageNet; default off)")
    g.add_argument("--random-erasing", type=float, default=0.0,
                   help="RandomErasing's probability, after normalisation (CIFAR, ImageNet; default 0: off)")
    g.add_argument("--cutout", type=int, default=0, help="Cutout square side (CIFAR, ImageNet; default 0: off)")
    g.add_argument("--mixup", type=float, default=0.0,
                   help="mixup with λ ~ Beta(A, A) (timm's 0.8; default 0: off); the teacher sees the mixed images "
                        "and the loss's CE term the mixed soft targets")
    g.add_argument("--cutmix", type=float, default=0.0,
                   help="CutMix with λ ~ Beta(A, A) (timm's 1.0; default 0: off); with --mixup, one of the two per "
                        "batch, each half of the time")
    g.add_argument("--mix-prob", type=float, default=1.0, help="probability that a batch is mixed (default 1)")


def _machine(g) -> None:
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    g.add_argument("--workers", type=int, help="DataLoader workers (default 0 for digits/mnist5k, else 8)")
    g.add_argument("--amp", default="bf16", choices=("bf16", "fp16", "off"), help="autocast on CUDA")
    g.add_argument("--channels-last", action="store_true")
    g.add_argument("--compile", action="store_true", help="torch.compile the student")
    g.add_argument("--recompute", action="store_true",
                   help="the student saves no convolution output: each conv -> BN -> neuron unit recomputes it in "
                        "the backward from the spikes its convolution keeps as bits (one extra convolution forward "
                        "per unit; 7-22x fewer saved bytes at T=4, identical results, changeable on resume)")
    g.add_argument("--sync-bn", action="store_true",
                   help="BatchNorm statistics over the global batch of a distributed run (torchrun), computed "
                        "inside the fused BatchNorm + neuron op (default off; refused with one process)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=0,
                   help="CPU intra-op threads (0: auto = 1 for the small digits/mnist5k models on the CPU unless "
                        "OMP_NUM_THREADS is set, so parallel runs do not oversubscribe the cores; else PyTorch's)")


def _run(g) -> None:
    g.add_argument("--out", help="run directory (default runs/<timestamp>); a folder that already holds a run "
                                 "is refused unless --resume continues it or --overwrite is given")
    g.add_argument("--overwrite", action="store_true", help="start a new run in an --out that holds one")
    g.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps")
    g.add_argument("--resume", help="continue from a checkpoint (last.pt), in its run folder")
    g.add_argument("--max-bad-steps", type=int, default=10, help="non-finite losses in a row before stopping")
    g.add_argument("--stop-after-epochs", type=int, default=0,
                   help="end this invocation after N epochs (a time-limited job); --resume continues the run")
    g.add_argument("--cache-dir", default=TrainConfig().cache_dir, help="where the digits/mnist5k teachers are cached")
    g.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=True,
                   help="TensorBoard event files in the run folder (skipped with a note without tensorboard)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def given_flags(argv) -> set[str]:
    """The destinations of the flags actually present in ``argv`` (``--no-ts-ce``, abbreviations and
    ``--flag=value`` included): the parser re-run with every default suppressed."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def read_yaml(path: str, parser: argparse.ArgumentParser) -> dict:
    """The settings in a YAML file as {dest: value}; unknown keys and wrong types are one-line errors."""
    try:
        import yaml
    except ImportError:
        raise UsageError(f"--config {path}: reading YAML needs PyYAML (pip install pyyaml)") from None
    try:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f)
    except OSError as e:
        raise UsageError(f"--config {path}: cannot be read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"--config {path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                         f"save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise UsageError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UsageError(f"--config {path}: must hold a mapping of settings, got a {type(loaded).__name__}")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    values = {}
    for key, value in loaded.items():
        dest = str(key).replace("-", "_")
        if dest in RENAMED and RENAMED[dest] not in loaded:  # a config.yaml of a previous version
            _DEPRECATED[f"{key} (in {path})"] = RENAMED[dest]
            dest = RENAMED[dest]
        if dest not in actions:
            raise UsageError(f"--config {path}: unknown setting {key!r}; allowed: {', '.join(sorted(actions))}")
        values[dest] = _typed(path, key, value, actions[dest])
    return values


def _typed(path, key, value, action):
    if value is None:
        return None
    if isinstance(action, _RandAugment):
        return randaugment_setting(value, f"--config {path}: {key}")
    if action.type is _v_reset:
        if isinstance(value, str) and value.strip().lower() in ("none", "soft"):
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"--config {path}: {key} must be a number, or null for a soft reset, got {value!r}")
        return float(value)
    if action.type in (int, float):
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 (PyYAML) reads 1e-3, without a dot, as a string
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if action.type is int:
            ok = ok and math.isfinite(value) and float(value).is_integer()
        if not ok:
            raise UsageError(f"--config {path}: {key} must be a {action.type.__name__}, got {value!r}")
        return action.type(value)
    if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise UsageError(f"--config {path}: {key} must be true or false, got {value!r}")
        return value
    if not isinstance(value, str):
        raise UsageError(f"--config {path}: {key} must be a string, got {value!r}")
    if action.choices and value not in action.choices:
        raise UsageError(f"--config {path}: {key} must be one of {', '.join(action.choices)}, got {value!r}")
    return value


def parse(argv) -> tuple[TrainConfig, set[str]]:
    """The configuration the command line (and its --config file) asks for, before defaults are filled in,
    and the settings given explicitly (the YAML file's included)."""
    parser = build_parser()
    _DEPRECATED.clear()
    first = parser.parse_args(argv)
    given = given_flags(argv)
    if first.config:
        from_file = read_yaml(first.config, parser)
        parser.set_defaults(**from_file)
        given |= set(from_file)
    cfg = TrainConfig(**vars(parser.parse_args(argv)))
    for old, new in _DEPRECATED.items():
        print(f"fastsnn.train: warning: {old} is deprecated; use {new}", file=sys.stderr)
    return cfg, given


def resolve(cfg: TrainConfig) -> None:
    """Fill every ``None`` that has a per-data-set or per-method default."""
    if cfg.dataset not in DEFAULTS:
        raise UsageError(f"--dataset must be one of {', '.join(DEFAULTS)}, got {cfg.dataset!r}")
    if cfg.method not in METHODS:
        raise UsageError(f"--method must be one of {', '.join(METHODS)}, got {cfg.method!r}")
    d = DEFAULTS[cfg.dataset]
    for key in ("lr", "weight_decay", "batch_size", "epochs", "workers", "warmup_epochs", "val_fraction"):
        if getattr(cfg, key) is None:
            setattr(cfg, key, d[key])
    if cfg.arch is None:
        cfg.arch = d["teacher"] if cfg.ann else d["arch"]
    if cfg.teacher is None:
        spec = models.REGISTRY.get(cfg.arch)
        cfg.teacher = (spec.teacher if spec is not None else None) or d["teacher"]
    per_timestep = cfg.method in ("tser", "ts")
    cfg.ts_ce = per_timestep if cfg.ts_ce is None else cfg.ts_ce
    cfg.ts_kl = per_timestep if cfg.ts_kl is None else cfg.ts_kl
    if cfg.method != "tser":
        cfg.lam = 0.0


def validate(cfg: TrainConfig, world: int = 1) -> None:
    """Every setting checked against what it allows; raises :class:`UsageError` (one line) at the first
    problem. Reads nothing but the file system's answer to "does this path exist"."""
    _validate_names(cfg)
    _validate_numbers(cfg)
    _validate_augmentation(cfg)
    if cfg.model_ema_warmup and not cfg.model_ema:
        raise UsageError("--model-ema-warmup ramps up the EMA's decay; give --model-ema DECAY too")
    if cfg.sync_bn and world == 1:
        raise UsageError("--sync-bn synchronises BatchNorm across the ranks of a distributed run (torchrun "
                         "--nproc-per-node N -m fastsnn.train ...); this run has one process")
    if cfg.batch_size % world:
        raise UsageError(f"--batch-size {cfg.batch_size} is not divisible by the {world} ranks")
    import torch

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but CUDA is not available")
    for flag, path in (("--resume", cfg.resume), ("--teacher-weights", cfg.teacher_weights),
                       ("--config", cfg.config)):
        if path:
            check_file(flag, path)
    if cfg.uses_teacher and not cfg.teacher_weights:
        if cfg.dataset not in datasets.BUNDLED:
            raise UsageError(f"--method {cfg.method} on {cfg.dataset} needs --teacher-weights (train one with --ann)")
        if cfg.teacher != DEFAULTS[cfg.dataset]["teacher"]:
            raise UsageError(f"--teacher {cfg.teacher} needs --teacher-weights; without them the {cfg.dataset} "
                             f"teacher is {DEFAULTS[cfg.dataset]['teacher']}, trained and cached by the program")
        from .teacher import cached_teacher_path

        if not os.path.isfile(cached_teacher_path(cfg)):
            problem = rundir.check(cfg.cache_dir, resuming=True, overwrite=False, flag="--cache-dir")
            if problem:
                raise UsageError(f"{problem}: the {cfg.dataset} teacher is trained and cached there (FASTSNN_CACHE "
                                 f"or --cache-dir); give a writable one, or --teacher-weights")


def _validate_augmentation(cfg: TrainConfig) -> None:
    """One policy at most; the augmentation flags apply to the image data sets (CIFAR, ImageNet) only."""
    policies = [flag for flag, on in (("--autoaugment", cfg.autoaugment), ("--randaugment", cfg.randaugment),
                                      ("--trivialaugment", cfg.trivialaugment)) if on]
    if len(policies) > 1:
        raise UsageError(f"{' and '.join(policies)}: give one augmentation policy at most")
    if cfg.randaugment is not None:
        randaugment_setting(cfg.randaugment)
    given = policies + [flag for flag, on in (("--random-erasing", cfg.random_erasing),
                                              ("--cutout", cfg.cutout)) if on]
    if given and cfg.dataset in datasets.BUNDLED:
        raise UsageError(f"{given[0]} applies to cifar10, cifar100 and imagenet; {cfg.dataset} is trained without "
                         f"augmentation")


def mix_of(cfg: TrainConfig, num_classes: int, rank: int = 0):
    """The data module's Mix of this run (its generator seeded by the run's seed and the rank), or None when its
    targets are class indices: no mixup or CutMix, and no label smoothing in a distillation loss
    (F.cross_entropy smooths --method ce and --ann itself)."""
    mixes = (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.mix_prob > 0
    smooths = cfg.label_smoothing > 0 and not (cfg.ann or cfg.method == "ce")
    if not (mixes or smooths):
        return None
    return datasets.Mix(num_classes, mixup=cfg.mixup, cutmix=cfg.cutmix, prob=cfg.mix_prob,
                        label_smoothing=cfg.label_smoothing, seed=f"fastsnn-mix-{cfg.seed}-{rank}")


def augment_of(cfg: TrainConfig):
    """The data module's Augment for this configuration."""
    n_m = None if cfg.randaugment is None else tuple(int(v) for v in cfg.randaugment.split())
    return datasets.Augment(autoaugment=cfg.autoaugment, randaugment=n_m, trivialaugment=cfg.trivialaugment,
                            random_erasing=cfg.random_erasing, cutout=cfg.cutout)


def check_file(flag: str, path: str) -> None:
    """UsageError unless `path` (given as `flag`) is an existing file."""
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a folder; give a file (e.g. {os.path.join(path, 'last.pt')})")
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path}: no such file")


def _validate_names(cfg: TrainConfig) -> None:
    names = models.available()
    if cfg.ann:
        if cfg.arch not in names["teachers"]:
            raise UsageError(f"--arch with --ann must be a teacher: {', '.join(names['teachers'])}; got {cfg.arch!r}")
    elif cfg.arch not in names["students"]:
        raise UsageError(f"--arch must be one of {', '.join(names['students'])} (or a teacher with --ann); "
                         f"got {cfg.arch!r}")
    if cfg.ann and cfg.recompute:
        raise UsageError("--recompute is for a spiking student (it recomputes the fused units' convolution outputs); "
                         "a teacher trained with --ann has none")
    if cfg.uses_teacher and cfg.teacher not in names["teachers"]:
        raise UsageError(f"--teacher must be one of {', '.join(names['teachers'])}, got {cfg.teacher!r}")
    for flag, value, allowed in (("--surrogate", cfg.surrogate, tuple(SURROGATES)), ("--neuron", cfg.neuron, KINDS),
                                 ("--sew-connect", cfg.sew_connect, ("ADD", "AND", "IAND")),
                                 ("--optimizer", cfg.optimizer, ("sgd", "adamw")),
                                 ("--device", cfg.device, ("auto", "cpu", "cuda")),
                                 ("--amp", cfg.amp, ("bf16", "fp16", "off"))):
        if value not in allowed:
            raise UsageError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")
    problem = datasets.check_data_dir(cfg.dataset, cfg.data_dir, cfg.download)
    if problem:
        raise UsageError(problem)


def _validate_numbers(cfg: TrainConfig) -> None:
    from ..ops.tser_loss import TAU_RANGE

    for name in ("alpha", "kd_tau", "lam", "entropy_tau", "membrane_tau", "v_threshold", "v_reset",
                 "surrogate_alpha", "lr", "weight_decay", "momentum", "label_smoothing", "grad_clip", "warmup_epochs",
                 "val_fraction", "mixup", "cutmix", "mix_prob", "model_ema"):
        value = getattr(cfg, name)
        if value is not None and not math.isfinite(value):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    low, high = TAU_RANGE
    entropy_tau = cfg.kd_tau if cfg.entropy_tau is None else cfg.entropy_tau
    for name, limit in INT_LIMITS.items():
        value = getattr(cfg, name)
        if value is not None and value > limit:
            raise UsageError(f"--{name.replace('_', '-')} must be <= {limit}, got {value}")
    for name, value, ok, rule in [
        ("--seed", cfg.seed, cfg.seed >= 0, ">= 0"),
        ("--kd-tau", cfg.kd_tau, low <= cfg.kd_tau <= high, f"in [{low}, {high}]"),
        ("--entropy-tau", entropy_tau, low <= entropy_tau <= high, f"in [{low}, {high}]"),
        ("--momentum", cfg.momentum, 0 <= cfg.momentum < 1, "in [0, 1)"),
        ("--workers", cfg.workers, cfg.workers >= 0, ">= 0"),
        ("--grad-clip", cfg.grad_clip, cfg.grad_clip >= 0, ">= 0 (0: off)"),
        ("--warmup-epochs", cfg.warmup_epochs, cfg.warmup_epochs >= 0, ">= 0"),
        ("--cutout", cfg.cutout, cfg.cutout >= 0, ">= 0"),
        ("--random-erasing", cfg.random_erasing, 0 <= cfg.random_erasing <= 1, "in [0, 1]"),
        ("--mixup", cfg.mixup, cfg.mixup >= 0, ">= 0 (0: off)"),
        ("--cutmix", cfg.cutmix, cfg.cutmix >= 0, ">= 0 (0: off)"),
        ("--mix-prob", cfg.mix_prob, 0 <= cfg.mix_prob <= 1, "in [0, 1]"),
        ("--model-ema", cfg.model_ema, 0 <= cfg.model_ema < 1, "in (0, 1), or 0 for off"),
        ("--epochs", cfg.epochs, cfg.epochs >= 1, ">= 1"),
        ("--batch-size", cfg.batch_size, cfg.batch_size >= 1, ">= 1"),
        ("--T", cfg.T, cfg.T >= 1, ">= 1"), ("--lr", cfg.lr, cfg.lr > 0, "> 0"),
        ("--alpha", cfg.alpha, 0 <= cfg.alpha <= 1, "in [0, 1]"),
        ("--lam", cfg.lam, cfg.lam >= 0, ">= 0"), ("--weight-decay", cfg.weight_decay, cfg.weight_decay >= 0, ">= 0"),
        ("--label-smoothing", cfg.label_smoothing, 0 <= cfg.label_smoothing < 1, "in [0, 1)"),
        ("--save-every", cfg.save_every, cfg.save_every >= 0, ">= 0"),
        ("--max-bad-steps", cfg.max_bad_steps, cfg.max_bad_steps >= 1, ">= 1"),
        ("--threads", cfg.threads, cfg.threads >= 0, ">= 0"),
        ("--stop-after-epochs", cfg.stop_after_epochs, cfg.stop_after_epochs >= 0, ">= 0"),
        ("--membrane-tau", cfg.membrane_tau, cfg.membrane_tau > 1, "> 1"),
        ("--surrogate-alpha", cfg.surrogate_alpha, cfg.surrogate_alpha is None or cfg.surrogate_alpha > 0, "> 0"),
        ("--v-threshold", cfg.v_threshold, cfg.v_reset is None or cfg.v_threshold > cfg.v_reset,
         "> --v-reset for a hard reset"),
        ("--val-fraction", cfg.val_fraction, 0 <= cfg.val_fraction < 0.5, "in [0, 0.5)"),
    ]:
        if not ok:
            raise UsageError(f"{name} must be {rule}, got {value}")


def _field_types() -> dict:
    """{setting: the Python types its value may have}, read from TrainConfig's annotations."""
    names = {"int": int, "float": (int, float), "str": str, "bool": bool, "None": type(None)}
    types = {}
    for f in dataclasses.fields(TrainConfig):
        allowed = []
        for part in str(f.type).split("|"):
            allowed += list(names[part.strip()]) if isinstance(names[part.strip()], tuple) else [names[part.strip()]]
        types[f.name] = tuple(allowed)
    return types


FIELD_TYPES = _field_types()


def check_saved(saved, source: str) -> dict:
    """A checkpoint's saved configuration: a mapping whose known settings have their field's type (unknown
    ones, from another version, are left out). Raises UsageError naming `source` (e.g. "--resume last.pt")."""
    if not isinstance(saved, dict):
        raise UsageError(f"{source}: its config must be a mapping of settings, got a {type(saved).__name__}")
    checked = {}
    saved = {RENAMED.get(k, k) if RENAMED.get(k) not in saved else k: v for k, v in saved.items()}  # older names
    for key, value in saved.items():
        allowed = FIELD_TYPES.get(key) if isinstance(key, str) else None
        if allowed is None:
            continue
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise UsageError(f"{source}: its config holds {key}={value!r}, not a "
                             f"{' or '.join(t.__name__ for t in allowed)}; the file was not written by fastsnn.train")
        checked[key] = value
    return checked


def check_method_settings(cfg: TrainConfig, given: set[str]) -> None:
    """A λ given for a method without the entropy term would be silently dropped: refused."""
    if "lam" in given and cfg.lam and cfg.method != "tser":
        raise UsageError(f"--lam {cfg.lam:g} applies to --method tser only (the entropy term); this run's method "
                         f"is {cfg.method}")


def merge_resumed(cfg: TrainConfig, saved: dict, given: set[str], *, mid_epoch: bool) -> list[str]:
    """``cfg`` becomes the saved configuration with the settings given now applied; returns the changes
    (``"epochs 15 -> 20"``) to be logged. A change that would alter the run so far is refused."""
    changes = []
    for key, old in saved.items():
        if not hasattr(cfg, key) or key in CONTROLS:
            continue
        new = getattr(cfg, key)
        if key not in given or new == old:
            setattr(cfg, key, old)
            continue
        flag = "--" + key.replace("_", "-")
        if key in RESUME_EPOCH_BOUNDARY and mid_epoch:
            raise UsageError(f"{flag} cannot change from {old} to {new} when resuming mid-epoch (samples would be "
                             f"re-trained or skipped); resume from an end-of-epoch checkpoint to change it")
        if key not in RESUME_COMPATIBLE | RESUME_EPOCH_BOUNDARY:
            raise UsageError(f"{flag} cannot change on resume (the run was started with {old!r}, asked for "
                             f"{new!r}); start a new run to change it. Changeable on resume: "
                             + ", ".join(sorted(RESUME_COMPATIBLE | RESUME_EPOCH_BOUNDARY)))
        changes.append(f"{key} {old} -> {new}")
    return changes


def to_yaml(cfg: TrainConfig) -> str:
    """The run-defining settings as YAML, one ``key: value`` line each (written without PyYAML, which a bare
    machine may lack; :func:`read_yaml` reads it back exactly)."""
    return "".join(f"{key}: {_yaml_scalar(value)}\n" for key, value in cfg.saved().items())


def _yaml_scalar(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = repr(value)
        if not math.isfinite(value):
            return {"inf": ".inf", "-inf": "-.inf"}.get(text, ".nan")
        mantissa, e, exponent = text.partition("e")
        if "." not in mantissa:  # YAML 1.1 (PyYAML) reads 1e-05 as a string, 1.0e-05 as a float
            mantissa += ".0"
        return mantissa + (e + ("+" if exponent[0].isdigit() else "") + exponent if e else "")
    return json.dumps(str(value))  # a double-quoted YAML scalar
