"""Exact resume of the training stream: CountedLoader.state_dict / load_state_dict."""

from __future__ import annotations

import io
import itertools
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from compress.config import DataConfig, DatasetConfig
from compress.data import CountedLoader, DataError, build_train_loader, train_transform
from tests.test_data import _csv_with_bad

Make = Callable[[], CountedLoader]


@pytest.fixture(scope="module")
def tok():
    import open_clip

    return open_clip.get_tokenizer("ViT-B-32")


def _roundtrip(state: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """Through a file, as a checkpoint holds it: only weights_only-safe types survive."""
    path = tmp_path / "loader_state.pt"
    torch.save(state, path)
    return torch.load(path, weights_only=True)


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (a.keys() == b.keys() and a["captions"] == b["captions"] and torch.equal(a["images"], b["images"])
            and torch.equal(a["texts"], b["texts"]))


def _record(make: Make, total: int, tmp_path: Path) -> tuple[list[dict], list[dict], CountedLoader]:
    """An uninterrupted run's ``total`` batches, and its saved state before each batch."""
    loader = make()
    stream = loader.forever()
    states, batches = [], []
    for _ in range(total):
        states.append(_roundtrip(loader.state_dict(), tmp_path))
        batches.append(next(stream))
    states.append(_roundtrip(loader.state_dict(), tmp_path))
    return batches, states, loader


def _check_resumes(make: Make, positions: list[int], total: int, tmp_path: Path) -> list[dict]:
    """Resuming a fresh loader from the state after batch n gives batches n..total of the
    uninterrupted run, and the same counter; returns the states used."""
    batches, states, ref = _record(make, total, tmp_path)
    for n in positions:
        resumed = make()
        stream = resumed.forever()  # created before the state is loaded (as train_batches does)
        resumed.load_state_dict(states[n])
        rest = list(itertools.islice(stream, total - n))
        assert all(_same(a, b) for a, b in zip(rest, batches[n:], strict=True)), f"resumed after batch {n}"
        assert resumed.state_dict()["counter"] == ref.state_dict()["counter"]
        assert (resumed.epoch, resumed.counter.seen, resumed.counter.bad) == (ref.epoch, ref.counter.seen,
                                                                              ref.counter.bad)
    return [states[n] for n in positions]


@pytest.mark.parametrize("workers", [0, 2])
def test_map_style_with_bad_samples_resumes_exactly_across_epochs(tmp_path, tok, workers):
    bad = {i for i in range(44) if i % 5 == 2}  # 9 of 44 bad: batches are refilled, the reserve carries over
    path = _csv_with_bad(tmp_path, 44, bad)
    data = DataConfig(train=DatasetConfig(kind="csv", path=str(path), max_bad_fraction=0.5, bad_window=50),
                      num_workers=workers)
    make = lambda: build_train_loader(data, train_transform(24), tok, batch_size=8, seed=3,  # noqa: E731
                                      pin_memory=False)
    positions = list(range(13)) if workers == 0 else [2, 5, 9]
    used = _check_resumes(make, positions, 13, tmp_path)  # 13 batches: more than 3 epochs
    per_epoch = len(make())
    assert any(s["reserve"] for s in used) and any(s["epoch"] > 0 for s in used)
    if workers == 0:  # a state saved right after the last DataLoader batch of an epoch is among them
        assert any(s["batches_in_epoch"] == per_epoch for s in used)


def test_synthetic_resume_skips_consumed_samples_unread(tmp_path, tok):
    calls = [0]
    augment = train_transform(24)

    def counting(img: Any) -> torch.Tensor:
        calls[0] += 1
        return augment(img)

    data = DataConfig(train=DatasetConfig(num_samples=40))
    make = lambda: build_train_loader(data, counting, tok, batch_size=8, seed=1, pin_memory=False)  # noqa: E731
    batches, states, _ = _record(make, 8, tmp_path)
    assert states[7]["epoch"] == 1 and states[7]["batches_in_epoch"] == 2
    resumed = make()
    resumed.load_state_dict(states[7])
    calls[0] = 0
    assert _same(next(resumed.forever()), batches[7])
    assert calls[0] == 8  # only the batch drawn: the 16 samples before it in the epoch were not loaded


def _noise_png(seed: int) -> bytes:
    """A 20x16 noise image: unlike a solid colour, every random crop of it differs."""
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 20, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _write_big_shards(root: Path, shards: int = 4, per_shard: int = 6) -> str:
    """``shards`` tars of ``per_shard`` samples, a corrupt image in two of them."""
    for s in range(shards):
        with tarfile.open(root / f"part-{s:06d}.tar", "w") as tar:
            for k in range(per_shard):
                key = f"s{s}_{k}"
                image = b"not an image" if (s, k) in {(1, 2), (3, 4)} else _noise_png(s * per_shard + k)
                for suffix, payload in (("png", image), ("txt", f"sample {key}".encode())):
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return str(root / f"part-{{000000..{shards - 1:06d}}}.tar")


@pytest.mark.parametrize("workers", [0, 2])
def test_webdataset_resumes_exactly_across_epochs(tmp_path, tok, workers):
    calls = [0]
    augment = train_transform(24)  # random crops: each sample's view is seeded by its position

    def counting(img: Any) -> torch.Tensor:
        calls[0] += 1
        return augment(img)

    cfg = DatasetConfig(kind="webdataset", path=_write_big_shards(tmp_path), max_bad_fraction=0.5,
                        bad_window=50, options={"shuffle_buffer": 4})
    data = DataConfig(train=cfg, num_workers=workers)
    make = lambda: build_train_loader(data, counting, tok, batch_size=3, seed=2, pin_memory=False)  # noqa: E731
    positions = [0, 3, 5, 7, 8, 12] if workers == 0 else [3, 6, 8]
    used = _check_resumes(make, positions, 14, tmp_path)  # 24 samples, 22 good: 7 batches an epoch
    assert any(s["reserve"] for s in used) and any(s["epoch"] > 0 for s in used)
    assert any(s["batches_in_epoch"] % 2 for s in used)  # an odd count: the worker order is rotated
    if workers == 0:
        _, states, _ = _record(make, 5, tmp_path)
        resumed = make()
        resumed.load_state_dict(states[4])
        calls[0] = 0
        next(resumed.forever())
        drawn = 3 * (resumed.batches_in_epoch - states[4]["batches_in_epoch"])  # samples of the batches drawn
        assert 3 <= calls[0] <= drawn < 3 * states[4]["batches_in_epoch"]  # the skipped ones were not decoded


def test_state_is_checked_and_must_come_before_the_stream(tmp_path, tok):
    data = DataConfig(train=DatasetConfig(num_samples=16))
    loader = build_train_loader(data, T.ToTensor(), tok, batch_size=4, pin_memory=False)
    stream = loader.forever()
    next(stream)
    state = loader.state_dict()
    with pytest.raises(RuntimeError, match="before the first batch"):
        loader.load_state_dict(state)
    other = build_train_loader(data, T.ToTensor(), tok, batch_size=8, pin_memory=False)
    with pytest.raises(DataError, match="batch size 4"):
        other.load_state_dict(state)


def test_webdataset_state_refuses_another_worker_count(tmp_path, tok):
    """Shards are split across workers: resumed with another count, the position would name other samples."""
    cfg = DatasetConfig(kind="webdataset", path=_write_big_shards(tmp_path), max_bad_fraction=0.5,
                        bad_window=50, options={"shuffle_buffer": 4})
    two = build_train_loader(DataConfig(train=cfg, num_workers=2), T.ToTensor(), tok, batch_size=3, pin_memory=False)
    stream = two.forever()
    for _ in range(3):
        next(stream)
    state = _roundtrip(two.state_dict(), tmp_path)
    none = build_train_loader(DataConfig(train=cfg, num_workers=0), T.ToTensor(), tok, batch_size=3, pin_memory=False)
    with pytest.raises(DataError, match="data.num_workers = 2"):
        none.load_state_dict(state)
    # map-style data reads the same samples whatever the worker count: accepted
    csv = DataConfig(train=DatasetConfig(num_samples=16), num_workers=2)
    saved = build_train_loader(csv, T.ToTensor(), tok, batch_size=4, pin_memory=False)
    next(saved.forever())
    other = build_train_loader(DataConfig(train=DatasetConfig(num_samples=16)), T.ToTensor(), tok, batch_size=4,
                               pin_memory=False)
    other.load_state_dict(_roundtrip(saved.state_dict(), tmp_path))


# ----------------------------------------------------------------------------- the reserve is saved as keys
def _tensors(obj: Any) -> int:
    """How many tensors a (nested) state holds."""
    if isinstance(obj, torch.Tensor):
        return 1
    if isinstance(obj, dict):
        return sum(_tensors(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_tensors(v) for v in obj)
    return 0


def _maker(kind: str, root: Path, tok: Any, bad: bool = True, workers: int = 0) -> Make:
    """A training loader over a CSV set (one row in five missing when ``bad``) or webdataset shards
    (a corrupt image in two of them), 40x40 crops of 64 px so a decoded reserve would be large."""
    if kind == "csv":
        path = _csv_with_bad(root, 44, {i for i in range(44) if i % 5 == 2} if bad else set())
        cfg = DatasetConfig(kind="csv", path=str(path), max_bad_fraction=0.5, bad_window=50)
        size = 8
    else:
        path = _write_big_shards(root)
        if not bad:
            for s in (1, 3):  # the same shards with their corrupt images repaired
                _repair_shard(root / f"part-{s:06d}.tar")
        cfg = DatasetConfig(kind="webdataset", path=path, max_bad_fraction=0.5, bad_window=50,
                            options={"shuffle_buffer": 4})
        size = 3
    data = DataConfig(train=cfg, num_workers=workers)
    return lambda: build_train_loader(data, train_transform(40), tok, batch_size=size, seed=3, pin_memory=False)


@pytest.mark.parametrize("kind", ["csv", "webdataset"])
def test_a_mid_epoch_state_keeps_the_reserve_as_keys_and_resumes_exactly(tmp_path, tok, kind):
    """Resumed mid-epoch with refill samples in reserve: the state holds their keys (no image), the
    resumed loader re-reads them, and the batches are those of the uninterrupted stream."""
    make = _maker(kind, tmp_path, tok)
    total = 12
    batches, states, ref = _record(make, total, tmp_path)
    mid = [n for n, s in enumerate(states[:total])  # inside an epoch: the next batch is of the same epoch
           if s["reserve"] and s["batches_in_epoch"] and states[n + 1]["epoch"] == s["epoch"]]
    assert len(mid) >= 2, [(s["batches_in_epoch"], len(s["reserve"])) for s in states]
    for n in mid:
        state = states[n]
        assert state["version"] == 2 and _tensors(state) == 0  # keys, not decoded images
        assert all(len(k) == (2 if kind == "csv" else 4) and all(isinstance(x, int) for x in k)
                   for k in state["reserve"])
        resumed = make()
        stream = resumed.forever()
        resumed.load_state_dict(state)
        rest = list(itertools.islice(stream, total - n))
        assert all(_same(a, b) for a, b in zip(rest, batches[n:], strict=True)), f"resumed after batch {n}"
        assert resumed.state_dict()["counter"] == ref.state_dict()["counter"]


@pytest.mark.parametrize("kind", ["csv", "webdataset"])
def test_the_saved_loader_state_is_as_large_with_bad_samples_as_without(tmp_path, tok, kind):
    """The checkpoint's loader state holds the reserve's keys, about 20 bytes a sample: its size does not
    grow with the bad samples met (a decoded reserve was up to a batch of images, here 19 KiB each)."""

    def saved_after(make: Make, steps: int) -> dict[str, Any]:
        loader = make()
        stream = loader.forever()
        for _ in range(steps):
            next(stream)
        return loader.state_dict()

    (tmp_path / "bad").mkdir()
    (tmp_path / "clean").mkdir()
    with_bad = _maker(kind, tmp_path / "bad", tok, bad=True)
    clean = _maker(kind, tmp_path / "clean", tok, bad=False)
    steps = next(n for n in range(1, 12) if saved_after(with_bad, n)["reserve"])  # the first state with a reserve
    sizes = {}
    for name, make in (("bad", with_bad), ("clean", clean)):
        state = saved_after(make, steps)
        assert bool(state["reserve"]) == (name == "bad") and (state["counter"]["bad"] > 0) == (name == "bad")
        buf = io.BytesIO()
        torch.save(state, buf)
        sizes[name] = len(buf.getvalue())
    assert abs(sizes["bad"] - sizes["clean"]) < 400, sizes


def _repair_shard(path: Path) -> None:
    """Rewrite a shard of :func:`_write_big_shards` with every image decodable."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for i, (info, payload) in enumerate(members):
            if payload == b"not an image":
                payload = _noise_png(1000 + i)
                info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_an_older_loader_state_is_refused_with_a_clear_message(tmp_path, tok):
    loader = _maker("csv", tmp_path, tok)()
    state = loader.state_dict()
    with pytest.raises(DataError, match=r"version 1; this code reads 2 .*--force"):
        loader.load_state_dict({**state, "version": 1})


def test_shard_samples_are_re_read_by_key_by_seek_or_by_scanning_a_compressed_shard(tmp_path):
    """``ShardDataset.read`` gives the very items the stream gave: a seek to the sample's header in a
    plain local shard, a read up to it in a gzip-compressed one (no byte offset there)."""
    import gzip

    from compress.data import ShardDataset

    _write_big_shards(tmp_path, shards=2)
    (tmp_path / "part-000001.tar.gz").write_bytes(gzip.compress((tmp_path / "part-000001.tar").read_bytes()))
    urls = [str(tmp_path / "part-000000.tar"), str(tmp_path / "part-000001.tar.gz")]
    ds = ShardDataset(urls, train_transform(24), shuffle=True, seed=4, shuffle_buffer=3)
    ds.with_keys = True
    ds.set_epoch(2)
    items = list(ds)
    assert {k.key[3] >= 0 for k in items} == {True, False}  # byte offsets in the plain shard, -1 in the gzip one
    again = ds.read([list(k.key) for k in reversed(items)])
    for a, b in zip(reversed(items), again, strict=True):
        assert a.key == b.key and (a.item is None) == (b.item is None)
        if a.item is not None:
            assert torch.equal(a.item[0], b.item[0]) and a.item[1] == b.item[1]
