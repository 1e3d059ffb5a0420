"""Importance scores of heads, MLP neurons, residual channels and layers of a CLIP model's transformer towers.

- ``magnitude``: torch-pruning's ``GroupMagnitudeImportance`` (p=2: the sum of the squares of the unit's weights,
  the squared L2; Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017), on a group per layer.
- ``taylor``: torch-pruning's ``GroupTaylorImportance``, sum of |w * dL/dw| over the unit's weights (the absolute
  value per weight, torch-pruning's default; after the first-order Taylor criterion of Molchanov et al., "Pruning
  Convolutional Neural Networks for Resource Efficient Inference", ICLR 2017, which takes |sum w * dL/dw| per unit,
  and their CVPR 2019 paper, which squares it), L the source's own CLIP contrastive loss on one
  calibration batch, the scores of the batches summed (per batch, as both papers accumulate over mini-batches).
- ``activation``: Minitron-style activation importance (after Muralidharan et al., "Compact Language Models via
  Pruning and Knowledge Distillation", 2024): a neuron's mean |activation| after the MLP's non-linearity (the input
  of ``c_proj``; Minitron scores the pre-activation and aggregates per sequence first), a head's mean L2 norm of
  its output (the input of ``out_proj``), over the calibration tokens (text: only those up to the end-of-text
  token, which the pooled feature can see); a layer's Block Importance 1 - mean cos(x_in, x_out) over the same
  tokens (ShortGPT, Men et al. 2024); a residual channel's Minitron embedding-channel importance, the sum over the
  tower's residual-width LayerNorms (``ln_pre``, every ``ln_1`` / ``ln_2``, ``ln_post`` / ``ln_final``) of the mean
  |LN(x)_c| over the same tokens.

torch-pruning cannot trace a head: the ``(qkv h d)`` split of ``HeadAttention`` is a reshape its graph does not turn
into a head group, and ``in_proj_weight`` is a bare parameter. So each layer gets hand-built groups (torch-pruning's
``Group`` of ``Dependency`` items, no tracing): a neuron's group is ``c_fc``'s output row and ``c_proj``'s input
column; a head's is ``in_proj`` (viewed as an ``nn.Linear`` sharing its parameter) output rows mapped to their
inner channel ``c mod (H d)`` plus ``out_proj``'s input columns, and the inner channels' scores are summed over the
head's ``d`` channels. A layer's magnitude / Taylor score is the sum of its heads' and neurons' scores. A residual
channel's group is every tensor that reads or writes the residual stream at that channel: the tower's embeddings
(patch conv rows, class / positional / token embedding columns), its final norm and projection rows, and in every
block ``ln_1`` / ``ln_2``, the ``in_proj`` and ``c_fc`` input columns, the ``out_proj`` and ``c_proj`` output rows
(and LayerScale); a bare tensor is given to torch-pruning as an ``nn.Linear`` view with the channel axis first
(``out_channels``) or, for a 2-D tensor with it second, as is (``in_channels``). Biases are left out of every group
(torch-pruning's default, ``bias=False``), as for heads and neurons.

Cost at ViT-B/32 (126 M prunable parameters): magnitude reads each weight once (3 s on 2 busy CPU cores, no data);
taylor one forward and backward of the source per calibration micro-batch (at the recipe's 256-sample micro-batch,
without gradient checkpointing: ~20 GB of fp32 activations for both towers, plus 0.6 GB of gradients, freed after),
activation one forward per micro-batch (no activations kept); the channel scores add one read of every weight
(magnitude / taylor) or one |x| sum per LayerNorm output (activation) and 5 KB to the scores file (768 + 512
floats); the scores file is 0.25 MB.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch.nn import functional as F
from torch_pruning.dependency import Dependency, Group, Node

from compress.models.towers import get_tower

CRITERIA = ("magnitude", "taylor", "activation")
Scores = dict[str, Tensor]  # "<tower>/heads/<layer>", "<tower>/neurons/<layer>", "<tower>/layers", "<tower>/channels"


def _group(items: Iterable[tuple[nn.Module, Callable, list[int], list[int]]]) -> Group:
    """A torch-pruning group built by hand: (layer, pruning function, its indices, the root index of each)."""
    group = Group()
    for i, (module, fn, idxs, root) in enumerate(items):
        node = Node(module, None)
        group.add_dep(Dependency(fn, fn, node, node), idxs)
        group[i].root_idxs = root
    return group


def _linear_view(weight: nn.Parameter) -> nn.Linear:
    """An ``nn.Linear`` whose weight is ``weight`` itself (its ``.grad`` included), for torch-pruning's criteria."""
    view = nn.Linear(1, 1, bias=False, device="meta")
    view.weight = weight
    return view


def _channel_view(param: nn.Parameter, axis: int, width: int) -> tuple[nn.Linear, Callable]:
    """``param`` as an ``nn.Linear`` with its residual-channel axis as output rows (a view, its gradient viewed the
    same way), or, for a 2-D tensor whose channel axis is the second, as is with that axis as the input columns."""
    if param.dim() == 2 and axis == 1:
        return _linear_view(param), tp.prune_linear_in_channels
    view = nn.Linear(1, 1, bias=False, device="meta")
    view.weight = nn.Parameter(param.detach().movedim(axis, 0).reshape(width, -1), requires_grad=False)
    if param.grad is not None:
        view.weight.grad = param.grad.movedim(axis, 0).reshape(width, -1)
    return view, tp.prune_linear_out_channels


def _channel_group(model: nn.Module, name: str) -> Group:
    """The residual channels of a tower as one hand-built torch-pruning group (see the module)."""
    tower = get_tower(model, name)
    width = tower.width
    idx = list(range(width))
    items: list[tuple[nn.Module, Callable, list[int], list[int]]] = []
    for p in tower.channel_params:
        module, fn = _channel_view(model.get_parameter(p.key), p.axis, width)
        items.append((module, fn, idx, idx))
    for block in tower.blocks:
        items += [(block.ln_1, tp.prune_layernorm_out_channels, idx, idx),
                  (block.ln_2, tp.prune_layernorm_out_channels, idx, idx),
                  (_linear_view(block.attn.in_proj_weight), tp.prune_linear_in_channels, idx, idx),
                  (block.attn.out_proj, tp.prune_linear_out_channels, idx, idx),
                  (block.mlp.c_fc, tp.prune_linear_in_channels, idx, idx),
                  (block.mlp.c_proj, tp.prune_linear_out_channels, idx, idx)]
        for ls in ("ls_1", "ls_2"):
            gamma = getattr(getattr(block, ls), "gamma", None)
            if isinstance(gamma, nn.Parameter):
                items.append((*_channel_view(gamma, 0, width), idx, idx))
    return _group(items)


def _layer_groups(block: nn.Module) -> tuple[Group | None, Group | None, int, int]:
    """The head group (over the inner channels) and the neuron group of one block, its heads and head dim."""
    attn, mlp = block.attn, block.mlp
    heads, head_dim = int(attn.num_heads), int(attn.head_dim)
    inner, neurons = heads * head_dim, int(mlp.c_fc.out_features)
    head_group = None
    if inner:
        rows = list(range(3 * inner))
        head_group = _group([(_linear_view(attn.in_proj_weight), tp.prune_linear_out_channels, rows,
                              [r % inner for r in rows]),
                             (attn.out_proj, tp.prune_linear_in_channels, list(range(inner)), list(range(inner)))])
    neuron_group = None
    if neurons:
        idx = list(range(neurons))
        neuron_group = _group([(mlp.c_fc, tp.prune_linear_out_channels, idx, idx),
                               (mlp.c_proj, tp.prune_linear_in_channels, idx, idx)])
    return head_group, neuron_group, heads, head_dim


def _tp_scores(model: nn.Module, towers: tuple[str, ...], criterion: tp.importance.Importance) -> Scores:
    out: Scores = {}
    for name in towers:
        layers = []
        for i, block in enumerate(get_tower(model, name).blocks):
            head_group, neuron_group, heads, head_dim = _layer_groups(block)
            h = (criterion(head_group)[: heads * head_dim].view(heads, head_dim).sum(1) if head_group is not None
                 else torch.zeros(0))
            n = criterion(neuron_group)[: block.mlp.c_fc.out_features] if neuron_group is not None else torch.zeros(0)
            out[f"{name}/heads/{i}"], out[f"{name}/neurons/{i}"] = h.float().cpu(), n.float().cpu()
            layers.append(float(h.sum() + n.sum()))
        out[f"{name}/layers"] = torch.tensor(layers)
        out[f"{name}/channels"] = criterion(_channel_group(model, name)).float().cpu()
    return out


def magnitude_scores(model: nn.Module, towers: tuple[str, ...]) -> Scores:
    """Sum of squared weights of each head / neuron / residual channel (torch-pruning's group magnitude, p=2,
    summed over the group)."""
    with torch.no_grad():
        return _tp_scores(model, towers, tp.importance.GroupMagnitudeImportance(p=2, group_reduction="sum",
                                                                                normalizer=None))


def clip_loss(model: nn.Module, batch: Mapping[str, Any], device: torch.device) -> Tensor:
    """The source's own CLIP contrastive loss on a batch (Radford et al. 2021): symmetric cross-entropy of
    ``logit_scale * image @ text.T`` against the diagonal."""
    image = F.normalize(model.encode_image(batch["images"].to(device)), dim=-1)
    text = F.normalize(model.encode_text(batch["texts"].to(device)), dim=-1)
    logits = model.logit_scale.exp() * image @ text.T
    labels = torch.arange(len(logits), device=device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def taylor_scores(model: nn.Module, towers: tuple[str, ...], batches: list[Mapping[str, Any]],
                  device: torch.device) -> Scores:
    """First-order Taylor scores after Molchanov et al. (ICLR 2017, CVPR 2019), torch-pruning's default form:
    |w * dL/dw| summed over a unit's weights, computed per calibration batch (L: the source's CLIP loss on that
    batch) and summed over the batches. Per batch, not on the summed gradient: at a converged source the batches'
    gradients largely cancel, their magnitudes do not. The source's training mode, ``requires_grad`` flags and
    gradients are as before."""
    frozen = {p: p.requires_grad for p in model.parameters()}
    training = model.training
    model.eval().zero_grad(set_to_none=True)
    model.requires_grad_(True)  # the source is usually the frozen teacher
    total: Scores = {}
    try:
        criterion = tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer=None)
        for batch in batches:
            with torch.enable_grad():
                clip_loss(model, batch, device).backward()
            for key, value in _tp_scores(model, towers, criterion).items():
                total[key] = total[key] + value if key in total else value
            model.zero_grad(set_to_none=True)
        return total
    finally:
        model.zero_grad(set_to_none=True)
        model.train(training)
        for p, flag in frozen.items():
            p.requires_grad_(flag)


@torch.no_grad()
def activation_scores(model: nn.Module, towers: tuple[str, ...], batches: list[Mapping[str, Any]],
                      device: torch.device) -> Scores:
    """Minitron's activation scores of heads, neurons and residual channels and ShortGPT's Block Importance of
    layers, over the tokens of ``batches`` (one forward of each tower per batch; hooks, removed after)."""
    training = model.training
    model.eval()
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    real: dict[str, Tensor | None] = {"tokens": None}  # (B, L) True at the tokens the pooled feature can see

    def tokens(x: Tensor) -> Tensor:
        """``x`` (B, L, ...) or (L, B, ...) as rows of its real tokens (text: up to the end-of-text token)."""
        mask = real["tokens"]
        if mask is None:
            return x.reshape(-1, *x.shape[2:])
        if x.shape[:2] != mask.shape:
            x = x.transpose(0, 1)
        return x[mask]

    def add(key: str, value: Tensor, n: int) -> None:
        sums[key] = sums.get(key, 0) + value.double().cpu()
        counts[key] = counts.get(key, 0) + n

    for name in towers:
        for i, block in enumerate(get_tower(model, name).blocks):
            heads, head_dim = int(block.attn.num_heads), int(block.attn.head_dim)

            def on_heads(_m, args, key=f"{name}/heads/{i}", h=heads, d=head_dim):
                x = tokens(args[0]).reshape(-1, h, d)
                add(key, x.float().norm(dim=-1).sum(0), len(x))

            def on_neurons(_m, args, key=f"{name}/neurons/{i}"):
                x = tokens(args[0])
                add(key, x.float().abs().sum(0), len(x))

            def on_block(_m, args, output, key=f"{name}/layer/{i}"):
                x, y = tokens(args[0]), tokens(output[0] if isinstance(output, tuple) else output)
                cos = F.cosine_similarity(x.float(), y.float(), dim=-1).reshape(-1)
                add(key, (1 - cos).sum().reshape(1), len(cos))

            handles += [block.attn.out_proj.register_forward_pre_hook(on_heads),
                        block.mlp.c_proj.register_forward_pre_hook(on_neurons),
                        block.register_forward_hook(on_block)]
        for j, (parent, attr) in enumerate(get_tower(model, name).norm_slots()):

            def on_norm(_m, _args, output, key=f"{name}/norm/{j}"):
                y = output if output.dim() == 2 else tokens(output)  # (B, W): a pooled feature's norm
                add(key, y.float().abs().sum(0), len(y))

            handles.append(getattr(parent, attr).register_forward_hook(on_norm))
    try:
        for batch in batches:
            if "vision" in towers:
                real["tokens"] = None
                model.encode_image(batch["images"].to(device))
            if "text" in towers:
                texts = batch["texts"].to(device)
                real["tokens"] = real_text_tokens(texts)
                model.encode_text(texts)
    finally:
        real["tokens"] = None
        model.train(training)
        for handle in handles:
            handle.remove()
    out: Scores = {}
    for name in towers:
        depth = len(get_tower(model, name).blocks)
        for i in range(depth):
            for kind in ("heads", "neurons"):
                key = f"{name}/{kind}/{i}"
                out[key] = (sums[key] / counts[key]).float() if key in sums else torch.zeros(0)
        out[f"{name}/layers"] = torch.tensor([float(sums[f"{name}/layer/{i}"] / counts[f"{name}/layer/{i}"])
                                              for i in range(depth)])
        norms = [k for k in sums if k.startswith(f"{name}/norm/")]
        out[f"{name}/channels"] = sum(sums[k] / counts[k] for k in norms).float()
    return out


def real_text_tokens(texts: Tensor) -> Tensor:
    """(B, L) True at each text's positions up to its end-of-text token (open_clip's tokenizer gives it the largest
    id, and the text feature is pooled there; the causal mask hides the padding after it from every earlier token)."""
    end = texts.argmax(dim=-1, keepdim=True)
    return torch.arange(texts.shape[-1], device=texts.device).unsqueeze(0) <= end


def compute_scores(criterion: str, model: nn.Module, towers: tuple[str, ...], batches: list[Mapping[str, Any]],
                   device: torch.device) -> Scores:
    if criterion == "magnitude":
        return magnitude_scores(model, towers)
    if criterion == "taylor":
        return taylor_scores(model, towers, batches, device)
    if criterion == "activation":
        return activation_scores(model, towers, batches, device)
    raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
