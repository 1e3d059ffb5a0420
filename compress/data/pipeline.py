"""What a run needs from the data package: an endless stream of training batches and counts."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compress import distributed
from compress.config import RunConfig
from compress.data.collate import teacher_texts_key
from compress.data.loader import CountedLoader, build_train_loader
from compress.data.robust import DataError
from compress.data.sampling import EpochShuffleSampler
from compress.data.transforms import CropViews, preprocess_of, train_transform_for, training_views
from compress.data.views import FixedViews
from compress.models.forward import model_list, model_tokenizer_identity, tokenizer_for


class ReplayStream:
    """The gradient cache's second reading of a step's micro-batches (``train.accum_inputs: reread``).

    A second loader over the same data set object, order and per-sample seeds, started (:meth:`begin_step`)
    from the position the first loader has when a step begins, yields the step's micro-batches again one
    pass later: the trainer keeps none of the step's images (host memory: this loader's batches in flight,
    not ``accum_steps`` micro-batches); the cost is a second read and decode of every sample (and
    ``data.num_workers`` more worker processes). Each micro-batch read again is checked against the first
    pass's sample keys and image fingerprints (``"fingerprints"``, a float64 sum per image, made in the
    workers). One that differs, or a read that fails the second time (a flaky file system), is read again
    by key in this process (:meth:`CountedLoader.read`), and the second loader restarts from the first's
    position at the next step (``resyncs``). A restart that cannot find its place (webdataset shards read by
    several workers, in the tail of an epoch where a worker ran out of samples: ``ShardDataset.seek`` is not
    exact there) stops the second loader until the next epoch: those steps read their micro-batches again
    by key in this process (``by_key_steps``; host memory stays flat, the reading is serial)."""

    def __init__(self, build: Callable[[], CountedLoader], main: CountedLoader) -> None:
        self.build, self.main = build, main
        self._stream: Iterator[dict[str, Any]] | None = None
        self._unsure_start = False  # restarted at this step where a seek may miss its place
        self._paused_in_epoch: int | None = None
        self.resyncs = 0
        self.by_key_steps = 0

    def begin_step(self) -> None:
        """Before the step's first micro-batch is drawn from the first loader: (re)start the second one at
        that position if it is not running in step (the first step, after a resume or a failed reading)."""
        if self._stream is not None:
            self._unsure_start = False
            return
        if self._paused_in_epoch is not None and self.main.epoch <= self._paused_in_epoch:
            self.by_key_steps += 1  # :meth:`again` reads this step by key
            return
        self._paused_in_epoch = None
        loader = self.build()
        loader.load_state_dict(self.main.state_dict())
        loader.prepare()  # with workers: they seek to the position while the features pass runs
        self._stream = loader.forever()
        self._unsure_start = self.main.batches_in_epoch > 0 and not self.main.seeks_exactly

    def again(self, first: Mapping[str, Any]) -> dict[str, Any]:
        """The next micro-batch of the step a second time; ``first``: what the first pass read of it (its
        ``keys`` and ``fingerprints``)."""
        keys = first.get("keys")
        if self._stream is not None:
            try:
                batch = next(self._stream)
                why = None if same_samples(first, batch) else f"other samples (first key {keys and keys[0]})"
            except Exception as e:  # noqa: BLE001 - any failure of the second reading is read again by key
                batch, why = None, f"{type(e).__name__}: {e}"
            if why is None:
                return batch  # type: ignore[return-value]
            self._stream = None  # out of step: its workers go with it
            self.resyncs += 1
            paused = self._unsure_start
            if paused:  # the restart itself did not find the step's place: not again in this epoch
                self._paused_in_epoch = self.main.epoch
            if self.resyncs == 1 or paused:
                then = ("the steps until the next epoch are read by key too" if paused
                        else "the second loader restarts at the next step")
                print(f"clip-compress: warning: the second reading of a micro-batch failed ({why}); it is read again "
                      f"by key and {then} (counted in data/replay_resyncs)", file=sys.stderr)
        if keys is None:
            raise DataError("the second loader stopped and the micro-batch has no sample keys to read it again by")
        return self.main.read(keys)


def same_samples(first: Mapping[str, Any], again: Mapping[str, Any]) -> bool:
    """Whether two readings of a micro-batch hold the same samples: equal keys, and equal image
    fingerprints (float64 sums, up to their rounding) where the batches carry them."""
    if first.get("keys") != again.get("keys"):
        return False
    a, b = first.get("fingerprints"), again.get("fingerprints")
    return a is None or b is None or (a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-9, atol=0.0)))


@dataclass
class DataStats:
    """Counts of the training stream (bad samples skipped), for the log and the result row; ``replay``:
    the second reading of the micro-batches (``train.accum_inputs: reread`` with ``accum_steps`` > 1)."""

    loader: CountedLoader
    replay: ReplayStream | None = None

    def as_metrics(self, all_ranks: bool = False) -> dict[str, Any]:
        """This process's counts, or (``all_ranks``, a collective) the sums over every process's share."""
        counter = self.loader.counter
        counts = [counter.seen, counter.bad] + ([self.replay.resyncs, self.replay.by_key_steps] if self.replay else [])
        if all_ranks and distributed.world_size() > 1:
            counts = distributed.sum_over_ranks(torch.tensor(counts, dtype=torch.int64)).tolist()
        seen, bad = counts[:2]
        out = {"data/samples_seen": seen, "data/bad_samples": bad,
               "data/bad_fraction": round(bad / seen, 6) if seen else 0.0}
        if self.replay is not None:
            out["data/replay_resyncs"], out["data/replay_by_key_steps"] = counts[2], counts[3]
        return out


def _sampler_for_ranks(seed: int):
    """This rank's share of each epoch's permutation under torch.distributed, else the default sampler."""
    if not distributed.is_distributed():
        return None
    rank, world = distributed.rank(), distributed.world_size()
    return lambda ds: EpochShuffleSampler(len(ds), seed, rank, world)


def training_transform(cfg: RunConfig, student: nn.Module, teacher: nn.Module | Sequence[nn.Module] | None,
                       store: Any = None) -> Any:
    """The training transform: each sample's random crop for the student (and the teacher's view of it, where the
    teacher needs another size or normalisation), or, with a ``teacher_cache`` section, its fixed views
    (:class:`~compress.data.views.FixedViews`): boxes drawn from the cache's seed (``mode: online``) or read from the
    cache ``store`` with the teacher's outputs for them (``mode: cache``: no teacher view is made)."""
    cache = cfg.teacher_cache
    if cache is None:
        return train_transform_for(student, teacher)
    views = {"images": preprocess_of(student)}
    outputs: tuple[tuple[str, int], ...] = ()
    if store is not None:
        manifest = store.manifest
        outputs = tuple((name, k) for k in range(len(manifest["teachers"])) for name in manifest["outputs"])
    else:  # each teacher's view where it differs from the student's (an ensemble's member k: teacher_images/k)
        views = training_views(student, teacher)
    return FixedViews(CropViews(views), cache.num_augmentations, cache.seed, store, outputs)


def student_inputs(views: FixedViews) -> FixedViews:
    """Fixed views made for the student alone: the same boxes (from the same seed or cache), no teacher view and no
    cached teacher output."""
    return dataclasses.replace(views, crop=views.crop.only("images"), outputs=())


def teacher_tokenizers(student: nn.Module, teacher: nn.Module | Sequence[nn.Module] | None) -> dict[str, Any]:
    """``{teacher_texts_key(k): tokenizer}`` for each teacher whose tokenizer is not the student's
    (:func:`compress.models.forward.tokenizer_identity`): its ids of the captions are made in the loader's workers."""
    teachers = model_list(teacher)
    mine = model_tokenizer_identity(student)
    return {teacher_texts_key(k): tokenizer_for(model) for k, model in enumerate(teachers)
            if model_tokenizer_identity(model) != mine}


def train_batches(
    cfg: RunConfig, student: nn.Module, teacher: nn.Module | Sequence[nn.Module] | None, device: torch.device,
    store: Any = None,
) -> tuple[Iterator[dict[str, Any]], DataStats]:
    """Micro-batches ``{"images", "texts", "captions", "keys"}`` forever (a new shuffle each epoch), each
    with exactly ``train.batch_size / (world size x train.accum_steps)`` samples (bad ones
    replaced): the trainer draws ``accum_steps`` of them per optimizer step, so the loader's
    batches in flight, and the position it saves, are counted in micro-batches.

    Images are preprocessed for the student (its size and normalisation); when the teacher
    needs another size or normalisation, ``"teacher_images"`` holds the same random view
    prepared for the teacher (see :class:`~compress.data.transforms.DistillTransform`); a teacher ensemble (a list
    of models) gets ``"teacher_images/k"`` for each member k >= 1 with a view of its own
    (:func:`~compress.data.transforms.teacher_view_key`), and a member whose tokenizer is not the student's its
    own token ids (:func:`teacher_tokenizers`). Pass ``teacher=None`` when no loss reads the teacher.
    ``device`` is where the batches will go
    (pinned memory on CUDA).

    The stream is a generator that reads the loader's position at its first ``next()``: to
    resume, call ``stats.loader.load_state_dict(state)`` (a saved ``stats.loader.state_dict()``)
    before drawing the first batch. With ``train.accum_steps`` > 1 and ``train.accum_inputs: reread``,
    ``stats.replay`` reads each step's micro-batches a second time (:class:`ReplayStream`). With a
    ``teacher_cache`` section the samples are fixed views (:func:`training_transform`; ``store``: the opened cache
    in ``mode: cache``) and the batches also carry ``"sample_ids"``, ``"aug_ids"`` and the cached outputs."""
    train_tf = training_transform(cfg, student, teacher, store)
    micro = cfg.train.micro_batch(distributed.world_size())
    extra = teacher_tokenizers(student, teacher) if store is None else {}

    def build(twin_of: CountedLoader | None = None) -> CountedLoader:
        # the second reading feeds the student's live pass alone: with fixed views it makes no teacher view, reads
        # no cached output and tokenizes no teacher's captions
        twin = twin_of is not None and isinstance(train_tf, FixedViews)
        return build_train_loader(
            cfg.data, student_inputs(train_tf) if twin else train_tf, tokenizer_for(student), micro, seed=cfg.seed,
            sampler=_sampler_for_ranks(cfg.seed), pin_memory=device.type == "cuda",
            dataset=twin_of.source_dataset() if twin_of is not None else None, extra_tokenizers={} if twin else extra,
        )

    loader = build()
    reread = cfg.train.accum_steps > 1 and cfg.train.accum_inputs == "reread"
    replay = ReplayStream(lambda: build(loader), loader) if reread else None
    return loader.forever(), DataStats(loader, replay)
