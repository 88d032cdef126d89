"""`rct-dist demo`: every loss of the package on real data that ships with scikit-learn, offline.

A teacher MLP learns the digit classes 0-4 with Proxy-Anchor; a smaller student (16-d) then learns
from the teacher alone (no labels) with RC and with each baseline, and from labels directly.
Recall@K is measured on the held-out classes 5-9. Under `torchrun` (or any launcher that sets
WORLD_SIZE) every model trains data-parallel in DDP, each rank fed its slice of each global batch,
and the losses gather the global batch across ranks.

The 8 x 8 digits are an easy, small set: it exercises the whole loss path in seconds, it cannot
show the size of the paper's gains.
"""

from __future__ import annotations

import os
import time
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from rct_dist.distributed import is_distributed, world_rank, world_size
from rct_dist.eval import recall_at_k
from rct_dist.train.task import WithLoss
from rct_dist.losses import (
    DarkRankLoss,
    PKTLoss,
    ProxyAnchorLoss,
    RelaxedContrastiveLoss,
    RKDAngleLoss,
    RKDDistanceLoss,
)

KS = (1, 2, 4, 8)
TRAIN_CLASSES = 5


def load_digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits (1,797 8x8 images), classes 0-4 for training and 5-9 held out."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    train = y < TRAIN_CLASSES
    return x[train], y[train], x[~train], y[~train]


def mlp(*widths: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def fit(net: nn.Module, criterion: nn.Module, x: torch.Tensor, target: torch.Tensor, steps: int, batch: int,
        seed: int) -> float:
    """AdamW + cosine; each rank takes its slice of the same seeded global batch. Returns the last loss."""
    torch.manual_seed(seed)
    model: nn.Module = WithLoss(net, criterion)
    if is_distributed():
        model = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    share = -(-batch // world_size())
    mine = slice(world_rank() * share, (world_rank() + 1) * share)
    loss = torch.zeros(())
    for _ in range(steps):
        idx = torch.randperm(len(x), generator=g)[:batch][mine]
        loss = model(x[idx], target[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return loss.item()


def evaluate(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[int, float]:
    with torch.no_grad():
        return recall_at_k(net(x), y, KS)


def run_demo(steps: int = 400, batch: int = 120, seed: int = 0, say: Callable[[str], None] = print) -> list[tuple]:
    """Train and evaluate every model; returns rows (name, {k: recall}, seconds) and prints a table."""
    x_train, y_train, x_test, y_test = load_digits_split()
    rows: list[tuple] = [("pixels, no model", recall_at_k(x_test, y_test, KS), 0.0)]

    def timed(name: str, build: Callable[[], nn.Module], criterion: nn.Module, target: torch.Tensor) -> nn.Module:
        start = time.perf_counter()
        torch.manual_seed(seed)
        net = build()
        if steps:
            fit(net, criterion, x_train, target, steps, batch, seed)
        rows.append((name, evaluate(net, x_test, y_test), time.perf_counter() - start))
        say(f"  {name}: R@1 {rows[-1][1][1]:.4f}")
        return net

    say(f"digits: {len(x_train)} training images (classes 0-4), {len(x_test)} held out (5-9); "
        f"{world_size()} process(es), {steps} steps of {batch}")
    teacher = timed("teacher 64-256-64, Proxy-Anchor", lambda: mlp(64, 256, 64),
                    ProxyAnchorLoss(TRAIN_CLASSES, 64), y_train)
    with torch.no_grad():
        teacher_emb = teacher(x_train)
    student = lambda: mlp(64, 32, 16)  # noqa: E731
    torch.manual_seed(seed)
    rows.append(("student 64-32-16, random init", evaluate(student(), x_test, y_test), 0.0))
    timed("student, labels (Proxy-Anchor)", student, ProxyAnchorLoss(TRAIN_CLASSES, 16), y_train)
    for name, criterion in (
        ("student <- teacher, RC", RelaxedContrastiveLoss()),
        ("student <- teacher, RKD (D + 2A)", _Sum(RKDDistanceLoss(), RKDAngleLoss(), 2.0)),
        ("student <- teacher, PKT", PKTLoss()),
        ("student <- teacher, DarkRank", DarkRankLoss()),
    ):
        timed(name, student, criterion, teacher_emb)
    say(format_table(rows))
    return rows


class _Sum(nn.Module):
    """a + weight * b: RKD as its paper uses it (distance + 2 x angle)."""

    def __init__(self, a: nn.Module, b: nn.Module, weight: float) -> None:
        super().__init__()
        self.a, self.b, self.weight = a, b, weight

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return self.a(student, teacher) + self.weight * self.b(student, teacher)


def format_table(rows: list[tuple]) -> str:
    width = max(len(r[0]) for r in rows)
    head = f"{'model':<{width}}  " + "  ".join(f"R@{k:<4}" for k in KS) + "  seconds"
    lines = [head, "-" * len(head)]
    for name, recall, seconds in rows:
        lines.append(f"{name:<{width}}  " + "  ".join(f"{100 * recall[k]:5.1f}" for k in KS) + f"  {seconds:7.1f}")
    return "\n".join(lines)


def init_from_env() -> bool:
    """Join the process group a launcher (torchrun, deepspeed, srun wrappers) describes in the environment."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return True
    return False
