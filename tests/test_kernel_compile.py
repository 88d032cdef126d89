"""The fused RC kernels, as launched (`fused.kernel_configs`), compiled by Triton's real compiler and
its bundled ptxas for sm_80 and sm_90 (no GPU needed): no register spill, shared memory within the
target's limit, tensor-core instructions in the tf32/bf16 modes and none in the IEEE mode.

Student sizes D = 64 ... 1024 (teacher 512), every precision. The compiler runs in one child process
without TRITON_INTERPRET (the kernel tests set it in theirs), with a fresh Triton cache so that the
kernels really compile, two at a time; the results are cached for the module. Integer arguments D
and DT and all pointers are compiled as divisible by 16, as Triton specialises them at launch for
these sizes.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the fused RC kernels need the triton package")

ROOT = Path(__file__).resolve().parents[1]
ARCHS = (80, 90)
SIZES = (64, 128, 256, 512, 1024)
TEACHER = 512
PRECISIONS = ("ieee", "tf32", "bf16")
KERNELS = ("_row_sum_kernel", "_loss_kernel", "_grad_kernel")
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes a block may opt in to

COMPILE = textwrap.dedent(
    """
    import json, os, re, subprocess, sys, tempfile
    from concurrent.futures import ProcessPoolExecutor

    def one(job):
        arch, d, precision, name = job
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import get_ptxas
        from triton.compiler import ASTSource
        from rct_dist.losses import fused

        config = fused.kernel_configs(d, TEACHER, precision, arch=arch)[name]
        constexprs = config["constexprs"]
        fn = getattr(fused, name)
        operand = "*bf16" if precision == "bf16" else "*fp32"
        signature = {}
        for arg in fn.arg_names:
            if arg in constexprs:
                signature[arg] = "constexpr"
            elif arg in ("rows_ptr", "cols_ptr", "t_rows_ptr", "t_cols_ptr"):
                signature[arg] = operand
            else:
                signature[arg] = "*fp32" if arg.endswith("_ptr") else "i32"
        attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(fn.arg_names)
                 if signature[arg].startswith("*") or arg in ("D", "DT")}
        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": config["num_warps"], "num_stages": config["num_stages"]})
        ptx = kernel.asm["ptx"]
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "k.ptx")
            with open(path, "w") as f:
                f.write(ptx)
            gpu = "sm_90a" if arch == 90 else "sm_80"
            done = subprocess.run([get_ptxas(arch).path, "-v", "--gpu-name", gpu, path, "-o", path + ".o"],
                                  capture_output=True, text=True)
        info = done.stdout + done.stderr
        registers = re.search(r"Used (\\d+) registers", info)
        spills = re.findall(r"(\\d+) bytes spill stores, (\\d+) bytes spill loads", info)
        return {"arch": arch, "d": d, "precision": precision, "kernel": name, "rc": done.returncode,
                "registers": int(registers.group(1)) if registers else None,
                "spill_bytes": sum(int(a) + int(b) for a, b in spills) if spills else None,
                "shared": kernel.metadata.shared, "mma": ("mma.sync" in ptx) or ("wgmma" in ptx),
                "ptxas": info[-2000:]}

    TEACHER = int(sys.argv[1])
    jobs = json.loads(sys.argv[2])
    with ProcessPoolExecutor(2) as pool:
        print(json.dumps(list(pool.map(one, [tuple(j) for j in jobs]))))
    """
)


@functools.cache
def compiled() -> dict[tuple, dict]:
    """Every (arch, D, precision, kernel) compiled once: {key: registers, spill bytes, shared, ...}."""
    jobs = [(arch, d, precision, name) for arch in ARCHS for d in SIZES for precision in PRECISIONS for name in KERNELS]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with __import__("tempfile").TemporaryDirectory() as cache:
        env["TRITON_CACHE_DIR"] = cache
        done = subprocess.run([sys.executable, "-c", COMPILE, str(TEACHER), json.dumps(jobs)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=900)
    if done.returncode:
        reason = done.stderr[-3000:]
        if "ptxas" in reason and ("No such file" in reason or "not found" in reason):
            pytest.skip(f"Triton's bundled ptxas cannot run here: {reason[-300:]}")
        raise AssertionError(f"compiling the kernels failed:\n{reason}")
    return {(r["arch"], r["d"], r["precision"], r["kernel"]): r for r in json.loads(done.stdout.splitlines()[-1])}


def table(rows: list[dict]) -> str:
    return "\n".join(f"sm_{r['arch']} D={r['d']:<5} {r['precision']:<5} {r['kernel']:<16} regs {r['registers']} "
                     f"spill {r['spill_bytes']} B shared {r['shared']} B" for r in rows)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("arch", ARCHS)
def test_kernels_compile_without_spills(arch, precision):
    rows = [compiled()[(arch, d, precision, name)] for d in SIZES for name in KERNELS]
    print("\n" + table(rows))
    assert all(r["rc"] == 0 and r["registers"] is not None for r in rows), [r["ptxas"] for r in rows if r["rc"]]
    spilled = [r for r in rows if r["spill_bytes"] != 0]
    assert not spilled, "register spills:\n" + table(spilled)
    too_big = [r for r in rows if r["shared"] > SHARED_LIMIT[arch]]
    assert not too_big, f"shared memory above the sm_{arch} limit {SHARED_LIMIT[arch]} B:\n" + table(too_big)
    assert all(r["registers"] <= 255 for r in rows)
    # tensor cores exactly where asked: none in the IEEE mode, in every product of the others
    assert all(r["mma"] == (precision != "ieee") for r in rows), table([r for r in rows if r["mma"] == (precision == "ieee")])
