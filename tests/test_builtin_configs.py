"""Built-in configs are package data: found by name from any working directory, listed and printed by
`rct-dist configs`, and DeepSpeed configs named, never located relative to the working directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rct_dist.config import (
    ConfigError,
    builtin_configs,
    builtin_deepspeed_configs,
    load_config,
    resolve_config_path,
    resolve_deepspeed_config,
)

PACKAGE_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(autouse=True)
def elsewhere(tmp_path, monkeypatch):
    """Every test runs from a folder that holds no configs."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RCT_DIST_DATA", "/data")


def test_every_yaml_is_listed_by_name():
    names = builtin_configs()
    on_disk = {p.relative_to(PACKAGE_CONFIGS).with_suffix("").as_posix() for p in PACKAGE_CONFIGS.rglob("*.yaml") if "studies" not in p.parts}
    assert set(names) == on_disk and len(names) >= 20
    assert {"cub/teacher", "cub/compression", "omniglot/rc", "imagenet/transfer"} <= set(names)
    assert set(builtin_deepspeed_configs()) >= {f"zero{s}_{p}" for s in range(4) for p in ("fp32", "bf16", "fp16")}


def test_name_and_path_give_the_same_config():
    by_name = load_config("cub/teacher", [])
    assert by_name == load_config("cub/teacher.yaml", []) == load_config(PACKAGE_CONFIGS / "cub" / "teacher.yaml", [])
    assert (by_name.job, by_name.model.backbone, by_name.run.name) == ("train-teacher", "resnet50", "cub-teacher")
    # base: links inside the package resolve relative to the file
    assert by_name.data.root == "/data/cub-shards"


def test_a_local_file_wins_over_a_builtin_of_the_same_name(tmp_path):
    (tmp_path / "cub").mkdir()
    (tmp_path / "cub" / "teacher.yaml").write_text("job: transfer\nrun:\n  name: mine\n")
    assert load_config("cub/teacher.yaml", []).run.name == "mine"  # an existing path is taken as given
    assert load_config("cub/teacher", []).run.name == "cub-teacher"  # no such file: the built-in


def test_unknown_name_lists_near_ones():
    with pytest.raises(ConfigError) as info:
        resolve_config_path("cub/teachr")
    message = str(info.value)
    assert "cub/teachr" in message and "did you mean cub/teacher" in message and "rct-dist configs" in message


def test_deepspeed_config_by_name_or_path(tmp_path):
    assert resolve_deepspeed_config("zero2_bf16") == PACKAGE_CONFIGS / "deepspeed" / "zero2_bf16.json"
    assert resolve_deepspeed_config("zero2_bf16.json") == PACKAGE_CONFIGS / "deepspeed" / "zero2_bf16.json"
    own = tmp_path / "mine.json"
    own.write_text("{}")
    assert resolve_deepspeed_config(str(own)) == own
    with pytest.raises(ConfigError, match=r"zero2_bf61.*did you mean zero2_bf16"):
        load_config(None, ["deepspeed.config=zero2_bf61"])  # refused at load, before any process starts
    with pytest.raises(ConfigError, match="neither a file nor a built-in"):
        load_config(None, ["deepspeed.config=configs/deepspeed/zero2_bf16.json"])  # the old relative path


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rct_dist.cli", *args], capture_output=True, text=True, check=False)


def test_cli_lists_prints_and_resolves():
    listing = _cli("configs")
    assert listing.returncode == 0, listing.stderr
    assert "cub/compression" in listing.stdout and "Model compression: ResNet-50 512-d -> ResNet-18 128-d" in listing.stdout
    assert "zero2_bf16_autocast" in listing.stdout
    text = _cli("configs", "cub/teacher")
    assert text.returncode == 0 and text.stdout == (PACKAGE_CONFIGS / "cub" / "teacher.yaml").read_text()
    resolved = _cli("configs", "--resolved", "omniglot/rc", "optim.epochs=3")
    assert resolved.returncode == 0, resolved.stderr
    assert "epochs: 3" in resolved.stdout and "backbone: rct_cnn3_small" in resolved.stdout
    bad = _cli("configs", "omniglot/rcc")
    assert bad.returncode == 2 and "did you mean omniglot/rc" in bad.stderr and "Traceback" not in bad.stderr
