"""``importance`` inheritance in two processes (gloo, CPU): rank 0 scores and writes the scores file, rank 1 only reads
it (it never scores), and each stage's next source is the model rank 0 exported, read by both ranks. With
``magnitude`` (scores that read no data) a staged run of two processes with B samples each equals one process with
2B, stage by stage (the reason and the tolerance as in ``tests/test_ddp.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from compress.recipe import config_from_dict
from compress.run import run_dir_for, run_experiment
from tests.test_ddp import BASE, STEPS, TOL, WORLD, free_ports, key_bias_slices, spawn_and_join

pytestmark = pytest.mark.slow

CRITERIA = {"magnitude": {}, "taylor": {"calibration_batches": 1}}


def config(criterion: str, out: Path):
    inheritance = {"name": "importance", "criterion": criterion, **CRITERIA[criterion]}
    return config_from_dict({**BASE, "student": None, "inheritance": inheritance,
                             "stages": {"targets": [0.2, 0.4]}, "output": {**BASE["output"], "dir": str(out)}})


def worker(rank: int, out: str, ports: list[int]) -> None:
    import os

    import strategies.inheritance.importance as importance

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
                       "MASTER_ADDR": "127.0.0.1", "HF_HUB_OFFLINE": "1"})
    torch.set_num_threads(1)
    if rank != 0:
        def no_scoring(*args, **kwargs):
            raise AssertionError(f"rank {rank} scored the source")

        importance.compute_scores = no_scoring
    for criterion, port in zip(CRITERIA, ports, strict=True):
        os.environ["MASTER_PORT"] = str(port)
        row = run_experiment(config(criterion, Path(out) / criterion))
        (Path(out) / f"{criterion}.rank{rank}.json").write_text(json.dumps({"status": row["status"],
                                                                           "error": row.get("error")}))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("importance-ddp")
    spawn_and_join(worker, (str(root / "two"), free_ports(len(CRITERIA))), WORLD, 600)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        row = run_experiment(config("magnitude", root / "one" / "magnitude"))
        assert row["status"] == "completed", row.get("error")
    finally:
        torch.set_num_threads(threads)
    return root


@pytest.mark.parametrize("criterion", list(CRITERIA))
def test_every_rank_completes_and_only_rank_0_scores(runs, criterion):
    rows = [json.loads((runs / "two" / f"{criterion}.rank{r}.json").read_text()) for r in range(WORLD)]
    assert [r["status"] for r in rows] == ["completed"] * WORLD, rows
    run_dir = run_dir_for(config(criterion, runs / "two" / criterion))
    stages = sorted((run_dir / "stages").iterdir())
    assert len(stages) == 2
    for stage in stages:
        with safe_open(str(stage / "importance" / "scores.safetensors"), "pt") as f:
            key = json.loads(f.metadata()["key"])
        assert key["criterion"] == criterion
        if criterion == "taylor":  # rank 0's own micro-batch of B, in a world of two
            assert (key["micro_batch"], key["world_size"]) == (BASE["train"]["batch_size"] // WORLD, WORLD)


def test_two_processes_prune_and_train_a_staged_importance_run_as_one_process(runs):
    one = run_dir_for(config("magnitude", runs / "one" / "magnitude"))
    two = run_dir_for(config("magnitude", runs / "two" / "magnitude"))
    for stage in sorted(p.name for p in (one / "stages").iterdir()):
        a, b = (json.loads((d / "stages" / stage / "structure.json").read_text()) for d in (one, two))
        assert a == b, stage
        x, y = (load_file(str(next((d / "stages" / stage / "model").glob("*.safetensors")))) for d in (one, two))
        assert x.keys() == y.keys()
        for key, tensor in x.items():
            diff = (tensor - y[key]).abs()
            keys = key_bias_slices(key, tensor)
            if keys is not None:  # rounding noise moved by Adam (see tests/test_ddp.py): lr per step at most
                assert float(diff[keys].max()) <= BASE["train"]["lr"] * 2 * STEPS, (stage, key)
                diff = diff[~keys]
            worst = float(diff.max()) if diff.numel() else 0.0
            assert worst <= 10 * TOL, (stage, key, worst)
