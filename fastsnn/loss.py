"""The TSER distillation loss as an nn.Module."""
from __future__ import annotations

from torch import Tensor, nn

from .ops.tser_loss import check_loss_params, tser_loss


class TSERLoss(nn.Module):
    """fastsnn.tser_loss as a module: forward(student_logits[T, B, C], teacher_logits[B, C], target[B]).

    Same arguments and defaults as fastsnn.tser_loss (alpha=0.5, tau=5.0, lam=0.01, ts_ce=True,
    ts_kl=True, entropy_tau=None, ignore_index=-100). With return_terms=True, forward returns
    (loss, {"ce", "kl", "entropy"}).
    """

    def __init__(self, alpha: float = 0.5, tau: float = 5.0, lam: float = 0.01, ts_ce: bool = True,
                 ts_kl: bool = True, entropy_tau: float | None = None, ignore_index: int = -100,
                 return_terms: bool = False, backend: str = "auto"):
        super().__init__()
        self.alpha, self.tau, self.lam, self.ts_ce, self.ts_kl = alpha, tau, lam, ts_ce, ts_kl
        self.entropy_tau, self.ignore_index = entropy_tau, ignore_index
        self.return_terms, self.backend = return_terms, backend
        check_loss_params(alpha, tau, lam, ts_ce, ts_kl, entropy_tau, backend, ignore_index)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor):
        return tser_loss(student_logits, teacher_logits, target, alpha=self.alpha, tau=self.tau, lam=self.lam,
                         ts_ce=self.ts_ce, ts_kl=self.ts_kl, entropy_tau=self.entropy_tau,
                         ignore_index=self.ignore_index, return_terms=self.return_terms, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, tau={self.tau}, lam={self.lam}, ts_ce={self.ts_ce}, ts_kl={self.ts_kl}, "
                f"entropy_tau={self.entropy_tau}")
