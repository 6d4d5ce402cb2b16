"""Spiking neuron modules over time-major inputs x[T, ...], backed by fastsnn's fused kernels."""
from __future__ import annotations

import torch
from torch import nn

from .backend import BACKENDS
from .ops.bn_lif import apply_bn_neuron
from .ops.lif import apply_neuron
from .spec import NeuronSpec, init_w, kind_of


class MultistepNeuron(nn.Module):
    """A multistep neuron module holding one validated NeuronSpec (see fastsnn.NeuronSpec).

    forward(x[T, ...]) -> spikes [T, ...]; forward(x_step, repeat=T) presents one timestep [...] at all T
    steps (direct encoding; see fastsnn.lif_multistep). By default the neuron is stateless between calls:
    every forward starts from v_reset (a whole sequence is one call). With `stateful=True` (SpikingJelly's
    convention, which conversion keeps) the final membrane of a call is the next call's initial one,
    gradients flowing through it, until `reset()` (e.g. from spikingjelly's functional.reset_net).
    """

    step_mode = "m"

    def __init__(self, spec: NeuronSpec, *, backend: str = "auto", stateful: bool = False):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"{type(self).__name__}: backend must be one of {BACKENDS}, got {backend!r}")
        self.spec = spec
        self.backend = backend
        self.stateful = stateful
        self.v: torch.Tensor | None = None

    @staticmethod
    def from_spec(spec: NeuronSpec, *, backend: str = "auto", stateful: bool = False) -> "MultistepNeuron":
        """The module of a spec (IF for kind "if", PLIF for the parametric kinds, with w at 1/sigmoid(w) = tau,
        LIF otherwise), built without validating the spec again."""
        cls = IF if spec.kind == "if" else PLIF if spec.parametric else LIF
        module = cls.__new__(cls)
        MultistepNeuron.__init__(module, spec, backend=backend, stateful=stateful)
        if spec.parametric:
            module.w = nn.Parameter(torch.tensor(init_w(spec.tau)))
        return module

    def __getattr__(self, name):
        # the spec's fields read as attributes: neuron.tau, neuron.v_threshold, neuron.surrogate, ...
        spec = self.__dict__.get("spec")
        if spec is not None and name in NeuronSpec.__dataclass_fields__:
            return getattr(spec, name)
        return super().__getattr__(name)

    @property
    def decay_input(self) -> bool:
        """SpikingJelly's name for the charge: True for "lif" (and "if"), False for "lif_no_decay"."""
        return self.spec.kind != "lif_no_decay"

    def forward(self, x: torch.Tensor, repeat: int | None = None, bn: nn.Module | None = None,
                residual: torch.Tensor | None = None, residual_storage: str | None = None,
                residual_bn: nn.Module | None = None, source=None, residual_source=None) -> torch.Tensor:
        """spikes of x[T, ...]; with bn (an nn.BatchNorm1d/2d/3d module), of bn(x) [+ residual, or
        + residual_bn(residual)] computed by the fused op (fastsnn.bn_lif): the BatchNorm's parameters and
        running statistics are used and updated as its own forward would, but the normalised tensors are never
        stored. source / residual_source (with bn): the ConvSources x and the residual are convolution outputs
        of (SpikeConv2d(x, source_into=...)), which the op then saves in their place and recomputes them from."""
        if self.step_mode != "m":
            raise RuntimeError(f"{type(self).__name__}: only step_mode='m' (input [T, ...]) is supported, "
                               f"got step_mode={self.step_mode!r}")
        op = type(self).__name__
        if bn is not None:
            if self.stateful:
                raise ValueError(f"{op}: bn= (the fused BatchNorm + neuron) needs a stateless neuron; this one "
                                 f"is stateful=True")
            return batch_norm_fire(op, bn, self.spec, x, residual=residual, residual_storage=residual_storage,
                                   residual_bn=residual_bn, repeat=repeat, backend=self.backend, w=self.learned_w,
                                   source=source, residual_source=residual_source)
        if residual is not None or residual_bn is not None or source is not None or residual_source is not None:
            raise ValueError(f"{op}: residual, residual_bn, source and residual_source are only taken with bn= "
                             f"(add the residual to x instead)")
        if self.stateful:
            spikes, self.v = apply_neuron(op, x, self.spec, v_init=self.v, return_v=True, repeat=repeat,
                                          backend=self.backend, w=self.learned_w)
            return spikes
        return apply_neuron(op, x, self.spec, repeat=repeat, backend=self.backend, w=self.learned_w)

    @property
    def learned_w(self) -> torch.Tensor | None:
        """A parametric neuron's weight w (rate sigmoid(w)); None for the others."""
        return self._parameters.get("w")

    def reset(self) -> None:
        """Clears the membrane kept by a stateful neuron (SpikingJelly's functional.reset_net calls this)."""
        self.v = None

    def extra_repr(self) -> str:
        s = self.spec
        if s.parametric:
            tau = f"tau={1.0 / float(torch.sigmoid(self.w.detach().float())):.4g} (learnable), " \
                  f"decay_input={s.decay_input}, "
        else:
            tau = "" if s.kind == "if" else f"tau={s.tau}, decay_input={s.decay_input}, "
        return (tau + f"v_threshold={s.v_threshold}, v_reset={s.v_reset}, surrogate={s.surrogate!r}, "
                f"alpha={s.alpha}, detach_reset={s.detach_reset}" + (", stateful=True" if self.stateful else ""))


class LIF(MultistepNeuron):
    """Leaky integrate-and-fire neuron; forward(x[T, ...]) → spikes [T, ...]. See fastsnn.lif_multistep."""

    def __init__(self, tau: float = 2.0, decay_input: bool = True, v_threshold: float = 1.0,
                 v_reset: float | None = 0.0, surrogate: str = "atan", alpha: float | None = None,
                 detach_reset: bool = False, backend: str = "auto", stateful: bool = False):
        spec = NeuronSpec.create("LIF", kind=kind_of(decay_input, "LIF"), tau=tau, v_threshold=v_threshold,
                                 v_reset=v_reset, surrogate=surrogate, alpha=alpha, detach_reset=detach_reset)
        super().__init__(spec, backend=backend, stateful=stateful)


class PLIF(MultistepNeuron):
    """Parametric leaky integrate-and-fire neuron (SpikingJelly's ParametricLIFNode): LIF whose rate
    k = sigmoid(w) is learnt, w one nn.Parameter (state_dict key "w", SpikingJelly's) initialised to
    −log(init_tau − 1). forward(x[T, ...]) → spikes [T, ...]; see fastsnn.plif_multistep."""

    def __init__(self, init_tau: float = 2.0, decay_input: bool = True, v_threshold: float = 1.0,
                 v_reset: float | None = 0.0, surrogate: str = "atan", alpha: float | None = None,
                 detach_reset: bool = False, backend: str = "auto", stateful: bool = False):
        spec = NeuronSpec.create("PLIF", kind=kind_of(decay_input, "PLIF", parametric=True), tau=init_tau,
                                 v_threshold=v_threshold, v_reset=v_reset, surrogate=surrogate, alpha=alpha,
                                 detach_reset=detach_reset)
        super().__init__(spec, backend=backend, stateful=stateful)
        self.w = nn.Parameter(torch.tensor(init_w(spec.tau)))


class IF(MultistepNeuron):
    """Integrate-and-fire neuron (no leak); forward(x[T, ...]) → spikes [T, ...]. See fastsnn.if_multistep."""

    def __init__(self, v_threshold: float = 1.0, v_reset: float | None = 0.0, surrogate: str = "atan",
                 alpha: float | None = None, detach_reset: bool = False, backend: str = "auto",
                 stateful: bool = False):
        spec = NeuronSpec.create("IF", kind="if", v_threshold=v_threshold, v_reset=v_reset, surrogate=surrogate,
                                 alpha=alpha, detach_reset=detach_reset)
        super().__init__(spec, backend=backend, stateful=stateful)


def _batch_norm_args(op: str, name: str, bn: nn.Module):
    """(weight, bias, running_mean, running_var, training, momentum factor, eps) as bn's own forward would use
    them, with nn.BatchNorm's bookkeeping: num_batches_tracked (incremented here), momentum=None (cumulative
    average), track_running_stats=False (batch statistics in eval mode too)."""
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"{op}: {name} must be a torch.nn BatchNorm module (BatchNorm1d/2d/3d), got "
                        f"{type(bn).__name__}")
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    training = bn.training or (bn.running_mean is None and bn.running_var is None)
    use_running = not bn.training or bn.track_running_stats
    return (bn.weight, bn.bias, bn.running_mean if use_running else None, bn.running_var if use_running else None,
            training, factor, bn.eps)


def sync_group(bn: nn.Module):
    """The process group whose ranks' batches bn's training statistics span, or None: a fastsnn.SyncBatchNorm or
    torch's nn.SyncBatchNorm (or a BNNeuron with sync_bn set, see convert_sync_bn) in training mode inside an
    initialised torch.distributed job (its process_group, None meaning every rank, as nn.SyncBatchNorm's)."""
    if not bn.training or not (isinstance(bn, nn.SyncBatchNorm) or getattr(bn, "sync_bn", False)):
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None  # nn.SyncBatchNorm's own rule: outside a distributed job it is a BatchNorm
    return bn.process_group or dist.group.WORLD


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm (any [N, C, ...] input) whose training statistics span the ranks of `process_group` (None: every
    rank) inside a torch.distributed job, on any device (torch's nn.SyncBatchNorm needs a GPU, and DDP refuses it
    on the CPU): called as a module, plain PyTorch (fastsnn.reference's synchronised form); passed to a fused
    BatchNorm + neuron call (bn= of a fastsnn neuron, the students' layers), the fused op synchronises itself.
    Outside a distributed job, or in eval mode, it is an ordinary BatchNorm. nn.BatchNorm2d's state_dict keys."""

    sync_bn = True

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"SyncBatchNorm: expected an input [N, C, ...] with at least 2 dims, got {input.dim()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = sync_group(self)
        if group is None:
            return super().forward(x)
        from .reference import _sync_batch_norm

        self._check_input_dim(x)
        weight, bias, running_mean, running_var, training, factor, eps = _batch_norm_args("SyncBatchNorm", "bn", self)
        return _sync_batch_norm(x, weight, bias, running_mean, running_var, training, factor, eps, x.dtype,
                                group=group)

    @classmethod
    def of(cls, bn: nn.modules.batchnorm._BatchNorm, process_group=None) -> "SyncBatchNorm":
        """A SyncBatchNorm holding bn's parameters and buffers (the same tensors) and mode."""
        synced = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, process_group)
        if bn.affine:
            synced.weight, synced.bias = bn.weight, bn.bias
        synced.running_mean, synced.running_var = bn.running_mean, bn.running_var
        synced.num_batches_tracked = bn.num_batches_tracked
        return synced.train(bn.training)


def convert_sync_bn(module: nn.Module, process_group=None) -> nn.Module:
    """module with every BatchNorm synchronised across the ranks of `process_group` (None: every rank) in training
    mode, fusion kept: each nn.BatchNorm1d/2d/3d becomes a fastsnn.SyncBatchNorm (same parameters, buffers and
    state_dict keys), whose fused BatchNorm + neuron calls (fastsnn.bn_lif) then share their statistics inside the
    op; each BNNeuron module (BNLIF, BNPLIF, BNIF) is marked in place (sync_bn, process_group). torch's
    nn.SyncBatchNorm.convert_sync_batchnorm would replace a BNNeuron by a plain SyncBatchNorm, dropping its neuron,
    and its SyncBatchNorm needs a GPU. Returns the module (a new one when module itself is a BatchNorm), like
    torch's function."""
    if isinstance(module, BNNeuron):
        module.sync_bn, module.process_group = True, process_group
        return module
    if type(module) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        return SyncBatchNorm.of(module, process_group)
    for name, child in module.named_children():
        converted = convert_sync_bn(child, process_group)
        if converted is not child:
            setattr(module, name, converted)
    return module


def batch_norm_fire(op: str, bn: nn.Module, spec: NeuronSpec, x: torch.Tensor, *, residual=None,
                    residual_storage=None, residual_bn: nn.Module | None = None, repeat=None,
                    backend: str = "auto", w: torch.Tensor | None = None, source=None,
                    residual_source=None) -> torch.Tensor:
    """spec's neuron over bn(x) [+ residual, or + residual_bn(residual)], fused, with nn.BatchNorm's bookkeeping
    (see _batch_norm_args). A residual_bn that normalises differently from bn (another mode, momentum factor or
    eps) is applied on its own first, and its output is the residual."""
    *params, training, factor, eps = _batch_norm_args(op, "bn", bn)
    group = sync_group(bn)
    residual_params = None
    if residual_bn is not None:
        if residual is None:
            raise ValueError(f"{op}: residual_bn normalises the residual, but residual is None")
        *r_params, r_training, r_factor, r_eps = _batch_norm_args(op, "residual_bn", residual_bn)
        if (r_training, r_factor, r_eps) == (training, factor, eps):
            residual_params = tuple(r_params)
        elif sync_group(residual_bn) is not None:  # the unfused shortcut, synchronised: the plain-PyTorch form
            from .reference import _sync_batch_norm

            residual = _sync_batch_norm(residual.flatten(0, 1), r_params[0], r_params[1], r_params[2], r_params[3],
                                        r_training, r_factor, r_eps, residual.dtype,
                                        group=sync_group(residual_bn)).unflatten(0, residual.shape[:2])
        else:  # the unfused shortcut: num_batches_tracked was counted above, so call the functional form
            residual = torch.nn.functional.batch_norm(
                residual.flatten(0, 1), r_params[2], r_params[3], r_params[0], r_params[1], r_training, r_factor,
                r_eps).unflatten(0, residual.shape[:2])
    return apply_bn_neuron(op, x, *params, spec, training=training, momentum=factor, eps=eps, residual=residual,
                           residual_storage=residual_storage, residual_bn=residual_params, repeat=repeat,
                           backend=backend, w=w, source=source, residual_source=residual_source,
                           process_group=group)


class BNNeuron(nn.modules.batchnorm._BatchNorm):
    """BatchNorm (over the channel dim 2 of x[T, B, C, ...], statistics over T·B·spatial) + optional residual +
    multistep neuron, as one module with nn.BatchNorm2d's parameters, buffers and state_dict keys (weight,
    bias, running_mean, running_var, num_batches_tracked), so BatchNorm checkpoints load unchanged.

    forward(x[T, B, C, ...], residual=None, repeat=None, residual_bn=None, source=None, residual_source=None)
    -> spikes; see fastsnn.bn_lif (residual_bn: a BatchNorm module normalising the residual inside the same op;
    source, residual_source: recompute x and the residual from their convolutions' sources).
    """

    def __init__(self, num_features: int, spec: NeuronSpec, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, backend: str = "auto"):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        if backend not in BACKENDS:
            raise ValueError(f"{type(self).__name__}: backend must be one of {BACKENDS}, got {backend!r}")
        self.spec = spec
        self.backend = backend
        self.sync_bn, self.process_group = False, None  # see convert_sync_bn

    def _check_input_dim(self, input):  # the op checks x (any [T, B, C, ...])
        pass

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, repeat: int | None = None,
                residual_bn: nn.Module | None = None, source=None, residual_source=None) -> torch.Tensor:
        return batch_norm_fire(type(self).__name__, self, self.spec, x, residual=residual, residual_bn=residual_bn,
                               repeat=repeat, backend=self.backend, w=self._parameters.get("w"), source=source,
                               residual_source=residual_source)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", neuron={self.spec}"


class BNLIF(BNNeuron):
    """BatchNorm + LIF (see BNNeuron, fastsnn.bn_lif); the neuron arguments are fastsnn.LIF's."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, tau: float = 2.0, decay_input: bool = True,
                 v_threshold: float = 1.0, v_reset: float | None = 0.0, surrogate: str = "atan",
                 alpha: float | None = None, detach_reset: bool = False, backend: str = "auto"):
        spec = NeuronSpec.create("BNLIF", kind=kind_of(decay_input, "BNLIF"), tau=tau, v_threshold=v_threshold,
                                 v_reset=v_reset, surrogate=surrogate, alpha=alpha, detach_reset=detach_reset)
        super().__init__(num_features, spec, eps, momentum, affine, track_running_stats, backend)


class BNPLIF(BNNeuron):
    """BatchNorm + PLIF (see BNNeuron, fastsnn.bn_plif): nn.BatchNorm2d's keys plus the neuron's "w"; the neuron
    arguments are fastsnn.PLIF's."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, init_tau: float = 2.0, decay_input: bool = True,
                 v_threshold: float = 1.0, v_reset: float | None = 0.0, surrogate: str = "atan",
                 alpha: float | None = None, detach_reset: bool = False, backend: str = "auto"):
        spec = NeuronSpec.create("BNPLIF", kind=kind_of(decay_input, "BNPLIF", parametric=True), tau=init_tau,
                                 v_threshold=v_threshold, v_reset=v_reset, surrogate=surrogate, alpha=alpha,
                                 detach_reset=detach_reset)
        super().__init__(num_features, spec, eps, momentum, affine, track_running_stats, backend)
        self.w = nn.Parameter(torch.tensor(init_w(spec.tau)))


class BNIF(BNNeuron):
    """BatchNorm + IF (see BNNeuron, fastsnn.bn_if); the neuron arguments are fastsnn.IF's."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, v_threshold: float = 1.0, v_reset: float | None = 0.0,
                 surrogate: str = "atan", alpha: float | None = None, detach_reset: bool = False,
                 backend: str = "auto"):
        spec = NeuronSpec.create("BNIF", kind="if", v_threshold=v_threshold, v_reset=v_reset, surrogate=surrogate,
                                 alpha=alpha, detach_reset=detach_reset)
        super().__init__(num_features, spec, eps, momentum, affine, track_running_stats, backend)
