"""Robust sample loading: a bad image is skipped and counted, never a crash.

Datasets return ``None`` for a sample they cannot load (missing file, corrupt bytes, a
shard read error). The collate functions drop the ``None`` entries and record
``num_bad`` / ``num_samples`` in the batch; :class:`BadSampleCounter` adds these up in the
main process (collate runs inside DataLoader workers, so a counter there would be lost)
and raises :class:`DataError` once the fraction of bad samples in a sliding window passes the
configured limit.
"""

from __future__ import annotations

import io
import logging
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

log = logging.getLogger(__name__)

#: how many bad samples each process reports in the log before going quiet
_MAX_WARNINGS = 5
_warned = 0
_warned_sources: set[str] = set()


class DataError(RuntimeError):
    """A data set cannot be used: too many bad samples, a missing column, an empty source."""


def warn_bad(source: str, reason: object, once: bool = False) -> None:
    """Log a skipped sample (the first few per process); ``once``: a whole source (a broken shard),
    logged once per process whatever came before, so every broken shard is named."""
    global _warned
    if once:
        if source not in _warned_sources:
            _warned_sources.add(source)
            log.warning("bad data source %s: %s", source, reason)
        return
    if _warned < _MAX_WARNINGS:
        _warned += 1
        log.warning("skipping bad sample %s: %s", source, reason)


@dataclass(frozen=True)
class Lost:
    """``count`` samples a source could not deliver at all (the tail of a truncated or damaged
    shard). A data set yields it in place of one sample; the collate functions count ``count``
    bad samples for it (drawn and bad), so ``max_bad_fraction`` sees the loss."""

    count: int


def open_image(source: str | Path | bytes, name: str | None = None) -> Image.Image | None:
    """Decode an image fully (``load()`` catches truncated files) as RGB; ``None`` if it
    is missing or cannot be decoded."""
    try:
        fp = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
        with Image.open(fp) as img:
            img.load()
            return img.convert("RGB")
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBomb...
        warn_bad(name or (str(source) if not isinstance(source, bytes | bytearray) else "<bytes>"), e)
        return None


@contextmanager
def torch_seeded(seed: int) -> Iterator[None]:
    """A block with torch's CPU generator seeded by ``seed`` (mod 2**64); the caller's state is
    restored after, so a sample's random augmentation depends on its key, not on the process.

    Only the CPU generator is saved, seeded and restored (its state is a 5 KB tensor): the draws are
    those of ``torch.random.fork_rng(devices=[])`` + ``torch.manual_seed(seed)``, bit for bit, without
    ``torch.manual_seed``'s seeding of every accelerator's generators, which on a CUDA build whose
    CUDA is not started queues a lazy call with a formatted stack trace (~150 us a sample against
    ~3 us here: benchmarks/bench_sample_seeding.py) and where CUDA is started reseeds the GPUs'
    generators behind the trainer's back."""
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed % (1 << 64))
    try:
        yield
    finally:
        generator.set_state(state)


def apply_transform(transform: Any, image: Image.Image, name: str) -> Any | None:
    """``transform(image)``, or ``None`` (counted as a bad sample) if it fails."""
    if transform is None:
        return image
    try:
        return transform(image)
    except Exception as e:
        warn_bad(name, e)
        return None


@dataclass
class BadSampleCounter:
    """Counts samples seen and bad samples skipped for one data set, in the main process.

    ``update`` raises :class:`DataError` when a whole batch is bad (a batch of at least
    ``whole_batch_min`` samples, or a batch that ends a run of at least ``whole_batch_min`` bad
    samples before any good one: a wrong root or a broken source stops at once, one bad first
    image of a small batch does not), or when more than ``max_bad_fraction`` of the last
    ``window`` samples were bad; the fraction is judged only once ``window`` samples were
    seen, so a bad image among the first few does not stop a run, and it slides, so a burst
    of bad data late in a long run is not diluted by what came before. :meth:`close` judges
    a pass shorter than the window over all its samples (evaluation sets). A small all-bad
    batch after good data (say the last, partial batch) only counts towards the fraction.
    """

    name: str
    max_bad_fraction: float = 0.01
    window: int = 1000
    whole_batch_min: int = 8
    seen: int = 0
    bad: int = 0
    _recent: deque[tuple[int, int]] = field(default_factory=deque, repr=False)
    _recent_bad: int = field(default=0, repr=False)
    _recent_seen: int = field(default=0, repr=False)

    @property
    def fraction(self) -> float:
        """Bad fraction over everything seen."""
        return self.bad / self.seen if self.seen else 0.0

    @property
    def window_fraction(self) -> float:
        """Bad fraction over the last ``window`` samples (whole batches, so a little more)."""
        return self._recent_bad / self._recent_seen if self._recent_seen else 0.0

    def update(self, num_bad: int, num_samples: int) -> None:
        num_bad, num_samples = int(num_bad), int(num_samples)
        self.seen += num_samples
        self.bad += num_bad
        self._recent.append((num_bad, num_samples))
        self._recent_bad += num_bad
        self._recent_seen += num_samples
        while self._recent and self._recent_seen - self._recent[0][1] >= self.window:
            b, n = self._recent.popleft()
            self._recent_bad -= b
            self._recent_seen -= n
        nothing_good_yet = self.bad == self.seen >= self.whole_batch_min
        if num_samples and num_bad == num_samples and (num_samples >= self.whole_batch_min or nothing_good_yet):
            raise DataError(
                f"data set {self.name!r}: a whole batch of {num_samples} samples was bad "
                f"({self.bad} of {self.seen} bad so far, fraction {self.fraction:.3f})"
            )
        if self.seen >= self.window and self.window_fraction > self.max_bad_fraction:
            raise DataError(
                f"data set {self.name!r}: {self._recent_bad} of the last {self._recent_seen} samples were bad "
                f"(fraction {self.window_fraction:.3f} > max_bad_fraction {self.max_bad_fraction}; "
                f"{self.bad} of {self.seen} in all)"
            )

    def close(self) -> None:
        """End of a finite pass: judge it over all its samples if it was shorter than the window."""
        if 0 < self.seen < self.window and self.fraction > self.max_bad_fraction:
            raise DataError(
                f"data set {self.name!r}: {self.bad} of {self.seen} samples were bad "
                f"(fraction {self.fraction:.3f} > max_bad_fraction {self.max_bad_fraction})"
            )

    def update_from_batch(self, batch: dict[str, Any]) -> None:
        self.update(batch.get("num_bad", 0), batch.get("num_samples", 0))

    def state_dict(self) -> dict[str, Any]:
        """The counts and the sliding window (ints and lists only: loads with ``weights_only=True``)."""
        return {"name": self.name, "seen": self.seen, "bad": self.bad, "recent": [list(r) for r in self._recent]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (the limits stay those of this counter's config)."""
        if state["name"] != self.name:
            raise DataError(f"bad-sample counter state is for data set {state['name']!r}, not {self.name!r}")
        self.seen, self.bad = int(state["seen"]), int(state["bad"])
        self._recent = deque((int(b), int(n)) for b, n in state["recent"])
        self._recent_bad = sum(b for b, _ in self._recent)
        self._recent_seen = sum(n for _, n in self._recent)

    def as_dict(self, prefix: str = "data") -> dict[str, float | int]:
        """Numbers for logging and the result row."""
        return {
            f"{prefix}_samples_seen": self.seen,
            f"{prefix}_bad_samples": self.bad,
            f"{prefix}_bad_fraction": round(self.fraction, 6),
        }
