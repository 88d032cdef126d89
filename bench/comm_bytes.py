"""Bytes each rank moves per training step for the RC loss, against the gradient all-reduce; a step-time model.

Sections (all by default; each prints markdown):

- `--check`: runs the real loss (`RelaxedContrastiveLoss`, untiled and tiled) forward + backward on W
  gloo processes at tiny sizes, with torch.distributed's collectives wrapped to record every call
  (operation, phase, dtype, element count), and compares the calls with the closed-form list
  `loss_calls(N, D_s, D_t, W, tiled)` below. Any mismatch is printed and makes the exit status 1.
- `--bytes`: the checked formulas at training sizes (global batch N, dims, W), per rank per step,
  against the student's parameter-gradient reduction (parameter counts from the real models).
- `--model`: step time on stated interconnects and stated per-GPU compute times (see `Assumptions`).
- `--zero`: ZeRO 0-3 memory per rank and gradient communication for the students.

Bytes per rank are ring-algorithm bytes *sent* by each rank (a ring receives the same amount):

    all_gather, b bytes in per rank:      (W - 1) b          (b = padded rows x dim x itemsize)
    reduce_scatter, b bytes out per rank: (W - 1) b
    all_reduce of S bytes:                2 (W - 1) S / W

Nothing here times anything on the CPU.

    python bench/comm_bytes.py                # every section, defaults below
    python bench/comm_bytes.py --check        # the measured-vs-formula check only (about a minute)
    python bench/comm_bytes.py --model --student resnet18 --student-dim 128 --teacher-dim 512
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FP32, INT64 = 4, 8

# ----------------------------------------------------------------------------------------------------
# The formulas


@dataclass(frozen=True)
class Call:
    """One collective call as this rank issues it: what it is for, when, and its payload."""

    purpose: str
    phase: str  # "forward" or "backward"
    op: str  # "all_gather", "all_reduce", "reduce_scatter"
    numel: int  # all_gather: this rank's input; reduce_scatter: this rank's output; all_reduce: the tensor
    itemsize: int

    def sent(self, world: int) -> float:
        """Bytes this rank sends in a ring implementation of the call."""
        b = self.numel * self.itemsize
        return 2 * (world - 1) * b / world if self.op == "all_reduce" else (world - 1) * b


def loss_calls(counts: list[int], student_dim: int, teacher_dim: int, tiled: bool) -> list[Call]:
    """The collectives one step of `RelaxedContrastiveLoss` issues on each rank, in order.

    `counts`: rows per rank (the global batch N = sum). Gathers pad to the largest rank's rows.
    The loss computes in fp32 whatever the model's dtype, so everything gathered is fp32.
    """
    n, pad = sum(counts), max(counts)
    calls = [
        Call("sizes + verdicts", "forward", "all_gather", 4, INT64),  # rows, dims, problem code
        Call("student all-gather", "forward", "all_gather", pad * student_dim, FP32),
        Call("teacher all-gather", "forward", "all_gather", pad * teacher_dim, FP32),
        Call("loss value + parts", "forward", "all_reduce", 3, FP32),  # total, pull, push
    ]
    if tiled:  # the tiled backward detaches the gathered columns: no reduce-scatter, one N x 4 all-reduce
        calls.append(Call("row statistics (tiled)", "backward", "all_reduce", n * 4, FP32))
    else:
        calls.append(Call("student reduce-scatter", "backward", "reduce_scatter", pad * student_dim, FP32))
    return calls


def even_counts(n: int, world: int) -> list[int]:
    return [n // world + (r < n % world) for r in range(world)]


def gradient_bytes(params: int, itemsize: int, world: int, zero_stage: int) -> float:
    """Bytes each rank sends per step for the parameter gradients (and, ZeRO 3, parameters).

    ZeRO 0 all-reduces the gradients; ZeRO 1 and 2 reduce-scatter them and all-gather the updated
    parameters (the same 2 (W-1)/W volume); ZeRO 3 also all-gathers the parameters for the forward and
    again for the backward: 3 (W-1)/W.
    """
    factor = 3 if zero_stage == 3 else 2
    return factor * (world - 1) * params * itemsize / world


# ----------------------------------------------------------------------------------------------------
# Measuring the real calls


_RECORD: list[tuple] = []
_PHASE = ["forward"]


def _wrap(name: str, fn, payload):
    def wrapped(*args, **kwargs):
        t = payload(*args, **kwargs)
        _RECORD.append((_PHASE[0], name, t.numel(), t.element_size()))
        return fn(*args, **kwargs)

    return wrapped


def instrument() -> None:
    """Wrap torch.distributed's collectives (and the reduce-scatter the loss bound at import)."""
    import torch.distributed as dist

    import rct_dist.distributed.collectives as collectives

    dist.all_gather = _wrap("all_gather", dist.all_gather, lambda out, x, *a, **k: x)
    dist.all_reduce = _wrap("all_reduce", dist.all_reduce, lambda x, *a, **k: x)
    for name in ("all_gather_into_tensor", "reduce_scatter", "broadcast", "all_to_all"):
        if hasattr(dist, name):  # not used by the loss: recorded so that a new use would show
            setattr(dist, name, _wrap(name, getattr(dist, name), lambda *a, **k: a[0] if torch.is_tensor(a[0]) else a[1]))
    collectives._reduce_scatter = _wrap("reduce_scatter", collectives._reduce_scatter, lambda out, x, *a, **k: out)


def _rank_main(rank: int, world: int, tmp: str, cases: list[tuple]) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    instrument()
    from rct_dist.losses import RelaxedContrastiveLoss

    out = []
    for counts, student_dim, teacher_dim, tiled in cases:
        g = torch.Generator().manual_seed(0)
        n = sum(counts)
        student = torch.randn(n, student_dim, generator=g)
        teacher = torch.randn(n, teacher_dim, generator=g)
        start = sum(counts[:rank])
        mine = student[start:start + counts[rank]].clone().requires_grad_()
        loss_fn = RelaxedContrastiveLoss(chunk_size=4 if tiled else 0)
        _RECORD.clear()
        _PHASE[0] = "forward"
        loss = loss_fn(mine, teacher[start:start + counts[rank]])
        _PHASE[0] = "backward"
        loss.backward()
        out.append(list(_RECORD))
    torch.save(out, Path(tmp) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def measure(world: int, cases: list[tuple]) -> list[list[list[tuple]]]:
    """Per rank, per case: the recorded calls (phase, op, numel, itemsize)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank_main, args=(world, tmp, cases), nprocs=world, join=True)
        return [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(world)]


CHECK_CASES = [  # (rows per rank, student dim, teacher dim); each untiled and tiled
    ([3, 3], 8, 16),
    ([4, 1, 3], 8, 16),
    ([5, 0, 2, 3], 6, 10),
    ([2, 2, 2, 2], 8, 16),
]


def check() -> bool:
    print("## Measured vs formula: the loss's collectives per rank per step\n")
    print("Real `RelaxedContrastiveLoss` forward + backward on W gloo processes, every torch.distributed call "
          "recorded; the formula column is `loss_calls` (bytes sent per rank, ring algorithm).\n")
    print("| W | rows per rank | D_s | D_t | path | call | op | measured payload (elements x bytes) | "
          "formula payload | bytes sent per rank | match |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    ok = True
    by_world: dict[int, list[tuple]] = {}
    for counts, ds, dt in CHECK_CASES:
        for tiled in (False, True):
            by_world.setdefault(len(counts), []).append((counts, ds, dt, tiled))
    for world, cases in sorted(by_world.items()):
        ranks = measure(world, cases)
        for i, (counts, ds, dt, tiled) in enumerate(cases):
            expected = loss_calls(counts, ds, dt, tiled)
            for rank in range(world):
                got = ranks[rank][i]
                same = [(c.phase, c.op, c.numel, c.itemsize) for c in expected] == [tuple(g) for g in got]
                if not same:
                    ok = False
                    print(f"| {world} | {counts} | {ds} | {dt} | {'tiled' if tiled else 'untiled'} | rank {rank} "
                          f"MISMATCH | | {got} | {[(c.phase, c.op, c.numel, c.itemsize) for c in expected]} | | no |")
            got = ranks[0][i]
            for j, c in enumerate(expected):
                m = got[j] if j < len(got) else ("-", "-", 0, 0)
                match = (m[1], m[2], m[3]) == (c.op, c.numel, c.itemsize)
                print(f"| {world} | {counts} | {ds} | {dt} | {'tiled' if tiled else 'untiled'} | {c.purpose} ({c.phase}) | "
                      f"{m[1]} | {m[2]} x {m[3]} | {c.numel} x {c.itemsize} | {c.sent(world):.0f} | "
                      f"{'yes' if match else 'NO'} |")
    print(f"\nEvery rank's calls equal the formula's, in order: {'yes' if ok else 'NO'}\n")
    return ok


# ----------------------------------------------------------------------------------------------------
# Training sizes


STUDENTS = {"resnet18": 128, "resnet50": 512}  # the compression (ResNet-18 128-d) and self-transfer students


def parameter_count(backbone: str, dim: int) -> int:
    from rct_dist.models import build_model

    with torch.device("meta"):
        net = build_model(backbone, dim)
    return sum(p.numel() for p in net.parameters())


def human(b: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= size:
            return f"{b / size:.3g} {unit}"
    return f"{b:.0f} B"


def auto_tiled(n: int, world: int) -> bool:
    """The path `RelaxedContrastiveLoss(chunk_size=None)` takes: tiled once a rank's share exceeds 2^22 pairs."""
    from rct_dist.losses.tiled import tile_size

    return tile_size(None, n, world) > 0


def loss_bytes(n: int, world: int, ds: int, dt: int, tiled: bool) -> dict[str, float]:
    return {c.purpose: c.sent(world) for c in loss_calls(even_counts(n, world), ds, dt, tiled)}


def bytes_table(sizes: list[int], worlds: list[int], ds: int, dt: int, params: dict[str, int]) -> None:
    print(f"## Bytes sent per rank per step (D_s = {ds}, D_t = {dt}; formulas checked above)\n")
    print("Columns up to `loss total`: the tiled path; `untiled` sends the student reduce-scatter instead of the "
          "N x 4 all-reduce; `auto` is the path `chunk_size=None` takes (tiled once rows per rank x N > 2^22). "
          "Gradients: ZeRO 0-2 (2 (W-1)/W x parameters x bytes).\n")
    grad_cols = [f"{name} grad {p}" for name in params for p in ("fp32", "bf16")]
    print("| N | W | student gather | teacher gather | row stats | small (sizes, value) | loss total | "
          "untiled loss total | auto | " + " | ".join(grad_cols) + " | auto loss / resnet18 fp32 grad |")
    print("|" + "---|" * (10 + len(grad_cols)))
    for n in sizes:
        for w in worlds:
            t = loss_bytes(n, w, ds, dt, tiled=True)
            u = sum(loss_bytes(n, w, ds, dt, tiled=False).values())
            small = t["sizes + verdicts"] + t["loss value + parts"]
            grads = [gradient_bytes(params[name], size, w, 2) for name in params for size in (4, 2)]
            total = sum(t.values())
            tiled = auto_tiled(n, w)
            auto = total if tiled else u
            print(f"| {n:,} | {w} | {human(t['student all-gather'])} | {human(t['teacher all-gather'])} | "
                  f"{human(t['row statistics (tiled)'])} | {human(small)} | {human(total)} | {human(u)} | "
                  f"{'tiled' if tiled else 'untiled'} | " + " | ".join(human(g) for g in grads)
                  + f" | {auto / grads[0]:.3g} |")
    print()


# ----------------------------------------------------------------------------------------------------
# Step-time model


@dataclass
class Assumptions:
    """Every input of the step-time model. Figures from the shared notes are marked; the rest are assumptions."""

    nvlink_gbs: float = 450.0  # GB/s per GPU within a node (8 GPUs per node)
    ib_gbs: float = 50.0  # 400 Gb/s InfiniBand per GPU across nodes
    gpus_per_node: int = 8
    step_latency_us: float = 5.0  # per ring step (assumption)
    # timm fwd+bwd at batch 32, 224 px, on an H100 (shared notes); per embedding = / 32, linear in batch (assumption)
    fwd_bwd_ms_at_32: dict = field(default_factory=lambda: {"resnet18": 9.5, "resnet50": 33.8, "resnet50-bf16": 27.6})
    teacher_forward_fraction: float = 1 / 3  # a forward is a third of forward + backward (assumption)
    peak_fp32_tflops: float = 67.0  # H100 SXM fp32 (non-tensor-core) peak, the loss's compute dtype
    loss_efficiency: float = 0.25  # fraction of that peak the tiled loss reaches (ASSUMPTION: no GPU figure yet)
    elementwise_flops_per_pair: float = 60.0  # exp, sqrt, relu, masks, ... counted as FLOPs (assumption)
    max_images_per_gpu: int = 512  # one micro-batch at 224 px on an 80+ GB GPU (assumption)

    def bandwidth(self, world: int) -> float:
        return (self.nvlink_gbs if world <= self.gpus_per_node else self.ib_gbs) * 1e9


def ring_seconds(call: Call, world: int, a: Assumptions) -> float:
    """Ring time: (W-1) steps of latency + bytes sent / link bandwidth (all_reduce: 2 (W-1) steps)."""
    steps = 2 * (world - 1) if call.op == "all_reduce" else world - 1
    return steps * a.step_latency_us * 1e-6 + call.sent(world) / a.bandwidth(world)


def loss_flops(rows: int, n: int, ds: int, dt: int, elementwise: float) -> float:
    """Tiled RC loss (used for the untiled path too, which recomputes less: an upper bound there), forward + backward, per rank: the (rows x n) pairs meet three student Gram products
    (pass 1, pass 2, backward), two teacher ones (pass 2, backward) and one gradient product (backward)."""
    return rows * n * (2 * 4 * ds + 2 * 2 * dt + elementwise)


def step_model(n: int, world: int, student: str, teacher: str, ds: int, dt: int, params: int,
               precision: str, a: Assumptions) -> dict[str, float]:
    rows = math.ceil(n / world)
    student_key = f"{student}-bf16" if precision == "bf16" and f"{student}-bf16" in a.fwd_bwd_ms_at_32 else student
    teacher_key = f"{teacher}-bf16" if precision == "bf16" and f"{teacher}-bf16" in a.fwd_bwd_ms_at_32 else teacher
    student_s = a.fwd_bwd_ms_at_32[student_key] / 32 * rows * 1e-3
    teacher_s = a.fwd_bwd_ms_at_32[teacher_key] / 32 * rows * 1e-3 * a.teacher_forward_fraction
    loss_s = loss_flops(rows, n, ds, dt, a.elementwise_flops_per_pair) / (a.peak_fp32_tflops * 1e12 * a.loss_efficiency)
    if world == 1:
        loss_comm = grad_comm = 0.0
    else:
        calls = loss_calls(even_counts(n, world), ds, dt, tiled=auto_tiled(n, world))
        loss_comm = sum(ring_seconds(c, world, a) for c in calls)
        grad_call = Call("gradients", "backward", "all_reduce", params, 2 if precision == "bf16" else 4)
        grad_comm = ring_seconds(grad_call, world, a)
    # The loss's collectives sit on the critical path (gather before the loss, statistics inside its
    # backward); the gradient reduction is counted in full (no overlap with the backward assumed).
    total = student_s + teacher_s + loss_s + loss_comm + grad_comm
    return dict(rows=rows, student=student_s, teacher=teacher_s, loss=loss_s, loss_comm=loss_comm,
                grad_comm=grad_comm, total=total)


def model_table(sizes: list[int], worlds: list[int], student: str, teacher: str, ds: int, dt: int,
                params: int, precision: str, a: Assumptions) -> None:
    print(f"## Step-time model: student {student} {ds}-d, teacher {teacher} {dt}-d (forward only), "
          f"{precision} backbones, fp32 loss\n")
    print(f"Assumptions: {a.nvlink_gbs:g} GB/s NVLink per GPU within {a.gpus_per_node}-GPU nodes, {a.ib_gbs:g} GB/s "
          f"(400 Gb/s InfiniBand) per GPU across nodes, {a.step_latency_us:g} us per ring step; backbone times "
          f"{a.fwd_bwd_ms_at_32} ms per 32 at 224 px (H100, shared notes) scaled linearly; teacher forward = "
          f"{a.teacher_forward_fraction:.3g} of its forward + backward; loss at {a.loss_efficiency:g} x "
          f"{a.peak_fp32_tflops:g} TFLOP/s fp32 (an ASSUMPTION: no GPU measurement of the loss exists), "
          f"{a.elementwise_flops_per_pair:g} FLOPs of elementwise work per pair; no overlap of communication with "
          f"compute; the loss's collectives are those of the path `chunk_size=None` takes. Rows per GPU above {a.max_images_per_gpu} do not fit one micro-batch (assumption): marked *.\n")
    print("| N | W | rows/GPU | student fwd+bwd | teacher fwd | loss compute | loss comm | grad all-reduce | "
          "step | loss share (compute + comm) | comm share |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n in sizes:
        for w in worlds:
            m = step_model(n, w, student, teacher, ds, dt, params, precision, a)
            share = (m["loss"] + m["loss_comm"]) / m["total"]
            comm = (m["loss_comm"] + m["grad_comm"]) / m["total"]
            mark = "*" if m["rows"] > a.max_images_per_gpu else ""
            print(f"| {n:,} | {w} | {m['rows']:,}{mark} | {fmt_s(m['student'])} | {fmt_s(m['teacher'])} | "
                  f"{fmt_s(m['loss'])} | {fmt_s(m['loss_comm'])} | {fmt_s(m['grad_comm'])} | {fmt_s(m['total'])} | "
                  f"{100 * share:.1f} % | {100 * comm:.2f} % |")
    print()


def fmt_s(seconds: float) -> str:
    return f"{seconds:.3g} s" if seconds >= 1 else f"{seconds * 1e3:.3g} ms"


# ----------------------------------------------------------------------------------------------------
# ZeRO


def zero_table(params: dict[str, int], worlds: list[int]) -> None:
    """Model states per rank (ZeRO paper accounting, AdamW): fp32 training 4 (weights) + 4 (grads) + 8 (m, v)
    bytes per parameter; bf16 mixed precision 2 + 2 + 12 (fp32 master, m, v)."""
    print("## ZeRO: model-state memory per rank and gradient traffic per step\n")
    print("Memory per rank with AdamW (ZeRO paper accounting; activations, the teacher and the loss's "
          "N x (D_s + D_t) gathered rows come on top). Traffic: bytes sent per rank per step.\n")
    print("| student | params | precision | W | ZeRO 0 | ZeRO 1 | ZeRO 2 | ZeRO 3 | traffic ZeRO 0-2 | traffic ZeRO 3 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, p in params.items():
        for precision, (w_b, g_b, o_b) in (("fp32", (4, 4, 8)), ("bf16", (2, 2, 12))):
            for w in worlds:
                z = [(w_b + g_b + o_b) * p, (w_b + g_b) * p + o_b * p / w, w_b * p + (g_b + o_b) * p / w,
                     (w_b + g_b + o_b) * p / w]
                print(f"| {name} | {p / 1e6:.2f} M | {precision} | {w} | " + " | ".join(human(x) for x in z)
                      + f" | {human(gradient_bytes(p, g_b, w, 2))} | {human(gradient_bytes(p, g_b, w, 3))} |")
    print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="measured-vs-formula check (gloo processes)")
    parser.add_argument("--bytes", action="store_true", help="bytes per rank at training sizes")
    parser.add_argument("--model", action="store_true", help="step-time model")
    parser.add_argument("--zero", action="store_true", help="ZeRO memory and traffic")
    parser.add_argument("--sizes", type=int, nargs="+", default=[16384, 65536, 262144, 1048576])
    parser.add_argument("--worlds", type=int, nargs="+", default=[8, 64, 256, 1024])
    parser.add_argument("--student", default="resnet18", choices=sorted(STUDENTS))
    parser.add_argument("--teacher", default="resnet50")
    parser.add_argument("--student-dim", type=int, default=128)
    parser.add_argument("--teacher-dim", type=int, default=512)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--loss-efficiency", type=float, default=Assumptions.loss_efficiency,
                        help="fraction of fp32 peak the loss reaches (an assumption until measured on a GPU)")
    parser.add_argument("--step-latency-us", type=float, default=Assumptions.step_latency_us,
                        help="latency per ring step (0: bandwidth terms only)")
    args = parser.parse_args(argv)
    everything = not (args.check or args.bytes or args.model or args.zero)
    ok = True
    if args.check or everything:
        ok = check()
    params = {name: parameter_count(name, dim) for name, dim in STUDENTS.items()}
    if args.bytes or everything:
        bytes_table(args.sizes, args.worlds, args.student_dim, args.teacher_dim, params)
    if args.model or everything:
        a = Assumptions(loss_efficiency=args.loss_efficiency, step_latency_us=args.step_latency_us)
        student_params = parameter_count(args.student, args.student_dim)
        model_table(args.sizes, args.worlds, args.student, args.teacher, args.student_dim, args.teacher_dim,
                    student_params, args.precision, a)
    if args.zero or everything:
        zero_table(params, args.worlds)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
