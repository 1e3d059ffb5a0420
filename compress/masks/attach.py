"""Attach structured hard-concrete masks to a converted CLIP model, and take them off again.

Per tower (CoFi, Xia et al. 2022; TinyCLIP, Wu et al. 2023): one gate per attention head
[L, H], per MLP hidden neuron [L, 4D], per residual channel [D] shared by all layers, and
optionally one per attention block and per MLP block [L] (CoFi's layer gates, off in TinyCLIP).
With ``round_to`` r > 1 the deterministic masks keep a multiple of r MLP neurons per layer and
residual channels per tower (heads are whole units already; see
:func:`~compress.masks.gates.deterministic_gates`).
The towers' code is unchanged; :func:`attach_masks`

- swaps ``attn.out_proj`` and ``mlp.c_proj`` for :class:`~compress.masks.modules.GatedLinear`
  (head / neuron gates on the input columns, channel x layer gates on the output rows),
- swaps every LayerNorm over the residual for a :class:`~compress.masks.modules.MaskedLayerNorm`,
- adds one forward pre-hook per tower on the module that receives the embeddings
  (``visual.ln_pre``, the text ``transformer``): it draws the tower's gates for this forward
  (a sample in training mode, the deterministic mask in eval mode) and multiplies the
  embeddings by the channel gate. Inside :func:`one_gate_sample` every forward uses the
  same sample (the trainer holds one per optimizer step).

The gates live in ``model.structure_masks`` (a :class:`ClipMasks`), so they move, train and
checkpoint with the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from compress.masks.budget import TowerCosts
from compress.masks.gates import LOG_ALPHA_INIT, HardConcreteGates, logistic_noise
from compress.masks.modules import GatedLinear, MaskedLayerNorm
from compress.models.attention import convert_attention, is_converted
from compress.models.structure import tower_structure
from compress.models.towers import Tower, get_tower, resolve_towers

ATTRIBUTE = "structure_masks"


class _MaskHook:
    """Base of the hooks :func:`attach_masks` registers (found and removed by :func:`detach_masks`)."""


class _EmbedHook(_MaskHook):
    """Forward pre-hook: draw the tower's gates, multiply the embeddings by the channel gate."""

    def __init__(self, masks: TowerMasks) -> None:
        self.masks = masks

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        gate = self.masks.refresh()
        return (args[0] * gate.to(args[0].dtype), *args[1:])


class _OutputGateHook(_MaskHook):
    """Forward hook of an attention without heads: its output (the out_proj bias) times the row gate."""

    def __init__(self, out_proj: GatedLinear) -> None:
        self.out_proj = out_proj

    def __call__(self, module: nn.Module, args: tuple, output: tuple) -> tuple:
        gate = self.out_proj.row_gate
        return output if gate is None else (output[0] * gate.to(output[0].dtype), *output[1:])


class TowerMasks(nn.Module):
    """The gates of one tower, and the module references they are written to on every forward."""

    def __init__(self, tower: Tower, layer_gates: bool = False, init: float = LOG_ALPHA_INIT,
                 round_to: int = 1) -> None:
        super().__init__()
        structure = tower_structure(tower)
        layers = len(structure["heads"])
        self.tower = tower.name
        self.head_dim = structure["head_dim"]
        self.channels = HardConcreteGates([structure["width"]], init, round_to)
        self.heads = HardConcreteGates(structure["heads"], init)
        self.neurons = HardConcreteGates(structure["mlp_width"], init, round_to)
        self.attn_layers = HardConcreteGates([1] * layers, init) if layer_gates else None
        self.mlp_layers = HardConcreteGates([1] * layers, init) if layer_gates else None
        self.costs = TowerCosts(tower)
        for name, sizes in (("head_layer", structure["heads"]), ("neuron_layer", structure["mlp_width"])):
            index = torch.repeat_interleave(torch.arange(layers), torch.tensor(sizes, dtype=torch.long))
            self.register_buffer(name, index, persistent=False)
        # plain lists: references into the model, not submodules of this one
        self._out_projs: list[GatedLinear] = [b.attn.out_proj for b in tower.blocks]
        self._c_projs: list[GatedLinear] = [b.mlp.c_proj for b in tower.blocks]
        self._norms: list[MaskedLayerNorm] = [getattr(parent, name) for parent, name in tower.norm_slots()]

    @property
    def num_layers(self) -> int:
        return len(self.heads.segments)

    def gate_modules(self) -> list[HardConcreteGates]:
        gates = (self.channels, self.heads, self.neurons, self.attn_layers, self.mlp_layers)
        return [g for g in gates if g is not None]

    def refresh(self) -> Tensor:
        """Draw every gate once (sampled in training, deterministic in eval), write them to the
        tower's modules, and return the channel gate [D]."""
        channels, heads, neurons = self.channels(), self.heads(), self.neurons()
        keep = (channels != 0).to(channels.dtype)
        for norm in self._norms:
            norm.keep = keep
        inner = [h * self.head_dim for h in self.heads.segments]
        head_cols = torch.split(heads.repeat_interleave(self.head_dim), inner)
        head_rows = _rows(channels, self.attn_layers, self.num_layers)
        mlp_rows = _rows(channels, self.mlp_layers, self.num_layers)
        for out_proj, cols, rows in zip(self._out_projs, head_cols, head_rows, strict=True):
            out_proj.col_gate, out_proj.row_gate = cols, rows
        for c_proj, cols, rows in zip(self._c_projs, self.neurons.split(neurons), mlp_rows, strict=True):
            c_proj.col_gate, c_proj.row_gate = cols, rows
        return channels

    def clear(self) -> None:
        """Forget the gates of the last forward (they hold autograd graphs)."""
        for m in (*self._out_projs, *self._c_projs):
            m.row_gate = m.col_gate = None
        for norm in self._norms:
            norm.keep = None

    # -- sizes --------------------------------------------------------------------------------
    def _sums(self, heads: Tensor, neurons: Tensor, attn: Tensor | None, mlp: Tensor | None) -> tuple[Tensor, Tensor]:
        zeros = heads.new_zeros(self.num_layers)
        head_sums = zeros.index_add(0, self.head_layer, heads)
        neuron_sums = zeros.index_add(0, self.neuron_layer, neurons)
        if attn is not None:
            head_sums = head_sums * attn
        if mlp is not None:
            neuron_sums = neuron_sums * mlp
        return head_sums, neuron_sums

    def expected_size(self) -> Tensor:
        """E[kept prunable parameters] under the keep probabilities (differentiable)."""
        attn = self.attn_layers.keep_probability() if self.attn_layers is not None else None
        mlp = self.mlp_layers.keep_probability() if self.mlp_layers is not None else None
        sums = self._sums(self.heads.keep_probability(), self.neurons.keep_probability(), attn, mlp)
        return self.costs(self.channels.keep_probability(), *sums)

    def _hard(self) -> dict[str, Tensor | None]:
        """0/1 keep indicators of the deterministic masks."""
        gates = {"channels": self.channels, "heads": self.heads, "neurons": self.neurons,
                 "attn": self.attn_layers, "mlp": self.mlp_layers}
        return {k: None if g is None else (g.deterministic() != 0).to(g.log_alpha.dtype) for k, g in gates.items()}

    def deterministic_size(self) -> Tensor:
        """The size formula at the deterministic masks' 0/1 indicators: the size after pruning."""
        hard = self._hard()
        return self.costs(hard["channels"], *self._sums(hard["heads"], hard["neurons"], hard["attn"], hard["mlp"]))

    def counts(self) -> dict[str, int]:
        """Kept channels, heads and MLP neurons under the deterministic masks."""
        hard = self._hard()
        head_sums, neuron_sums = self._sums(hard["heads"], hard["neurons"], hard["attn"], hard["mlp"])
        return {"channels": int(hard["channels"].sum()), "heads": int(head_sums.sum()),
                "neurons": int(neuron_sums.sum())}


def _rows(channels: Tensor, layer_gates: HardConcreteGates | None, layers: int) -> list[Tensor]:
    if layer_gates is None:
        return [channels] * layers
    return list((layer_gates().unsqueeze(1) * channels.unsqueeze(0)).unbind(0))


class ClipMasks(nn.Module):
    """The masks of a model (``towers[name]`` is a :class:`TowerMasks`) and, once a strategy
    adds them, its Lagrange multipliers (``lagrangians``), so that all of it is checkpointed."""

    def __init__(self, towers: dict[str, TowerMasks]) -> None:
        super().__init__()
        self.towers = nn.ModuleDict(towers)
        self.lagrangians = nn.ModuleDict()

    def mask_parameters(self) -> list[nn.Parameter]:
        return [g.log_alpha for t in self.towers.values() for g in t.gate_modules()]

    @torch.no_grad()
    def clamp_(self) -> None:
        for t in self.towers.values():
            for g in t.gate_modules():
                g.clamp_()

    def clear(self) -> None:
        for t in self.towers.values():
            t.clear()

    @contextlib.contextmanager
    def one_sample(self, generator: torch.Generator | None = None) -> Iterator[None]:
        """Every forward pass inside the block uses the same gate sample (drawn on entry, from
        ``generator`` if given): one sample per optimizer step, however many passes gradient
        accumulation makes; the trainer seeds ``generator`` from the run seed and the step, so
        every rank of a data-parallel run draws the same gates."""
        gates = [g for t in self.towers.values() for g in t.gate_modules()]
        for g, noise in zip(gates, _one_draw(gates, generator), strict=True):
            g.hold_sample(generator, noise)
        try:
            yield
        finally:
            for g in gates:
                g.release_sample()


def _one_draw(gates: list[HardConcreteGates], generator: torch.Generator | None) -> list[Tensor | None]:
    """Every gate module's noise from one draw of ``generator`` (one kernel, and at most one copy to the
    gates' device instead of one per module). Uniform draws fill a tensor element by element in order,
    so on the CPU this gives the same numbers as one draw per module in turn (tests/test_masks.py)."""
    if generator is None or not gates or len({(g.log_alpha.dtype, g.log_alpha.device) for g in gates}) > 1:
        return [None] * len(gates)
    sizes = [g.log_alpha.numel() for g in gates]
    noise = logistic_noise(gates[0].log_alpha.new_empty(sum(sizes)).detach(), generator)
    return list(torch.split(noise, sizes))


def one_gate_sample(model: nn.Module, generator: torch.Generator | None = None) -> contextlib.AbstractContextManager:
    """:meth:`ClipMasks.one_sample` of ``model``'s masks; nothing to do for a model without masks."""
    masks = get_masks(model)
    return masks.one_sample(generator) if masks is not None else contextlib.nullcontext()


def get_masks(model: nn.Module) -> ClipMasks | None:
    return getattr(model, ATTRIBUTE, None)


def attach_masks(
    model: nn.Module,
    towers: str | Iterable[str] = "both",
    layer_gates: bool = False,
    init: float = LOG_ALPHA_INIT,
    round_to: int = 1,
) -> ClipMasks:
    """Attach masks to ``model`` in place (converting its attention first if needed); returns them.
    ``round_to``: kept MLP neurons and residual channels are multiples of it under the deterministic masks."""
    if get_masks(model) is not None:
        raise ValueError("the model already carries structured masks")
    if not is_converted(model):
        convert_attention(model)
    names = resolve_towers(towers if isinstance(towers, str) else tuple(towers))
    found = {name: get_tower(model, name) for name in names}  # fails before anything changes
    if round_to > 1:
        for name, tower in found.items():
            structure = tower_structure(tower)
            smallest = min(w for w in (structure["width"], *structure["mlp_width"]) if w > 0)
            if round_to > smallest:
                raise ValueError(f"round_to={round_to} is larger than the {name} tower's smallest width it rounds "
                                 f"({smallest}: residual {structure['width']}, MLP {structure['mlp_width']}); "
                                 "lower round_to")
    masks = {}
    for name, tower in found.items():
        for block in tower.blocks:
            block.attn.out_proj = GatedLinear.wrap(block.attn.out_proj)
            block.mlp.c_proj = GatedLinear.wrap(block.mlp.c_proj)
            if block.attn.num_heads == 0:
                block.attn.register_forward_hook(_OutputGateHook(block.attn.out_proj))
        for parent, attr in tower.norm_slots():
            setattr(parent, attr, MaskedLayerNorm.wrap(getattr(parent, attr)))
        tower = get_tower(model, name)  # the view again, now over the swapped modules
        device = tower.blocks[0].ln_1.weight.device if tower.blocks else None
        masks[name] = TowerMasks(tower, layer_gates, init, round_to).to(device)
        tower.embed_site.register_forward_pre_hook(_EmbedHook(masks[name]))
    container = ClipMasks(masks)
    setattr(model, ATTRIBUTE, container)
    return container


def detach_masks(model: nn.Module) -> ClipMasks:
    """Undo :func:`attach_masks` (plain modules sharing the same parameters, hooks removed);
    returns the masks taken off. The weights are unchanged: fold the masks first to keep their effect."""
    masks = get_masks(model)
    if masks is None:
        raise ValueError("the model carries no structured masks")
    masks.clear()
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, h in hooks.items() if isinstance(h, _MaskHook)]:
                del hooks[key]
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, GatedLinear | MaskedLayerNorm):
                setattr(parent, name, child.unwrap())
    delattr(model, ATTRIBUTE)
    return masks
