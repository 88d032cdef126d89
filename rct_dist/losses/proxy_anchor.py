"""The Proxy-Anchor loss (Kim, Kim, Cho & Kwak, CVPR 2020), for training teachers with labels.

With cos = normalize(X) @ normalize(P).T for embeddings X and one learnable proxy per class P:

    pos = 1/|P+| sum_{p in P+} log(1 + sum_{x in X_p+} exp(-alpha (cos(x, p) - margin)))
    neg = 1/|C|  sum_{p}       log(1 + sum_{x in X_p-} exp( alpha (cos(x, p) + margin)))

where X_p+ are the embeddings of class p, X_p- the others, and P+ the classes present in the
batch. This equals the authors' `Proxy_Anchor` (tjddus9597/Proxy-Anchor-CVPR2020, code/losses.py),
except that rows are normalised exactly (theirs adds 1e-12 under the square root; zero rows stay
zero here) and log(1 + sum exp) is evaluated in a shifted form that cannot overflow.
"""

from __future__ import annotations

import torch
from torch import nn

from rct_dist.distributed import all_gather_rows, is_distributed
from rct_dist.losses.base import agree_on_inputs, compute_dtype, describe
from rct_dist.geometry import safe_normalize

# Problem codes travel between ranks as integers; index = code.
_PROBLEMS = (
    "",
    "embeddings must be a 2-D floating-point tensor (batch, embedding_size)",
    "embeddings have the wrong embedding size",
    "labels must be a 1-D integer tensor",
    "labels and embeddings must have the same number of rows",
    "labels must lie in [0, num_classes)",
    "embeddings contain NaN or Inf",
    "proxies contain NaN or Inf",
)


def _log1p_sum_exp(z: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """log(1 + sum_i exp(z_i)) over dim 0, only where `keep`; shifted by max(0, max z), so a large
    alpha cannot overflow, and with -inf (not a zero factor) for dropped terms, so no inf * 0 = NaN."""
    z = z.masked_fill(~keep, float("-inf"))
    shift = z.detach().amax(0).clamp_min(0)
    return shift + torch.log(torch.exp(-shift) + torch.exp(z - shift).sum(0))


class ProxyAnchorLoss(nn.Module):
    """Proxy-Anchor, `loss(embeddings, labels)`; `return_parts=True` also returns the detached
    `pos` and `neg` terms.

    With torch.distributed initialised (and `gather`), the embeddings are gathered with autograd
    and the labels without, and every rank computes the loss of the global batch and returns it
    unscaled. The gather's backward sums the W ranks' (identical) gradients for each rank's rows,
    so rank r's embeddings get W * dL/dX_r and its model W * dL/dtheta_r; the proxies get dL/dP on
    every rank (they are replicated, like any parameter). The data-parallel engine's averaging
    over W ranks then leaves exactly the global gradient for both the model (sum_r dL/dtheta_r)
    and the proxies.

    Inputs are checked on every rank and the verdicts exchanged with the row counts, so a bad
    input on one rank raises the same ValueError on all ranks instead of hanging the others.
    Computation runs in fp32 (float64 stays float64) with autocast disabled.
    """

    def __init__(
        self, num_classes: int, embedding_size: int, margin: float = 0.1, alpha: float = 32.0, gather: bool = True
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if embedding_size < 1:
            raise ValueError(f"embedding_size must be positive, got {embedding_size}")
        if alpha <= 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.margin = margin
        self.alpha = alpha
        self.gather = gather
        self.proxies = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")

    def _local_problem(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[int, str]:
        """(code, detailed message) for this rank's inputs; code 0 means fine."""
        if not (isinstance(embeddings, torch.Tensor) and embeddings.dim() == 2 and embeddings.is_floating_point()):
            return 1, f"{_PROBLEMS[1]}, got {describe(embeddings)}"
        if embeddings.shape[1] != self.embedding_size:
            return 2, f"{_PROBLEMS[2]}: expected {self.embedding_size}, got {embeddings.shape[1]}"
        if not (
            isinstance(labels, torch.Tensor)
            and labels.dim() == 1
            and not labels.is_floating_point()
            and not labels.is_complex()
            and labels.dtype != torch.bool
        ):
            return 3, f"{_PROBLEMS[3]}, got {describe(labels)}"
        if labels.shape[0] != embeddings.shape[0]:
            return 4, f"{_PROBLEMS[4]}, got {labels.shape[0]} labels for {embeddings.shape[0]} embeddings"
        bad = (labels < 0) | (labels >= self.num_classes)
        if bad.any():
            return 5, f"{_PROBLEMS[5]} with num_classes={self.num_classes}, got {labels[bad][:5].tolist()}"
        if not torch.isfinite(embeddings).all():
            rows = (~torch.isfinite(embeddings).all(1)).nonzero().flatten()[:5].tolist()
            return 6, f"{_PROBLEMS[6]} (rows {rows})"
        if not torch.isfinite(self.proxies).all():
            return 7, _PROBLEMS[7]
        return 0, ""

    def _global_batch(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Check the inputs on every rank; return the embeddings in the compute dtype and the labels
        on their device, gathered over ranks when distributed (in the compute dtype, so the
        gather's backward sums fp32 gradients, not bf16 ones)."""
        code, message = self._local_problem(embeddings, labels)
        distributed = self.gather and is_distributed()
        rows = [embeddings.shape[0] if code == 0 else 0]
        counts = [s[0] for s in agree_on_inputs(code, message, _PROBLEMS, rows, self.proxies.device, distributed)]
        if sum(counts) < 1:
            raise ValueError("Proxy-Anchor needs at least 1 embedding in the batch, got 0")
        x = embeddings.to(compute_dtype(embeddings, self.proxies))
        y = labels.to(x.device)
        if distributed:
            x = all_gather_rows(x, counts, with_grad=True)
            y = all_gather_rows(y.unsqueeze(1), counts, with_grad=False).squeeze(1)
        return x, y

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, return_parts: bool = False):
        device_type = self.proxies.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            x, y = self._global_batch(embeddings, labels)
            cos = safe_normalize(x) @ safe_normalize(self.proxies.to(x.dtype)).T
            positive = y.unsqueeze(1) == torch.arange(self.num_classes, device=y.device)
            with_positive = positive.any(0)
            pos = _log1p_sum_exp(-self.alpha * (cos - self.margin), positive)
            neg = _log1p_sum_exp(self.alpha * (cos + self.margin), ~positive)
            pos_term = pos.sum() / with_positive.sum()
            neg_term = neg.sum() / self.num_classes
            loss = pos_term + neg_term
        return (loss, {"pos": pos_term.detach(), "neg": neg_term.detach()}) if return_parts else loss
