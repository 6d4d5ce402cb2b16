"""Accuracy at every T (acc_at_t): the accuracy of the running mean of the first t timesteps' logits, on a
model whose logits are known, against counts made by hand."""
import math

import torch

from fastsnn.training.config import TrainConfig
from fastsnn.training.loop import evaluate
from fastsnn.training.report import csv_text


class _Fixed(torch.nn.Module):
    """Returns preset logits [T, B, C] for the batch whose first pixel holds its index."""

    def __init__(self, logits_per_batch):
        super().__init__()
        self.logits = logits_per_batch
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # a module with a parameter, as a model has

    def forward(self, images):
        return self.logits[int(images.flatten()[0])]


def _evaluate(logits_per_batch, targets, T):
    loader = [(torch.full((len(t), 1, 2, 2), float(i)), t) for i, t in enumerate(targets)]
    cfg = TrainConfig(T=T)
    return evaluate(_Fixed(logits_per_batch), loader, torch.device("cpu"), cfg)


def test_acc_at_t_counts_by_hand():
    # 3 classes, T = 3, 4 images in two batches; each row is one image's logits at t = 1, 2, 3
    batch1 = torch.tensor([  # [T, B=2, C]
        [[5.0, 0, 0], [0, 0, 1.0]],
        [[0, 9.0, 0], [0, 3.0, 0]],
        [[0, 9.0, 0], [0, 0, 3.0]],
    ])
    batch2 = torch.tensor([  # [T, B=2, C]
        [[0, 1.0, 0], [2.0, 0, 0]],
        [[0, 1.0, 0], [0, 0, 1.0]],
        [[4.0, 0, 0], [0, 0, 1.5]],
    ])
    targets = [torch.tensor([0, 2]), torch.tensor([1, 2])]
    result = _evaluate([batch1, batch2], targets, T=3)
    # image by image, argmax of the mean of the first t timesteps, and correct?
    #   a (target 0): t1 [5,0,0] -> 0 yes; t2 [2.5,4.5,0] -> 1 no;  t3 [5/3,6,0] -> 1 no
    #   b (target 2): t1 [0,0,1] -> 2 yes; t2 [0,1.5,.5] -> 1 no;   t3 [0,1,4/3] -> 2 yes
    #   c (target 1): t1 [0,1,0] -> 1 yes; t2 [0,1,0] -> 1 yes;     t3 [4/3,2/3,0] -> 0 no
    #   d (target 2): t1 [2,0,0] -> 0 no;  t2 [1,0,.5] -> 0 no;     t3 [2/3,0,5/6] -> 2 yes
    assert result["acc_at_t"] == [75.0, 25.0, 50.0]
    # each timestep alone: t1 a b c yes, d no; t2 a no (argmax 1), b no, c yes, d yes; t3 a no, b yes, c no, d yes
    assert result["per_timestep_acc"] == [75.0, 50.0, 50.0]
    assert result["acc"] == result["acc_at_t"][-1] == 50.0


def test_acc_at_t_has_one_entry_per_timestep_and_reaches_acc():
    torch.manual_seed(0)
    T, B, C = 5, 7, 4
    logits = [torch.randn(T, B, C) for _ in range(3)]
    targets = [torch.randint(0, C, (B,)) for _ in range(3)]
    result = _evaluate(logits, targets, T=T)
    assert len(result["acc_at_t"]) == T and result["acc_at_t"][-1] == result["acc"]
    every = torch.cat(logits, 1)
    target = torch.cat(targets)
    for t in range(1, T + 1):
        want = 100.0 * float((every[:t].mean(0).argmax(-1) == target).sum()) / (3 * B)
        assert math.isclose(result["acc_at_t"][t - 1], want)


def test_csv_has_a_column_per_timestep():
    text = csv_text([{"epoch": 1, "acc_at_t": [10.0, 20.0]}])
    assert text.splitlines()[0] == "epoch,acc_at_t_1,acc_at_t_2"


def test_evaluate_leaves_the_model_in_its_mode():
    """A teacher (eval mode) evaluated before distillation stays in eval mode: evaluate used to leave every model
    in train mode, so the teacher's BatchNorm then normalised with batch statistics and moved its running
    statistics at every training step."""
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    loader = [(torch.rand(5, 1, 2, 2), torch.randint(0, 3, (5,)))]
    for mode in (False, True):
        net.train(mode)
        evaluate(net, loader, torch.device("cpu"), TrainConfig(ann=True, workers=0))
        assert net.training is mode and all(m.training is mode for m in net.modules())
