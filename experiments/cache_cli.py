"""``clip-compress cache-teacher CONFIG``: generate (here, or as jobs of the config's dispatch backend) or verify the
config's teacher-output cache (:mod:`compress.teacher_cache`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from compress.config import RunConfig

#: why a config without a ``teacher_cache`` section cannot be cached
NO_SECTION = ("has no teacher_cache section: add one (teacher_cache: {dir: DIR, num_augmentations: A, dtype: fp16}) "
              "to cache its teachers' outputs")


class CacheCliError(Exception):
    """A user error of the command (one line)."""


def cache_teacher(args: argparse.Namespace) -> int:
    """The command: ``--verify N``, ``--dispatch`` (``--parts`` jobs), or generate part ``--part`` here."""
    from compress.recipe import load_config

    cfg = load_config(args.config, args.set or [])
    if cfg.teacher_cache is None:
        raise CacheCliError(f"{args.config} {NO_SECTION}")
    if args.parts < 1 or not 0 <= args.part < args.parts:
        raise CacheCliError(f"--part {args.part} --parts {args.parts}: need parts >= 1 and 0 <= part < parts")
    from compress.teacher_cache.generate import check_cacheable, generate, print_report, verify

    check_cacheable(cfg)
    if args.verify is not None:
        if args.verify < 1:
            raise CacheCliError(f"--verify {args.verify}: the number of (sample, view) pairs must be at least 1")
        report = verify(cfg, args.verify, batch_size=args.batch_size)
        print(f"verify: {len(report.pairs)} (sample, view) pairs of {report.root}: largest |cached - online| "
              f"(tolerance {report.tolerance:g} for {report.dtype})")
        for name, values in report.max_abs.items():
            for k, value in enumerate(values):
                print(f"  {name} teacher {k}: {value:.3g}")
        print(f"  boxes differing from a fresh draw: {report.box_mismatches}")
        print("verify: " + ("passed" if report.passed else "FAILED"))
        return 0 if report.passed else 1
    if args.dispatch:
        return _dispatch(cfg, args.parts)
    report = generate(cfg, part=args.part, parts=args.parts, wait=not args.no_wait, batch_size=args.batch_size)
    print_report(report)
    return 0


def _dispatch(cfg: RunConfig, parts: int) -> int:
    """``parts`` jobs of the config's dispatch backend, job ``i`` generating part ``i`` (then helping the others)."""
    from compress.teacher_cache.generate import generate, print_report
    from experiments.backends import get_backend
    from experiments.cache_job import CacheJob

    assert cfg.teacher_cache is not None
    backend = get_backend(cfg.dispatch.backend)
    backend.refuse([[cfg]])  # no cluster here, say: one line before anything is submitted
    backend.check_device(cfg)
    folder = Path(cfg.teacher_cache.dir) / "submitit"
    calls = [CacheJob(cfg.to_dict(), part, parts) for part in range(parts)]
    out = backend.submit_tasks(f"cache-{cfg.name}", calls, cfg, folder)
    if backend.waits:
        print_report(generate(cfg, wait=False, progress=False))
        return 0
    print(f"[submitted] {parts} cache part job(s) with the {backend.name} backend: {', '.join(map(str, out))} "
          f"(logs in {folder})", file=sys.stdout)
    return 0
