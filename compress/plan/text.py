"""The plan as ``clip-compress run CONFIG --dry-run`` prints it."""

from __future__ import annotations

from compress.memory import gib
from compress.plan.build import Plan, StagePlan
from compress.plan.facts import ModelFacts


def _m(count: int | None) -> str:
    return "?" if count is None else f"{count / 1e6:.2f}M"


def _g(count: int | None) -> str:
    """MACs in G (M, k for tiny models)."""
    if count is None:
        return "?"
    for size, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return str(count)


def _count(n: int) -> str:
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _facts_line(facts: ModelFacts) -> str:
    return (f"params vision {_m(facts.vision)}, text {_m(facts.text)} (+ token embedding "
            f"{_m(facts.token_embedding)}); MACs per image {_g(facts.macs_image)}, per text {_g(facts.macs_text)}")


def _kib(n: int) -> str:
    return f"{n / 2**10:.0f} KiB" if n >= 2**10 else f"{n} B"


def _memory_lines(s: StagePlan) -> list[str]:
    """Micro-batch, host and device memory of one step per process (:mod:`compress.memory`)."""
    world = s.world_size
    micro = s.micro_batch
    head = (f"  memory       micro-batch {micro} per process (batch {s.batch_size} / ({world} process"
            f"{'es' if world != 1 else ''} x {s.accum_steps} micro-batch{'es' if s.accum_steps != 1 else ''}))")
    if s.memory is None or s.host is None:
        return [head, "               host and device memory unknown (a model's size is unknown)"]
    h, m = s.host, s.memory
    workers = f"{h.batches_in_flight} micro-batches" if h.batches_in_flight > 1 else "1 micro-batch"
    loaders = "the loader" if h.loaders == 1 else f"{h.loaders} loaders"
    again = "; the second reads the step again" if h.loaders > 1 else ""
    kept = (f"the step's {h.retained_samples} samples (kept for the gradient cache's second pass)"
            if h.retained_samples else "the step's tokens (for the loss)")
    host = (f"               host ~{gib(h.total)}: {gib(h.in_flight)} in flight in {loaders} ({workers} of {micro} x "
            f"{_kib(h.bytes_per_sample)}{again}) + {gib(h.retained)} for {kept}")
    lower = "+" if m.unknown else ""
    sims = (f" ({m.similarity_matrices} + 3 working of {m.rows} x {m.columns} fp32)" if m.similarities else "")
    device = (f"               device ~{gib(m.total)}{lower} in {m.precision}: weights {gib(m.weights)}, optimizer "
              f"{gib(m.optimizer)}, activations {gib(m.activations)} (one micro-batch"
              f"{', grad checkpointing' if s.grad_checkpointing else ''}), features {gib(m.features)}, similarities "
              f"{gib(m.similarities)}{sims}")
    lines = [head, host, device]
    if m.unknown:
        lines.append(f"               not estimated: {', '.join(m.unknown)}")
    if s.memory_note:
        lines.append(f"               {s.memory_note}")
    return lines


def format_plan(plan: Plan) -> str:
    """The plan as the CLI prints it."""
    n = len(plan.stages)
    lines = [
        f"plan of {plan.name} (run id {plan.run_id}): {n} stage{'s' if n != 1 else ''}; dry run: nothing is "
        "trained, downloaded or written",
        f"run directory  {plan.run_dir}",
        f"               {plan.state}",
    ]
    if plan.teacher is not None:
        t = plan.teacher
        role = (f"teachers[0]    {t.label} (frozen, the same for every stage; students inherit from it)"
                if plan.members else f"teacher        {t.label} (frozen, the same for every stage)")
        lines += [role, f"               {_facts_line(t)}"]
        if t.note:
            lines.append(f"               {t.note}")
        for k, m in enumerate(plan.members, start=1):
            lines += [f"teachers[{k}]    {m.label} (frozen; an ensemble member: its outputs feed the loss)",
                      f"               {_facts_line(m)}"]
            if m.note:
                lines.append(f"               {m.note}")
        if plan.members:
            lines.append(f"               an ensemble of {len(plan.members) + 1} teachers, each on its own view and "
                         "tokens (the memory estimates below count every one)")
    else:
        lines.append("teacher        none")
    lines.extend(plan.cache)
    for s in plan.stages:
        lines.append("")
        lines.append(f"stage {s.index}: {s.name}" if plan.staged else "training")
        if plan.staged:
            lines.append(f"  directory    {s.directory}")
        lines.append(f"  source       {s.source_text}")
        lines.append(f"  inheritance  {s.inheritance}")
        lines.append(f"  student      {s.student_text}")
        if s.student is not None:
            lines.append(f"               {_facts_line(s.student)}")
            if s.student.note:
                lines.append(f"               {s.student.note}")
        if s.target_sparsity is not None:
            per_stage = ""
            if s.stage_target is not None and abs(s.stage_target - s.target_sparsity) > 1e-9:
                per_stage = f"; this stage removes {s.stage_target:.1%} of its source"
            whose = "the teacher's" if s.towers == ("vision", "text") else f"the teacher's {'+'.join(s.towers)}"
            lines.append(f"  target       {s.target_sparsity:.1%} of {whose} prunable parameters removed "
                         f"(cumulative){per_stage}")
            if s.expected_prunable is not None:
                lines.append(f"  expected     vision + text {_m(s.expected_prunable)} at the target (total "
                             f"{_m(s.expected_total)}); the split between towers and the MACs are decided by "
                             f"{s.structure_decided_by}")
        micro = s.batch_size // s.accum_steps
        accum = f" ({s.accum_steps} micro-batches of {micro})" if s.accum_steps > 1 else ""
        epochs = f" = {s.epochs:.2f} epochs of data.train" if s.epochs is not None else ""
        lines.append(f"  steps        {s.steps} x batch {s.batch_size}{accum} = {_count(s.samples)} samples{epochs}")
        lines.extend(_memory_lines(s))
        lines.append(f"  losses       {'; '.join(s.losses)}")
        for i, text in enumerate(s.schedules):
            lines.append(f"  {'schedules' if i == 0 else '':<11}  {text}")
        lines.append(f"  state        {s.state}")
    if plan.warnings:
        lines.append("")
        lines.append("warnings:")
        lines.extend(f"  {w}" for w in plan.warnings)
    return "\n".join(lines)
