"""The submitit job of one part of a teacher-output cache: a picklable callable over a plain config dict."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from compress.recipe import config_from_dict


class CacheJob:
    """``CacheJob(cfg.to_dict(), part, parts)()`` generates part ``part`` of ``parts`` of the config's teacher cache,
    then (``wait``) every shard still missing (:func:`compress.teacher_cache.generate.generate`); returns a summary
    dict. Preempted or timed out, the job is requeued and resumes (finished shards are never redone)."""

    def __init__(self, config: Mapping[str, Any], part: int = 0, parts: int = 1, wait: bool = True) -> None:
        if not isinstance(config, Mapping):
            raise TypeError(f"CacheJob takes a plain config dict (cfg.to_dict()), got {type(config).__name__}")
        self.config, self.part, self.parts, self.wait = dict(config), int(part), int(parts), bool(wait)

    def __call__(self) -> dict[str, Any]:
        from compress.teacher_cache.generate import generate

        report = generate(config_from_dict(self.config), part=self.part, parts=self.parts, wait=self.wait)
        return {"root": str(report.root), "part": self.part, "parts": self.parts, "computed": report.computed,
                "missing": report.missing, "complete": report.complete, "bad_samples": report.bad_samples,
                "bytes": report.bytes, "seconds": report.seconds}

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit calls this on preemption or timeout: the same part again (it resumes)."""
        import submitit

        return submitit.helpers.DelayedSubmission(CacheJob(self.config, self.part, self.parts, self.wait))
