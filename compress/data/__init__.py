"""Data: image-text training sets, zero-shot tasks and retrieval sets, robust to bad samples.

Sources (``DatasetConfig.kind``): ``synthetic`` (the embedded "shapes" world, rendered on
the fly, deterministic by seed), ``csv`` (open_clip's CSV/TSV), ``webdataset`` (tar
shards) and ``folder`` (ImageNet layout; class-name captions for training, zero-shot
classification for evaluation).

Trainer::

    batches, stats = compress.data.pipeline.train_batches(cfg, student, teacher, device)
    # or, by hand:
    train_tf = train_transform_for(student, teacher)   # each model's own preprocess config
    loader = build_train_loader(cfg.data, train_tf, tokenizer, batch_size, seed=cfg.seed,
                                sampler=None)          # or lambda ds: DistributedSampler(ds, ...)
    for step, batch in zip(range(steps), loader.forever()):
        batch["images"]          # FloatTensor[B, 3, H, W], always B = batch_size (bad samples replaced)
        batch["teacher_images"]  # only when the teacher needs another size or normalisation
        batch["teacher_images/1"]  # an ensemble's member 1 (teacher=[t0, t1, ...]), likewise
        batch["texts"]           # LongTensor[B, context_length]
        batch["captions"]        # list[str]
    loader.counter.as_dict()   # {"data_samples_seen", "data_bad_samples", "data_bad_fraction"}

Evaluator::

    eval_tf = eval_transform_for(model)
    task = build_zero_shot_task(task_cfg, eval_tf, cfg.data, batch_size)   # ZeroShotTask
    task.classnames, task.templates, task.prompts(name), task.heldout_labels
    for batch in task.loader:  batch["images"], batch["labels"]
    ret = build_retrieval_set(cfg.data, eval_tf, tokenizer=tokenizer, batch_size=batch_size)  # or None
    for batch in ret.loader:  batch["images"], batch["texts"]

Benchmark sets: clip_benchmark's webdataset folders (``wds_<name>``: classnames, ``{c}`` templates,
``test/*.tar``) are read by :class:`~compress.data.benchmark_sets.WdsEvalSet` and written by
``write_wds_classification`` / ``write_wds_retrieval``; ``benchmark_export.export_synthetic`` writes the
embedded evaluation sets in that format.

Bad samples: data sets return ``None`` for a missing/corrupt image; collate drops it and
reports ``num_bad``/``num_samples`` in the batch; the loader counts them in the main
process (:class:`BadSampleCounter`), refills training batches from the next samples, and
raises :class:`DataError` when more than ``max_bad_fraction`` of the last ``bad_window``
samples were bad (judged once ``bad_window`` samples were read) or when a whole batch is bad.
"""

from compress.data.collate import make_collate, make_label_collate
from compress.data.csv_data import CsvDataset
from compress.data.datasets import build_dataset
from compress.data.folder import FolderTextDataset, ImageFolderDataset, imagenet_preset
from compress.data.loader import CountedLoader, build_eval_loader, build_train_loader
from compress.data.robust import BadSampleCounter, DataError, open_image
from compress.data.sampling import EpochShuffleSampler
from compress.data.shards import ShardDataset
from compress.data.synthetic import ShapesClassification, ShapesDataset, ShapesOptions
from compress.data.tasks import RetrievalSet, ZeroShotTask, build_retrieval_set, build_zero_shot_task
from compress.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    DistillTransform,
    eval_transform,
    eval_transform_for,
    preprocess_of,
    train_transform,
    train_transform_for,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "BadSampleCounter",
    "CountedLoader",
    "CsvDataset",
    "DataError",
    "DistillTransform",
    "EpochShuffleSampler",
    "FolderTextDataset",
    "ImageFolderDataset",
    "RetrievalSet",
    "ShapesClassification",
    "ShapesDataset",
    "ShapesOptions",
    "ShardDataset",
    "ZeroShotTask",
    "build_dataset",
    "build_eval_loader",
    "build_retrieval_set",
    "build_train_loader",
    "build_zero_shot_task",
    "eval_transform",
    "eval_transform_for",
    "imagenet_preset",
    "make_collate",
    "make_label_collate",
    "open_image",
    "preprocess_of",
    "train_transform",
    "train_transform_for",
]
