"""Which layers, heads and MLP neurons an importance-ranked inheritance keeps, given their scores and a budget.

1. ``drop_layers``: each tower's k lowest-scored layers go first (their parameters count toward the budget; more
   than the budget is refused).
2. ``per_layer``: the kept layers' heads and neurons, each scored over its kind's mean in the tower, are removed from
   the lowest up while the removal stays within the budget (a unit too large for what is left is skipped); every
   layer keeps one head and ``round_to`` neurons; then each layer's neuron count goes to the nearest multiple of
   ``round_to`` (ties up), its best-scored neurons kept.
   ``uniform``: every kept layer of a tower keeps all its heads and the same ``m`` neurons (its best-scored ones);
   ``m`` falls by ``round_to`` at a time, in the tower whose next ``round_to`` neurons per layer have the lowest mean
   normalised score, while the removal comes nearer the budget.
3. ``channels: prune``, ``per_layer``: the tower's residual channels join the ranking of step 2 in chunks of
   ``round_to`` (its lowest-scored channels first, a chunk scored by its mean normalised score), so the kept width is a
   multiple of ``round_to`` (at least ``round_to``). Costs are counted at the state when a unit goes: a channel costs
   its tower-level tensors plus, in each kept layer, its norms, biases and ``4 d`` per kept head and 2 per kept
   neuron; a head ``4 d`` per kept channel (+ ``3 d`` of bias), a neuron 2 per kept channel (+1), so the removed
   count is exact before the neurons' rounding.
   ``uniform``: open_clip ties a tower's width to heads x head dim (one attention inner size, the width), so the
   width moves by a head dim at a time together with one head in every kept layer (its lowest-scored one): a third
   option beside the ``round_to`` neurons step, scored by the mean normalised score of the d channels and the heads
   it removes; where a width step overshot, ``round_to`` neurons per layer come back (the best-scored first) while
   that nears the target. The kept width is a multiple of the head dim, and the export is a plain open_clip model
   (``width``, the text tower's ``heads`` and ``mlp_ratio`` rewritten).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from compress.models.structure import TowerKeep


def _budget_keys(towers: tuple[str, ...], budget: str) -> dict[str, str]:
    return {name: ("all" if budget == "pooled" else name) for name in towers}


def _normalised(scores: Mapping[str, Tensor], name: str, kind: str, layers: list[int]) -> dict[int, Tensor]:
    """Scores of a kind in the kept layers of a tower, over their mean (1 when all are 0)."""
    values = {i: scores[f"{name}/{kind}/{i}"].double() for i in layers}
    flat = torch.cat([v for v in values.values()]) if values else torch.zeros(0)
    mean = float(flat.mean()) if flat.numel() else 0.0
    return {i: (v / mean if mean > 0 else torch.ones_like(v)) for i, v in values.items()}


def _round(n: int, step: int, full: int) -> int:
    """``n`` to the nearest multiple of ``step`` (ties up), at least ``step`` (or ``full`` when smaller), at most
    ``full``."""
    if step <= 1:
        return n
    rounded = int((n + step / 2) // step) * step
    return min(max(rounded, min(step, full)), full)


def select_units(
    scores: Mapping[str, Tensor], structure: Mapping[str, Any], costs: Mapping[str, Mapping[str, Any]],
    towers: tuple[str, ...], target: float, budget: str, widths: str, drop: Mapping[str, int], round_to: int,
    channels: bool = False,
) -> dict[str, TowerKeep]:
    """The kept layers (as ``TowerKeep.layers``), heads, neurons and (``channels``) residual channels of each tower in
    ``towers``."""
    keys = _budget_keys(towers, budget)
    needed: dict[str, float] = {}
    for name in towers:
        needed[keys[name]] = needed.get(keys[name], 0.0) + target * costs[name]["total"]
    removed = dict.fromkeys(needed, 0.0)
    kept_layers: dict[str, list[int]] = {}
    for name in towers:
        depth = len(structure[name]["heads"])
        order = sorted(range(depth), key=lambda i: (float(scores[f"{name}/layers"][i]), i))
        gone = set(order[: drop.get(name, 0)])
        kept_layers[name] = [i for i in range(depth) if i not in gone]
        removed[keys[name]] += sum(costs[name]["layers"][i] for i in gone)
    for key, value in removed.items():
        if value > needed[key] + 1e-9:
            raise ValueError(f"drop_layers removes {value:,.0f} parameters, more than the target's {needed[key]:,.0f} "
                             f"({key}): drop fewer layers or raise target_sparsity")
    kept_channels = {name: torch.arange(structure[name]["width"]) for name in towers}
    if widths == "uniform":
        heads, neurons, kept_channels = _uniform(scores, structure, costs, towers, keys, needed, removed, kept_layers,
                                                 round_to, channels)
    else:
        heads, neurons, kept_channels = _per_layer(scores, structure, costs, towers, keys, needed, removed,
                                                   kept_layers, round_to, channels)
    out = {}
    for name in towers:
        layers = kept_layers[name]
        out[name] = TowerKeep(channels=kept_channels[name],
                              heads=[heads[name][i] for i in layers], neurons=[neurons[name][i] for i in layers],
                              layers=layers if len(layers) != len(structure[name]["heads"]) else None)
    return out


def _top(score: Tensor, count: int) -> Tensor:
    """The indices of the ``count`` best scores, in ascending index order (ties: the lower index)."""
    order = sorted(range(len(score)), key=lambda j: (-float(score[j]), j))
    return torch.tensor(sorted(order[:count]), dtype=torch.long)


def _per_layer(scores, structure, costs, towers, keys, needed, removed, kept_layers, round_to, channels=False):
    units = []
    for name in towers:
        for kind in ("heads", "neurons"):
            for i, score in _normalised(scores, name, kind, kept_layers[name]).items():
                units += [(float(s), name, kind, i, j) for j, s in enumerate(score)]
    step = max(round_to, 1)
    chunks: dict[str, list[Tensor]] = {}
    if channels:
        for name in towers:
            score = _channel_scores(scores, name)
            order = sorted(range(len(score)), key=lambda j: (float(score[j]), j))  # worst first
            chunks[name] = [torch.tensor(order[c: c + step]) for c in range(0, len(order), step)]
            units += [(float(score[chunk].mean()), name, "channels", 0, c) for c, chunk in enumerate(chunks[name])]
    left = {(name, kind, i): len(scores[f"{name}/{kind}/{i}"]) for name in towers for i in kept_layers[name]
            for kind in ("heads", "neurons")}
    width = {name: structure[name]["width"] for name in towers}
    floor = {"heads": 1, "neurons": round_to}

    def cost(name: str, kind: str) -> float:
        c = costs[name]
        if kind == "heads":
            return c["head_channel"] * width[name] + c["head_bias"]
        if kind == "neurons":
            return c["neuron_channel"] * width[name] + c["neuron_bias"]
        return step * (c["channel_tower"] + sum(c["channel_block"] + c["head_channel"] * left[name, "heads", i]
                                                + c["neuron_channel"] * left[name, "neurons", i]
                                                for i in kept_layers[name]))

    dropped: set[tuple[str, str, int, int]] = set()
    for _s, name, kind, i, j in sorted(units):
        key = keys[name]
        size = width[name] - step if kind == "channels" else left[name, kind, i] - 1
        c = cost(name, kind)
        if removed[key] + c > needed[key] or size < (step if kind == "channels" else floor[kind]):
            continue
        dropped.add((name, kind, i, j))
        removed[key] += c
        if kind == "channels":
            width[name] -= step
        else:
            left[name, kind, i] -= 1
    heads, neurons, kept_channels = {}, {}, {}
    for name in towers:
        heads[name], neurons[name] = {}, {}
        gone = [chunks[name][j] for (t, kind, _i, j) in dropped if t == name and kind == "channels"]
        removed_channels = set(torch.cat(gone).tolist()) if gone else set()
        kept_channels[name] = torch.tensor([c for c in range(structure[name]["width"]) if c not in removed_channels],
                                           dtype=torch.long)
        for i in kept_layers[name]:
            h = scores[f"{name}/heads/{i}"]
            heads[name][i] = torch.tensor([j for j in range(len(h)) if (name, "heads", i, j) not in dropped],
                                          dtype=torch.long)
            full = len(scores[f"{name}/neurons/{i}"])
            count = _round(left[name, "neurons", i], round_to, full)
            neurons[name][i] = _top(scores[f"{name}/neurons/{i}"], count)
    return heads, neurons, kept_channels


def _channel_scores(scores: Mapping[str, Tensor], name: str) -> Tensor:
    """A tower's residual-channel scores over their mean (1 when all are 0)."""
    value = scores[f"{name}/channels"].double()
    mean = float(value.mean()) if value.numel() else 0.0
    return value / mean if mean > 0 else torch.ones_like(value)


def _uniform(scores, structure, costs, towers, keys, needed, removed, kept_layers, round_to, channels=False):
    step = max(round_to, 1)
    width = {name: min((len(scores[f"{name}/neurons/{i}"]) for i in kept_layers[name]), default=0) for name in towers}
    if any(len({len(scores[f"{name}/neurons/{i}"]) for i in kept_layers[name]}) > 1 for name in towers):
        raise ValueError("widths: uniform needs a source whose layers have one MLP width per tower (this source was "
                         "pruned per layer); use widths: per_layer")
    d = {name: structure[name]["head_dim"] for name in towers}
    n_heads = {name: structure[name]["heads"][kept_layers[name][0]] if kept_layers[name] else 0 for name in towers}
    res = {name: structure[name]["width"] for name in towers}
    if channels:
        for name in towers:
            if any(structure[name]["heads"][i] != n_heads[name] for i in kept_layers[name]) or \
                    n_heads[name] * d[name] != res[name]:
                raise ValueError(f"widths: uniform with channels: prune needs a source whose {name} width is heads x "
                                 f"head dim in every layer (open_clip's shape; this source has width {res[name]}, "
                                 f"heads {structure[name]['heads']}, head dim {d[name]}): use widths: per_layer")
    # a layer's neurons (heads) and the tower's channels sorted best first, with their normalised scores
    ranked = {name: {i: torch.sort(v, descending=True).values
                     for i, v in _normalised(scores, name, "neurons", kept_layers[name]).items()} for name in towers}
    ranked_heads = {name: {i: torch.sort(v, descending=True).values
                           for i, v in _normalised(scores, name, "heads", kept_layers[name]).items()}
                    for name in towers}
    ranked_channels = {name: torch.sort(_channel_scores(scores, name), descending=True).values
                       for name in towers} if channels else {}
    m = {name: width[name] - width[name] % step if width[name] % step else width[name] for name in towers}
    h = dict(n_heads)

    def neuron_cost(name: str) -> float:
        return costs[name]["neuron_channel"] * res[name] + costs[name]["neuron_bias"]

    def width_cost(name: str) -> float:
        """d channels and one head per layer (the channels counted at the heads kept, then the head at the width
        left)."""
        c, layers = costs[name], len(kept_layers[name])
        per_channel = c["channel_tower"] + layers * (c["channel_block"] + c["head_channel"] * h[name]
                                                     + c["neuron_channel"] * m[name])
        return d[name] * per_channel + layers * (c["head_channel"] * (res[name] - d[name]) + c["head_bias"])

    for name in towers:  # the full width is kept unless rounded; rounding down counts toward the budget
        removed[keys[name]] += (width[name] - m[name]) * neuron_cost(name) * len(kept_layers[name])
    while True:
        options = []
        for name in towers:
            key, layers = keys[name], len(kept_layers[name])
            gap = abs(needed[key] - removed[key])
            cost = step * neuron_cost(name) * layers
            if m[name] - step >= step and abs(needed[key] - removed[key] - cost) < gap:
                mean = sum(float(r[m[name] - step: m[name]].sum()) for r in ranked[name].values()) / (step * layers)
                options.append((mean, name, cost, "neurons"))
            if channels and h[name] > 1:  # one head per layer and its head dim of channels, as open_clip ties them
                cost = width_cost(name)
                if abs(needed[key] - removed[key] - cost) < gap:
                    units = float(ranked_channels[name][res[name] - d[name]: res[name]].sum()) + sum(
                        float(r[h[name] - 1]) for r in ranked_heads[name].values())
                    options.append((units / (d[name] + layers), name, cost, "width"))
        if not options:
            break
        _mean, name, cost, kind = min(options)
        if kind == "width":
            h[name] -= 1
            res[name] -= d[name]
        else:
            m[name] -= step
        removed[keys[name]] += cost
    while channels:  # a width step may overshoot: neurons come back (best first) while that nears the target
        back = []
        for name in towers:
            key, layers = keys[name], len(kept_layers[name])
            cost = step * neuron_cost(name) * layers
            gap = abs(needed[key] - removed[key])
            if m[name] + step <= width[name] and abs(needed[key] - removed[key] + cost) < gap:
                mean = sum(float(r[m[name]: m[name] + step].sum()) for r in ranked[name].values()) / (step * layers)
                back.append((-mean, name, cost))
        if not back:
            break
        _mean, name, cost = min(back)
        m[name] += step
        removed[keys[name]] -= cost
    heads = {name: {i: _top(scores[f"{name}/heads/{i}"], h[name]) if channels
                    else torch.arange(structure[name]["heads"][i]) for i in kept_layers[name]} for name in towers}
    neurons = {name: {i: _top(scores[f"{name}/neurons/{i}"], m[name]) for i in kept_layers[name]} for name in towers}
    kept = {name: _top(scores[f"{name}/channels"], res[name]) if channels else torch.arange(res[name])
            for name in towers}
    return heads, neurons, kept
