"""What a teacher-output cache is a function of, its 16-hex id, its folder, and its size on disk (torch-free).

The cache's content is determined by the teachers (their specs, the fingerprints of their local files, and
``cfg.seed`` for a ``random_init`` teacher: random teachers are built after ``seed_everything(cfg.seed)``), the
training data (``cfg.data.train`` as written, without the bad-sample limits, and its path's file fingerprint),
the augmentation (``RandomResizedCrop``'s scale and ratio, ``num_augmentations``, the views' ``seed``), the stored
``dtype`` and ``outputs``, and the teachers' compute precision as written (``train.precision``). The student, the
losses, the schedules and the run's seed do not enter it: every run of a sweep that shares these shares one cache.
``dir`` and ``shard_size`` do not either (where, and how the same rows are cut into files).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.config.identity import canonical, data_fingerprint, hash_identity, model_fingerprints
from compress.config.schema import ModelSpec, RunConfig

#: the on-disk format; a change of layout or meaning bumps it (and so every cache id)
FORMAT_VERSION = 1
#: the length of a cache id (hex digits of the identity's sha256)
CACHE_ID_LENGTH = 16
#: the training augmentation's crop: ``compress.data.transforms.TRAIN_SCALE`` and torchvision's ratio range
#: (equal values checked by a test; written here so that this module needs no torch)
CROP_SCALE = (0.9, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
#: bytes per stored number of each cache dtype
DTYPE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
#: data-set keys that change how bad samples stop a run, not what a sample is
_DATA_KEYS_OUT = ("max_bad_fraction", "bad_window")


class CacheConfigError(ValueError):
    """A config whose teacher cache cannot be built or read (one line naming the key)."""


def teachers_of(cfg: RunConfig) -> list[ModelSpec]:
    """The teachers the cache holds outputs of, in order: ``cfg.teachers`` or ``[cfg.teacher]``."""
    teachers = cfg.teacher_specs()
    if not teachers:
        raise CacheConfigError("teacher_cache: the config has no teacher (set teacher or teachers)")
    return teachers


def _teacher_identity(spec: ModelSpec, seed: int) -> dict[str, Any]:
    files = model_fingerprints(RunConfig(teacher=spec, student=None))  # the run id's rules for local files
    out: dict[str, Any] = {"spec": {k: getattr(spec, k) for k in ModelSpec.__dataclass_fields__}, "files": files}
    if spec.random_init:
        out["seed"] = seed
    return out


def cache_identity(cfg: RunConfig) -> dict[str, Any]:
    """What the cache's content is a function of (see the module docstring), as plain data."""
    tc = cfg.teacher_cache
    if tc is None:
        raise CacheConfigError("the config has no teacher_cache section: add one (teacher_cache: {dir: ...})")
    train = cfg.data.train
    data = {k: v for k, v in cfg.to_dict()["data"]["train"].items() if k not in _DATA_KEYS_OUT}
    data["fingerprint"] = data_fingerprint(train.path) if train.path else None
    return canonical({
        "format": FORMAT_VERSION,
        "teachers": [_teacher_identity(t, cfg.seed) for t in teachers_of(cfg)],
        "data": data,
        "augmentation": {"crop": "RandomResizedCrop", "scale": list(CROP_SCALE), "ratio": list(CROP_RATIO),
                         "num_augmentations": tc.num_augmentations, "seed": tc.seed},
        "dtype": tc.dtype,
        "outputs": sorted(tc.outputs),
        "precision": cfg.train.precision,
    })


def cache_id_of(cfg: RunConfig) -> str:
    """The cache's id: the first 16 hex digits of the sha256 of :func:`cache_identity`."""
    return hash_identity(cache_identity(cfg), CACHE_ID_LENGTH)


def cache_root(cfg: RunConfig) -> Path:
    """The cache's folder: ``teacher_cache.dir / cache_id``."""
    assert cfg.teacher_cache is not None  # cache_id_of refuses a config without the section
    cache_id = cache_id_of(cfg)
    return Path(cfg.teacher_cache.dir) / cache_id


def num_shards(num_samples: int, shard_size: int) -> int:
    """Shards of ``shard_size`` samples (the last may hold fewer): shard s holds [s*size, min((s+1)*size, N))."""
    return -(-int(num_samples) // int(shard_size))


def shard_range(shard: int, shard_size: int, num_samples: int) -> range:
    """The sample ids of shard ``shard``: ``[s*size, min((s+1)*size, N))`` (empty past the last shard)."""
    start = int(shard) * int(shard_size)
    return range(min(start, int(num_samples)), min(start + int(shard_size), int(num_samples)))


def bytes_per_sample(image_dims: list[int], text_dims: list[int], num_augmentations: int, dtype: str,
                     outputs: list[str]) -> int:
    """Bytes one sample takes: ``ok`` (1) + boxes (A x 4 int32) + per teacher k, per stored image output
    A x image_dims[k] numbers and per stored text output text_dims[k] numbers of ``dtype``."""
    size = DTYPE_BYTES[dtype]
    image = sum(1 for o in outputs if o.startswith("image_"))
    text = sum(1 for o in outputs if o.startswith("text_"))
    per = 1 + 16 * num_augmentations
    per += sum(image * num_augmentations * d * size for d in image_dims)
    per += sum(text * d * size for d in text_dims)
    return per


def estimated_bytes(num_samples: int, image_dims: list[int], text_dims: list[int], num_augmentations: int,
                    dtype: str, outputs: list[str]) -> int:
    """The cache's size on disk without file headers (128 bytes per ``.npy`` file, a few per shard):
    ``num_samples x`` :func:`bytes_per_sample`."""
    return int(num_samples) * bytes_per_sample(image_dims, text_dims, num_augmentations, dtype, outputs)
