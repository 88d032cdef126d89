"""Step timing for the training loop: whole steps, images and views counted apart, one sync per log.

A step runs from the moment the loop asks the loader for a batch to the moment it asks for the next
one, so its time holds the wait for data, the host-to-device copy, forward/backward/step, and whatever
the loop does after the step: logging, `.item()` syncs, checkpoints. Nothing falls between two steps.

On CUDA, kernels run asynchronously: the host clock only shows the GPU's work when the host waits for
it. `StepTimer.read` calls `sync` (torch.cuda.synchronize) once, at log steps, before reading the
clock, so a logging window [previous read, this read] holds all the device work queued in it. Steps
that do not log never synchronise.

Data wait is the host's time blocked on the loader (batch fetch + copy to the device). When the data
keeps up, the host runs ahead of the GPU and waits elsewhere (at the next sync or when the launch
queue fills), so the wait fraction is the share of wall time lost to the input pipeline, not a GPU
utilisation figure.

Rates: `images` are dataset images, `views` the augmented copies the model sees (images x data.views).
Both are logged, for this device and for all devices (per device x world size: the loader gives every
rank the same batch count and size).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

Clock = Callable[[], float]


@dataclass(frozen=True)
class Window:
    """What happened between two reads of a `StepTimer`."""

    steps: int
    images: int
    views: int
    seconds: float  # wall time of the window: whole steps, logging and checkpoints included
    waited: float  # of which the host waited for data

    @property
    def step_seconds(self) -> float:
        return self.seconds / self.steps if self.steps else float("nan")

    @property
    def wait_fraction(self) -> float:
        return self.waited / self.seconds if self.seconds > 0 else float("nan")

    def scalars(self, world: int = 1) -> dict[str, float]:
        """TensorBoard scalars: rates per device and in total (x world), wait fraction, step time."""
        per_s = 1.0 / self.seconds if self.seconds > 0 else float("nan")
        return {
            "throughput/images_per_s": self.images * per_s * world,
            "throughput/views_per_s": self.views * per_s * world,
            "throughput/images_per_s_per_device": self.images * per_s,
            "throughput/views_per_s_per_device": self.views * per_s,
            "throughput/data_wait_fraction": self.wait_fraction,
            "throughput/step_seconds": self.step_seconds,
        }


class StepTimer:
    """Wall-clock bookkeeping of training steps (see the module docstring).

    Call `start()` before the first batch is requested, `data_ready()` once a batch is on the device,
    `step_done(images, views)` after the optimizer step, `read()` at log steps (syncs, returns the
    window since the last read and opens the next one), and `next_step()` at the end of every loop
    body, after logging and checkpoints, right before the next batch is requested.
    """

    def __init__(self, clock: Clock = time.perf_counter, sync: Callable[[], None] | None = None) -> None:
        self.clock = clock
        self.sync = sync
        self._window_start = self._step_start = 0.0
        self._steps = self._images = self._views = 0
        self._waited = 0.0

    def start(self) -> None:
        self._window_start = self._step_start = self.clock()
        self._steps = self._images = self._views = 0
        self._waited = 0.0

    def data_ready(self) -> None:
        self._waited += self.clock() - self._step_start

    def step_done(self, images: int, views: int) -> None:
        self._steps += 1
        self._images += images
        self._views += views

    def next_step(self) -> None:
        self._step_start = self.clock()

    def read(self) -> Window:
        if self.sync is not None:
            self.sync()
        now = self.clock()
        window = Window(self._steps, self._images, self._views, now - self._window_start, self._waited)
        self._window_start = now
        self._steps = self._images = self._views = 0
        self._waited = 0.0
        return window


def device_sync(device) -> Callable[[], None] | None:
    """torch.cuda.synchronize for a CUDA device; None (nothing to wait for) elsewhere."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return None


def step_scalars(window: Window, world: int, loss, parts: dict, engine, target, student_emb) -> dict[str, float]:
    """Everything a log step reports: losses, learning rate, gradient norm, teacher/student geometry and
    the window's timing. Reads device values (`.item()`), so call it after `StepTimer.read` synced."""
    from rct_dist.train.monitor import distance_correlation

    values = {"loss/total": loss.item(), **{f"loss/{k}": v.item() for k, v in parts.items()},
              "lr": engine.get_lr()[0], **window.scalars(world)}
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is not None:
        values["grad_norm"] = float(grad_norm)
    if target is not None:
        values["geometry/teacher_student_distance_corr"] = distance_correlation(target, student_emb)
    return values
