"""recall_at_k against a brute-force float64 computation, with duplicates and ties."""

from __future__ import annotations

import pytest
import torch

from rct_dist.eval import recall_at_k


def brute_recall(x: torch.Tensor, y: torch.Tensor, k: int) -> float:
    x = x.double()
    hits = 0
    for i in range(len(x)):
        d = ((x - x[i]) ** 2).sum(1)
        others = [j for j in range(len(x)) if j != i]
        order = sorted(others, key=lambda j: (d[j].item(), j))
        hits += any(y[j] == y[i] for j in order[:k])
    return hits / len(x)


@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_matches_brute_force(chunk_size):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, generator=g)
    y = torch.randint(0, 6, (60,), generator=g)
    got = recall_at_k(x, y, ks=(1, 2, 4, 8), chunk_size=chunk_size)
    expected = {k: brute_recall(x, y, k) for k in (1, 2, 4, 8)}
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0 < got[1] < got[8] < 1


def test_duplicates_of_the_query_are_neighbours():
    """Two identical items of the same class find each other; excluding the query by dropping the
    first neighbour would drop the duplicate instead and miss it."""
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [5.0, 5.0], [5.0, 5.1]])
    y = torch.tensor([0, 0, 1, 2])
    assert recall_at_k(x, y, ks=(1,)) == {1: 0.5}


def test_cosine_ignores_norms():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 4, generator=g)
    y = torch.randint(0, 4, (40,), generator=g)
    scaled = x * torch.rand(40, 1, generator=g).add(0.1) * 10
    assert recall_at_k(scaled, y, metric="cosine") == recall_at_k(x, y, metric="cosine")
    unit = torch.nn.functional.normalize(x, dim=1)
    assert recall_at_k(x, y, metric="cosine") == pytest.approx({k: brute_recall(unit, y, k) for k in (1, 2, 4, 8)})


@pytest.mark.parametrize(
    "kwargs,message",
    [({"ks": (0,)}, "every k must be in"), ({"ks": (10,)}, "every k must be in"),
     ({"metric": "dot"}, "metric must be"), ({"labels": torch.zeros(3, dtype=torch.int64)}, "need \\(n, dim\\)")],
)
def test_bad_input_is_named(kwargs, message):
    args = {"embeddings": torch.randn(10, 3), "labels": torch.zeros(10, dtype=torch.int64), **kwargs}
    with pytest.raises(ValueError, match=message):
        recall_at_k(**args)
