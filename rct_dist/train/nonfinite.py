"""Skip optimizer steps with a NaN/Inf loss or gradient on any rank, the same way on every rank.

`GuardedAdamW` is a torch AdamW whose `step()` first asks whether anything this step saw was not finite:
the losses handed to `note_loss` since the last step (kept on the device, no sync) and every gradient in
its param groups (one fused inf-norm per step). The answer is all-reduced (MAX) over the default process
group, because under ZeRO each rank holds only a partition of the gradients, and a rank that skipped
alone would leave the replicas apart. Then one host sync (`.item()`) per optimizer step. A skipped step
touches neither the parameters nor Adam's state; it is counted (`skipped_total`, `consecutive`) and more
than `max_nonfinite_steps` in a row raise `NonFiniteStepError`. With `skip_nonfinite=False` it is AdamW,
with no check and no sync.

Inside DeepSpeed (`attach`, called by `build_engine`):
- DeepSpeed's optimizer wrappers (ZeRO 1/2/3, the bf16 optimizer) already skip a step whose global
  gradient norm is not finite, before the inner `step()` is reached. `attach` wraps `engine.step` and
  counts such a step as skipped too (it is decided on every rank alike), so the limit holds whichever
  side caught the step; DeepSpeed also counts it in `engine.skipped_steps`. The loss flag is what the
  guard adds there (a NaN loss whose gradients are finite), and without a wrapper (ZeRO 0 fp32) the
  gradient check as well.
- ZeRO 1/2/3 call the inner `step()` once per param group (or sub-group) per optimizer step: the first
  call of an engine step decides for all of them, so there is still one all-reduce and one sync. (That
  call sees only its own group's gradients; DeepSpeed has checked them all by then, unless a bf16
  config sets `check_grad_overflow: false`.)
- The LR schedule advances on a step the guard skipped (DeepSpeed does not see the skip) but not on one
  DeepSpeed skipped itself.
- fp16 (and fp16 autocast): DeepSpeed's loss scaler skips overflowing steps as part of its normal work
  (several in a row while it finds its scale, counted in `engine.skipped_steps`, and it raises itself
  at its minimum scale), and the guard would only ever see steps it let through: `attach` turns the
  guard off there.

Checkpoints: the counters are not in `state_dict()`. DeepSpeed's ZeRO checkpoints keep only the inner
optimizer's per-parameter state, so they would survive under some configs and not others; a resumed run
starts with `consecutive` 0 (its parameters are those of the last finite step anyway). A loop that wants
`skipped_total` over a resume keeps it in its own checkpoint state and assigns it back.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist


class NonFiniteStepError(RuntimeError):
    """Too many optimizer steps in a row had a NaN/Inf loss or gradient; raised on every rank alike."""


class NonFiniteGuard:
    """Mixin for a torch optimizer (first base): skip a step with a non-finite loss or gradient on any
    rank (see the module docstring). The optimizer's own arguments pass through.

    `skipped_total`: skipped optimizer steps; `consecutive`: skipped in a row now; `steps`: optimizer
    steps decided (under an attached engine, the engine's `global_steps`); `last_finite_step`: the last
    step that was applied (0: none yet).
    """

    param_groups: list[dict[str, Any]]

    def __init__(self, params: Iterable[Any], *, skip_nonfinite: bool = True, max_nonfinite_steps: int = 5,
                 **optimizer: Any) -> None:
        super().__init__(params, **optimizer)  # type: ignore[call-arg]
        if max_nonfinite_steps < 0:
            raise ValueError(f"max_nonfinite_steps must be >= 0, got {max_nonfinite_steps}")
        self.skip_nonfinite = skip_nonfinite
        self.max_nonfinite_steps = max_nonfinite_steps
        self.skipped_total = 0
        self.consecutive = 0
        self.steps = 0
        self.last_finite_step = 0
        self._loss_bad: torch.Tensor | None = None  # any noted loss non-finite since the last step (device)
        self._skip: bool | None = None  # this engine step's decision, once made
        self._in_engine_step = False

    def note_loss(self, loss: torch.Tensor) -> None:
        """Remember whether this loss (a micro-batch's, before `engine.step()`) is finite; no host sync."""
        if not self.skip_nonfinite:
            return
        bad = ~torch.isfinite(loss.detach()).all()
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad.to(self._loss_bad.device)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        apply = super().step  # type: ignore[misc]
        if not self.skip_nonfinite:
            return apply(closure)
        if closure is not None:
            raise NotImplementedError("skip_nonfinite takes no closure: the gradients it computes would not be checked")
        if self._skip is None:
            self._skip = self._decide()
            if not self._in_engine_step:  # on its own, each call is one optimizer step
                self._settle(self._skip, self.steps + 1)
                skip, self._skip = self._skip, None
                self._check_limit()
                return None if skip else apply()
        return None if self._skip else apply()

    def _decide(self) -> bool:
        """Whether any rank saw a non-finite loss or gradient: one all-reduce, one host sync."""
        with torch.no_grad():
            return self._any_rank_nonfinite()

    def _any_rank_nonfinite(self) -> bool:
        grads = [p.grad for group in self.param_groups for p in group["params"]
                 if p.grad is not None and p.grad.numel() > 0]
        device = _collective_device(grads[0].device if grads else
                                    self._loss_bad.device if self._loss_bad is not None else torch.device("cpu"))
        flags = [torch.zeros((), device=device)]
        if self._loss_bad is not None:
            flags.append(self._loss_bad.to(device, torch.float32))
        if grads:
            norms = torch._foreach_norm(grads, float("inf"))  # max |g|: no overflow of finite values, NaN stays NaN
            finite = torch.isfinite(torch.stack([n.to(device, torch.float32) for n in norms])).all()
            flags.append((~finite).to(torch.float32))
        flag = torch.stack(flags).amax().reshape(1)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _settle(self, skipped: bool, step: int) -> None:
        """Count optimizer step `step` as skipped or applied, and forget the noted losses."""
        self.steps = step
        self._loss_bad = None
        if skipped:
            self.skipped_total += 1
            self.consecutive += 1
        else:
            self.consecutive = 0
            self.last_finite_step = step

    def _check_limit(self) -> None:
        if self.consecutive > self.max_nonfinite_steps:
            raise NonFiniteStepError(
                f"{self.consecutive} optimizer steps in a row had a NaN/Inf loss or gradient on some rank and were "
                f"skipped (optim.max_nonfinite_steps={self.max_nonfinite_steps}; {self.skipped_total} skipped in "
                f"all). The last finite step was {self.last_finite_step}: the model is as it was after that step, "
                "and so are the checkpoints written since. Resume from the last checkpoint with a lower optim.lr, "
                "gradient clipping (optim.grad_clip > 0), or an fp32 or bf16-autocast deepspeed.config "
                "(e.g. zero2_fp32, zero2_bf16_autocast) in place of bf16 weights."
            )

    # Engine steps (driven by `attach`): one decision per optimizer step, however many inner calls.
    def _begin_engine_step(self) -> None:
        self._in_engine_step, self._skip = True, None

    def _end_engine_step(self, took_step: bool, step: int) -> None:
        self._in_engine_step = False
        if not took_step or not self.skip_nonfinite:
            return  # between accumulation boundaries: the noted losses wait for the boundary
        skip = True if self._skip is None else self._skip  # never reached: DeepSpeed skipped it itself
        self._skip = None
        self._settle(skip, step)
        self._check_limit()


class GuardedAdamW(NonFiniteGuard, torch.optim.AdamW):
    """The trainer's AdamW, guarded: `GuardedAdamW(params, skip_nonfinite=..., max_nonfinite_steps=..., lr=...)`."""


def _collective_device(device: torch.device) -> torch.device:
    """Where the flag can be all-reduced: gloo takes CPU tensors, nccl CUDA ones (ZeRO-Offload keeps
    gradients on the CPU under nccl)."""
    if not (dist.is_available() and dist.is_initialized()):
        return device
    backend = dist.get_backend()
    if backend == "gloo":
        return torch.device("cpu")
    if backend == "nccl" and device.type == "cpu":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _loss_scaled(engine: Any) -> bool:
    """fp16 weights or fp16 autocast: DeepSpeed's loss scaler owns the skipping."""
    autocast_fp16 = engine.torch_autocast_enabled() and engine.torch_autocast_dtype() == torch.float16
    return bool(engine.fp16_enabled() or autocast_fp16)


def attach(engine: Any, guard: NonFiniteGuard) -> None:
    """Make `guard` (the engine's client optimizer) count the engine's optimizer steps, reachable as
    `engine.nonfinite_guard`; off under loss scaling (module docstring)."""
    if _loss_scaled(engine):
        guard.skip_nonfinite = False
    engine_step = engine.step

    def step(*args: Any, **kwargs: Any) -> Any:
        before = engine.global_steps
        if guard.steps != before:  # the first step, or the first since a resume: count from the engine's steps
            guard.steps = guard.last_finite_step = before
        guard._begin_engine_step()
        try:
            result = engine_step(*args, **kwargs)
        finally:
            guard._in_engine_step = False
        guard._end_engine_step(engine.global_steps != before, engine.global_steps)
        return result

    engine.step = step
    engine.nonfinite_guard = guard
