"""A weight EMA of the student (what timm's ModelEmaV3 keeps): evaluated every epoch beside the raw weights."""
from __future__ import annotations

import copy

import torch

WARMUP_POWER = 2.0 / 3.0  # timm's ModelEmaV3 warm-up power (its default; 3/4 for short runs)


class ModelEma:
    """An exponential moving average of a model's parameters and floating-point buffers (BatchNorm's running
    statistics; integer buffers such as num_batches_tracked are copied), updated after every optimiser step:

        ema ← d·ema + (1 − d)·model,   d = decay, or with warmup min(decay, 1 − (1 + n)^(−2/3)) at update n

    (timm's ModelEmaV3 with use_warmup, warmup_gamma 1). `module` is a copy of the model in eval mode with no
    gradients; its state_dict (with the update count) goes into every checkpoint, so a resumed run continues the
    same average bit for bit."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = False):
        if not (isinstance(decay, float) and 0.0 < decay < 1.0):
            raise ValueError(f"ModelEma: decay must be a number in (0, 1), got {decay!r}")
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.warmup, self.updates = decay, bool(warmup), 0

    def decay_at(self, updates: int) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, max(0.0, 1.0 - (1.0 + updates) ** -WARMUP_POWER))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        weight = 1.0 - self.decay_at(self.updates)
        mine = self.module.state_dict()
        for name, value in model.state_dict().items():
            target = mine[name]
            if target.is_floating_point():
                target.lerp_(value.to(target.dtype), weight)
            else:
                target.copy_(value)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or not isinstance(state.get("updates"), int) \
                or isinstance(state.get("updates"), bool) or state["updates"] < 0:
            raise ValueError("model_ema is not {module: state_dict, updates: int >= 0}")
        self.module.load_state_dict(state["module"])
        self.updates = state["updates"]
