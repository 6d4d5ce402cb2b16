"""mixup/CutMix with soft targets (fastsnn.data.Mix) and their place in a training step: the images and targets
each mode makes, read back from its output; reproducibility; the teacher sees the mixed images and the loss the
mixed soft targets."""
import pytest
import torch
import torch.nn.functional as F

from fastsnn import models
from fastsnn.data import Mix
from fastsnn.training import loop
from fastsnn.training.config import TrainConfig, mix_of, resolve
from fastsnn.training.state import TrainState

B, C = 6, 5


def _saved(obj):
    """obj through torch.save into memory (what a checkpoint does to it)."""
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.rand(B, 3, 8, 10, generator=g), torch.tensor([0, 1, 2, 3, 4, 0])


def test_smoothing_alone_leaves_the_images_and_smooths_the_one_hots():
    images, target = _batch()
    out, soft = Mix(C, label_smoothing=0.1)(images, target)
    assert out is images
    torch.testing.assert_close(soft, F.one_hot(target, C).float() * 0.9 + 0.02)


def test_mixup_mixes_images_and_targets_with_one_lambda():
    images, target = _batch()
    out, soft = Mix(C, mixup=0.8, label_smoothing=0.1, seed=1)(images, target)
    flipped = images.flip(0)
    lam = float(((out - flipped) * (images - flipped)).sum() / (images - flipped).square().sum())  # least squares
    assert 0.0 < lam < 1.0
    torch.testing.assert_close(out, lam * images + (1 - lam) * flipped)
    q = F.one_hot(target, C).float() * 0.9 + 0.02
    torch.testing.assert_close(soft, lam * q + (1 - lam) * q.flip(0))
    torch.testing.assert_close(soft.sum(-1), torch.ones(B))


def test_cutmix_pastes_one_box_and_weights_the_targets_by_its_area():
    images, target = _batch()
    out, soft = Mix(C, cutmix=1.0, seed=2)(images, target)
    pasted = (out != images).any(0).any(0)  # [H, W]: where the reversed batch shows (its pixels differ a.s.)
    rows, cols = pasted.any(1).nonzero().flatten(), pasted.any(0).nonzero().flatten()
    box = (slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))
    assert bool(pasted[box].all()) and int(pasted.sum()) == pasted[box].numel()  # one rectangle
    assert torch.equal(out[..., box[0], box[1]], images.flip(0)[..., box[0], box[1]])
    lam = 1 - pasted[box].numel() / pasted.numel()
    q = F.one_hot(target, C).float()
    torch.testing.assert_close(soft, lam * q + (1 - lam) * q.flip(0))


def test_both_modes_prob_and_reproducibility():
    """The same seed gives the same batches; a saved state continues the sequence exactly; the global torch
    generator (which a DataLoader draws from) plays no part."""
    images, target = _batch()
    mix = Mix(C, mixup=0.8, cutmix=1.0, prob=0.7, seed=3)
    first = [mix(images, target) for _ in range(40)]
    again = Mix(C, mixup=0.8, cutmix=1.0, prob=0.7, seed=3)
    second = [again(images, target) for _ in range(20)]
    saved = again.state_dict()
    torch.rand(5)
    resumed = Mix(C, mixup=0.8, cutmix=1.0, prob=0.7, seed=99)
    resumed.load_state_dict(torch.load(_saved(saved), weights_only=True))
    second += [resumed(images, target) for _ in range(20)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    unmixed = sum(out is images for out, _ in first)
    boxes = sum(out is not images and bool((out == images).any()) for out, _ in first)  # CutMix keeps pixels
    blends = 40 - unmixed - boxes
    assert unmixed > 3 and boxes > 3 and blends > 3


@pytest.mark.parametrize("kwargs,words", [
    (dict(mixup=-1.0), "mixup must be a finite number >= 0"),
    (dict(cutmix=float("inf")), "cutmix must be a finite number"),
    (dict(prob=2.0), "prob must be a finite number in [0, 1]"),
    (dict(label_smoothing=1.0), "label_smoothing must be a finite number in [0, 1)"),
])
def test_bad_settings_are_refused(kwargs, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace(")", r"\)")):
        Mix(C, **kwargs)


class _RecordingTeacher(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = []
        self.linear = torch.nn.Linear(64, 10)

    def forward(self, images):
        self.seen.append(images.clone())
        return self.linear(images.flatten(1))


def test_a_training_step_gives_the_teacher_the_mixed_images_and_the_loss_the_soft_targets(monkeypatch):
    cfg = TrainConfig(T=2, mixup=0.8, cutmix=1.0, label_smoothing=0.1, method="tser", amp="off")
    resolve(cfg)
    torch.manual_seed(0)
    student = models.create("digits_snn", 10, T=2, in_channels=1)
    teacher = _RecordingTeacher().eval()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01)
    seen = {}
    real_student = student.forward

    def student_forward(images):
        seen["student"] = images.clone()
        return real_student(images)

    def loss(cfg_, student_logits, teacher_logits, target):
        seen["target"] = target
        return real_loss(cfg_, student_logits, teacher_logits, target)

    real_loss = loop.compute_loss
    monkeypatch.setattr(student, "forward", student_forward)
    monkeypatch.setattr(loop, "compute_loss", loss)
    session = loop.Session(cfg=cfg, rank=0, world=1, device=torch.device("cpu"), model=student,
                           train_model=student, teacher=teacher, optimizer=optimizer,
                           scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
                           scaler=torch.amp.GradScaler("cpu", enabled=False), sampler=None, loader=None,
                           test_loader=None, val_loader=None, per_rank_batch=4, num_classes=10, in_channels=1,
                           out="", reporter=None, log=print, mix=mix_of(cfg, 10))
    g = torch.Generator().manual_seed(1)
    images, target = torch.rand(4, 1, 8, 8, generator=g), torch.tensor([1, 2, 3, 4])
    torch.manual_seed(5)
    loss_value, _ = loop.train_step(session, TrainState(), images, target, 0)
    assert loss_value is not None
    assert not torch.equal(seen["student"], images)  # mixed (prob 1)
    assert torch.equal(teacher.seen[0], seen["student"])
    q = seen["target"]
    assert q.shape == (4, 10) and q.dtype == torch.float32
    torch.testing.assert_close(q.sum(-1), torch.ones(4))
    assert float(q.min()) >= 0.01 - 1e-7  # the smoothing's ε/C everywhere


def test_mix_of_is_none_for_class_index_runs():
    assert mix_of(TrainConfig(), 10) is None
    assert mix_of(TrainConfig(method="ce", label_smoothing=0.1), 10) is None  # F.cross_entropy smooths itself
    assert mix_of(TrainConfig(ann=True, label_smoothing=0.1), 10) is None
    assert mix_of(TrainConfig(label_smoothing=0.1), 10) is not None
    assert mix_of(TrainConfig(method="ce", mixup=0.2), 10) is not None
    assert mix_of(TrainConfig(cutmix=1.0, mix_prob=0.0), 10) is None
