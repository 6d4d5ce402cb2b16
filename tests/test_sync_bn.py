"""Synchronised BatchNorm inside the fused op (fastsnn.bn_lif(..., process_group=...), convert_sync_bn): gloo ranks
holding unequal shares of one global batch give what one process gives on the whole batch: the same spikes,
running statistics, dL/dx for each rank's share, and weight/bias gradients that sum over the ranks to the global
ones. Run with 2 and 3 ranks, through the Triton kernels (interpreter) and the plain-PyTorch reference, for a
plain layer, a downsample shortcut (residual_bn), a time-broadcast stem (repeat), a BNLIF module, the module pair
(a converted BatchNorm2d given to a LIF neuron) and a converted BatchNorm2d called on its own."""
import pytest
import torch
import torch.distributed as dist

import fastsnn
from helpers import gloo_results

T, C, HW = 2, 4, 3
SHARES = {2: (3, 2), 3: (3, 1, 2)}  # unequal per-rank batches


def _data(batch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, batch, C, HW, HW, generator=g) * 1.5 + 0.3
    residual = torch.randn(T, batch, C, HW, HW, generator=g)
    stem = torch.randn(batch, C, HW, HW, generator=g) + 0.5
    grad = torch.randn(T, batch, C, HW, HW, generator=g)
    return x, residual, stem, grad


def _params():
    g = torch.Generator().manual_seed(1)
    return [torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g) * 0.1 + 0.8]


def _cases(x, residual, stem, grad, backend, group):
    """{case: (spikes, running statistics..., dL/dx, dL/d(other inputs)..., dL/dweight, dL/dbias...)} for one
    rank's share (group: the process group) or the whole batch (group None)."""
    out = {}
    kinds = {"plain": dict(), "residual_bn": dict(residual=residual), "repeat": dict(repeat=T)}
    for name, extra in kinds.items():
        weight, bias = (p.clone().requires_grad_() for p in _params())
        running = [torch.zeros(C), torch.ones(C)]
        inputs = [(stem if name == "repeat" else x).clone().requires_grad_()]
        kw = dict(training=True, momentum=0.3, backend=backend, process_group=group, **extra)
        params = [weight, bias]
        if name == "residual_bn":
            r_weight, r_bias = (p.clone().flip(0).requires_grad_() for p in _params())
            r_running = [torch.full((C,), 0.1), torch.full((C,), 2.0)]
            kw.update(residual=residual.clone().requires_grad_(), residual_bn=(r_weight, r_bias, *r_running))
            inputs.append(kw["residual"])
            params += [r_weight, r_bias]
            running += r_running
        spikes = fastsnn.bn_lif(inputs[0], weight, bias, *running[:2], **kw)
        grads = torch.autograd.grad(spikes, inputs + params, grad)
        out[name] = [spikes.detach(), *running, *grads]
    bn = fastsnn.BNLIF(C, momentum=0.2, backend=backend)
    fastsnn.convert_sync_bn(bn, group)
    xm = x.clone().requires_grad_()
    spikes = bn(xm)
    out["module"] = [spikes.detach(), bn.running_mean.clone(), bn.running_var.clone(),
                     *torch.autograd.grad(spikes, (xm, bn.weight, bn.bias), grad)]
    # the module pair: a converted nn.BatchNorm2d handed to a neuron (what the zoo's students do)
    pair_bn = fastsnn.convert_sync_bn(torch.nn.BatchNorm2d(C, momentum=0.2), group)
    xm = x.clone().requires_grad_()
    spikes = fastsnn.LIF(backend=backend)(xm, bn=pair_bn)
    out["pair"] = [spikes.detach(), pair_bn.running_mean.clone(), pair_bn.running_var.clone(),
                   *torch.autograd.grad(spikes, (xm, pair_bn.weight, pair_bn.bias), grad)]
    # a BatchNorm called on its own (no fused op: the plain-PyTorch synchronised form), on the folded batch
    plain = fastsnn.convert_sync_bn(torch.nn.BatchNorm2d(C, momentum=0.2), group)
    xm = x.clone().requires_grad_()
    y = plain(xm.flatten(0, 1)).unflatten(0, x.shape[:2])
    out["batch_norm"] = [y.detach(), plain.running_mean.clone(), plain.running_var.clone(),
                         *torch.autograd.grad(y, (xm, plain.weight, plain.bias), grad)]
    return out


def _rank(rank, results, world):
    shares = SHARES[world]
    start = sum(shares[:rank])
    x, residual, stem, grad = (t[:, start:start + shares[rank]] if t.dim() == 5 else t[start:start + shares[rank]]
                               for t in _data(sum(shares)))
    results[rank] = {backend: _cases(x, residual, stem, grad, backend, dist.group.WORLD)
                     for backend in ("triton", "reference")}


def _batch_dim(case, k):
    """Which of a case's results are split over the ranks (dim of the batch), summed over them (None), or
    equal on every rank ("same")."""
    if k == 0:
        return 1
    running = 4 if case == "residual_bn" else 2
    if k <= running:
        return "same"
    inputs = 2 if case == "residual_bn" else 1
    if k <= running + inputs:
        return 0 if case == "repeat" else 1
    return None


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_match_one_process_on_the_global_batch(world):
    alone = {backend: _cases(*_data(sum(SHARES[world])), backend, None) for backend in ("triton", "reference")}
    ranks = gloo_results(_rank, world, world)
    for backend, cases in alone.items():
        for case, expected in cases.items():
            for k, want in enumerate(expected):
                got = [r[backend][case][k] for r in ranks]
                how = _batch_dim(case, k)
                where = f"{backend} {case} result {k}"
                if how == "same":
                    for g in got:
                        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-6, msg=where)
                    continue
                merged = torch.cat(got, dim=how) if how is not None else torch.stack(got).sum(0)
                if k == 0 and case != "batch_norm":  # spikes: exactly the global batch's
                    assert torch.equal(merged, want), where
                else:
                    torch.testing.assert_close(merged, want, rtol=1e-4, atol=1e-5, msg=where)


def test_without_a_distributed_job_the_argument_is_refused_in_one_line():
    x = torch.randn(T, 2, C, HW, HW)
    with pytest.raises(ValueError, match="process_group.*not initialised"):
        fastsnn.bn_lif(x, None, None, None, None, training=True, process_group=object())


def test_convert_sync_bn_keeps_the_neuron_and_the_state_dict():
    from fastsnn import models

    model = models.create("digits_snn", 10, T=2, in_channels=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = sum(type(m) is torch.nn.BatchNorm2d for m in model.modules())
    converted = fastsnn.convert_sync_bn(model)
    assert converted is model
    assert sum(type(m) is fastsnn.SyncBatchNorm for m in model.modules()) == plain > 0
    assert not any(type(m) is torch.nn.BatchNorm2d for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    bn = fastsnn.BNPLIF(4)
    assert fastsnn.convert_sync_bn(bn) is bn and bn.sync_bn and isinstance(bn, fastsnn.BNPLIF)
    # outside a distributed job a synchronised BatchNorm is a BatchNorm: the converted model gives the same output
    x = torch.rand(2, 1, 8, 8)
    reference = models.create("digits_snn", 10, T=2, in_channels=1)
    reference.load_state_dict(before)
    assert torch.equal(model(x), reference(x))


def _compiled_rank(rank, results):
    x, _, _, grad = _data(sum(SHARES[2]))
    share = slice(sum(SHARES[2][:rank]), sum(SHARES[2][:rank + 1]))
    x, grad = x[:, share], grad[:, share]
    group = dist.group.WORLD

    def step(x, weight, bias, running_mean, running_var):
        return fastsnn.bn_lif(x, weight, bias, running_mean, running_var, training=True, backend="triton",
                              process_group=group)

    out = {}
    for name, fn in (("eager", step), ("compiled", torch.compile(step))):
        weight, bias = (p.clone().requires_grad_() for p in _params())
        running = [torch.zeros(C), torch.ones(C)]
        xr = x.clone().requires_grad_()
        spikes = fn(xr, weight, bias, *running)
        out[name] = [spikes.detach(), *running, *torch.autograd.grad(spikes, (xr, weight, bias), grad)]
    results[rank] = out


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
def test_compiled_synchronised_call_gives_the_eager_one():
    """torch.compile carries the process group through the custom ops (by name): 2 ranks, compiled = eager."""
    ranks = gloo_results(_compiled_rank, 2)
    for out in ranks:
        for k, (got, want) in enumerate(zip(out["compiled"], out["eager"])):
            assert torch.equal(got, want), k
