"""Autograd-aware ops: torch.library custom ops, input checks and backend dispatch."""
from .lif import if_multistep, lif_multistep
from .tser_loss import tser_loss

__all__ = ["lif_multistep", "if_multistep", "tser_loss"]
