"""`make-shards --out URL`: the splits written to a local staging folder, then uploaded, index last.

The upload order makes a split's index the mark of a complete upload (as the local writer's is): the
shards first, then the sample table (`.rct-members.npz`, keyed by the shards' names, sizes and SHA-256,
so that readers anywhere skip the one pass over the shards' headers), then `index.json`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Callable

from rct_dist.data.members import CACHE_NAME, build_table
from rct_dist.data.splits import INDEX, CacheSettings, content_signature_of
from rct_dist.data.shard_cache import ShardSpec
from rct_dist.data.stores import MissingObject, RemoteStore, join

log = logging.getLogger(__name__)


def _remote_index(store: RemoteStore) -> dict | None:
    try:
        return json.loads(store.read(INDEX))
    except MissingObject:
        return None
    except ValueError:
        return {}  # unreadable: not ours, treated as made with other arguments


def upload_run(args, run: Callable) -> dict:
    """`run(args)` for a remote `args.out` (see the module docstring)."""
    from rct_dist.data.shards import recorded_args, split_names, validation
    from rct_dist.data.shards.writer import same_args, summarize

    val = validation(args)
    names = [*split_names(args), *([val.split] if val else [])]
    record = recorded_args(args)
    stores = {split: RemoteStore(join(args.out, split)) for split in names}
    indexes = {split: _remote_index(store) for split, store in stores.items()}
    conflicts = [stores[s].url for s, index in indexes.items() if index is not None and not same_args(index, record)]
    if conflicts and not args.overwrite:
        raise FileExistsError(f"{', '.join(conflicts)} already hold shards made with other arguments (see made_by.args "
                              f"in their index.json; this run: {record}); pass --overwrite to replace them or choose "
                              "another --out")
    finished = {s: index for s, index in indexes.items() if index is not None and same_args(index, record)}
    if len(finished) == len(names):
        return {"out": args.out, "source": args.source,
                "splits": {s: summarize(index, "already done") for s, index in finished.items()}}
    stage = args.stage or CacheSettings().root() / "staging" / hashlib.sha256(args.out.encode()).hexdigest()[:10]
    local = run(dataclasses.replace(args, out=Path(stage), stage=None))
    splits = {}
    for split in names:
        if split in finished:
            splits[split] = summarize(finished[split], "already done")
            continue
        upload_split(Path(stage) / split, stores[split])
        splits[split] = {**local["splits"][split], "status": "uploaded"}
        shutil.rmtree(Path(stage) / split)
    return {"out": args.out, "source": args.source, "splits": splits}


def upload_split(folder: Path, store: RemoteStore) -> None:
    """One local split to `store`: shards, the content-keyed sample table, then the index."""
    meta = json.loads((folder / INDEX).read_text(encoding="utf-8"))
    specs = [ShardSpec(n, b, h) for n, b, h in zip(meta["shards"], meta["shard_bytes"], meta["shard_sha256"])]
    build_table(folder, tuple(meta["shards"]), tuple(meta["shard_samples"]), int(meta["classes"]),
                signature=content_signature_of(int(meta["classes"]), specs))
    for spec in specs:
        store.upload(folder / spec.name, spec.name)
    store.upload(folder / CACHE_NAME, CACHE_NAME)
    store.upload(folder / INDEX, INDEX)
    log.info("uploaded %d shard(s) of split %s to %s", len(specs), meta["split"], store.url)
