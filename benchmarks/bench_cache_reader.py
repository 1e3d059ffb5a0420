"""The teacher cache's reader at real row shapes: a step's 1024 samples per GPU read from ``CacheStore``.

A cache of ViT-B/32-sized rows (D=512, fp16, A=5 views: ``image_features`` [n,5,512], ``text_features`` [n,512],
boxes, ok) is written in ``--shards`` shards of ``--shard-size`` samples; then, for random sample ids and views
(interleaved rounds, medians), the milliseconds one process spends per step of ``--batch`` samples:

1. read one by one (what the training loader's workers do: ``ok``, ``boxes`` and both outputs per sample), with
   every shard's memory maps open (a warm LRU), and with none open (each sample maps its shard's 4 files);
2. read in one call per file for the whole step (a reader in the main process).

The ratio of (1) without and with open maps is the price of a shard that is not mapped. How many stay mapped is
``open_shards_limit()`` per process (each map holds a file descriptor: ``(soft RLIMIT_NOFILE - 256) / 4``, 192
shards at the common soft limit of 1024, at most ``OPEN_SHARDS``): at 400M samples in shards of 16384 (24k
shards) a training loader's worker reads mostly unmapped shards, the "unmapped" line, unless ``ulimit -n`` is
raised (65536: 8192 shards). The page cache is warm here: at 400M samples (2.5 TB) each row is also a random read
from storage.

    python benchmarks/bench_cache_reader.py [--shards 128] [--shard-size 256] [--batch 1024] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from compress.teacher_cache.identity import bytes_per_sample
from compress.teacher_cache.store import MANIFEST, CacheStore, ShardWriter, output_file

A, D = 5, 512
OUTPUTS = ["image_features", "text_features"]


def write(root: Path, shards: int, size: int) -> None:
    rng = np.random.default_rng(0)
    image = rng.standard_normal((size, A, D)).astype(np.float16)
    text = rng.standard_normal((size, D)).astype(np.float16)
    for s in range(shards):
        w = ShardWriter(root, s)
        w.write("ok.npy", np.ones(size, bool))
        w.write("boxes.npy", np.zeros((size, A, 4), np.int32))
        w.write(output_file("image_features", 0), image)
        w.write(output_file("text_features", 0), text)
        w.write_meta({"bad": 0, "seconds": 0.0})
        w.commit()
    manifest = {"num_samples": shards * size, "shard_size": size, "num_shards": shards, "num_augmentations": A,
                "dtype": "fp16", "outputs": OUTPUTS, "teachers": [{"image_dim": D, "text_dim": D}]}
    (root / MANIFEST).write_text(json.dumps(manifest))


def one_by_one(store: CacheStore, ids: np.ndarray, augs: np.ndarray) -> float:
    started = time.perf_counter()
    for i, v in zip(ids.tolist(), augs.tolist(), strict=True):
        store.ok([i])
        store.boxes([i], [v])
        for name in OUTPUTS:
            store.outputs(name, 0, [i], [v])
    return time.perf_counter() - started


def at_once(store: CacheStore, ids: np.ndarray, augs: np.ndarray) -> float:
    started = time.perf_counter()
    store.ok(ids)
    store.boxes(ids, augs)
    for name in OUTPUTS:
        store.outputs(name, 0, ids, augs)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=128)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write(root, args.shards, args.shard_size)
        warm, cold = CacheStore(root), CacheStore(root, open_shards=0)
        rng = np.random.default_rng(1)
        total = args.shards * args.shard_size
        times: dict[str, list[float]] = {"open": [], "unmapped": [], "one call": []}
        for step in range(args.rounds + 1):
            ids, augs = rng.integers(0, total, args.batch), rng.integers(0, A, args.batch)
            measured = {"open": one_by_one(warm, ids, augs), "unmapped": one_by_one(cold, ids, augs),
                        "one call": at_once(warm, ids, augs)}
            if step:  # the first round maps every shard of the warm reader
                for key, value in measured.items():
                    times[key].append(value)
    ms = {key: 1e3 * statistics.median(values) for key, values in times.items()}
    per = bytes_per_sample([D], [D], A, "fp16", OUTPUTS)
    print(f"{args.batch} samples per step, rows of D={D}, A={A}, fp16 ({per} bytes per sample; 400M samples: "
          f"{400e6 * per / 1e12:.2f} TB)")
    print(f"  one by one, maps open:      {ms['open']:7.1f} ms  (open_shards {warm.open_shards} of {args.shards})")
    print(f"  one by one, shard unmapped: {ms['unmapped']:7.1f} ms  ({ms['unmapped'] / ms['open']:.1f}x)")
    print(f"  one call per file:          {ms['one call']:7.1f} ms")


if __name__ == "__main__":
    main()
