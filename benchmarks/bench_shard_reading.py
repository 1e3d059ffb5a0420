"""Reading webdataset shards: our reader (``compress.data.shards.shard_samples``, which also checks each
shard's end-of-archive block) against webdataset's ``tarfile_samples`` on the same shards, and the bytes
of a saved loader state with and without bad samples.

Prints raw samples/s of both readers (no decoding: the tar reading alone, where the check lives) and
the ratio ours / webdataset's; then the ``torch.save`` size of ``CountedLoader.state_dict()`` at a batch
of ``--batch`` 224 px images after a few steps, on a CSV set with no bad rows and with one in ten
missing (the refill reserve is saved as keys, so both should be about the same).

    python benchmarks/bench_shard_reading.py [--shards 4] [--per-shard 2000] [--payload 30000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import io
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image

from compress.config import DataConfig, DatasetConfig
from compress.data import build_train_loader, train_transform
from compress.data.shards import shard_samples


def write_shards(root: Path, shards: int, per_shard: int, payload: int) -> list[str]:
    """``shards`` tars of ``per_shard`` samples: a ``payload``-byte "jpg" and a caption each."""
    image = bytes(range(256)) * (payload // 256)
    urls = []
    for s in range(shards):
        path = root / f"{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for k in range(per_shard):
                for suffix, data in (("jpg", image), ("txt", f"caption {s} {k}".encode())):
                    info = tarfile.TarInfo(f"{s}_{k:06d}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        urls.append(str(path))
    return urls


def rate(read, urls: list[str], rounds: int) -> float:
    """Median samples/s of ``read(urls)`` (an iterator of samples) over ``rounds`` passes."""
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        n = sum(1 for _ in read(urls))
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def ours(urls: list[str]):
    return (s for i, u in enumerate(urls) for s in shard_samples(u, i))


def theirs(urls: list[str]):
    return wds.tarfile_samples({"url": u} for u in urls)


def state_bytes(root: Path, batch: int, bad_every: int | None) -> int:
    rows = ["filepath,title"]
    for i in range(10 * batch):
        if bad_every and i % bad_every == 3:
            rows.append(f"gone{i}.png,row {i}")
        else:
            Image.new("RGB", (32, 32), (i % 256, 7, 9)).save(root / f"{i}.png")
            rows.append(f"{i}.png,row {i}")
    (root / "d.csv").write_text("\n".join(rows))
    data = DataConfig(train=DatasetConfig(kind="csv", path=str(root / "d.csv"), max_bad_fraction=0.5))
    loader = build_train_loader(data, train_transform(224), None, batch_size=batch, seed=0, pin_memory=False)
    stream = loader.forever()
    for _ in range(2):
        next(stream)
    buf = io.BytesIO()
    torch.save(loader.state_dict(), buf)
    return len(buf.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--per-shard", type=int, default=2000)
    parser.add_argument("--payload", type=int, default=30000, help="bytes of each sample's image")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        urls = write_shards(Path(tmp), args.shards, args.per_shard, args.payload)
        rate(ours, urls, 1)  # warm the page cache
        pairs = [(rate(ours, urls, 1), rate(theirs, urls, 1)) for _ in range(args.rounds)]  # interleaved
        a, b = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
        ratio = statistics.median(p[0] / p[1] for p in pairs)
        print(f"shard reading: ours {a:.0f} samples/s, webdataset {b:.0f} samples/s, ratio {ratio:.3f} "
              f"(median of {args.rounds} interleaved rounds)")
    for bad_every in (None, 10):
        with tempfile.TemporaryDirectory() as tmp:
            size = state_bytes(Path(tmp), args.batch, bad_every)
        label = f"1 in {bad_every} missing" if bad_every else "no bad rows"
        print(f"saved loader state, batch {args.batch} at 224 px, {label}: {size} bytes")


if __name__ == "__main__":
    main()
