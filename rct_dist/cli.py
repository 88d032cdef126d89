"""`rct-dist` command line: parse, then call one function per subcommand."""

from __future__ import annotations

import argparse


def _demo(args: argparse.Namespace) -> None:
    from rct_dist.demo import run_demo
    from rct_dist.distributed import world_rank
    from rct_dist.train.loop import finish

    run_demo(data=args.data, out=args.out, epochs=args.epochs, teacher_epochs=args.teacher_epochs,
             classes=args.classes, dataset=args.dataset, say=lambda text: print(text, flush=True) if world_rank() == 0 else None)
    finish()


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
    demo = sub.add_parser("demo", help="teacher, student from labels, RC and RKD transfer on Omniglot; one table")
    demo.add_argument("--data", help="folder holding Omniglot (zips or npz); default $RCT_DIST_DATA[/omniglot]")
    demo.add_argument("--out", default="runs/demo", help="runs, shards and TensorBoard logs go here")
    demo.add_argument("--dataset", choices=("auto", "omniglot", "digits"), default="auto",
                      help="auto: Omniglot if found or downloadable, else digits")
    demo.add_argument("--epochs", type=int, help="epochs per student (default 20 on Omniglot, 3 on digits)")
    demo.add_argument("--teacher-epochs", type=int, help="(default: as --epochs)")
    demo.add_argument("--classes", type=int, default=200, help="Omniglot classes per split")
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
