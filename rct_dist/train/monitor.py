"""What a run shows while it trains: TensorBoard scalars and pictures and a progress bar, on rank 0 only."""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def distance_correlation(teacher: torch.Tensor, student: torch.Tensor) -> float:
    """Pearson correlation of the pairwise distances of teacher and student on one batch: how much of
    the teacher's geometry the student already has (1 = same up to scale)."""
    n = teacher.shape[0]
    upper = torch.triu_indices(n, n, 1, device=teacher.device)
    t = torch.cdist(teacher.float(), teacher.float())[upper[0], upper[1]]
    s = torch.cdist(student.float(), student.float())[upper[0], upper[1]]
    return torch.corrcoef(torch.stack([t, s]))[0, 1].item()


class Monitor:
    """TensorBoard writer and tqdm bar that exist on rank 0 and do nothing elsewhere."""

    def __init__(self, log_dir: Path, enabled: bool, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.writer = None
        self.bar = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir))

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, image, step)

    def start_epoch(self, epoch: int, epochs: int, batches: int, initial: int = 0) -> None:
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=batches, initial=initial, desc=f"epoch {epoch + 1}/{epochs}", file=sys.stderr,
                            dynamic_ncols=True, leave=False)

    def advance(self, postfix: dict[str, str]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update()

    def say(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def end_epoch(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.end_epoch()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
