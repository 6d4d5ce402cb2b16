"""Exact distributed evaluation: under DDP every test image is counted exactly once (no padding duplicates, no
dropped tail), so 3 gloo ranks on a data set whose size is not a multiple of 3 give the single process's
accuracies, per-timestep and running-mean accuracies and firing rate."""
import pytest
import torch
import torch.distributed as dist

from fastsnn import models
from helpers import gloo_results
from fastsnn.training import setup
from fastsnn.training.config import TrainConfig
from fastsnn.training.loop import evaluate

SIZE, T, WORLD = 31, 2, 3  # 31 = 3·10 + 1: the ranks' shares are 11, 10, 10


def _data():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(SIZE, 1, 8, 8, generator=g)
    return torch.utils.data.TensorDataset(images, torch.randint(0, 10, (SIZE,), generator=g))


def _model():
    torch.manual_seed(1)
    return models.create("digits_snn", 10, T=T, in_channels=1)


def _rank(rank, out):
    cfg = TrainConfig(T=T, batch_size=6, workers=0)
    loader = setup.eval_loader(_data(), cfg, torch.device("cpu"), rank, WORLD)
    seen = torch.tensor([float(sum(len(t) for _, t in loader))])
    dist.all_reduce(seen)
    result = evaluate(_model(), loader, torch.device("cpu"), cfg, WORLD)
    out[rank] = dict(result, seen=float(seen))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
def test_three_ranks_count_every_image_once_and_match_one_process():
    cfg = TrainConfig(T=T, batch_size=6, workers=0)
    alone = evaluate(_model(), setup.eval_loader(_data(), cfg, torch.device("cpu"), 0, 1), torch.device("cpu"), cfg)
    results = gloo_results(_rank, WORLD)
    for result in results:
        assert result["seen"] == SIZE  # 11 + 10 + 10: none twice, none dropped
        for key in ("acc", "acc5", "per_timestep_acc", "acc_at_t"):
            assert result[key] == pytest.approx(alone[key], abs=1e-9), key
        assert result["firing_rate"] == pytest.approx(alone["firing_rate"], rel=1e-12)
