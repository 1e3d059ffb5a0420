"""The gradient cache's second reading of a step's micro-batches (``train.accum_inputs: reread``,
``compress.data.pipeline.ReplayStream``) at the data level: on webdataset shards read by two workers
with a shuffle buffer, bad samples and the refill reserve, across epochs, it gives the first pass's
micro-batches sample for sample; a read that fails the second time, a sample that reads differently and
a restart that cannot find its place are all survived with the first pass's samples."""

from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import compress.data.shards as shards_module
from compress.config import DataConfig, DatasetConfig
from compress.data import build_train_loader, train_transform
from compress.data.pipeline import ReplayStream


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 20, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def write_shards(root: Path, shards: int, per_shard: int, bad: set[tuple[int, int]] = frozenset()) -> str:
    """``shards`` tar shards of ``per_shard`` png/txt pairs; the pairs in ``bad`` carry an undecodable image."""
    root.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tarfile.open(root / f"p-{s:06d}.tar", "w") as tar:
            for k in range(per_shard):
                image = b"not an image" if (s, k) in bad else _png(s * per_shard + k)
                for suffix, payload in (("png", image), ("txt", f"sample {s} {k}".encode())):
                    info = tarfile.TarInfo(f"s{s}_{k}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return str(root / f"p-{{000000..{shards - 1:06d}}}.tar")


def loaders(path: str, workers: int, micro: int = 3):
    data = DataConfig(train=DatasetConfig(kind="webdataset", path=path, max_bad_fraction=0.5, bad_window=50,
                                          options={"shuffle_buffer": 4}), num_workers=workers)
    main = build_train_loader(data, train_transform(24), None, batch_size=micro, seed=2, pin_memory=False)

    def twin():
        return build_train_loader(data, train_transform(24), None, batch_size=micro, seed=2, pin_memory=False,
                                  dataset=main.source_dataset())

    return main, twin


def same(a, b) -> bool:
    return a["keys"] == b["keys"] and torch.equal(a["images"], b["images"]) and a["captions"] == b["captions"]


def read_twice(main, replay: ReplayStream, steps: int, accum: int, restart_at: tuple[int, ...] = ()):
    """Steps as the trainer takes them: begin, the first pass's ``accum`` micro-batches, then the second
    reading of each; returns (micro-batches equal, the steps read by key)."""
    stream = main.forever()
    equal, by_key = [], []
    for step in range(steps):
        if step in restart_at:
            replay._stream = None  # as after a failed reading: restarted from the first loader's position
        before = replay.by_key_steps
        replay.begin_step()
        if replay.by_key_steps > before:
            by_key.append(step)
        first = [next(stream) for _ in range(accum)]
        for m in first:
            equal.append(same(m, replay.again({k: v for k, v in m.items() if k != "images"})))
    return equal, by_key


@pytest.mark.parametrize("workers", [0, 2])
def test_the_second_reading_is_the_first_on_shards_with_bad_samples_across_epochs(tmp_path, workers):
    path = write_shards(tmp_path / "even", 4, 6, {(1, 2), (3, 4)})
    main, twin = loaders(path, workers)
    replay = ReplayStream(twin, main)
    equal, by_key = read_twice(main, replay, steps=14, accum=2)
    assert all(equal) and not by_key and len(equal) == 28
    assert main.epoch >= 2 and main.counter.bad >= 2 * main.epoch  # two bad samples per epoch, refilled
    assert (replay.resyncs, replay.by_key_steps) == (0, 0)


def test_a_read_that_fails_the_second_time_is_read_again_by_key(tmp_path, monkeypatch, capsys):
    """The second opening of shard 0 breaks part way (a connection reset): the first pass read it whole,
    so the run goes on with the first pass's samples (read again by key), the second loader restarts."""
    path = write_shards(tmp_path / "flaky", 2, 40)
    opened: dict[str, int] = {}
    real = shards_module.wds.gopen

    class Flaky(io.RawIOBase):
        def __init__(self, inner, limit: int) -> None:
            self.inner, self.left = inner, limit

        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:
            if self.left <= 0:
                raise OSError("connection reset")
            n = self.inner.readinto(memoryview(buffer)[: min(len(buffer), self.left)])
            self.left -= n
            return n

    def gopen(url, *args, **kwargs):
        opened[url] = opened.get(url, 0) + 1
        stream = real(url, *args, **kwargs)
        if opened[url] == 2 and url.endswith("000000.tar"):  # the second loader's reading of shard 0
            return io.BufferedReader(Flaky(stream, 20_000))
        return stream

    monkeypatch.setattr(shards_module.wds, "gopen", gopen)
    logging.disable(logging.WARNING)
    try:
        main, twin = loaders(path, 0)
        replay = ReplayStream(twin, main)
        equal, _ = read_twice(main, replay, steps=8, accum=4)
    finally:
        logging.disable(logging.NOTSET)
    assert all(equal) and main.counter.bad == 0 and replay.resyncs >= 1
    assert "the second reading of a micro-batch failed" in capsys.readouterr().err


def test_a_sample_that_reads_differently_under_the_same_key_is_caught_by_its_fingerprint(tmp_path):
    """Same keys, other pixels (a rewritten file, here another transform): the fingerprints differ, the
    micro-batch is read again by key (the first pass's pixels), the second loader restarts."""
    path = write_shards(tmp_path / "even", 2, 12)
    main, _ = loaders(path, 0)
    data = DataConfig(train=DatasetConfig(kind="webdataset", path=path, options={"shuffle_buffer": 4}))
    rewritten = iter([True])

    def twin():
        dataset = main.source_dataset()
        if next(rewritten, False):  # the first build decodes another size: other pixels under the same keys
            dataset.transform = train_transform(28)
        return build_train_loader(data, None, None, batch_size=3, seed=2, pin_memory=False, dataset=dataset)

    replay = ReplayStream(twin, main)
    stream = main.forever()
    replay.begin_step()
    first = next(stream)
    again = replay.again({k: v for k, v in first.items() if k != "images"})
    assert same(first, again) and replay.resyncs == 1


def test_a_restart_that_cannot_find_its_place_reads_by_key_until_the_next_epoch(tmp_path, capsys):
    """Uneven shards over two workers: in the tail of an epoch (a worker has run out) a restarted second
    loader does not find the step's place; the second loader pauses (those steps are read again by key)
    and starts again in the next epoch, instead of restarting at every step."""
    path = write_shards(tmp_path / "uneven", 3, 12)
    logging.disable(logging.WARNING)
    try:
        main, twin = loaders(path, 2, micro=1)
        replay = ReplayStream(twin, main)
        equal, by_key = read_twice(main, replay, steps=48, accum=1, restart_at=(28,))
    finally:
        logging.disable(logging.NOTSET)
    assert all(equal)
    # 36 samples an epoch: worker 1's shard ends at batch 24, the restart at 28 seeks to the wrong place; steps
    # 29 to 36 (36: the first of the next epoch, drawn by a step that began at the end of epoch 0) go by key
    assert (replay.resyncs, replay.by_key_steps) == (1, 8)
    assert by_key == list(range(29, 37)) and main.epoch == 1
    assert "the steps until the next epoch are read by key too" in capsys.readouterr().err
