"""Checkpoint integrity: a complete checkpoint is never rewritten in place, interrupted saves are cleaned up,
the COMPLETE marker vouches for every file and size, and a damaged checkpoint is passed over for the
previous one (a fake engine stands in for DeepSpeed's `save_checkpoint`, which writes one file per rank)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rct_dist.config import load_config
from rct_dist.train import checkpoint
from rct_dist.train.checkpoint import MARKER, complete_checkpoints, damage, save, tag_for, usable_checkpoints
from rct_dist.train.loop import resume_point


class FakeEngine:
    """Writes `model.pt` and `optim.pt` into the tag folder; records whether a marker was there meanwhile."""

    def __init__(self) -> None:
        self.marked_while_writing: list[bool] = []

    def save_checkpoint(self, folder: str, tag: str, client_state: dict) -> None:
        path = Path(folder) / tag
        self.marked_while_writing.append((path / MARKER).exists())
        path.mkdir(parents=True, exist_ok=True)
        (path / "model.pt").write_bytes(b"m" * (10 + len(json.dumps(client_state))))
        (path / "optim.pt").write_bytes(b"o" * 20)


def test_marker_vouches_for_files_and_sizes(tmp_path):
    path = save(FakeEngine(), tmp_path, step=5, epoch=0, client_state={"epoch": 0}, keep=3)
    marker = json.loads((path / MARKER).read_text())
    assert marker["step"] == 5 and marker["epoch"] == 0
    assert marker["files"] == {"model.pt": (path / "model.pt").stat().st_size, "optim.pt": 20}
    assert damage(path) is None
    (path / "optim.pt").write_bytes(b"o" * 7)  # truncated
    assert damage(path) == "optim.pt has 7 bytes, its marker says 20"
    (path / "optim.pt").unlink()
    assert damage(path) == "optim.pt is missing"


def test_a_complete_checkpoint_is_unmarked_before_a_save_of_the_same_step(tmp_path):
    engine = FakeEngine()
    save(engine, tmp_path, step=8, epoch=0, client_state={"batch": 8}, keep=3)
    save(engine, tmp_path, step=8, epoch=0, client_state={"batch": 0, "epoch": 1}, keep=3)
    assert engine.marked_while_writing == [False, False]  # a kill during the rewrite leaves it unmarked
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [8]
    assert damage(tmp_path / tag_for(8)) is None  # the marker describes the second write


def test_interrupted_saves_are_removed_by_the_next_complete_one(tmp_path):
    engine = FakeEngine()
    save(engine, tmp_path, step=1, epoch=0, client_state={}, keep=5)
    half = tmp_path / tag_for(2)  # a save killed before its marker
    half.mkdir()
    (half / "model.pt").write_bytes(b"partial")
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [1]
    save(engine, tmp_path, step=3, epoch=0, client_state={}, keep=5)
    assert not half.exists()
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [1, 3]


def test_keep_removes_the_oldest(tmp_path):
    engine = FakeEngine()
    for step in (1, 2, 3, 4):
        save(engine, tmp_path, step=step, epoch=0, client_state={}, keep=2)
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [3, 4]


def test_resume_auto_falls_back_past_a_damaged_checkpoint(tmp_path, capsys):
    cfg = load_config(None, [f"run.out_dir={tmp_path}", "run.name=r", "run.resume=auto"])
    folder = tmp_path / "r" / "checkpoints"
    engine = FakeEngine()
    for step in (10, 20):
        save(engine, folder, step=step, epoch=0, client_state={}, keep=3)
    assert resume_point(cfg, tmp_path / "r") == folder / tag_for(20)
    (folder / tag_for(20) / "model.pt").write_bytes(b"x")  # damaged after it was marked complete
    assert resume_point(cfg, tmp_path / "r") == folder / tag_for(10)
    assert "is damaged (model.pt has 1 bytes" in capsys.readouterr().out
    assert [s for s, _ in usable_checkpoints(folder)] == [10]
    with pytest.raises(RuntimeError, match="is damaged: model.pt has 1 bytes"):
        checkpoint.load(object(), folder / tag_for(20))


def test_markers_without_a_file_list_still_count(tmp_path):
    """Checkpoints of earlier versions (marker: step and epoch only) are trusted as before."""
    old = tmp_path / tag_for(4)
    old.mkdir()
    (old / MARKER).write_text(json.dumps({"step": 4, "epoch": 0}))
    assert damage(old) is None and [s for s, _ in usable_checkpoints(tmp_path)] == [4]
