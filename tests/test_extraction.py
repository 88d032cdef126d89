"""Distributed extraction equals single-process extraction, padding duplicates and unequal parts included.

The model and inputs are small integers, so every float32 product and sum is exact and the
comparison can be bitwise whatever batch shapes the matrix products see on each rank.
"""

from __future__ import annotations

import torch
from torch import nn

from multiprocess import run_ranks
from rct_dist.eval import extract_embeddings

KEYS = [f"img/{i}" for i in range(10)] + ["α-long-key/0011", "b"]  # varied widths, non-ASCII


def make_model() -> nn.Linear:
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.copy_(torch.randint(-3, 4, (3, 4), generator=g))
        model.bias.copy_(torch.randint(-3, 4, (3,), generator=g))
    return model


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(-5, 6, (len(KEYS), 4), generator=g).float(), torch.randint(0, 3, (len(KEYS),), generator=g)


def batches(order: list[int], size: int):
    images, labels = make_data()
    for s in range(0, len(order), size):
        part = order[s : s + size]
        yield images[part], labels[part], [KEYS[i] for i in part]


# rank 0: 7 samples; rank 1: 5 samples plus padding duplicates of rank 0's samples 0 and 3.
SHARES = [[6, 0, 2, 3, 11, 1, 9], [5, 4, 10, 8, 7, 0, 3]]


def extract_rank(rank: int, world: int) -> list:
    model = make_model()
    split = extract_embeddings(model, batches(SHARES[rank], 3))
    lopsided = extract_embeddings(model, batches(list(range(len(KEYS))), 5) if rank == 0 else iter(()))
    return [split, lopsided, model.training]


def test_two_ranks_equal_single_process():
    model = make_model()
    expected = extract_embeddings(model, batches(list(reversed(range(len(KEYS)))), 4))
    assert expected[2] == sorted(KEYS)
    images, labels = make_data()
    order = [KEYS.index(k) for k in expected[2]]
    assert torch.equal(expected[0], model(images[order]).detach())
    assert torch.equal(expected[1], labels[order])
    assert model.training  # eval mode only during extraction
    for split, lopsided, training in run_ranks(extract_rank, 2):
        for got in (split, lopsided):
            assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
            assert got[2] == expected[2]
        assert training
