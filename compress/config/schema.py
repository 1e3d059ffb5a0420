"""The config schema: dataclasses with their defaults (what a YAML file may say)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from compress.config.dispatch import DispatchConfig

SCHEMA_VERSION = 1

PluginSpec = dict[str, Any]


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_plain(v) for v in value]
    return value


@dataclass
class ModelSpec:
    """A model: an open_clip name (``ViT-B-32``), ``name@pretrained_tag``, a checkpoint
    file (``.safetensors`` / ``.pt``), a model config JSON, or a directory exported by this
    project. ``pretrained`` is a tag or a checkpoint path for a named architecture.
    ``random_init``: a teacher without weights (a bare name or config JSON) is refused unless
    this says the random teacher is intended (tests); students are random by construction."""

    model: str = "ViT-B-32"
    pretrained: str | None = None
    force_quick_gelu: bool = False
    random_init: bool = False


#: the data set kinds ``DatasetConfig.kind`` may name
DATASET_KINDS = ("synthetic", "csv", "webdataset", "folder")


@dataclass
class DatasetConfig:
    """One data source. ``kind``: synthetic | csv | webdataset | folder.

    Bad samples (missing or corrupt images, empty captions) are skipped and counted; the run
    stops with ``DataError`` when more than ``max_bad_fraction`` (in [0, 1)) of the last
    ``bad_window`` samples were bad, judged only once ``bad_window`` samples were read (an
    evaluation pass shorter than the window is judged at its end). Training batches keep their
    size: a skipped sample is replaced by the next good one of the stream.
    """

    kind: str = "synthetic"
    path: str | None = None
    split: str = "train"
    num_samples: int | None = None
    seed: int = 0
    image_key: str = "filepath"
    caption_key: str = "title"
    separator: str = ","
    max_bad_fraction: float = 0.01
    bad_window: int = 1000
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Training data (``train``), the retrieval set (``val``) and DataLoader workers.

    There is no image size here: every model gets images at its own resolution and with its
    own normalisation (``model.visual.preprocess_cfg``)."""

    train: DatasetConfig = field(default_factory=DatasetConfig)
    val: DatasetConfig | None = None
    num_workers: int = 0


#: ``train.report_to``: the trackers a run can feed (``jsonl`` is ``metrics.jsonl``, always written)
REPORT_TO = ("jsonl", "tensorboard", "wandb")


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 256
    accum_steps: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: float | None = 5.0
    precision: str = "auto"
    device: str = "auto"
    log_every: int = 10
    checkpoint_every: int = 1000
    max_nonfinite_in_row: int = 20
    grad_checkpointing: bool = False
    #: torch.compile the student's towers (vision tower, text transformer); an execution setting (not in the run id)
    compile: bool = False
    #: the gradient cache's second reading of a step's micro-batches (``accum_steps`` > 1): ``reread`` (a
    #: second loader reads them again, K micro-batches behind the first: host memory flat in accum_steps,
    #: every sample decoded twice) or ``keep`` (the features pass's micro-batches stay on the host until
    #: the live pass: ``batch_size / world`` samples per process, one decode); an execution setting (not
    #: in the run id: both give the same step)
    accum_inputs: str = "reread"
    progress: bool = True
    #: where the logged records go besides ``metrics.jsonl`` (``jsonl``: always written, may be listed):
    #: ``tensorboard`` (event files in ``RUN_DIR/tensorboard``), ``wandb`` (Weights & Biases, offline unless
    #: ``WANDB_MODE`` says otherwise, in ``RUN_DIR/wandb``); see :mod:`compress.tracking`. An execution setting
    #: (not in the run id)
    report_to: list[str] = field(default_factory=lambda: ["jsonl"])

    def micro_batch(self, world_size: int) -> int:
        """Samples per process in one micro-batch: ``batch_size // (world_size x accum_steps)`` (the data
        loader's batch; a step draws ``accum_steps`` of them)."""
        return self.batch_size // (world_size * self.accum_steps)


#: the zero-shot tasks of the synthetic shapes world (``ZeroShotTaskConfig.task`` of a ``synthetic`` task)
SYNTHETIC_TASKS = ("shape", "color", "color_shape")


@dataclass
class ZeroShotTaskConfig:
    name: str = "zero_shot"
    kind: str = "synthetic"
    path: str | None = None
    task: str | None = None
    classnames: list[str] | None = None
    templates: list[str] | None = None


@dataclass
class EvalConfig:
    zero_shot: list[ZeroShotTaskConfig] = field(default_factory=list)
    retrieval: bool = True
    params: bool = True
    macs: bool = True
    throughput: bool = True
    batch_size: int = 128


@dataclass
class OutputConfig:
    """Where a run writes, and which checkpoints it keeps.

    ``save_checkpoint``: write resume checkpoints (every ``train.checkpoint_every`` steps and at
    the end of training); false: none, and a killed run starts again from step 0.
    ``keep_every``: besides the newest checkpoint, keep those whose step is a multiple of this
    (0: only the newest). ``keep_checkpoints``: keep them after the run completed (by default
    only the exported model, the metrics and the result row remain)."""

    dir: str = "runs"
    run_name: str | None = None
    save_checkpoint: bool = True
    keep_every: int = 0
    keep_checkpoints: bool = False


@dataclass
class StageConfig:
    """One stage of a progressive run (TinyCLIP's multi-stage distillation).

    ``source``: ``teacher`` or ``previous`` (the previous stage's exported model; the default after
    the first stage, which always starts from the teacher). ``student``: the stage's student
    architecture (manual / none inheritance). ``target_sparsity``: for automatic inheritance, the
    cumulative fraction of the teacher's prunable parameters removed at the end of this stage
    (0.25, 0.5, 0.75 ends at 75% pruned, not 91%). ``inheritance`` and ``losses`` replace the
    top-level ones, ``schedules`` replace the top-level ones key by key, ``train`` sets keys of the
    top-level ``train`` (``steps`` is a shorthand for ``train.steps``); the rest comes from the top
    level. ``name`` defaults to ``stage<k>``."""

    name: str | None = None
    steps: int | None = None
    source: str | None = None
    student: ModelSpec | None = None
    target_sparsity: float | None = None
    inheritance: PluginSpec | None = None
    losses: list[PluginSpec] | None = None
    schedules: dict[str, PluginSpec] | None = None
    train: dict[str, Any] = field(default_factory=dict)


#: what a teacher-output cache can hold per sample (image outputs per augmentation draw, text outputs once)
CACHE_OUTPUTS = ("image_features", "text_features", "image_embeds", "text_embeds")
#: how a run with a ``teacher_cache`` section gets its teacher's outputs
CACHE_MODES = ("cache", "online")
#: the number formats a cache stores its outputs in
CACHE_DTYPES = ("fp16", "bf16", "fp32")


@dataclass
class TeacherCacheConfig:
    """The teacher's outputs written once and read by every run of a sweep (MobileCLIP's reinforced data).

    Each training sample has ``num_augmentations`` fixed views, crop boxes drawn from ``(seed, sample, view)``;
    epoch e trains on view ``(e + offset(run seed, sample)) mod num_augmentations`` of each sample.
    ``mode: cache`` reads the teacher's outputs for that view, and its box, from the cache under ``dir``
    (a folder named by the cache's identity, written by ``clip-compress cache-teacher`` or by the first run that
    needs it); ``mode: online`` runs the teacher on the same views (no files: it checks a cache, or measures it).
    ``dtype``: the stored numbers (fp32 reproduces the online teacher). ``outputs``: what is stored (a loss that
    needs another teacher output is refused). ``dir`` and ``shard_size`` (samples per file) are not in the run id.
    """

    mode: str = "cache"
    dir: str = "teacher_cache"
    num_augmentations: int = 1
    seed: int = 0
    dtype: str = "fp16"
    outputs: list[str] = field(default_factory=lambda: ["image_features", "text_features"])
    shard_size: int = 16384

    @property
    def reads_cache(self) -> bool:
        """Whether the run reads the teachers' outputs from the cache (``mode: cache``), not online."""
        return self.mode == "cache"


#: where a stage takes its first weights from
STAGE_SOURCES = ("teacher", "previous")


@dataclass
class RunConfig:
    schema_version: int = SCHEMA_VERSION
    name: str = "run"
    seed: int = 0
    teacher: ModelSpec | None = field(default_factory=ModelSpec)
    #: a teacher ensemble (two or more models; the first is also ``teacher``, the source students inherit from)
    teachers: list[ModelSpec] = field(default_factory=list)
    #: the teachers' outputs from a cache (``None``: the teacher runs online on every batch)
    teacher_cache: TeacherCacheConfig | None = None
    student: ModelSpec | None = None
    inheritance: PluginSpec = field(default_factory=lambda: {"name": "manual"})
    losses: list[PluginSpec] = field(default_factory=lambda: [{"name": "affinity", "weight": 1.0}])
    schedules: dict[str, PluginSpec] = field(
        default_factory=lambda: {"lr": {"name": "warmup_cosine", "warmup_steps": 0}}
    )
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    dispatch: DispatchConfig = field(default_factory=lambda: DispatchConfig.of({}))
    stages: list[StageConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.dispatch = DispatchConfig.of(self.dispatch)  # a free mapping: the backends' keys are theirs

    def teacher_specs(self) -> list[ModelSpec]:
        """Every teacher in order: ``teachers`` (an ensemble), else ``[teacher]``, else none."""
        return list(self.teachers) or ([self.teacher] if self.teacher is not None else [])

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

