"""A run's teacher-output cache: opened (written first where shards are missing) and checked against the checkpoint a
run resumes from."""

from __future__ import annotations

from typing import Any

from compress import distributed
from compress.checkpoint import Checkpoint, CheckpointError, rng_state, set_rng_state
from compress.config import RunConfig


def open_teacher_cache(cfg: RunConfig) -> Any:
    """The opened teacher-output cache of a ``teacher_cache.mode: cache`` run, else None. Shards not written yet
    are generated first: this process's share under torch.distributed, then any other that no live process is
    writing (a cache another run is writing is waited for, not written twice). The random states are those of the
    caller after it (a run that wrote its cache trains as one that found it written)."""
    if cfg.teacher_cache is None or not cfg.teacher_cache.reads_cache:
        return None
    from compress.teacher_cache.generate import generate
    from compress.teacher_cache.identity import cache_root
    from compress.teacher_cache.store import CacheStore

    store = CacheStore(cache_root(cfg))
    if not store.complete():
        states = rng_state()
        generate(cfg, part=distributed.rank(), parts=distributed.world_size(), wait=True, progress=cfg.train.progress)
        set_rng_state(states)
        store = CacheStore(cache_root(cfg))
    return store


def check_cache_of_checkpoint(checkpoint: Checkpoint | None, cfg: RunConfig) -> None:
    """Refuse to resume from a checkpoint written while training on another teacher cache (the data file under the
    same path changed, so the cache id did): the run would continue on other teacher outputs."""
    if checkpoint is None or cfg.teacher_cache is None:
        return
    from compress.teacher_cache.identity import cache_id_of

    written, now = checkpoint.meta.get("teacher_cache_id"), cache_id_of(cfg)
    if written is not None and written != now:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} was trained on teacher cache {written}, this config's is {now} (the "
            "teachers or the training data changed): start fresh with --force"
        )
