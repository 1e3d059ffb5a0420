"""What running the command would do in the run directory (start, resume from a checkpoint, skip a completed run,
refuse another run's folder), and the data paths that are missing here: read, never written."""

from __future__ import annotations

from pathlib import Path

from compress.config import RunConfig
from compress.recipe import Recipe

#: data set kinds read from a path
_PATH_KINDS = ("csv", "folder", "webdataset")


def stage_state(directory: Path, recipe: Recipe, force: bool, staged: bool, warnings: list[str]) -> str:
    """What the run would do with this stage's folder: skip, resume (from which step), start."""
    from compress.checkpoint import CheckpointError, config_hash, latest_checkpoint
    from compress.results import STATUS_COMPLETED, read_result

    if force:
        return "starts at step 0 (--force: what an earlier attempt left is removed)"
    if staged:
        done = read_result(directory)
        if done is not None and done.get("status") == STATUS_COMPLETED:
            return "completed: kept (its exported model is the next stage's source)"
    try:
        checkpoint = latest_checkpoint(directory)
    except CheckpointError as error:
        warnings.append(f"{directory}: {error}")
        return "an unreadable checkpoint is there (see the warnings)"
    if checkpoint is None:
        return "starts at step 0"
    try:
        checkpoint.check_owner(recipe.run_id, config_hash(recipe.cfg))
    except CheckpointError as error:
        warnings.append(str(error))
        return f"a checkpoint of another run or config ({checkpoint.meta.get('run_id')}) is there: refused"
    return f"resumes from its checkpoint at step {checkpoint.step} ({checkpoint.path.name})"


def run_state(recipe: Recipe, run_dir: Path, force: bool, warnings: list[str]) -> tuple[str, str | None]:
    """What the command would do with the run as a whole, and what overrides every stage's state
    (``"skipped"``: a completed run; ``"refused"``: the folder belongs to another run), if anything."""
    from compress.results import STATUS_COMPLETED, read_result
    from compress.rundir import recorded_run_id

    if not run_dir.exists():
        return f"{run_dir} does not exist yet: the run starts at step 0", None
    owner = recorded_run_id(run_dir)
    run_id = recipe.run_id
    if owner is not None and owner != run_id:
        warnings.append(f"{run_dir} belongs to run {owner}, not to this config's run ({run_id}); choose another "
                        "output.run_name")
        return f"{run_dir} belongs to another run ({owner}): the run would be refused", "refused"
    done = read_result(run_dir)
    if done is not None and done.get("status") == STATUS_COMPLETED and done.get("run_id") == run_id:
        if force:
            return "a completed result is there; --force reruns the run from step 0", None
        return "a completed result is there: the run would be skipped (--force reruns it)", "skipped"
    return f"{run_dir} exists: each stage below says whether it resumes", None


def missing_paths(cfg: RunConfig) -> list[str]:
    """Data and evaluation paths that do not exist here (warnings of a dry run; a real run fails on
    them before training: the evaluation sets are built first)."""
    out: list[str] = []
    for where, ds in (("data.train", cfg.data.train), ("data.val", cfg.data.val)):
        if ds is None or ds.kind not in _PATH_KINDS:
            continue
        if not ds.path:
            out.append(f"{where}.path: not set (--set {where}.path=...)")
        elif ds.kind == "webdataset":
            out.extend(_missing_shards(where, ds.path))
        elif not Path(ds.path).exists():
            out.append(f"{where}.path: {ds.path} does not exist (--set {where}.path=...)")
    for i, task in enumerate(cfg.eval.zero_shot):
        if task.kind != "synthetic" and task.path and not Path(task.path).exists():
            out.append(f"eval.zero_shot[{i}].path: {task.path} does not exist (--set eval.zero_shot.{i}.path=...)")
    return out


def _missing_shards(where: str, pattern: str) -> list[str]:
    from compress.data.shards import expand_urls

    urls = expand_urls(pattern)
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not Path(u).is_file()]
    if not missing:
        return []
    return [f"{where}.path: {len(missing)} of {len(urls)} shards of {pattern} do not exist, e.g. {missing[0]} "
            f"(--set {where}.path=...)"]
