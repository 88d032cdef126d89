"""The fused Triton kernels (`kernel="triton"`) equal the torch path (value, parts, gradient), alone
and across gloo ranks, and fail clearly where they cannot run.

The kernels run on CPU tensors in Triton's interpreter, which needs TRITON_INTERPRET=1 set before
Triton is first imported in the process (Triton builds its own library functions then) and while
the kernels run. This module sets it at import. When Triton was already imported without it (other
test modules' imports can pull it in during collection of the whole suite), the kernel tests are
skipped here and `test_in_a_fresh_process` runs this file in a fresh pytest process instead.
Sizes are small and blocks 16 wide: the interpreter runs every block op in numpy.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

_FRESH = "triton" not in sys.modules
_OLD_FLAG = os.environ.get("TRITON_INTERPRET")
if _FRESH:
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton's first import in this process (and in spawned ranks)

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton", reason="the fused RC kernels need the triton package")

from loss_inputs import inputs as shared_inputs, loss_parts_grad  # noqa: E402
from multiprocess import run_ranks  # noqa: E402
from rct_dist.losses import RelaxedContrastiveLoss  # noqa: E402

INTERPRETER = not isinstance(triton.language.sum, triton.runtime.JITFunction)  # Triton built for its interpreter
if INTERPRETER:
    os.environ["TRITON_INTERPRET"] = "1"
    from rct_dist.losses import fused

    if not fused.INTERPRETED:  # imported while the flag was unset: build its kernels again
        fused = importlib.reload(fused)
else:  # Triton was imported without the interpreter: leave the process as it was
    if _OLD_FLAG is None:
        os.environ.pop("TRITON_INTERPRET", None)
    fused = None

BLOCK = 16


@pytest.fixture(autouse=True)
def interpreted_kernels(request, monkeypatch):
    """Blocks of 16; without the interpreter in this process, only test_in_a_fresh_process runs."""
    if fused is not None:
        monkeypatch.setattr(fused, "BLOCK", BLOCK)
    elif request.node.originalname != "test_in_a_fresh_process":
        pytest.skip("Triton was imported without TRITON_INTERPRET=1: test_in_a_fresh_process runs this")


def test_in_a_fresh_process():
    """The kernel tests, in a pytest process where this module imports Triton first."""
    if INTERPRETER:
        pytest.skip("the kernel tests run in this process")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).resolve())],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert " passed, 1 skipped" in summary, done.stdout[-3000:]  # only this test is skipped there


def inputs(n: int, ds: int = 6, dt: int = 10, dtype: torch.dtype = torch.float32, duplicates: bool = False):
    return shared_inputs(n, ds, dt, dtype=dtype, duplicates=duplicates)


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def assert_same(result, reference, rtol: float) -> None:
    (loss, parts, grad), (loss0, parts0, grad0) = result, reference
    for name, got, ref in (
        ("loss", loss, loss0), ("pull", parts["pull"], parts0["pull"]), ("push", parts["push"], parts0["push"]),
        ("grad", grad, grad0),
    ):
        err = relative_error(got, ref)
        assert err <= rtol, f"{name}: relative error {err:.3g} > {rtol}"


def test_kernels_run_in_the_interpreter():
    assert fused.INTERPRETED and fused.unavailable_reason(torch.device("cpu")) is None


@pytest.mark.parametrize(
    "n,ds,dtype,rtol,kwargs",
    [
        (37, 6, torch.float32, 1e-5, {}),  # N not a multiple of the block, D not a power of two
        (37, 6, torch.float64, 1e-10, {"sigma": 0.7, "delta": 1.3}),
        (9, 20, torch.float32, 1e-5, {"sigma": 0.5, "delta": 1.3, "reduction": "mean_pairs"}),  # N < block
        (48, 5, torch.float64, 1e-10, {"normalize_student": True}),  # N a multiple of the block
        (70, 24, torch.float32, 1e-5, {"sigma": 2.0, "delta": 0.8}),
    ],
    ids=["n37-f32", "n37-f64", "n9-mean-pairs-f32", "n48-normalized-f64", "n70-d24-f32"],
)
def test_fused_equals_torch(n, ds, dtype, rtol, kwargs):
    s, t = inputs(n, ds=ds, dtype=dtype)
    got = loss_parts_grad(s, t, kernel="triton", **kwargs)
    assert_same(got, loss_parts_grad(s, t, kernel="torch", chunk_size=0, **kwargs), rtol)  # untiled
    assert_same(got, loss_parts_grad(s, t, kernel="torch", chunk_size=8, **kwargs), rtol)  # tiled


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-7), (torch.float32, 1e-3)])
def test_fused_equals_torch_with_duplicate_rows(dtype, rtol):
    """Zero distances: no NaN, a finite gradient; as in test_tiled_loss, the Gram-form noise of
    identical rows differs between summation orders, so the paths agree to that level."""
    s, t = inputs(37, dtype=dtype, duplicates=True)
    got = loss_parts_grad(s, t, kernel="triton")
    assert all(torch.isfinite(x).all() for x in (got[0], got[2]))
    assert_same(got, loss_parts_grad(s, t, kernel="torch", chunk_size=0), rtol)


def test_fused_equals_torch_with_a_collapsed_student_and_huge_offset():
    _, t = inputs(20, dtype=torch.float64)
    collapsed = torch.ones(20, 4, dtype=torch.float64)
    collapsed[:10] += 1.0  # two clusters: half of all distances are zero
    assert_same(loss_parts_grad(collapsed, t, kernel="triton"), loss_parts_grad(collapsed, t, chunk_size=0), 1e-10)
    s, t = inputs(40)
    far = 1e4 + 1e-2 * s  # fp32: only the centring keeps these distances
    assert_same(loss_parts_grad(far, t, kernel="triton"), loss_parts_grad(far, t, chunk_size=0), 1e-5)


def test_half_inputs_and_nothing_of_b_by_n_kept():
    s, t = inputs(40, ds=8, dt=8)
    x = s.bfloat16().requires_grad_(True)
    sizes = [0]

    def pack(y: torch.Tensor) -> torch.Tensor:
        sizes.append(y.numel())
        return y

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda y: y):
        loss = RelaxedContrastiveLoss(kernel="triton")(x, t.bfloat16())
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    assert max(sizes) == 40 * 8  # the (centred) embeddings, nothing of N x N
    reference = RelaxedContrastiveLoss(kernel="torch", chunk_size=0)(x.detach(), t.bfloat16())
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=0)


def test_automatic_choice_stays_on_torch(monkeypatch):
    """"auto" runs torch ops everywhere until a GPU measurement shows the kernels equal and faster."""
    loss = RelaxedContrastiveLoss()
    assert loss.kernel == "auto" and loss.precision == "ieee"
    cuda32 = SimpleNamespace(is_cuda=True, dtype=torch.float32)
    assert loss._fused(cuda32, 1024) is None and loss._fused(cuda32, 0) is None
    assert RelaxedContrastiveLoss(kernel="torch")._fused(cuda32, 1024) is None
    assert RelaxedContrastiveLoss(kernel="triton")._fused(cuda32, 1024) is fused

    def refuse(*args):
        raise AssertionError("the fused kernels ran")

    monkeypatch.setattr(fused, "fused_row_sums", refuse)
    s, t = inputs(12)
    assert torch.isfinite(RelaxedContrastiveLoss(chunk_size=4)(s, t))


def float64_rc(s: torch.Tensor, t: torch.Tensor, sigma: float = 1.0, delta: float = 1.0):
    """The RC loss and its gradient in float64 from differences (no Gram form), written out here."""
    s = s.double().clone().requires_grad_(True)
    t = t.double()
    t = t / t.norm(dim=1, keepdim=True)
    n = s.shape[0]
    sq = (s[:, None, :] - s[None, :, :]).square().sum(-1)
    dist = torch.where(sq > 0, torch.where(sq > 0, sq, 1.0).sqrt(), 0.0)  # gradient 0 at zero distance
    d = dist / dist.mean(1, keepdim=True)
    w = torch.exp(-(t[:, None, :] - t[None, :, :]).square().sum(-1) / sigma)
    off = 1.0 - torch.eye(n, dtype=torch.float64)
    loss = ((w * d.square() + (1 - w) * torch.relu(delta - d).square()) * off).sum() / n
    (grad,) = torch.autograd.grad(loss, s)
    return loss.detach(), grad


def duplicated(n: int, ds: int, copies=((1, 4),)) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded fp32 student/teacher with exact duplicate student rows (row a copied to row b); the
    offset of 3 makes the centred rows inexact, so the Gram form's noise at zero distance shows."""
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(n, ds, generator=g) + 3.0, torch.randn(n, 10, generator=g)
    for a, b in copies:
        s[b] = s[a]
    return s, t


EXACT_CASES = {  # n, student size, duplicated rows
    "n5-dup": (5, 6, ((1, 4),)),
    "n37-d33-dups": (37, 33, ((3, 35), (5, 35), (0, 20))),
    "n129-d40-dup": (129, 40, ((7, 128),)),
}


@pytest.mark.parametrize("case", sorted(EXACT_CASES))
def test_ieee_mode_within_1e5_of_float64_with_duplicate_rows(case):
    """Exact duplicates: the Gram form alone is 3e-4 (value) and 8e-4 (gradient) off at n = 5 here
    (1e-5 and 7e-5 at n = 37); the recomputation of near pairs from differences brings both within
    1e-5 of float64."""
    s, t = duplicated(*EXACT_CASES[case])
    value, grad = float64_rc(s, t, sigma=0.7, delta=1.2)
    got = loss_parts_grad(s, t, kernel="triton", precision="ieee", sigma=0.7, delta=1.2)
    assert relative_error(got[0], value) <= 1e-5 and relative_error(got[2], grad) <= 1e-5, (
        relative_error(got[0], value), relative_error(got[2], grad))


# Measured in the interpreter (operands rounded as on the GPU, products exact, fp32 sums): value,
# gradient relative errors against float64 on these three batches (largest): tf32 2.0e-4, 9.0e-4;
# bf16 4.0e-4, 8.7e-3 (n = 5 has the largest value error: few pairs to average the rounding).
LOW_PRECISION_TOLERANCE = {"tf32": (1e-3, 3e-3), "bf16": (1e-2, 3e-2)}


@pytest.mark.parametrize("precision", sorted(LOW_PRECISION_TOLERANCE))
def test_low_precision_modes_within_their_documented_tolerance(precision):
    value_tol, grad_tol = LOW_PRECISION_TOLERANCE[precision]
    errors = []
    for case in sorted(EXACT_CASES):
        s, t = duplicated(*EXACT_CASES[case])
        value, grad = float64_rc(s, t)
        got = loss_parts_grad(s, t, kernel="triton", precision=precision)
        errors.append((relative_error(got[0], value), relative_error(got[2], grad)))
    assert all(v <= value_tol and g <= grad_tol for v, g in errors), errors
    # and they are really lower precision: the errors exceed the IEEE mode's by far
    assert max(g for _, g in errors) > 1e-4, errors


def test_32_bit_offsets_are_guarded_before_launch():
    """N x D beyond 2^31 - 1 is refused with the sizes named, before any copy or launch (the
    stride-0 inputs below take no memory)."""
    n, d = 2**31 // 512 + 1, 512
    s = torch.zeros(1, d).expand(n, d)
    t = torch.zeros(1, 8).expand(n, 8)
    from rct_dist.losses.tiled import TileSetup

    setup = TileSetup(1.0, 1.0, 1e-12, n, 0, False, 0)
    with pytest.raises(ValueError, match=f"N = {n} rows x student embedding size D 512.*32-bit|32-bit.*N = {n}"):
        fused.fused_row_sums(s, s, t, t, setup)
    with pytest.raises(ValueError, match="teacher embedding size 4096"):
        fused.check_sizes(2**19, 64, 4096)
    fused.check_sizes(2**21, 512, 512)  # 2^30 + padding: fits


def test_bad_precision_is_refused():
    with pytest.raises(ValueError, match="precision must be one of"):
        RelaxedContrastiveLoss(kernel="triton", precision="fp8")
    with pytest.raises(ValueError, match="precision must be one of"):
        fused.kernel_configs(64, 64, "half")


def test_bad_kernel_arguments(monkeypatch):
    with pytest.raises(ValueError, match="kernel must be one of"):
        RelaxedContrastiveLoss(kernel="cuda")
    with pytest.raises(ValueError, match='chunk_size=0 .*kernel="torch"'):
        RelaxedContrastiveLoss(kernel="triton", chunk_size=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match='needs a CUDA device.*use kernel="torch"'):
        RelaxedContrastiveLoss(kernel="triton")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real_find_spec(name, *a)
    )
    with pytest.raises(RuntimeError, match='triton package, which is not installed; use kernel="torch"'):
        RelaxedContrastiveLoss(kernel="triton")


def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    loss = RelaxedContrastiveLoss(kernel="triton")
    monkeypatch.setattr(fused, "INTERPRETED", False)  # as if imported without TRITON_INTERPRET
    s, t = inputs(10)
    with pytest.raises(RuntimeError, match='need CUDA tensors.*use kernel="torch"'):
        loss(s, t)


BAD_INPUTS = {
    "nan": lambda s, t: (s.index_fill(0, torch.tensor([2]), float("nan")), t),
    "shape": lambda s, t: (s[:, 0], t),
    "rows": lambda s, t: (s, t[:-1]),
    "int": lambda s, t: (s.long(), t),
    "zero_teacher": lambda s, t: (s, t.index_fill(0, torch.tensor([1]), 0.0)),
}


def error_message(loss: RelaxedContrastiveLoss, student, teacher) -> str:
    try:
        loss(student, teacher)
    except ValueError as e:
        return str(e)
    return "no error"


@pytest.mark.parametrize("bad", sorted(BAD_INPUTS))
def test_bad_input_same_error_as_torch(bad, monkeypatch):
    def refuse(*args):
        raise AssertionError("the kernels ran on bad input")

    monkeypatch.setattr(fused, "fused_row_sums", refuse)
    s, t = BAD_INPUTS[bad](*inputs(10))
    message = error_message(RelaxedContrastiveLoss(kernel="triton"), s, t)
    assert message != "no error" and message == error_message(RelaxedContrastiveLoss(kernel="torch"), s, t)


def fused_rank(rank: int, world: int, counts: list[int], dtype: torch.dtype, kwargs: dict, bad_rank: int) -> dict:
    """This rank's slice of one global batch: the loss, parts and gradient of the fused kernels, and
    the error every rank raises when `bad_rank`'s slice holds a NaN."""
    fused.BLOCK = BLOCK
    s, t = inputs(sum(counts), dtype=dtype)
    start = sum(counts[:rank])
    rows = slice(start, start + counts[rank])
    loss_fn = RelaxedContrastiveLoss(kernel="triton", **kwargs)
    bad = s[rows].clone()
    if rank == bad_rank:
        bad[0] = float("nan")
    message = error_message(loss_fn, bad, t[rows])
    x = s[rows].clone().requires_grad_(True)
    loss, parts = loss_fn(x, t[rows], return_parts=True)
    loss.backward()
    return {"loss": loss.detach(), "pull": parts["pull"], "push": parts["push"], "grad": x.grad, "error": message}


@pytest.mark.parametrize(
    "counts,dtype,rtol,kwargs",
    [
        ([23, 17], torch.float32, 1e-5, {}),
        ([20, 0, 13], torch.float64, 1e-10, {"sigma": 0.5, "delta": 1.2, "reduction": "mean_pairs"}),
    ],
    ids=["w2-unequal-f32", "w3-empty-rank-f64"],
)
def test_ranks_match_single_process_torch(counts, dtype, rtol, kwargs):
    """Each rank's loss and parts are the global ones; its gradient is world x that of its rows in
    the global loss (the engines average over ranks); a NaN on one rank raises on every rank."""
    s, t = inputs(sum(counts), dtype=dtype)
    reference = loss_parts_grad(s, t, kernel="torch", chunk_size=0, **kwargs)
    world = len(counts)
    results = run_ranks(fused_rank, world, counts, dtype, kwargs, 0)
    grads = torch.cat([r["grad"] for r in results]) / world
    for r in results:
        assert_same((r["loss"], r, grads), reference, rtol)
        assert "student contains NaN or Inf" in r["error"], r["error"]
