"""Time and peak memory of one forward + backward of the RC loss: naive, row-sharded core, tiled, triton.

- naive: the loss written the way the official code does it: full N x N Gram distances, an N x N
  identity mask, every intermediate an N x N matrix kept by autograd;
- core:  `RelaxedContrastiveLoss(chunk_size=0)`, the row-sharded loss on one process (B = N);
- tiled: `RelaxedContrastiveLoss(chunk_size=tile)`, nothing of size B x N kept;
- triton: `RelaxedContrastiveLoss(kernel="triton")`, the fused Triton kernels (CUDA only: skipped on
  CPU, where they run only in Triton's much slower interpreter).

Each (method, N) runs in its own subprocess, so the peak belongs to that run alone. On CPU the peak is
the max-RSS high-water mark (getrusage; torch's CPU allocations are invisible to tracemalloc) minus
the RSS before the measured calls, after the inputs exist and a small warm-up call ran; on CUDA it is
torch.cuda.max_memory_allocated minus the memory allocated before the call. Ratios are against the
naive loss measured in the same run; a run that fails (out of memory) is reported as such. Time is
the best of `--repeats` calls; `--threads` sets torch's CPU threads (1 gives stable timings on a
machine shared with other jobs, where a busy core stalls every multi-threaded op).

    python bench/loss.py --threads 1                      # CPU: N = 1k .. 16k, dim 128
    python bench/loss.py --device cuda --sizes 8192 32768 131072 524288 1048576 --tile 8192
    python bench/loss.py --device cuda --sizes 8192 32768 131072 --methods core tiled triton
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

METHODS = ("naive", "core", "tiled", "triton")


def naive_rc(student, teacher, sigma: float = 1.0, delta: float = 1.0):
    """The official `Relaxed_Contra` layout: dense N x N distances and masks (for comparison only)."""
    import torch
    import torch.nn.functional as F

    def pdist(e):
        sq = e.pow(2).sum(1)
        res = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=1e-12).sqrt().clone()
        res[range(len(e)), range(len(e))] = 0
        return res

    n = len(student)
    dist_mask = torch.ones(n, n, device=student.device) - torch.eye(n, device=student.device)
    with torch.no_grad():
        w = torch.exp(-pdist(F.normalize(teacher, p=2, dim=1)).pow(2) / sigma)
        pos_weight, neg_weight = w * dist_mask, (1 - w) * dist_mask
    dist = pdist(student)
    dist = dist / dist.mean(1, keepdim=True)
    pull = (dist.pow(2) * pos_weight).sum()
    push = (torch.relu(delta - dist).pow(2) * neg_weight).sum()
    return (pull + push) / n


def _loss_fn(method: str, tile: int):
    from rct_dist.losses import RelaxedContrastiveLoss

    if method == "triton":
        return RelaxedContrastiveLoss(kernel="triton")
    if method == "naive":
        return naive_rc
    return RelaxedContrastiveLoss(chunk_size=0 if method == "core" else tile, kernel="torch")  # torch, on CUDA too


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def worker(method: str, n: int, dim: int, device: str, tile: int, threads: int, repeats: int) -> dict:
    """Measured forward + backward calls; runs in a fresh process."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    loss_fn = _loss_fn(method, tile)
    g = torch.Generator().manual_seed(0)
    student = torch.randn(n, dim, generator=g).to(device).requires_grad_(True)
    teacher = torch.randn(n, dim, generator=g).to(device)
    loss_fn(student[:64], teacher[:64]).backward()  # warm-up: kernels, thread pools, lazy imports
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _max_rss_mib()
    seconds = []
    for _ in range(repeats):
        student.grad = None
        start = time.perf_counter()
        loss = loss_fn(student, teacher)
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    extra = (torch.cuda.max_memory_allocated() - before) / 2**20 if cuda else _max_rss_mib() - before
    return {"seconds": min(seconds), "extra_mib": extra, "loss": loss.item(), "grad_norm": student.grad.norm().item()}


def measure(method: str, n: int, args: argparse.Namespace) -> dict | None:
    settings = (method, n, args.dim, args.device, args.tile, args.threads, args.repeats)
    cmd = [sys.executable, __file__, "--worker", *map(str, settings)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--dim", type=int, default=128, help="student and teacher embedding size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tile", type=int, default=1024, help="tile edge of the tiled loss")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per run; the best counts")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = parser.parse_args()
    if "triton" in args.methods and not args.device.startswith("cuda"):
        print(f"method triton skipped: the fused Triton kernels need --device cuda, not {args.device}")
        args.methods = [m for m in args.methods if m != "triton"]
    print(f"{'N':>8} {'method':>6} {'seconds':>8} {'peak MiB':>9} {'time x':>7} {'memory x':>9}")
    for n in args.sizes:
        rows = {m: measure(m, n, args) for m in args.methods}
        base = rows.get("naive")
        for exact in ("tiled", "triton"):  # same loss, same distances: equal to rounding
            if rows.get("core") and rows.get(exact):
                assert abs(rows[exact]["loss"] - rows["core"]["loss"]) <= 1e-5 * rows["core"]["loss"], rows
        for method, row in rows.items():
            if row is None:
                print(f"{n:>8} {method:>6} {'failed (out of memory?)':>26}")
                continue
            ratios = (
                f"{row['seconds'] / base['seconds']:>7.2f} {row['extra_mib'] / max(base['extra_mib'], 1):>9.3f}"
                if base else f"{'n/a':>7} {'n/a':>9}"
            )
            print(f"{n:>8} {method:>6} {row['seconds']:>8.2f} {row['extra_mib']:>9.0f} {ratios}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        method, n, dim, device, tile, threads, repeats = sys.argv[2:9]
        print(json.dumps(worker(method, int(n), int(dim), device, int(tile), int(threads), int(repeats))))
    else:
        main()
