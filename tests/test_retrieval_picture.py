"""The retrieval picture: layout and frame colours, thumbnail un-normalisation, and the same picture
from 2 gloo ranks that each hold half of the images as from one process."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from multiprocess import run_ranks
from rct_dist.eval import extract_embeddings
from rct_dist.eval.retrieval_picture import (
    BACKGROUND,
    BORDER,
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    MATCH_COLOUR,
    MISMATCH_COLOUR,
    MISSING_COLOUR,
    QUERY_COLOUR,
    ThumbnailCache,
    retrieval_picture,
    tile_origin,
)

MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None]
STD = torch.tensor(IMAGENET_DEFAULT_STD)[:, None, None]


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> what the loader yields."""
    return (pixels.float() / 255 - MEAN) / STD


def solid_images(colours: list[tuple[int, int, int]], size: int) -> torch.Tensor:
    return torch.tensor(colours, dtype=torch.uint8)[:, :, None, None].repeat(1, 1, size, size)


def frame(picture: torch.Tensor, row: int, col: int, size: int) -> tuple[int, ...]:
    top, left = tile_origin(row, col, size)
    return tuple(picture[:, top, left].tolist())


def inner(picture: torch.Tensor, row: int, col: int, size: int) -> torch.Tensor:
    top, left = tile_origin(row, col, size)
    return picture[:, top + BORDER : top + BORDER + size, left + BORDER : left + BORDER + size]


# 6 items of 2 classes on a line; item 3 (class 1) is item 0's nearest neighbour.
POSITIONS = [0.0, 3.0, 4.0, 1.0, 10.0, 11.0]
LABELS = [0, 0, 0, 1, 1, 1]
COLOURS = [(10 * i + 5, 200 - 20 * i, 40 * i) for i in range(6)]
HAND_KEYS = [f"k{i}" for i in range(6)]


def hand_case(size: int = 8):
    embeddings = torch.tensor(POSITIONS)[:, None]
    cache = ThumbnailCache(size=size)
    for _ in cache.watch([(normalise(solid_images(COLOURS, size)), torch.tensor(LABELS), HAND_KEYS)]):
        pass
    return embeddings, torch.tensor(LABELS), HAND_KEYS, cache


def test_grid_shape_and_frames():
    size = 8
    embeddings, labels, keys, cache = hand_case(size)
    picture = retrieval_picture(embeddings, labels, keys, cache, n=2, k=4)
    assert picture.dtype == torch.uint8 and picture.dim() == 3 and picture.shape[0] == 3
    last_top, last_left = tile_origin(1, 4, size)
    assert picture.shape[1:] == (last_top + size + 2 * BORDER + 2, last_left + size + 2 * BORDER + 2)
    assert tuple(picture[:, 0, 0].tolist()) == BACKGROUND
    # query 0 at 0: neighbours 3 (d 1, wrong class), 1, 2, 4 (wrong class)
    # query 1 at 3: neighbours 2 (d 1), 3 (d 2, wrong class), 0 (d 3), 4 (d 7, wrong class)
    expected = {0: [0, 3, 1, 2, 4], 1: [1, 2, 3, 0, 4]}
    for row, items in expected.items():
        assert frame(picture, row, 0, size) == QUERY_COLOUR
        for col, item in enumerate(items):
            colour = torch.tensor(COLOURS[item], dtype=torch.uint8)[:, None, None]
            assert (inner(picture, row, col, size) == colour).all()
            if col:
                want = MATCH_COLOUR if LABELS[item] == LABELS[items[0]] else MISMATCH_COLOUR
                assert frame(picture, row, col, size) == want
    # bottom-right corner of a frame too
    top, left = tile_origin(0, 1, size)
    assert tuple(picture[:, top + size + 2 * BORDER - 1, left + size + 2 * BORDER - 1].tolist()) == MISMATCH_COLOUR


def test_tie_goes_to_lower_index_and_cosine_and_limits():
    embeddings = torch.tensor([[0.0], [1.0], [-1.0], [5.0]])
    cache = ThumbnailCache(size=4)
    cache.add(normalise(solid_images(COLOURS[:4], 4)), ["a", "b", "c", "d"])
    picture = retrieval_picture(embeddings, torch.tensor([0, 0, 1, 1]), ["a", "b", "c", "d"], cache, n=1, k=2)
    assert frame(picture, 0, 1, 4) == MATCH_COLOUR and frame(picture, 0, 2, 4) == MISMATCH_COLOUR  # b ties c, b wins
    # n and k larger than the set: clipped to (4 queries, 3 neighbours)
    big = retrieval_picture(embeddings + 1, torch.tensor([0, 0, 1, 1]), ["a", "b", "c", "d"], cache, n=10, k=10,
                            metric="cosine")
    assert big.shape[1:] == tuple(x + 4 + 2 * BORDER + 2 for x in tile_origin(3, 3, 4))
    assert retrieval_picture(embeddings[:1], torch.tensor([0]), ["a"], cache) is None


def test_missing_thumbnail_is_a_placeholder_and_max_items_bounds_the_cache():
    size = 8
    cache = ThumbnailCache(size=size, max_items=4)
    images = normalise(solid_images(COLOURS, size))
    cache.add(images[:3], HAND_KEYS[:3])
    cache.add(images, HAND_KEYS)  # keys 0-2 already held, 3 kept, 4 and 5 dropped
    assert len(cache) == 4 and cache.dropped == 2 and "k5" not in cache
    picture = retrieval_picture(torch.tensor(POSITIONS)[:, None], torch.tensor(LABELS), HAND_KEYS, cache, n=1, k=4)
    assert frame(picture, 0, 4, size) == MISMATCH_COLOUR  # neighbour 4: not held, still framed
    assert (inner(picture, 0, 4, size) == torch.tensor(MISSING_COLOUR, dtype=torch.uint8)[:, None, None]).all()
    cache.clear()
    assert len(cache) == 0 and cache.dropped == 0


def test_thumbnail_unnormalisation_round_trip():
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=g)
    cache = ThumbnailCache(size=16)
    cache.add(normalise(pixels), ["x", "y", "z"])
    for i, key in enumerate("xyz"):
        assert cache[key].dtype == torch.uint8
        assert (cache[key].int() - pixels[i].int()).abs().max() <= 1
    # downscaling keeps a flat colour and clamps out-of-range values
    flat = normalise(solid_images([(12, 130, 250)], 64))
    flat[:, 0] = 10.0  # far above white after un-normalising
    small = ThumbnailCache(size=8)
    small.add(flat, ["f"])
    assert small["f"].shape == (3, 8, 8)
    assert small["f"][0].eq(255).all()
    assert (small["f"][1:].int() - torch.tensor([130, 250])[:, None, None]).abs().max() <= 1


def test_watch_yields_batches_unchanged():
    batch = (normalise(solid_images(COLOURS[:2], 8)), torch.tensor([0, 1]), ["p", "q"], torch.tensor([True, True]))
    cache = ThumbnailCache(size=8)
    out = list(cache.watch([batch]))
    assert len(out) == 1 and out[0] is batch and len(cache) == 2
    with pytest.raises(ValueError):
        cache.add(batch[0], ["only-one"])


# End to end across ranks: extract_embeddings + cache.watch on each rank's share.
SIZE, THUMB, COUNT = 12, 6, 14
E2E_KEYS = [f"img/{i:02d}" for i in range(COUNT)]


def e2e_data():
    g = torch.Generator().manual_seed(3)
    pixels = torch.randint(0, 256, (COUNT, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)
    return normalise(pixels), torch.randint(0, 3, (COUNT,), generator=g)


def e2e_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 5))


def e2e_picture(order: list[int]) -> torch.Tensor | None:
    images, labels = e2e_data()
    batches = [(images[order[s : s + 4]], labels[order[s : s + 4]], [E2E_KEYS[i] for i in order[s : s + 4]])
               for s in range(0, len(order), 4)]
    cache = ThumbnailCache(size=THUMB)
    embeddings, gathered_labels, keys = extract_embeddings(e2e_model(), cache.watch(batches), device="cpu")
    return retrieval_picture(embeddings, gathered_labels, keys, cache, n=5, k=3)


# rank 0 holds the even samples, rank 1 the odd ones plus padding duplicates of 0 and 2
E2E_SHARES = [list(range(0, COUNT, 2))[::-1], list(range(1, COUNT, 2)) + [0, 2]]


def picture_rank(rank: int, world: int) -> torch.Tensor | None:
    return e2e_picture(E2E_SHARES[rank])


def test_two_ranks_give_the_single_process_picture():
    single = e2e_picture(list(range(COUNT)))
    pictures = run_ranks(picture_rank, 2)
    assert pictures[1] is None
    assert torch.equal(pictures[0], single)
    missing = torch.tensor(MISSING_COLOUR, dtype=torch.uint8)[:, None, None]
    assert not any((inner(single, r, c, THUMB) == missing).all() for r in range(5) for c in range(4))
