"""Step timing (fake clocks), uint8 batches and the device-side decode, and one real run: the throughput
scalars reach TensorBoard, and steps that do not log never call `.item()`."""

from __future__ import annotations

import io
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rct_dist.config import ConfigError, load_config
from rct_dist.data.loader import make_loader
from rct_dist.data.transforms import DeviceDecode, build_transform, normalize_uint8
from rct_dist.train import engine as engine_module
from rct_dist.train import loop
from rct_dist.train.feed import DeviceFeed, channels_last_for
from rct_dist.train.monitor import Monitor
from rct_dist.train.nonfinite import attach
from rct_dist.train.timing import StepTimer, Window

sys.path.insert(0, str(Path(__file__).parent))
from test_train import write_config  # noqa: E402


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_window_holds_whole_steps_with_logging_and_checkpoints():
    clock, synced = FakeClock(), []
    timer = StepTimer(clock, sync=lambda: synced.append(clock.now))
    timer.start()
    for step in range(1, 5):
        clock.advance(0.5)  # waiting for the batch
        timer.data_ready()
        clock.advance(1.0)  # forward, backward, step
        timer.step_done(images=8, views=16)
        if step == 2:
            clock.advance(3.0)  # a checkpoint after the step, before the next batch is asked for
        timer.next_step()
    window = timer.read()
    assert synced == [clock.now]  # one sync, at the read
    assert window.steps == 4 and window.images == 32 and window.views == 64
    assert window.seconds == pytest.approx(4 * 1.5 + 3.0)  # the checkpoint's time is in the window
    assert window.waited == pytest.approx(4 * 0.5)
    assert window.wait_fraction == pytest.approx(2.0 / 9.0)
    assert window.step_seconds == pytest.approx(9.0 / 4)


def test_time_spent_logging_after_a_read_goes_to_the_next_window():
    clock = FakeClock()
    timer = StepTimer(clock)
    timer.start()
    clock.advance(0.25)
    timer.data_ready()
    clock.advance(0.75)
    timer.step_done(4, 4)
    first = timer.read()
    clock.advance(2.0)  # .item() calls, TensorBoard writes after the read
    timer.next_step()
    clock.advance(1.0)
    timer.data_ready()
    clock.advance(1.0)
    timer.step_done(4, 4)
    second = timer.read()
    assert first.seconds == pytest.approx(1.0) and first.waited == pytest.approx(0.25)
    assert second.seconds == pytest.approx(4.0)  # logging 2 + wait 1 + compute 1
    assert second.waited == pytest.approx(1.0)  # the logging is not data wait
    assert first.seconds + second.seconds == pytest.approx(clock.now - 100.0)  # no gap between windows


def test_rates_count_images_and_views_apart_per_device_and_in_total():
    values = Window(steps=10, images=640, views=1280, seconds=2.0, waited=0.5).scalars(world=4)
    assert values["throughput/images_per_s_per_device"] == pytest.approx(320.0)
    assert values["throughput/views_per_s_per_device"] == pytest.approx(640.0)
    assert values["throughput/images_per_s"] == pytest.approx(1280.0)
    assert values["throughput/views_per_s"] == pytest.approx(2560.0)
    assert values["throughput/data_wait_fraction"] == pytest.approx(0.25)
    assert values["throughput/step_seconds"] == pytest.approx(0.2)


def _photo(side: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (side // 4, side // 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((side, side), Image.BILINEAR)


@pytest.mark.parametrize("train", [True, False])
def test_uint8_batches_normalised_on_the_device_equal_the_float_path(train):
    image = _photo()
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    float_t = build_transform(32, train, mean=mean, std=std)
    uint8_t = build_transform(32, train, mean=mean, std=std, uint8=True)
    random.seed(3), torch.manual_seed(3)
    expected = float_t(image)
    random.seed(3), torch.manual_seed(3)  # the same crop and flip (timm draws from `random`)
    raw = uint8_t(image)
    assert raw.dtype == torch.uint8 and raw.shape == (3, 32, 32)
    torch.testing.assert_close(normalize_uint8(raw[None], mean, std)[0], expected, rtol=1e-5, atol=1e-5)


def test_feed_normalises_uint8_and_flattens_views():
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    raw = torch.randint(0, 256, (3, 2, 3, 8, 8), dtype=torch.uint8)
    labels = torch.tensor([1, 2, 3])
    feed = DeviceFeed(torch.device("cpu"), torch.float32,
                      normalize=loop.Preprocess(mean=mean, std=std))
    images, flat_labels, stored, n_images, n_views = feed(raw, labels)
    assert (n_images, n_views) == (3, 6) and stored == []
    torch.testing.assert_close(images, (raw.flatten(0, 1).float() / 255 - 0.5) / 0.25)
    assert flat_labels.tolist() == [1, 1, 2, 2, 3, 3]


def test_device_decode_crops_flips_and_normalises_jpeg_and_png():
    blobs = []
    for i, fmt in enumerate(["JPEG", "PNG", "JPEG"]):
        buffer = io.BytesIO()
        _photo(48, seed=i).convert("L" if i == 2 else "RGB").save(buffer, format=fmt)  # a grayscale JPEG too
        blobs.append(buffer.getvalue())
    decode = DeviceDecode(24, "cpu", views=2, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0,
                          mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    batch = decode(blobs)
    assert batch.shape == (3, 2, 3, 24, 24) and batch.dtype == torch.float32
    assert 0.0 <= batch.min() and batch.max() <= 1.0
    # Full-image crop, no flip: the PNG's views equal PIL's own resize of the image, to resampling error.
    reference = torch.from_numpy(np.asarray(_photo(48, seed=1).resize((24, 24), Image.BILINEAR))).permute(2, 0, 1)
    assert (batch[1, 0] * 255 - reference.float()).abs().mean() < 3.0
    torch.testing.assert_close(batch[1, 0], batch[1, 1])
    assert torch.equal(batch[2, 0, 0], batch[2, 0, 1])  # gray becomes three equal channels
    flipped = DeviceDecode(24, "cpu", scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0, mean=(0.0, 0.0, 0.0),
                           std=(1.0, 1.0, 1.0))(blobs[1:2])
    torch.testing.assert_close(flipped[0], batch[1, 0].flip(-1))
    with pytest.raises(ValueError, match="interpolation"):
        DeviceDecode(24, "cpu", interpolation="lanczos")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_decode_is_refused_without_cuda(digits_shards):
    with pytest.raises(ValueError, match="no CUDA device"):
        make_loader(digits_shards / "train", batch_size=20, train=True, image_size=16, workers=0, rank=0, world=1,
                    decode="gpu")


def test_config_keys(tmp_path, digits_shards):
    cfg_file = write_config(tmp_path / "c.yaml", name="c", out=tmp_path, data=digits_shards)
    cfg = load_config(str(cfg_file))
    assert (cfg.data.decode, cfg.data.uint8_batches, cfg.model.channels_last, cfg.model.compile) == \
        ("cpu", False, None, False)
    assert channels_last_for(cfg, torch.device("cuda")) and not channels_last_for(cfg, torch.device("cpu"))
    assert channels_last_for(load_config(str(cfg_file), ["model.channels_last=true"]), torch.device("cpu"))
    with pytest.raises(ConfigError, match="data.decode must be one of cpu, gpu"):
        load_config(str(cfg_file), ["data.decode=gpus"])
    with pytest.raises(ConfigError, match="uint8_batches"):
        load_config(str(cfg_file), ["data.decode=gpu", "data.uint8_batches=true"])


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


GUARD_SYNC = "nonfinite.py:_any_rank_nonfinite"  # the non-finite step guard's one `.item()` per optimizer step


@pytest.mark.parametrize("guard", [False, True], ids=["guard-off", "guard-on"])
def test_short_run_logs_rates_and_syncs_only_at_log_steps(digits_shards, tmp_path, monkeypatch, guard):
    """15 steps, logged every 5th, with uint8 batches: every `.item()` inside the epoch falls in a log step,
    but for the non-finite step guard's (optim.skip_nonfinite), which reads one flag per optimizer step."""
    events: list[tuple[str, str]] = []
    recording = [False]
    item = torch.Tensor.item

    def counted_item(self):
        caller = sys._getframe(1).f_code
        # The project's own calls: torch's optimizer and DataLoader read CPU scalars, which never sync.
        if recording[0] and f"{os.sep}rct_dist{os.sep}" in caller.co_filename:
            events.append(("item", f"{Path(caller.co_filename).name}:{caller.co_name}"))
        return item(self)

    def wrap(name, kind):
        original = getattr(Monitor, name)

        def wrapper(self, *args, **kwargs):
            if kind == "on":
                recording[0] = True
            elif kind == "off":
                recording[0] = False
            else:
                events.append((kind, ""))
            return original(self, *args, **kwargs)
        monkeypatch.setattr(Monitor, name, wrapper)

    monkeypatch.setattr(torch.Tensor, "item", counted_item)
    wrap("start_epoch", "on")
    wrap("end_epoch", "off")
    wrap("scalars", "log")
    wrap("advance", "step")
    guards = []

    def recording_attach(engine, optimizer):
        guards.append(optimizer)
        return attach(engine, optimizer)
    monkeypatch.setattr(engine_module, "attach", recording_attach)
    cfg_file = write_config(tmp_path / "rc.yaml", name="rc", out=tmp_path / "runs", data=digits_shards)
    loop.train(load_config(str(cfg_file), ["data.uint8_batches=true", "data.samples_per_epoch=300",
                                            "log.projector_samples=0",
                                            "log.retrieval_images=0", f"optim.skip_nonfinite={str(guard).lower()}"]))
    assert [g.skip_nonfinite for g in guards] == [guard], "loop.py must pass optim.skip_nonfinite to build_engine"

    steps, current = [], []
    for kind, where in events:
        if kind == "step":
            steps.append(current)
            current = []
        else:
            current.append((kind, where))
    assert len(steps) == 300 // 20
    logged = [i + 1 for i, s in enumerate(steps) if ("log", "") in s]
    assert logged == [5, 10, 15]
    items = {i + 1: [w for k, w in s if k == "item"] for i, s in enumerate(steps)}
    assert all(any(w.startswith("timing.py") for w in items[i]) for i in logged)  # log steps read values
    assert {i: w.count(GUARD_SYNC) for i, w in items.items()} == {i: int(guard) for i in items}  # 1 per step, or 0
    others = {i: [x for x in w if x != GUARD_SYNC] for i, w in items.items()}
    assert {i: w for i, w in others.items() if w and i not in logged} == {}
    if guard:
        assert (guards[0].steps, guards[0].skipped_total) == (len(steps), 0)

    scalars = _scalars(tmp_path / "runs" / "rc" / "tensorboard")
    for tag in ("images_per_s", "views_per_s", "images_per_s_per_device", "views_per_s_per_device",
                "data_wait_fraction", "step_seconds"):
        assert [s for s, _ in scalars[f"throughput/{tag}"]] == logged, tag
    assert "throughput/samples_per_s" not in scalars
    for (_, images), (_, views) in zip(scalars["throughput/images_per_s"], scalars["throughput/views_per_s"]):
        assert images > 0 and views == pytest.approx(2 * images, rel=1e-4)  # data.views = 2
    assert all(0 <= v <= 1 for _, v in scalars["throughput/data_wait_fraction"])
