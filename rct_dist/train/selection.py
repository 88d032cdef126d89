"""Model selection without peeking at the test classes, and early stopping.

Metric-learning papers (the RC paper's official code included) keep the epoch with the best Recall@1 on
the test classes, which reports a maximum over noisy evaluations of the very numbers being compared;
Musgrave et al. ("A Metric Learning Reality Check", ECCV 2020) show how much that inflates results.
Here a run keeps (exports and reports) one of:

- `last`: the model after the last epoch (the default without a validation split);
- `val`: the model with the best R@1 on a validation split of held-out *training* classes
  (`make-shards --val-classes K`, `data.val_split`; the default when there is one);
- `test`: the best R@1 on the test split, the papers' protocol, only when asked (`eval.select: test`).

Early stopping (`optim.early_stop_patience`) watches the validation R@1 only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


def summary(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    """The numbers of an evaluation worth keeping: Recall@K and MAP@R."""
    if metrics is None:
        return None
    return {"recall": {int(k): float(v) for k, v in metrics["recall"].items()}, "map_at_r": float(metrics["map_at_r"])}


def resolve_select(select: str, val_split: str | None) -> str:
    """`auto` -> `val` with a validation split, else `last`."""
    if select == "auto":
        return "val" if val_split else "last"
    return select


@dataclass
class Selection:
    """The running choice of a run's model; its `state()` travels in checkpoints."""

    select: str  # last | val | test
    patience: int = 0  # evaluations without a better validation R@1 before stopping; 0: never
    score: float = -math.inf  # the kept model's selection score (R@1 on its split; for `last`, test R@1)
    best: dict[str, Any] = field(default_factory=dict)  # {"epoch", "test", "val"} of the kept model
    best_val_r1: float = -math.inf
    stale: int = 0  # evaluations since the validation R@1 last improved

    def __post_init__(self) -> None:
        if self.select not in ("last", "val", "test"):
            raise ValueError(f"select must be last, val or test, got {self.select!r}")

    def consider(self, epoch: int, test: dict[str, Any], val: dict[str, Any] | None) -> bool:
        """Record one evaluation (epoch counted from 1; 0 is the untrained model); True when this model
        replaces the kept one (the caller exports it)."""
        if self.select == "val" and val is None:
            raise ValueError("selection on the validation split needs its metrics")
        if val is not None:
            r1 = val["recall"][min(val["recall"])]
            self.stale = 0 if r1 > self.best_val_r1 else self.stale + 1
            self.best_val_r1 = max(self.best_val_r1, r1)
        source = {"last": test, "test": test, "val": val}[self.select]
        r1 = source["recall"][min(source["recall"])]
        keep = self.select == "last" or r1 > self.score
        if keep:
            self.score = r1
            self.best = {"epoch": epoch, "test": summary(test), "val": summary(val)}
        return keep

    def should_stop(self) -> bool:
        return self.patience > 0 and self.stale >= self.patience

    def state(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def restore(cls, state: dict[str, Any] | None, select: str, patience: int) -> Selection:
        """From a checkpoint's state; the current config's rule and patience win over the saved ones."""
        if not state:
            return cls(select, patience)
        saved = {k: v for k, v in state.items() if k in cls.__dataclass_fields__}
        if saved.get("select") != select:  # another rule: what was kept under the old one does not count
            saved = {k: saved[k] for k in ("best_val_r1", "stale") if k in saved}
        return cls(**{**saved, "select": select, "patience": patience})
