"""Retrieval metrics against brute-force float64 references (loops), with duplicates and exact ties.

The references order neighbours by (distance, index) and skip the query by index: the documented tie
rule of `rct_dist.eval.neighbours`. Tie data is built so float32 distances are exact (small integers,
64 items so the centring in pairwise.py is a dyadic shift; power-of-two scalings for cosine), so the
ties the references see are the ties the code sees.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types

import numpy as np
import pytest
import torch

from rct_dist.eval import evaluate, map_at_r, nmi, recall_at_k


def brute_neighbours(x: torch.Tensor, i: int) -> list[int]:
    """All other items, nearest first, ties by index."""
    d = ((x.double() - x[i].double()) ** 2).sum(1).tolist()
    return sorted((j for j in range(len(x)) if j != i), key=lambda j: (d[j], j))


def brute_recall(x: torch.Tensor, y: torch.Tensor, k: int) -> float:
    hits = 0
    for i in range(len(x)):
        hits += any(y[j] == y[i] for j in brute_neighbours(x, i)[:k])
    return hits / len(x)


def brute_map_at_r(x: torch.Tensor, y: torch.Tensor) -> float:
    scores = []
    for i in range(len(x)):
        r = int((y == y[i]).sum()) - 1
        if r == 0:
            continue
        correct, ap = 0, 0.0
        for rank, j in enumerate(brute_neighbours(x, i)[:r], start=1):
            if y[j] == y[i]:
                correct += 1
                ap += correct / rank
        scores.append(ap / r)
    return sum(scores) / len(scores)


def random_set(n: int = 60, dim: int = 5, classes: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g), torch.randint(0, classes, (n,), generator=g)


def tied_set(seed: int = 0):
    """64 points on a small integer grid: many duplicates and many equal distances."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 3, (64, 3), generator=g).float(), torch.randint(0, 5, (64,), generator=g)


KS = (1, 2, 4, 8)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1024])
def test_matches_brute_force(chunk_size):
    x, y = random_set()
    got = recall_at_k(x, y, ks=KS, chunk_size=chunk_size)
    assert got == pytest.approx({k: brute_recall(x, y, k) for k in KS}, abs=1e-12)
    assert 0 < got[1] < got[8] < 1
    assert map_at_r(x, y, chunk_size=chunk_size) == pytest.approx(brute_map_at_r(x, y), abs=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_ties_follow_the_index_rule(chunk_size):
    x, y = tied_set()
    d = torch.cdist(x.double(), x.double())
    assert (d[~torch.eye(64, dtype=torch.bool)] == 0).sum() > 10  # duplicates present
    expected = {k: brute_recall(x, y, k) for k in KS}
    assert recall_at_k(x, y, ks=KS, chunk_size=chunk_size) == pytest.approx(expected, abs=1e-12)
    assert map_at_r(x, y, chunk_size=chunk_size) == pytest.approx(brute_map_at_r(x, y), abs=1e-12)


def test_chunked_equals_unchunked():
    x, y = random_set(n=200, dim=8, classes=10, seed=3)
    whole = evaluate(x, y, ks=KS, chunk_size=200, with_nmi=False)
    for chunk_size in (1, 3, 50, 199):
        got = evaluate(x, y, ks=KS, chunk_size=chunk_size, with_nmi=False)
        assert got["recall"] == whole["recall"]  # same neighbours; only the MAP sum's order differs
        assert got["map_at_r"] == pytest.approx(whole["map_at_r"], rel=1e-12)


def test_duplicates_of_the_query_are_neighbours():
    """Two identical items of the same class find each other; excluding the query by dropping the
    first neighbour would drop the duplicate instead and miss it."""
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [5.0, 5.0], [5.0, 5.1]])
    y = torch.tensor([0, 0, 1, 2])
    assert recall_at_k(x, y, ks=(1,)) == {1: 0.5}


def test_map_at_r_by_hand():
    """Points 0, 1, 3, 4, 6 (A B A A B) and a far singleton C.
    Query 0 (R=2): B, A -> (1/2)/2.  Query 2: A, B -> 1/2.  Query 3: A, B -> 1/2.  Queries 1 and 4
    (R=1) miss.  The singleton has no R and is left out: (1/4 + 1/2 + 1/2) / 5."""
    x = torch.tensor([[0.0], [1.0], [3.0], [4.0], [6.0], [100.0]])
    y = torch.tensor([0, 1, 0, 0, 1, 2])
    assert map_at_r(x, y) == pytest.approx(0.25)
    assert recall_at_k(x, y, ks=(1,)) == pytest.approx({1: 2 / 6})


def test_map_at_r_tie_goes_to_lower_index():
    """Three identical points A B A: query 0 sees 1 (B) before 2 (A), query 2 sees 0 (A) first."""
    x = torch.zeros(3, 2)
    assert map_at_r(x, torch.tensor([0, 1, 0])) == pytest.approx(0.5)


def test_cosine_ignores_norms_and_ties_scaled_copies():
    x, y = random_set(n=40, dim=4, classes=4, seed=1)
    x = torch.cat([x, x[:10] * 4, x[5:15] / 2])  # power-of-two copies: exactly tied directions
    y = torch.cat([y, torch.randint(0, 4, (20,), generator=torch.Generator().manual_seed(2))])
    unit = torch.nn.functional.normalize(x.double(), dim=1)
    got = evaluate(x, y, ks=KS, metric="cosine", with_nmi=False)
    assert got["recall"] == pytest.approx({k: brute_recall(unit, y, k) for k in KS}, abs=1e-12)
    assert got["map_at_r"] == pytest.approx(brute_map_at_r(unit, y), abs=1e-12)
    g = torch.Generator().manual_seed(4)
    scaled = x * 2.0 ** torch.randint(-3, 4, (len(x), 1), generator=g)  # keeps the exact ties exact
    assert recall_at_k(scaled, y, metric="cosine") == pytest.approx(got["recall"], abs=1e-12)


def test_sop_style_ks():
    x, y = random_set(n=1200, dim=8, classes=300, seed=5)
    got = recall_at_k(x, y, ks=(1, 10, 100, 1000), chunk_size=256)
    xd = x.double()
    hits = dict.fromkeys((1, 10, 100, 1000), 0)
    for i in range(len(x)):  # vectorised per query: 1200 python-sorted rows would be slow
        d = ((xd - xd[i]) ** 2).sum(1).numpy()
        order = np.lexsort((np.arange(len(x)), d))
        order = order[order != i]
        same = (y[order] == y[i]).numpy()
        for k in hits:
            hits[k] += bool(same[:k].any())
    ref = {k: h / len(x) for k, h in hits.items()}
    assert got == pytest.approx(ref, abs=1e-12)
    assert got[1000] > got[100] > got[10] > got[1]


def test_evaluate_matches_the_single_metrics():
    x, y = random_set(n=80, dim=6, classes=4, seed=6)
    got = evaluate(x, y, ks=KS)
    assert got["recall"] == recall_at_k(x, y, ks=KS)
    assert got["map_at_r"] == pytest.approx(map_at_r(x, y), abs=1e-12)
    assert got["nmi"] == nmi(x, y)


def test_nmi_perfect_clustering_is_one():
    g = torch.Generator().manual_seed(7)
    y = torch.arange(4).repeat_interleave(10)
    x = torch.eye(4)[y] * 100 + torch.randn(40, 4, generator=g)
    assert nmi(x, y) == pytest.approx(1.0)
    assert nmi(x, y[torch.randperm(40, generator=g)]) < 0.5


class _FakeFlatL2:
    """Exact L2 search that returns ties in *descending* index order, so the query is often not the
    first hit: the faiss path must drop it by index and restore the (distance, index) order."""

    searches = 0

    def __init__(self, dim: int):
        self.x = np.zeros((0, dim), dtype=np.float32)

    def add(self, x: np.ndarray) -> None:
        self.x = np.concatenate([self.x, x])

    def search(self, q: np.ndarray, k: int):
        _FakeFlatL2.searches += 1
        d = ((q[:, None, :].astype(np.float64) - self.x[None]) ** 2).sum(2)
        idx = np.stack([np.lexsort((-np.arange(len(self.x)), row))[:k] for row in d])
        return np.take_along_axis(d, idx, 1).astype(np.float32), idx


def test_faiss_path_excludes_the_query_by_index(monkeypatch):
    fake = types.ModuleType("faiss")
    fake.__spec__ = importlib.machinery.ModuleSpec("faiss", None)
    fake.IndexFlatL2 = _FakeFlatL2
    monkeypatch.setitem(sys.modules, "faiss", fake)
    x, y = random_set(n=50, dim=4, classes=5, seed=8)
    x, y = torch.cat([x, x[:10]]), torch.cat([y, y[:10]])  # duplicates: tied with the query at 0
    for metric in ("euclidean", "cosine"):
        ref = evaluate(x, y, ks=KS, metric=metric, backend="torch", with_nmi=False)
        got = evaluate(x, y, ks=KS, metric=metric, chunk_size=16, with_nmi=False)  # auto picks faiss
        assert got["recall"] == pytest.approx(ref["recall"], abs=1e-12)
        assert got["map_at_r"] == pytest.approx(ref["map_at_r"], abs=1e-12)
    assert _FakeFlatL2.searches > 0


def test_faiss_backend_must_be_installed(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="faiss is not installed"):
        recall_at_k(*random_set(), backend="faiss")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_tensors_match_cpu():
    x, y = random_set(n=300, dim=16, classes=20, seed=9)
    cpu = evaluate(x, y, ks=KS, backend="torch", with_nmi=False)
    gpu = evaluate(x.cuda(), y.cuda(), ks=KS, chunk_size=64, with_nmi=False)
    assert gpu["recall"] == pytest.approx(cpu["recall"], abs=1e-12)
    assert gpu["map_at_r"] == pytest.approx(cpu["map_at_r"], abs=1e-12)


@pytest.mark.parametrize(
    "kwargs,message",
    [({"ks": (0,)}, "every k must be in"), ({"ks": (10,)}, "every k must be in"),
     ({"metric": "dot"}, "metric must be"), ({"labels": torch.zeros(3, dtype=torch.int64)}, "need \\(n, dim\\)"),
     ({"embeddings": torch.randn(10)}, "need \\(n, dim\\)"),
     ({"embeddings": torch.randn(10, 3).index_fill(0, torch.tensor([4]), float("nan"))}, "NaN"),
     ({"labels": torch.zeros(10)}, "integer labels"), ({"chunk_size": 0}, "chunk_size"),
     ({"backend": "annoy"}, "backend must be")],
)
def test_bad_input_is_named(kwargs, message):
    args = {"embeddings": torch.randn(10, 3), "labels": torch.zeros(10, dtype=torch.int64), **kwargs}
    with pytest.raises(ValueError, match=message):
        recall_at_k(**args)


def test_map_at_r_needs_a_class_with_two_items():
    with pytest.raises(ValueError, match="at least one class"):
        map_at_r(torch.randn(5, 2), torch.arange(5))
