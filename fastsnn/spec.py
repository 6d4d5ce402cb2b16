"""NeuronSpec: the one description of a multistep neuron that the modules, the ops, the reference, the
kernels' launchers and the ahead-of-time variant list all take. Validated once, where it is built."""
from __future__ import annotations

import functools
from dataclasses import dataclass

from .backend import check_number, tracing
from .surrogate import SURROGATES, resolve_surrogate

KINDS = ("if", "lif", "lif_no_decay", "plif", "plif_no_decay")
PARAMETRIC = ("plif", "plif_no_decay")  # kinds whose rate k = sigmoid(w) is a learnable tensor


@dataclass(frozen=True)
class NeuronSpec:
    """A multistep neuron, per timestep (v: membrane, x_t: input, v_reset: 0 for soft reset):

        charge  if:            h = v + x_t
                lif:           h = v + (x_t − (v − v_reset)) / tau      (SpikingJelly's decay_input=True)
                lif_no_decay:  h = v − (v − v_reset) / tau + x_t        (decay_input=False)
                plif:          h = v + (x_t − (v − v_reset))·k          (ParametricLIFNode, k = sigmoid(w), w a
                plif_no_decay: h = v − (v − v_reset)·k + x_t             learnable tensor given with each call;
                                                                          tau is then the initial 1/k)
        fire    s_t = Θ(h − v_threshold)
        reset   hard (v_reset a number): v = v_reset where s_t = 1, else h;  soft (None): v = h − v_threshold·s_t

    The backward replaces dΘ/du by the surrogate's derivative (see fastsnn.surrogate) with `alpha`;
    detach_reset stops the gradient through the reset. Build it with NeuronSpec.create (validating) or
    neuron_spec (cached, for per-call use); the constructor itself does not validate.
    """
    kind: str = "lif"
    tau: float = 2.0  # 1.0 for "if" (unused there)
    v_threshold: float = 1.0
    v_reset: float | None = 0.0
    surrogate: str = "atan"
    alpha: float = 2.0
    detach_reset: bool = False

    def __hash__(self) -> int:
        # computed once: the launchers key their per-spec constants on it on every call
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash((self.kind, self.tau, self.v_threshold, self.v_reset, self.surrogate, self.alpha,
                           self.detach_reset))
            object.__setattr__(self, "_hash", cached)
        return cached

    @property
    def parametric(self) -> bool:
        """Whether the charge's rate is a learnable tensor (PLIF) rather than the number 1/tau."""
        return self.kind in PARAMETRIC

    @property
    def decay_input(self) -> bool:
        """SpikingJelly's name for the charge: False for the "_no_decay" kinds, True otherwise ("if" included)."""
        return not self.kind.endswith("_no_decay")

    @property
    def hard_reset(self) -> bool:
        return self.v_reset is not None

    @property
    def v_rest(self) -> float:
        """The membrane's resting value: v_reset, or 0 for soft reset."""
        return 0.0 if self.v_reset is None else self.v_reset

    @staticmethod
    def create(op: str, *, kind: str = "lif", tau: float | None = 2.0, v_threshold: float = 1.0,
               v_reset: float | None = 0.0, surrogate: str = "atan", alpha: float | None = None,
               detach_reset: bool = False) -> "NeuronSpec":
        """A validated spec; errors name `op` and the argument, e.g. "LIF: tau must be a finite number > 1"."""
        if kind not in KINDS:
            raise ValueError(f"{op}: neuron kind must be one of {KINDS}, got {kind!r}")
        if kind == "if":
            tau = 1.0
        else:
            tau = check_number(op, "tau", tau, low=1.0, low_inclusive=False, rule="a finite number > 1")
        v_threshold = check_number(op, "v_threshold", v_threshold)
        if v_reset is not None:
            v_reset = check_number(op, "v_reset", v_reset, rule="a finite number, or None for soft reset")
            if v_threshold <= v_reset:
                raise ValueError(f"{op}: v_threshold must be > v_reset for hard reset, got v_threshold="
                                 f"{v_threshold} and v_reset={v_reset}")
        if not isinstance(detach_reset, bool):
            raise TypeError(f"{op}: detach_reset must be True or False, got {detach_reset!r}")
        entry, alpha = resolve_surrogate(op, surrogate, alpha)
        return NeuronSpec(kind, tau, v_threshold, v_reset, entry.name, alpha, detach_reset)

    def surrogate_grad(self, u):
        """g'(u) of this spec's surrogate (a tensor function, for the reference)."""
        return SURROGATES[self.surrogate].grad(u, self.alpha)


def kind_of(decay_input: bool, op: str, parametric: bool = False) -> str:
    """The kind of a LIF (or, `parametric`, PLIF) neuron with SpikingJelly's decay_input switch."""
    if not isinstance(decay_input, bool):
        raise TypeError(f"{op}: decay_input must be True or False, got {decay_input!r}")
    base = "plif" if parametric else "lif"
    return base if decay_input else base + "_no_decay"


def init_w(tau: float) -> float:
    """The PLIF weight w whose rate sigmoid(w) is 1/tau (SpikingJelly's init_w = −log(init_tau − 1))."""
    import math

    return -math.log(tau - 1.0)


@functools.lru_cache(maxsize=256, typed=True)  # typed: True and 1 are different arguments
def _cached(op, kind, tau, v_threshold, v_reset, surrogate, alpha, detach_reset):
    return NeuronSpec.create(op, kind=kind, tau=tau, v_threshold=v_threshold, v_reset=v_reset, surrogate=surrogate,
                             alpha=alpha, detach_reset=detach_reset)


def neuron_spec(op: str, *, kind: str, tau, v_threshold, v_reset, surrogate, alpha, detach_reset) -> NeuronSpec:
    """NeuronSpec.create, memoised for hashable arguments (a functional call validates once per distinct
    set of arguments, not once per call)."""
    if not tracing():
        try:
            return _cached(op, kind, tau, v_threshold, v_reset, surrogate, alpha, detach_reset)
        except TypeError:  # an unhashable argument: let create() produce its own error message
            pass
    return NeuronSpec.create(op, kind=kind, tau=tau, v_threshold=v_threshold, v_reset=v_reset,
                             surrogate=surrogate, alpha=alpha, detach_reset=detach_reset)
