"""Memory of one training step, planned before anything is built (``clip-compress run --dry-run``).

Pure functions of a :class:`~compress.config.RunConfig` and the models' shapes (read from an open_clip
config, a built model, or the plan's facts); nothing is allocated. The step is the gradient-cache step
(Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"): the loader
yields micro-batches of ``batch_size // (world * accum_steps)`` samples per process, the step's features
are computed without graph, the loss and its feature gradients once over the step's batch, then one live
forward and backward per micro-batch.

Device memory, per process (bytes):

- **weights**: the student in fp32 (4 B/param), the frozen teacher in the compute precision (none when its outputs
  come from a teacher-output cache; 2 B/param in
  bf16/fp16, 4 in fp32), and under autocast the student's 16-bit weight copies that autocast caches for
  the forward and keeps for the backward (2 B/param).
- **optimizer**: AdamW's two fp32 moments and the fp32 gradients of every trained parameter (12 B/param),
  plus DDP's gradient buckets (4 B/param) with more than one process.
- **activations** of one live micro-batch of the student (the teacher runs without graph), per
  transformer block from Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
  Models" (§4.1: ``sbh(34 + 5as/h)`` bytes with 16-bit activations and dropout). open_clip has no dropout
  and SDPA keeps no ``a s^2`` matrix (only its fp32 log-sum-exp, ``a s``), which leaves 16 ``s b h``
  elements per block with an MLP of 4h; in general, per sample, with inner = heads x head_dim::

      4 (2 s h + 4 s + a s)  +  c (2 s h + 4 s inner + 2 s m)

  bytes: the two LayerNorm inputs (the fp32 residual stream) and their mean / rstd, SDPA's log-sum-exp,
  and in the compute precision (c = 2 under bf16 / fp16 autocast, 4 in fp32) the qkv and fc1 inputs, q, k,
  v and the attention output, the GELU input and the fc2 input. Vision: s = (image / patch)^2 + 1; text:
  s = context length. Checked against the saved tensors of a real forward (tests). With
  ``train.grad_checkpointing`` each block keeps only its fp32 input (4 s h) and one block at a time is
  recomputed in full. Plus per tower the stem: the image (c 3 H W) and two fp32 ``s h`` tensors (the
  embedding sum and the final LayerNorm input). ModifiedResNet and HF text towers have no formula here:
  their activations are reported as unknown.
- **features**: the step's features kept for the gradient cache, fp32: the student's and the teacher's
  (each ensemble member's) image and text features of the process's rows (B / world) and their gathers over all
  ranks (B). A teacher ensemble's members each add their weights in the compute precision.
- **similarities**: each loss declares the (B / world) x B similarity matrices it computes per step
  (``DistillLoss.similarity_matrices``: affinity 4, the teacher's and the student's i2t and t2i); each
  leaves one fp32 matrix alive until the backward (the teacher's softmax, the student's log-softmax),
  and the softmax / gradient working copies add 3 more at the peak.

Host memory: the batches in flight in the loader, ``max(num_workers x prefetch_factor, 1)`` micro-batches
(prefetch_factor 2, PyTorch's default), and what the gradient cache's second pass reads the step from. With
``train.accum_inputs: reread`` (and accum_steps > 1) a second loader reads the micro-batches again: twice
the batches in flight, and of the step only its tokens are kept (B / world x 8 B x context length, for the
loss; its captions and sample keys, some tens of bytes a sample, are not counted); with ``keep`` the step's
micro-batches stay on the host (B / world samples). A sample is its fp32
image at the student's size, the teacher's view when the teacher's size differs, and its int64 tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: DataLoader's default number of batches each worker loads ahead
PREFETCH_FACTOR = 2
#: the GPU memory the plan warns against (an 80 GB A100 / H100): a reference only, a dispatch does not say
REFERENCE_GPU_BYTES = 80 * 2**30
#: working copies of a similarity matrix at the loss's peak (logits, their scaled copy, a gradient)
SIMILARITY_WORKING_COPIES = 3
#: open_clip's defaults (``CLIPVisionCfg``, ``CLIPTextCfg``)
_VISION_DEFAULTS = {"layers": 12, "width": 768, "head_width": 64, "mlp_ratio": 4.0, "patch_size": 16,
                    "image_size": 224}
_TEXT_DEFAULTS = {"context_length": 77, "width": 512, "heads": 8, "layers": 12, "mlp_ratio": 4.0}
GIB = 2**30


@dataclass(frozen=True)
class BlockShape:
    """One transformer block: residual width, heads, head width and MLP width."""

    width: int
    heads: int
    head_dim: int
    mlp_width: int


@dataclass(frozen=True)
class TowerShape:
    """A tower: its sequence length, residual width and blocks (``blocks`` is ``None`` for a tower the
    activation formula does not cover: ModifiedResNet, an HF text model); ``image`` is the input side
    (0 for text)."""

    kind: str
    seq: int
    width: int
    blocks: tuple[BlockShape, ...] | None
    image: int = 0


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a CLIP model: its parameters, image size, context length, embedding
    width and the shapes of its two towers."""

    parameters: int
    image_size: int
    context_length: int
    embed_dim: int
    vision: TowerShape
    text: TowerShape


@dataclass
class MemoryEstimate:
    """Device memory of one training step per process, in bytes, by part (see the module docstring);
    ``unknown`` names what has no formula (the total is then a lower bound)."""

    weights: int
    optimizer: int
    activations: int
    features: int
    similarities: int
    micro_batch: int
    similarity_matrices: int
    rows: int
    columns: int
    precision: str
    unknown: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.activations + self.features + self.similarities

    def parts(self) -> dict[str, int]:
        return {"weights": self.weights, "optimizer": self.optimizer, "activations": self.activations,
                "features": self.features, "similarities": self.similarities}


@dataclass
class HostEstimate:
    """Host memory of the data path per process, in bytes: the loaders' micro-batches in flight (``loaders``:
    2 when a second loader reads the step again) and what is kept of the step for the gradient cache's
    second pass (``retained_samples`` whole samples, or, read again, only their tokens)."""

    micro_batch: int
    bytes_per_sample: int
    batches_in_flight: int
    in_flight: int
    retained_samples: int
    retained: int
    loaders: int = 1

    @property
    def total(self) -> int:
        return self.in_flight + self.retained


# -- shapes -------------------------------------------------------------------------------------
def model_shape(model_cfg: Mapping[str, Any], parameters: int, structure: Mapping[str, Any] | None = None
                ) -> ModelShape:
    """The shape of an open_clip model config (``vision_cfg``, ``text_cfg``, ``embed_dim``) with
    ``parameters`` parameters; ``structure`` (a pruned model's ``clip_structure``: per tower ``width``,
    per-layer ``heads`` and ``mlp_width``) replaces the config's uniform widths."""
    vision = {**_VISION_DEFAULTS, **dict(model_cfg.get("vision_cfg") or {})}
    text = {**_TEXT_DEFAULTS, **dict(model_cfg.get("text_cfg") or {})}
    structure = structure or {}
    image_size = _square(vision["image_size"])
    if isinstance(vision["layers"], list | tuple):
        vision_tower = TowerShape("ModifiedResNet", 0, int(vision["width"]), None, 3 * image_size**2)
    else:
        width = int(vision["width"])
        heads = width // int(vision["head_width"])
        seq = (image_size // _square(vision["patch_size"])) ** 2 + 1
        vision_tower = _tower("vision", seq, width, heads, width // heads, int(width * vision["mlp_ratio"]),
                              int(vision["layers"]), structure.get("vision"), 3 * image_size**2)
    context = int(text["context_length"])
    if text.get("hf_model_name"):
        text_tower = TowerShape(f"HF text model {text['hf_model_name']}", context, int(text["width"]), None)
    else:
        width, heads = int(text["width"]), int(text["heads"])
        text_tower = _tower("text", context, width, heads, width // heads, int(width * text["mlp_ratio"]),
                            int(text["layers"]), structure.get("text"))
    return ModelShape(int(parameters), image_size, context, int(model_cfg.get("embed_dim", 512)), vision_tower,
                      text_tower)


def shape_of_model(model: Any) -> ModelShape:
    """The shape of a built model (``clip_cfg`` and, once pruned, ``clip_structure``)."""
    parameters = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return model_shape(model.clip_cfg, parameters, getattr(model, "clip_structure", None))


def _square(size: Any) -> int:
    return int(size[0] if isinstance(size, list | tuple) else size)


def _tower(kind: str, seq: int, width: int, heads: int, head_dim: int, mlp: int, layers: int,
           structure: Mapping[str, Any] | None, image: int = 0) -> TowerShape:
    if structure:
        width = int(structure["width"])
        blocks = tuple(BlockShape(width, int(h), head_dim, int(m))
                       for h, m in zip(structure["heads"], structure["mlp_width"], strict=True))
    else:
        blocks = tuple(BlockShape(width, heads, head_dim, mlp) for _ in range(layers))
    return TowerShape(kind, seq, width, blocks, image)


# -- formulas -----------------------------------------------------------------------------------
def block_activation_bytes(block: BlockShape, seq: int, compute_bytes: int) -> int:
    """Bytes one sample keeps for the backward of one block (module docstring):
    ``4 (2 s h + 4 s + a s) + c (2 s h + 4 s a d + 2 s m)``."""
    s, h, a, m = seq, block.width, block.heads, block.mlp_width
    inner = a * block.head_dim
    return 4 * (2 * s * h + 4 * s + a * s) + compute_bytes * (2 * s * h + 4 * s * inner + 2 * s * m)


def tower_activation_bytes(tower: TowerShape, batch: int, compute_bytes: int, checkpointing: bool) -> int | None:
    """Activations of one micro-batch of ``batch`` samples through a tower (``None``: no formula): every
    block's, or with checkpointing every block's fp32 input and one block recomputed; plus the stem
    (the image in the compute precision, two fp32 ``s h`` tensors)."""
    if tower.blocks is None:
        return None
    blocks = [block_activation_bytes(b, tower.seq, compute_bytes) for b in tower.blocks]
    kept = len(blocks) * 4 * tower.seq * tower.width + max(blocks, default=0) if checkpointing else sum(blocks)
    stem = compute_bytes * tower.image + 4 * 2 * tower.seq * tower.width
    return batch * (kept + stem)


def bytes_per_sample(student_image: int, teacher_image: int | Sequence[int] | None, context_length: int) -> int:
    """A collated sample on the host: the fp32 image at the student's size, the teacher's view when
    its size differs (each ensemble member's, ``teacher_image`` a list of sizes), the int64 tokens."""
    sizes = [] if not teacher_image else [teacher_image] if isinstance(teacher_image, int) else list(teacher_image)
    teacher = sum(3 * size**2 * 4 for size in sizes if size and size != student_image)
    return 3 * student_image**2 * 4 + teacher + 8 * context_length


def _shapes(teacher: Any | None) -> list[ModelShape]:
    """The teacher's shape, or an ensemble's (a sequence of models or shapes); none without a teacher."""
    models = [] if teacher is None else list(teacher) if isinstance(teacher, list | tuple) else [teacher]
    return [m if isinstance(m, ModelShape) else shape_of_model(m) for m in models]


def teacher_cached(cfg: Any) -> bool:
    """Whether the run reads its teachers' outputs from a teacher-output cache (``teacher_cache.mode: cache``)."""
    cache = getattr(cfg, "teacher_cache", None)
    return cache is not None and cache.reads_cache


def world_size_of(cfg: Any) -> int:
    """The data-parallel processes a run's dispatch starts: ``nodes x tasks_per_node`` (one task per GPU by
    default; ``tasks_per_node`` CPU processes with ``gpus_per_node: 0``, one when it is unset)."""
    return int(cfg.dispatch.nodes) * int(cfg.dispatch.tasks())


def micro_batch_of(cfg: Any, world_size: int | None = None) -> int:
    """Samples per process per micro-batch: ``batch_size // (world_size x accum_steps)``."""
    world = world_size or world_size_of(cfg)
    return cfg.train.micro_batch(world)


def compute_precision(cfg: Any) -> str:
    """The precision the step runs in on a GPU: ``auto`` is bf16 (CUDA with bf16), else the configured
    one; a run on the CPU (``train.device: cpu``) is fp32."""
    if str(cfg.train.device).startswith("cpu"):
        return "fp32"
    return "bf16" if cfg.train.precision == "auto" else cfg.train.precision


def similarity_matrices(cfg: Any) -> int:
    """The similarity matrices the configured losses compute per step (``DistillLoss.similarity_matrices``
    of each term with a non-zero weight or a weight schedule; a term of weight 0 is not computed)."""
    from compress.config.specs import split_loss
    from compress.config.validate import loss_weight_keys
    from compress.recipe.build import loss_similarity_matrices

    scheduled = {index for key, index in loss_weight_keys(cfg.losses).items() if key in cfg.schedules}
    total = 0
    for i, (spec, count) in enumerate(zip(cfg.losses, loss_similarity_matrices(cfg), strict=True)):
        if float(split_loss(spec)[1]) == 0.0 and i not in scheduled:
            continue
        total += count
    return total


def estimate_device_memory(
    cfg: Any,
    student: Any,
    teacher: Any | None = None,
    world_size: int | None = None,
    precision: str | None = None,
) -> MemoryEstimate:
    """Device memory of one training step per process (module docstring), from a resolved ``RunConfig``
    (a stage's config for a staged run) and the models.

    ``student`` / ``teacher``: a built model (``clip_cfg``, ``clip_structure`` once pruned), a
    :class:`ModelShape` (the plan's), or ``None`` for no teacher; a list of them for a teacher ensemble.
    ``world_size``: the processes (default
    the dispatch's, :func:`world_size_of`). ``precision``: ``fp32`` / ``bf16`` / ``fp16`` (default
    :func:`compute_precision`). Returns a :class:`MemoryEstimate` (``.total``, ``.parts()``, bytes)."""
    student_shape = student if isinstance(student, ModelShape) else shape_of_model(student)
    teachers = _shapes(teacher)
    world = world_size or world_size_of(cfg)
    precision = precision or compute_precision(cfg)
    compute = 4 if precision == "fp32" else 2
    micro = micro_batch_of(cfg, world)
    rows, columns = cfg.train.batch_size // world, cfg.train.batch_size
    p = student_shape.parameters
    weights = 4 * p + (0 if compute == 4 else 2 * p)
    if not teacher_cached(cfg):  # read from a teacher-output cache, the teachers never reach the device
        weights += sum(compute * t.parameters for t in teachers)
    optimizer = 12 * p + (4 * p if world > 1 else 0)
    activations, unknown = 0, []
    for tower in (student_shape.vision, student_shape.text):
        part = tower_activation_bytes(tower, micro, compute, cfg.train.grad_checkpointing)
        if part is None:
            unknown.append(f"activations of the {tower.kind} tower")
        else:
            activations += part
    models = 1 + len(teachers)
    features = 4 * 2 * models * (rows + columns) * max([student_shape.embed_dim, *(t.embed_dim for t in teachers)])
    matrices = similarity_matrices(cfg)
    similarities = 4 * rows * columns * (matrices + SIMILARITY_WORKING_COPIES) if matrices else 0
    return MemoryEstimate(weights, optimizer, activations, features, similarities, micro, matrices, rows, columns,
                          precision, unknown)


def estimate_host_memory(cfg: Any, student: Any, teacher: Any | None = None, world_size: int | None = None
                         ) -> HostEstimate:
    """Host memory of the data path per process (module docstring); ``student`` / ``teacher`` as for
    :func:`estimate_device_memory`."""
    student_shape = student if isinstance(student, ModelShape) else shape_of_model(student)
    teachers = _shapes(teacher)
    world = world_size or world_size_of(cfg)
    micro = micro_batch_of(cfg, world)
    views = [] if teacher_cached(cfg) else [t.image_size for t in teachers]  # cached: no teacher view is made
    sample = bytes_per_sample(student_shape.image_size, views, student_shape.context_length)
    reread = cfg.train.accum_steps > 1 and cfg.train.accum_inputs == "reread"
    loaders = 2 if reread else 1
    in_flight = loaders * max(cfg.data.num_workers * PREFETCH_FACTOR, 1)
    step = cfg.train.batch_size // world
    if reread:  # only the step's tokens stay (the losses' batch)
        return HostEstimate(micro, sample, in_flight, in_flight * micro * sample, 0,
                            step * 8 * student_shape.context_length, loaders)
    return HostEstimate(micro, sample, in_flight, in_flight * micro * sample, step, step * sample)


def gib(n: int) -> str:
    """Bytes in GiB (MiB below 1 GiB, KiB below 1 MiB)."""
    if n >= GIB:
        return f"{n / GIB:.1f} GiB"
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"
