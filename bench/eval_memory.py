"""Time and peak memory of the chunked `evaluate` against the same search done as one full N x N block.

Each (method, N) runs in its own subprocess, so the max-RSS high-water mark (getrusage) belongs to
that run alone; "extra" is the peak minus the RSS just before the evaluation (after torch and the
embeddings are loaded), i.e. what the search itself needed. The full-matrix baseline is `evaluate`
with chunk_size=N: same code and results, only the (N, N) block differs, so the ratios isolate the
cost of chunking. Labels are SOP-like (about 5 items per class).

    python bench/eval_memory.py                  # N = 2k, 8k, 16k, dim 128
    python bench/eval_memory.py --sop            # adds N = 60,502, dim 512, ks 1/10/100/1000 (chunked
                                                 # only: the full matrix would need ~150 GB)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

SOP_N, SOP_DIM, SOP_KS = 60_502, 512, (1, 10, 100, 1000)


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def worker(method: str, n: int, dim: int, ks: list[int], chunk_size: int) -> dict:
    """One measured evaluation; runs in a fresh process."""
    import torch

    from rct_dist.eval import evaluate

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, dim, generator=g)
    y = torch.randint(0, max(n // 5, 1), (n,), generator=g)
    before = _max_rss_mib()
    start = time.perf_counter()
    chunk_size = n if method == "full" else chunk_size
    result = evaluate(x, y, ks=ks, chunk_size=chunk_size, backend="torch", with_nmi=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mib": _max_rss_mib(), "extra_mib": _max_rss_mib() - before, "result": result}


def measure(method: str, n: int, dim: int, ks: tuple[int, ...], chunk_size: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, str(n), str(dim), ",".join(map(str, ks)), str(chunk_size)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000, 16000])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--sop", action="store_true", help="also N=60,502, dim 512 (chunked only)")
    args = parser.parse_args()
    runs = [(n, args.dim, (1, 2, 4, 8), True) for n in args.sizes]
    if args.sop:
        runs.append((SOP_N, SOP_DIM, SOP_KS, False))
    header = ("N", 7), ("dim", 4), ("method", 8), ("seconds", 8), ("peak MiB", 9), ("extra MiB", 10)
    print(" ".join(f"{name:>{width}}" for name, width in header), f"{'time x':>7} {'extra x':>8}")
    for n, dim, ks, with_full in runs:
        full = measure("full", n, dim, ks, args.chunk_size) if with_full else None
        chunked = measure("chunked", n, dim, ks, args.chunk_size)
        if full is not None:
            same = full["result"]["recall"] == chunked["result"]["recall"]
            assert same and abs(full["result"]["map_at_r"] - chunked["result"]["map_at_r"]) < 1e-9, (full, chunked)
        for name, row in (("full", full), ("chunked", chunked)):
            if row is None:
                continue
            ratios = (
                f"{row['seconds'] / full['seconds']:>7.2f} {row['extra_mib'] / max(full['extra_mib'], 1):>8.3f}"
                if full else f"{'n/a':>7} {'n/a':>8}"
            )
            cells = f"{row['seconds']:>8.2f} {row['peak_mib']:>9.0f} {row['extra_mib']:>10.0f}"
            print(f"{n:>7} {dim:>4} {name:>8} {cells} {ratios}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        method, n, dim, ks, chunk_size = sys.argv[2:7]
        stats = worker(method, int(n), int(dim), [int(k) for k in ks.split(",")], int(chunk_size))
        print(json.dumps(stats))
    else:
        main()
