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


def _train(args: argparse.Namespace) -> None:
    from rct_dist.config import load_config
    from rct_dist.train.loop import finish, train

    cfg = load_config(args.config, [*args.overrides, f"job={args.command}"])
    train(cfg)
    finish()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rct-dist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a teacher, transfer it with every loss, print Recall@K (offline)")
    demo.add_argument("--steps", type=int, default=400, help="optimizer steps per model")
    demo.add_argument("--batch", type=int, default=120, help="global batch size")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)
    for job, text in (("train-teacher", "train a teacher with Proxy-Anchor on labels"),
                      ("transfer", "transfer a frozen teacher to a student (RC by default)")):
        p = sub.add_parser(job, help=text, description=f"{text}. Overrides: section.key=value, e.g. optim.lr=3e-4")
        p.add_argument("--config", required=True, help="YAML run config (see configs/)")
        p.add_argument("overrides", nargs="*", help="section.key=value overrides, applied after the file")
        p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
        p.set_defaults(run=_train)
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
