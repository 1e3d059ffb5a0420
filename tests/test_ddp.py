"""Data-parallel training is exact: two CPU processes (gloo) with B samples each train as one
process with the doubled batch 2B, through the whole run (launch variables, process group,
per-rank data, DDP, gathered losses, rank-0 writes).

Why they must agree: each rank's loss compares its B rows against the 2B columns of both ranks
(gathered with gradients), the mean of the two rank losses is the full-batch loss, and DDP's
average of the rank gradients is the full-batch gradient (tests/test_distributed_gather.py
shows it for the losses alone). Rank r reads every second index of the same permutation, so
step k's two rank batches together are the single process's batch k; every sample is augmented
from (seed, epoch, index), whichever rank loads it; learnable masks draw the same gate sample
on both ranks (a generator seeded from the run seed and the step). What is left is float
rounding (other summation orders).

AdamW moves an element by lr * m / (sqrt(v) + eps): a rounding difference dg of a gradient
near 0 becomes lr * dg / eps in the weights, 1e-5 for dg = 1e-8 with the default eps 1e-6 (an
MLP weight whose gradient is nearly 0 showed it). The runs here use eps 1e-4, so the 1e-5 bound
measures the data-parallel gradient, not Adam's amplification of rounding. Parameters whose
true gradient is exactly 0 stay the exception: a key bias adds the same number to every logit
of a query, which softmax ignores, so its gradient is only rounding noise, different in the two
setups, and Adam still moves it by up to lr per step: it is bounded by lr * steps instead.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from compress.distributed import DistEnv, DistributedError, environment
from compress.recipe import config_from_dict
from compress.run import run_dir_for, run_experiment
from compress.step_timer import is_timing_key
from compress.train import Trainer

WORLD = 2
PER_RANK = 4
STEPS = 3
LR = 1e-3
TOL = 1e-5

BASE = {
    "name": "ddp",
    "teacher": {"model": "cc-test-teacher", "random_init": True},
    "student": {"model": "cc-test-student"},
    "inheritance": {"name": "manual"},
    "losses": [{"name": "affinity"}],
    "schedules": {"lr": {"name": "warmup_cosine", "warmup_steps": 1}},
    "data": {"train": {"kind": "synthetic", "num_samples": 64}},
    "train": {"steps": STEPS, "batch_size": WORLD * PER_RANK, "lr": LR, "eps": 1e-4, "log_every": 1,
              "progress": False, "checkpoint_every": 1},
    "eval": {"zero_shot": [], "retrieval": False, "macs": False, "throughput": False},
    "output": {"keep_checkpoints": True, "keep_every": 1},
}
AUTO = {"name": "auto", "prune_step": 3, "ramp_steps": 2, "mask_lr": 0.3, "lambda_lr": 1.0, "round_to": 1}
RESUMED = "affinity-stopped-and-resumed"
RN_TEACHER = {"model": "cc-test-rn-teacher", "random_init": True}  # embed dim 64 vs the student's 32: a projector

CASES: dict[str, dict] = {
    "affinity": {},
    "clip": {"losses": [{"name": "clip"}]},
    "feature_distill-projector": {"teacher": RN_TEACHER, "inheritance": {"name": "none"},
                                  "losses": [{"name": "feature_distill"}]},
    # CLIP-KD's interactive contrastive learning, with a projector (teacher embed dim 64, the student's 32)
    "icl-projector": {"teacher": RN_TEACHER, "inheritance": {"name": "none"}, "losses": [{"name": "icl"}]},
    "accum2-projector-clip": {"teacher": RN_TEACHER, "inheritance": {"name": "none"},
                              "losses": [{"name": "feature_distill"}, {"name": "clip", "weight": 0.5}],
                              "train": {**BASE["train"], "accum_steps": 2}},
    "grad-checkpointing": {"train": {**BASE["train"], "grad_checkpointing": True}},
    # a teacher ensemble: a 48 px teacher with another embedding size beside the 32 px one, each with its own logit
    # scale; every member's features are gathered across the ranks
    "ensemble": {"teachers": [BASE["teacher"], {"model": "cc-test-teacher-48px", "random_init": True}],
                 "losses": [{"name": "affinity", "scale": "model", "teacher_weights": [1, 3]}]},
    # the teacher's outputs from an fp32 cache (written by the two processes, a part each), with fixed views
    "teacher-cache": {"teacher": RN_TEACHER, "inheritance": {"name": "none"},
                      "teacher_cache": {"dtype": "fp32", "num_augmentations": 2, "shard_size": 24}},
    # masks for 3 steps, then pruned: the smaller student is wrapped again and trained 3 more steps (with a new
    # Adam, whose first steps again amplify rounding the most: eps 1e-3 here, see the module docstring)
    "auto-masks-then-pruned": {"inheritance": AUTO, "student": None,
                               "train": {**BASE["train"], "steps": 6, "eps": 1e-3}},
}


def case_config(name: str, out: Path, **extra):
    case = {**CASES[name], **extra}
    if "teacher_cache" in case:  # each run's own cache folder, beside its run directory
        case["teacher_cache"] = {**case["teacher_cache"], "dir": str(out / "teacher_cache")}
    return config_from_dict({**BASE, **case, "output": {**BASE["output"], "dir": str(out)}})


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def spawn_and_join(worker, args: tuple, processes: int, limit_s: float) -> None:
    """Run ``worker(rank, *args)`` in ``processes`` processes; fail the test (kill them) after ``limit_s`` (a deadlock
    fails it instead of waiting for the process group's timeout)."""
    context = mp.spawn(worker, args=args, nprocs=processes, join=False)
    deadline = time.monotonic() + limit_s
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {processes} processes did not finish within {limit_s:.0f} s")


#: runs of the two processes that are meant to fail: (name, config overrides, what fails where)
FAILING: dict[str, dict] = {
    "rn-student-on-cpu": {"student": {"model": "cc-test-rn-teacher"}, "inheritance": {"name": "none"}},
    "rank1-fails-in-training": {},
    "rank0-fails-in-evaluation": {},
}


def failing_config(name: str, out: Path):
    return config_from_dict({**BASE, **FAILING[name], "output": {**BASE["output"], "dir": str(out)}})


def worker(rank: int, names: list[str], out: str, ports: list[int]) -> None:
    """One of the two launched processes: torchrun's variables, then every case as a real run."""
    import os

    import compress.evaluation.run_eval as run_eval

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
                       "MASTER_ADDR": "127.0.0.1", "HF_HUB_OFFLINE": "1"})
    torch.set_num_threads(1)
    port = iter(ports)
    for name in names:
        os.environ["MASTER_PORT"] = str(next(port))
        row = run_experiment(case_config(name, Path(out) / name))
        if rank == 0 and row["status"] != "completed":
            raise RuntimeError(f"{name}: {row.get('error')}")
        if torch.distributed.is_initialized():
            raise RuntimeError("the run left its process group behind")
    # the affinity case again, stopped on both ranks before step 2 and started again: it resumes
    original_step, original_eval = Trainer.train_step, run_eval.evaluate_prepared

    def stopping(self, batch, step):
        if step == 2:
            raise KeyboardInterrupt("stopped")
        return original_step(self, batch, step)

    cfg = case_config("affinity", Path(out) / RESUMED)
    os.environ["MASTER_PORT"] = str(next(port))
    Trainer.train_step = stopping
    try:
        run_experiment(cfg)
        raise AssertionError("the first attempt was not stopped")
    except KeyboardInterrupt:
        pass
    finally:
        Trainer.train_step = original_step
    os.environ["MASTER_PORT"] = str(next(port))
    row = run_experiment(cfg)
    if rank == 0 and row["status"] != "completed":
        raise RuntimeError(f"resumed: {row.get('error')}")

    # runs that fail on one rank: every rank returns (none waits forever) and rank 0's row names the cause
    def failing_step(self, batch, step):
        if step == 1 and rank == 1:
            raise ValueError("rank 1 cannot read its shard")
        return original_step(self, batch, step)

    def failing_eval(*args, **kwargs):
        raise ValueError("evaluation data set missing")

    for name in FAILING:
        os.environ["MASTER_PORT"] = str(next(port))
        Trainer.train_step = failing_step if name == "rank1-fails-in-training" else original_step
        run_eval.evaluate_prepared = failing_eval if name == "rank0-fails-in-evaluation" else original_eval
        try:
            row = run_experiment(failing_config(name, Path(out) / name))
        finally:
            Trainer.train_step, run_eval.evaluate_prepared = original_step, original_eval
        (Path(out) / f"{name}.rank{rank}.json").write_text(json.dumps({"status": row["status"],
                                                                      "error": row.get("error")}))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run directories of every case: two processes (``ddp``) and one process with the doubled batch."""
    root = tmp_path_factory.mktemp("ddp")
    names = list(CASES)
    spawn_and_join(worker, (names, str(root / "two"), free_ports(len(names) + 2 + len(FAILING))), WORLD, 900)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in names:
            row = run_experiment(case_config(name, root / "one" / name))
            assert row["status"] == "completed", row.get("error")
    finally:
        torch.set_num_threads(threads)
    dirs = {name: {k: run_dir_for(case_config(name, root / k / name)) for k in ("one", "two")} for name in names}
    dirs[RESUMED] = {"two": run_dir_for(case_config("affinity", root / "two" / RESUMED)), "root": root}
    dirs["failing"] = {name: {"rows": [json.loads((root / "two" / f"{name}.rank{r}.json").read_text())
                                       for r in range(WORLD)],
                              "dir": run_dir_for(failing_config(name, root / "two" / name))} for name in FAILING}
    return dirs


def series(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def students(run_dir: Path) -> dict[int, dict[str, torch.Tensor]]:
    """The student of every checkpoint, by step (masks and multipliers included while they exist)."""
    found = run_dir.glob("checkpoints/step-*/student.safetensors")
    return {int(p.parent.name.split("-")[1]): load_file(str(p)) for p in found}


def key_bias_slices(name: str, tensor: torch.Tensor) -> torch.Tensor | None:
    """The key part of an attention's packed q/k/v bias (no true gradient), else None."""
    if name.endswith(("in_proj_bias", "qkv.bias")) and tensor.ndim == 1 and tensor.numel() % 3 == 0:
        mask = torch.zeros_like(tensor, dtype=torch.bool)
        third = tensor.numel() // 3
        mask[third : 2 * third] = True
        return mask
    return None


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.slow
def test_two_processes_train_as_one_process_with_the_doubled_batch(runs, name):
    one, two = runs[name]["one"], runs[name]["two"]
    a, b = series(one), series(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, len(a) + 1))  # rank 0 alone logged
    for ra, rb in zip(a, b, strict=True):
        for key in ra:
            if key.startswith(("loss", "inherit/")) or key == "lr":
                assert rb[key] == pytest.approx(ra[key], abs=TOL, rel=TOL), (ra["step"], key)
        # Adam's step hides a gradient's scale, the norm does not: equal at step 1 (equal weights); later it
        # also carries the rounding-level weight differences (one process with accum_steps 1 vs 2 differs as much)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=TOL if ra["step"] == 1 else 10 * TOL)
    weights_one, weights_two = students(one), students(two)
    assert weights_one.keys() == weights_two.keys() and len(weights_one) == len(a)
    for step, tensors in weights_one.items():
        assert tensors.keys() == weights_two[step].keys()
        for key, x in tensors.items():
            diff = (x - weights_two[step][key]).abs()
            keys = key_bias_slices(key, x)
            if keys is not None:  # rounding noise |g| < 1e-7 moved by Adam: lr * |g| / eps < 1e-6 a step
                assert float(diff[keys].max()) <= 1e-6 * step, (step, key)
                diff = diff[~keys]
            worst = float(diff.max()) if diff.numel() else 0.0
            assert worst <= TOL, (step, key, worst)
    row = json.loads((two / "result.json").read_text())["metrics"]
    one_row = json.loads((one / "result.json").read_text())["metrics"]
    assert row["dist/world_size"] == WORLD and row["dist/batch_per_process"] == PER_RANK
    assert one_row["dist/world_size"] == 1
    assert row["data/samples_seen"] == one_row["data/samples_seen"] > 0  # summed over both processes
    assert row["train/steps"] == len(a)


@pytest.mark.slow
def test_two_processes_from_a_cache_train_as_one_process_with_the_teacher_online(runs, tmp_path):
    """The chain closed: two processes reading the fp32 cache they wrote a part each of = one process running the
    teacher online on the same fixed views."""
    online = case_config("teacher-cache", tmp_path, teacher_cache={**CASES["teacher-cache"]["teacher_cache"],
                                                                   "mode": "online"})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run_experiment(online)["status"] == "completed"
    finally:
        torch.set_num_threads(threads)
    two = runs["teacher-cache"]["two"]
    assert (two.parent / "teacher_cache").is_dir()
    final = max(students(two))

    def exported(run_dir: Path) -> dict[str, torch.Tensor]:
        return load_file(str(next(run_dir.glob("model/*.safetensors"))))

    mine, theirs = exported(two), exported(run_dir_for(online))
    for key, x in theirs.items():
        diff = (x - mine[key]).abs()
        keys = key_bias_slices(key, x)
        if keys is not None:
            assert float(diff[keys].max()) <= 1e-6 * final, key
            diff = diff[~keys]
        assert float(diff.max()) <= TOL, key
    assert [r["loss"] for r in series(two)] == pytest.approx([r["loss"] for r in series(run_dir_for(online))],
                                                             abs=TOL, rel=TOL)


def test_the_masks_case_really_trains_masks_then_prunes(runs):
    """The auto case compares masks and multipliers, not just weights: they are in its checkpoints and
    move; after pruning at step 3 the smaller student trains on (DDP wraps it again)."""
    tensors = students(runs["auto-masks-then-pruned"]["two"])
    first = tensors[1]
    masked = [k for k in first if "log_alpha" in k]
    lambdas = [k for k in first if "lambda" in k]
    assert masked and lambdas
    assert any(not torch.equal(first[k], tensors[2][k]) for k in masked + lambdas)
    assert not any("log_alpha" in k for k in tensors[4])  # pruned: the masks are folded away
    assert any(not torch.equal(tensors[4][k], tensors[6][k]) for k in tensors[4])  # and it trained after


def test_the_gate_sample_of_a_step_does_not_depend_on_the_process_random_state():
    """Every rank draws the same gates in a step although their global random states may differ:
    the sample comes from a generator seeded with the run seed and the step."""
    from compress.masks import attach_masks, one_gate_sample
    from compress.masks.attach import get_masks
    from compress.models import load_model
    from compress.step_random import gate_generator

    model = load_model("cc-test-student")
    attach_masks(model)
    gates = [g for t in get_masks(model).towers.values() for g in t.gate_modules()]
    model.train()
    samples = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        with one_gate_sample(model, gate_generator(seed=3, step=7)):
            samples.append([g().detach().clone() for g in gates])
    assert all(torch.equal(a, b) for a, b in zip(*samples, strict=True))
    torch.manual_seed(0)
    with one_gate_sample(model, gate_generator(seed=3, step=8)):  # another step, another sample
        assert any(not torch.equal(g(), a) for g, a in zip(gates, samples[0], strict=True))


def test_a_resnet_student_is_refused_on_cpu_with_several_processes(runs):
    failing = runs["failing"]["rn-student-on-cpu"]
    for row in failing["rows"]:
        assert row["status"] == "failed"
    assert "BatchNorm" in failing["rows"][0]["error"] and "SyncBatchNorm needs GPUs" in failing["rows"][0]["error"]


def test_one_rank_failing_ends_the_run_on_every_rank_and_the_row_names_the_cause(runs):
    failing = runs["failing"]["rank1-fails-in-training"]
    assert [row["status"] for row in failing["rows"]] == ["failed", "failed"]
    written = json.loads((failing["dir"] / "result.json").read_text())
    assert written["error"].startswith("DistributedError: rank 1 failed: ValueError: rank 1 cannot read its shard")
    evaluation = runs["failing"]["rank0-fails-in-evaluation"]
    assert [row["status"] for row in evaluation["rows"]] == ["failed", "failed"]
    assert "evaluation data set missing" in evaluation["rows"][0]["error"]
    assert evaluation["rows"][1]["error"].startswith("DistributedError: rank 0 failed: ValueError: evaluation data")


def test_launch_environment_is_read_from_torchrun_or_an_srun_step():
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node7", "MASTER_PORT": "1234"}
    assert environment(torchrun) == DistEnv(3, 4, 1, "node7", 1234)
    srun = {"SLURM_STEP_ID": "0", "SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
            "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.2", "SLURM_JOB_ID": "123456"}
    assert environment(srun) == DistEnv(5, 8, 1, "10.0.0.2", 20000 + 123456 % 20000)
    # an sbatch script itself (no srun step) is one process, whatever --ntasks says
    assert environment({"SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_JOB_ID": "1"}) == DistEnv()
    assert environment({}) == DistEnv()
    with pytest.raises(DistributedError, match="MASTER_ADDR"):
        environment({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(DistributedError, match="not a valid launch"):
        environment({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "x", "MASTER_PORT": "1"})


def test_a_global_batch_that_does_not_split_is_refused_before_anything_runs(tmp_path, monkeypatch):
    from compress.config import ConfigError

    monkeypatch.setattr("compress.distributed.world_size", lambda: 3)
    monkeypatch.setattr("compress.distributed.environment", lambda env=None: DistEnv())
    cfg = case_config("affinity", tmp_path)  # 8 samples cannot split over 3 processes
    with pytest.raises(ConfigError, match=r"global batch: it must be a multiple of 3 process\(es\) x"):
        run_experiment(cfg)
    assert not run_dir_for(cfg).exists()


def test_two_processes_stopped_and_started_again_resume_exactly(runs):
    """Each rank's data position and random states are in the checkpoint (rank 0 gathers them)."""
    resumed, whole = runs[RESUMED]["two"], runs["affinity"]["two"]
    a, b = students(whole), students(resumed)
    assert a.keys() == b.keys()
    for step in a:
        for key in a[step]:
            assert torch.equal(a[step][key], b[step][key]), (step, key)
    assert [{k: v for k, v in r.items() if not is_timing_key(k)} for r in series(whole)] == [
        {k: v for k, v in r.items() if not is_timing_key(k)} for r in series(resumed)]
    state = torch.load(next(resumed.glob("checkpoints/step-00000002/state.pt")), weights_only=True)
    assert len(state["ranks"]) == WORLD  # one data position and one set of random states per rank


def test_a_checkpoint_of_two_processes_is_not_resumed_by_one(runs, tmp_path):
    import shutil

    source = runs[RESUMED]["two"]
    cfg = case_config("affinity", tmp_path)
    shutil.copytree(source, run_dir_for(cfg))
    (run_dir_for(cfg) / "result.json").unlink()
    row = run_experiment(cfg)
    assert row["status"] == "failed" and "written by 2 process(es), this attempt has 1" in row["error"]


@pytest.mark.slow
def test_torchrun_runs_the_cli_as_two_processes_and_rank_0_reports(tmp_path):
    import importlib.util
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "experiments.cli", "run", str(root / "experiments/configs/tiny-test.yaml"),
           "--set", f"output.dir={tmp_path}", "--set", "train.progress=false", "--set", "eval.throughput=false"]
    tracked = importlib.util.find_spec("tensorboard") is not None  # the track extra
    cmd += ["--set", "train.report_to=[jsonl,tensorboard]"] if tracked else []
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("[completed]") == 1, done.stdout  # one report, from rank 0
    (result,) = tmp_path.glob("*/result.json")
    row = json.loads(result.read_text())
    assert row["status"] == "completed" and row["metrics"]["dist/world_size"] == 2
    assert row["metrics"]["dist/batch_per_process"] == row["config"]["train"]["batch_size"] // 2
    assert len(series(result.parent)) == row["config"]["train"]["steps"]  # logged once, by rank 0
    if tracked:  # one writer, rank 0's: one event file, the same series
        from tests.test_tracking import jsonl_series, tensorboard_series

        assert len(list((result.parent / "tensorboard").glob("events.out.tfevents.*"))) == 1
        assert tensorboard_series(result.parent / "tensorboard") == jsonl_series(series(result.parent))


def test_the_trainer_draws_each_steps_gates_from_the_step_generator(tmp_path, monkeypatch):
    import compress.train as train
    from compress.step_random import gate_generator

    drawn = []
    original = train.one_gate_sample

    def spy(model, generator=None):
        drawn.append(None if generator is None else generator.initial_seed())
        return original(model, generator)

    monkeypatch.setattr(train, "one_gate_sample", spy)
    cfg = config_from_dict({**BASE, "student": None, "seed": 5, "train": {**BASE["train"], "steps": 2},
                            "inheritance": {**AUTO, "prune_step": 2, "ramp_steps": 1},
                            "output": {"dir": str(tmp_path)}})
    assert run_experiment(cfg)["status"] == "completed"
    assert drawn == [gate_generator(5, step).initial_seed() for step in (0, 1)]


def pruned_student() -> torch.nn.Module:
    """cc-test-student pruned as auto inheritance can leave it: layers without heads (vision 0, text 0: their
    qkv and out weights have no elements and nothing reads their ln_1) and MLPs without neurons."""
    from compress.models import load_model
    from compress.models.structure import TowerKeep, prune_model

    torch.manual_seed(0)
    none, r = torch.empty(0, dtype=torch.long), torch.arange
    keep = {"vision": TowerKeep(r(48), [none, r(3), r(2), r(3)], [r(192), none, r(100), r(192)]),
            "text": TowerKeep(r(64), [none, r(4)], [r(256), none])}
    return prune_model(load_model("cc-test-student"), keep)


def pruned_batches(ranks: int, rank: int, steps: int, accum: int) -> list[dict[str, torch.Tensor]]:
    """Micro-batches of ``rank`` of ``ranks``: each step's 16 samples, split over ranks, then micro-batches."""
    from tests.test_train import make_batch

    size = 16 // (ranks * accum)
    out = []
    for step in range(steps):
        batch = make_batch(16, seed=step)
        for j in range(accum):
            start = (rank * accum + j) * size
            out.append({k: v[start:start + size] for k, v in batch.items()})
    return out


def pruned_worker(rank: int, port: int, out: str) -> None:
    """One of two gloo processes training the pruned student (accumulation: no_sync passes, then the synced one)."""
    import os

    from compress.models import load_model
    from tests.test_train import make_trainer

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "HF_HUB_OFFLINE": "1"})
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        teacher = load_model("cc-test-teacher")
        trainer = make_trainer(teacher, pruned_student(), accum=2, steps=2, eps=1e-3,
                               batches=iter(pruned_batches(WORLD, rank, 2, 2)))
        trainer.fit()
        if rank == 0:
            torch.save(trainer.student.state_dict(), out)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_a_student_pruned_to_layers_without_heads_trains_on_two_processes_as_on_one(tmp_path):
    """Parameters no live pass reads (a layer without heads: its empty qkv and out weights, its ln_1) are left
    out of DDP; with them in, DDP (find_unused_parameters=False) waited for their gradients and the step after
    raised "Expected to have finished reduction in the prior iteration". Two processes equal one."""
    from compress.models import load_model
    from tests.test_train import make_trainer

    out = tmp_path / "two.pt"
    mp.spawn(pruned_worker, args=(free_ports(1)[0], str(out)), nprocs=WORLD)
    torch.manual_seed(0)
    teacher = load_model("cc-test-teacher")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = make_trainer(teacher, pruned_student(), accum=2, steps=2, eps=1e-3,
                           batches=iter(pruned_batches(1, 0, 2, 2)))
        one.fit()
    finally:
        torch.set_num_threads(threads)
    two = torch.load(out, weights_only=True)
    start = pruned_student().state_dict()
    assert not torch.equal(start["visual.transformer.resblocks.1.attn.in_proj_weight"],
                           two["visual.transformer.resblocks.1.attn.in_proj_weight"])  # it trained
    assert torch.equal(start["visual.transformer.resblocks.0.ln_1.weight"],
                       two["visual.transformer.resblocks.0.ln_1.weight"])  # read by nothing: no gradient, unchanged
    for key, value in one.student.state_dict().items():
        torch.testing.assert_close(two[key], value, rtol=1e-4, atol=1e-5, msg=key)
