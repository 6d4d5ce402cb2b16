"""Data sets for the training program: digits (bundled with scikit-learn, the offline default),
CIFAR-10/100 (torchvision's pickle layout) and ImageNet (ImageFolder train/ and val/)."""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

DATASETS = ("digits", "cifar10", "cifar100", "imagenet")

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


def _digits() -> DataSpec:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8] in [0, 1]
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(range(len(labels)), test_size=0.2, stratify=digits.target,
                                           random_state=0)
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = (images - mean) / std
    return DataSpec(TensorDataset(images[train_idx], labels[train_idx]),
                    TensorDataset(images[test_idx], labels[test_idx]), 10, 1, 8)


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
            entries = [load_cifar_batch(os.path.join(folder, f)) for f, _ in (self.train_list if train else self.test_list)]
            self.data = np.vstack([e["data"] for e in entries]).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))
            self.targets = [int(t) for e in entries for t in e.get("labels", e.get("fine_labels", []))]
            self.classes = load_cifar_batch(os.path.join(folder, self.meta["filename"]))[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    return SafeCIFAR


def _cifar(name: str, data_dir: str, download: bool, autoaugment: bool, cutout: int) -> DataSpec:
    from torchvision import datasets, transforms as T

    mean, std = CIFAR10_STATS if name == "cifar10" else CIFAR100_STATS
    train_tf = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
    if autoaugment:
        policy = T.AutoAugmentPolicy.CIFAR10
        train_tf.append(T.AutoAugment(policy))
    train_tf += [T.ToTensor(), T.Normalize(mean, std)]
    if cutout:
        train_tf.append(Cutout(cutout))
    test_tf = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    base = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100

    cls = _safe_cifar_class(base, verify=download)
    train = cls(data_dir, train=True, download=download, transform=T.Compose(train_tf))
    test = cls(data_dir, train=False, download=download, transform=test_tf)
    return DataSpec(train, test, 10 if name == "cifar10" else 100, 3, 32)


def _imagenet(data_dir: str) -> DataSpec:
    from torchvision import datasets, transforms as T

    mean, std = IMAGENET_STATS
    train = datasets.ImageFolder(os.path.join(data_dir, "train"), T.Compose([
        T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)]))
    test = datasets.ImageFolder(os.path.join(data_dir, "val"), T.Compose([
        T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(mean, std)]))
    return DataSpec(train, test, len(train.classes), 3, 224)


def check_data_dir(dataset: str, data_dir: str | None, download: bool) -> str | None:
    """A one-line problem with the data location, or None when it looks usable."""
    if dataset == "digits":
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
         cutout: int = 0) -> DataSpec:
    if dataset == "digits":
        return _digits()
    if dataset in ("cifar10", "cifar100"):
        return _cifar(dataset, data_dir, download, autoaugment, cutout)
    if dataset == "imagenet":
        return _imagenet(data_dir)
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
