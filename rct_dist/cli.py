"""`rct-dist` command line: parse, then call one function per subcommand."""

from __future__ import annotations

import argparse
import os
import sys


def _demo(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from rct_dist.demo import init_from_env, run_demo

    joined = init_from_env()
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    run_demo(steps=args.steps, batch=args.batch, seed=args.seed, say=print if rank0 else lambda _: None)
    if joined:
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        os._exit(0)  # gloo threads can abort during interpreter shutdown after a clean run


def _make_shards(args: argparse.Namespace) -> None:
    import json

    from rct_dist.data import shards

    print(json.dumps(shards.run(args), indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rct-dist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a teacher, transfer it with every loss, print Recall@K (offline)")
    demo.add_argument("--steps", type=int, default=400, help="optimizer steps per model")
    demo.add_argument("--batch", type=int, default=120, help="global batch size")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)
    from rct_dist.data.shards import add_arguments as add_shard_arguments

    make_shards = sub.add_parser("make-shards", help="write webdataset shards and an index per split from a dataset")
    add_shard_arguments(make_shards)
    make_shards.set_defaults(run=_make_shards)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
