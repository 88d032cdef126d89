"""A picture of retrieval results for TensorBoard: a few queries, each with its top-k neighbours.

Row i of the grid is query i (the first `n` items of the gathered eval set, which
`extract_embeddings` sorts by key, so the choice is deterministic and independent of the number of
ranks) followed by its k nearest neighbours in the order `neighbour_chunks` gives them (distance,
then index; the query itself excluded by index). The query is framed steel blue, a neighbour green
when its label equals the query's and red otherwise. A neighbour whose thumbnail no rank kept (see
`ThumbnailCache.max_items`) is drawn as a dark gray tile, still framed.

Distributed: embeddings, labels and keys are gathered on every rank, but each image exists only on
the rank that read it. So every rank keeps small thumbnails of the images it sees while the eval
pass runs (`ThumbnailCache.watch`), and `retrieval_picture` — called on every rank, it is a
collective — gathers just the thumbnails the picture needs, as uint8 tensor rows through
`all_gather_rows` (no pickling), on the embeddings' device, so it works on gloo and nccl alike.
Rank 0 gets the picture, other ranks None. On a single process nothing is gathered.

Memory: a thumbnail is 3 * size * size bytes, 3 KB at the default 32 px, kept in one growing uint8
buffer plus a key -> row dict (~100 bytes per key). `max_items` (default 16,384, ~50 MB) bounds a
rank's cache; images after that are not kept. For SOP (60,502 eval images) one rank holds all of
them only at max_items >= 60,502 (~190 MB); with 8 ranks each holds ~7,600 (~23 MB).
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from rct_dist.distributed import all_gather_rows, all_gather_stats, world_rank
from rct_dist.eval.neighbours import METRICS, neighbour_chunks

try:
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
except ImportError:  # timm is a dependency of the loader; these are its values
    IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
    IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

QUERY_COLOUR = (70, 130, 180)  # steel blue
MATCH_COLOUR = (0, 200, 0)  # green: neighbour's label == query's label
MISMATCH_COLOUR = (220, 0, 0)  # red
MISSING_COLOUR = (48, 48, 48)  # tile fill where no rank kept the thumbnail
BACKGROUND = (255, 255, 255)
BORDER = 2  # frame width, pixels
PAD = 2  # gap between tiles and around the grid
QUERY_GAP = 6  # extra gap between the query column and its neighbours


class ThumbnailCache:
    """This rank's thumbnails of the eval images it sees, keyed by sample key.

    `images` arrive as the loader makes them: float (B, 3, H, W), normalised with `mean`/`std`
    (timm's ImageNet defaults, as `rct_dist.data.transforms.build_transform` uses). They are
    un-normalised, clamped to [0, 1], resized to size x size (antialiased bilinear) and stored as
    uint8 RGB. A key seen again (distributed samplers pad with duplicates) keeps its first
    thumbnail. After `max_items` distinct keys, further keys are counted in `dropped`, not kept.
    """

    def __init__(
        self,
        size: int = 32,
        max_items: int = 16384,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ) -> None:
        if size < 1 or max_items < 0:
            raise ValueError(f"need size >= 1 and max_items >= 0, got {size} and {max_items}")
        self.size, self.max_items = size, max_items
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]
        self.rows: dict[str, int] = {}
        self.dropped = 0
        self._buffer = torch.zeros(0, 3, size, size, dtype=torch.uint8)

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def __getitem__(self, key: str) -> torch.Tensor:
        """The (3, size, size) uint8 thumbnail of `key`."""
        return self._buffer[self.rows[key]]

    def thumbnails(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, size, size) uint8 display thumbnails of normalised float (B, 3, H, W) images."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"need (batch, 3, height, width) images, got {tuple(images.shape)}")
        x = images.detach().float().cpu() * self.std + self.mean
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return x.clamp_(0, 1).mul_(255).round_().to(torch.uint8)

    def add(self, images: torch.Tensor, keys: Sequence[str]) -> None:
        """Keep thumbnails of the keys not yet held, up to `max_items`."""
        if len(keys) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(keys)} keys")
        new: list[int] = []
        batch_new: set[str] = set()
        for i, key in enumerate(keys):
            if key in self.rows or key in batch_new:
                continue
            if len(self.rows) + len(new) >= self.max_items:
                self.dropped += 1
                continue
            new.append(i)
            batch_new.add(key)
        if not new:
            return
        thumbs = self.thumbnails(images[new])
        start = len(self.rows)
        self._reserve(start + len(new))
        self._buffer[start : start + len(new)] = thumbs
        for offset, i in enumerate(new):
            self.rows[keys[i]] = start + offset

    def _reserve(self, rows: int) -> None:
        if rows > self._buffer.shape[0]:
            capacity = min(max(rows, 2 * self._buffer.shape[0], 256), self.max_items)
            grown = torch.zeros(capacity, 3, self.size, self.size, dtype=torch.uint8)
            grown[: self._buffer.shape[0]] = self._buffer
            self._buffer = grown

    def watch(self, batches: Iterable[tuple]) -> Iterator[tuple]:
        """Yield `batches` unchanged ((images, labels, keys, ...) tuples), keeping thumbnails as they pass."""
        for batch in batches:
            self.add(batch[0], batch[2])
            yield batch

    def clear(self) -> None:
        self.rows.clear()
        self.dropped = 0
        self._buffer = self._buffer[:0]


def tile_origin(row: int, col: int, size: int) -> tuple[int, int]:
    """(top, left) pixel of the framed tile at grid row `row`, column `col` (0 = the query)."""
    cell = size + 2 * BORDER
    top = PAD + row * (cell + PAD)
    left = PAD + col * (cell + PAD) + (QUERY_GAP if col > 0 else 0)
    return top, left


def _grid(tiles: list[list[tuple[torch.Tensor | None, tuple[int, int, int]]]], size: int) -> torch.Tensor:
    rows, cols = len(tiles), max(len(r) for r in tiles)
    cell = size + 2 * BORDER
    height = tile_origin(rows - 1, 0, size)[0] + cell + PAD
    width = tile_origin(0, cols - 1, size)[1] + cell + PAD
    picture = torch.tensor(BACKGROUND, dtype=torch.uint8)[:, None, None].repeat(1, height, width)
    for r, row in enumerate(tiles):
        for c, (thumb, colour) in enumerate(row):
            top, left = tile_origin(r, c, size)
            picture[:, top : top + cell, left : left + cell] = torch.tensor(colour, dtype=torch.uint8)[:, None, None]
            inner = picture[:, top + BORDER : top + BORDER + size, left + BORDER : left + BORDER + size]
            if thumb is None:
                inner[:] = torch.tensor(MISSING_COLOUR, dtype=torch.uint8)[:, None, None]
            else:
                inner[:] = thumb
    return picture


def retrieval_picture(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    keys: Sequence[str],
    cache: ThumbnailCache,
    n: int = 8,
    k: int = 4,
    metric: str = "euclidean",
    backend: str = "torch",
) -> torch.Tensor | None:
    """(3, H, W) uint8 grid of the first `n` items (by key) and their `k` nearest neighbours.

    Collective: every rank calls it with the same gathered (embeddings, labels, keys) — what
    `extract_embeddings` returns — and its own `cache`. Rank 0 gets the picture for
    `SummaryWriter.add_image` (CHW), other ranks None; everyone gets None when there are fewer
    than 2 items. The default backend "torch" searches only the n query rows (an (n, N) block) and
    orders ties exactly by index.
    """
    total = embeddings.shape[0]
    if labels.shape != (total,) or len(keys) != total:
        raise ValueError(f"{total} embeddings, {tuple(labels.shape)} labels and {len(keys)} keys")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    n, k = min(n, total), min(k, total - 1)
    if n < 1 or k < 1:
        return None
    counts = torch.full((total,), k, dtype=torch.int64, device=embeddings.device)
    chunks = neighbour_chunks(embeddings, counts, metric, chunk_size=n, backend=backend)
    _, _, neighbours = next(chunks)  # only the first chunk: queries 0..n-1
    chunks.close()
    neighbours = neighbours.cpu()
    needed = sorted(set(range(n)) | set(neighbours.flatten().tolist()))

    # Each rank sends (index, thumbnail) rows for the needed keys it holds; rank order, first wins.
    have = [i for i in needed if keys[i] in cache]
    device = embeddings.device
    stats = all_gather_stats([len(have), cache.size], device)
    if any(s[1] != cache.size for s in stats):
        raise ValueError(f"thumbnail sizes differ between ranks: {[s[1] for s in stats]}")
    row_counts = [s[0] for s in stats]
    width = 3 * cache.size * cache.size
    local = torch.zeros(len(have), width, dtype=torch.uint8)
    for row, i in enumerate(have):
        local[row] = cache[keys[i]].flatten()
    index = torch.tensor(have, dtype=torch.int64)[:, None]
    if max(row_counts) > 0:  # same decision on every rank: row_counts is gathered
        rows = all_gather_rows(local.to(device), row_counts, with_grad=False).cpu()
        index = all_gather_rows(index.to(device), row_counts, with_grad=False)[:, 0].cpu().tolist()
    else:
        rows, index = local, []
    if world_rank() != 0:
        return None
    found: dict[int, torch.Tensor] = {}
    for row, i in enumerate(index):
        found.setdefault(i, rows[row].view(3, cache.size, cache.size))

    label_list = labels.tolist()
    tiles = []
    for q in range(n):
        row = [(found.get(q), QUERY_COLOUR)]
        for j in neighbours[q].tolist():
            row.append((found.get(j), MATCH_COLOUR if label_list[j] == label_list[q] else MISMATCH_COLOUR))
        tiles.append(row)
    return _grid(tiles, cache.size)
