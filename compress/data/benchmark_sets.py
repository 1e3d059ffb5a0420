"""clip_benchmark's on-disk webdataset format (LAION's CLIP_benchmark 1.6.2, ``wds/NAME`` data sets;
the layout DataComp's 38 evaluation sets are published in), read and written.

A set is a folder (``ROOT/wds_<name>``, ``/`` in the name written ``-``; DataComp downloads to
``ROOT/wds_<name>_test``)::

    classnames.txt                          one class name per line (classification)
    zeroshot_classification_templates.txt   one prompt per line, ``{c}`` where the class name goes
    dataset_type.txt                        ``retrieval`` (absent: classification)
    test/nshards.txt                        the number of shards N
    test/0.tar ... test/{N-1}.tar           samples ``s0000000.png`` + ``s0000000.cls`` (the label as
                                            ASCII digits) or + ``s0000000.txt`` (the image's captions,
                                            one per line, newlines inside a caption written ``\\n``)

exactly as ``clip_benchmark.webdataset_builder.convert_dataset`` / ``convert_retrieval_dataset``
write it and ``clip_benchmark.datasets.builder.build_wds_dataset`` reads it (images ``webp``,
``png``, ``jpg`` or ``jpeg``). The writer here needs neither clip_benchmark nor webdataset: it writes
plain tar files with Python's ``tarfile`` (members in sample order, mtime 0, so the bytes depend
only on the content). The reader indexes the local shards once (tar headers and the small label /
caption members) and reads images by offset, so it is a map-style data set with a length.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from compress.data.robust import DataError, apply_transform, open_image

#: the split clip_benchmark (and DataComp) evaluate on
TEST_SPLIT = "test"
#: image extensions clip_benchmark decodes, in its order of preference within a sample
IMAGE_EXTS = ("webp", "png", "jpg", "jpeg")
#: how ``--image-format`` names map to PIL's save arguments (clip_benchmark's PIL_to_bytes)
_SAVE = {"webp": {"format": "webp", "lossless": True}, "png": {"format": "png"}, "jpg": {"format": "jpeg"}}
KINDS = ("classification", "retrieval", "multilabel")

ImageLike = Image.Image | bytes | str | Path


def folder_name(name: str) -> str:
    """The folder of set ``name`` under a data root: ``wds_<name>``, ``/`` written ``-``
    (``vtab/cifar100`` -> ``wds_vtab-cifar100``, as clip_benchmark's Hugging Face copies are named)."""
    return "wds_" + name.replace("/", "-")


def candidate_dirs(root: str | Path, name: str) -> list[Path]:
    """Where set ``name`` may live under ``root``, in the order looked at: ``wds_<name>``,
    DataComp's ``wds_<name>_test``, then ``<name>`` as given and with ``/`` written ``-``."""
    root = Path(root)
    cleaned = name.replace("/", "-")
    names = [folder_name(name), f"{folder_name(name)}_test", name, cleaned]
    return [root / n for n in dict.fromkeys(names)]


def locate(root: str | Path, name: str, split: str = TEST_SPLIT) -> Path | None:
    """The folder of set ``name`` under ``root`` (the first of :func:`candidate_dirs` holding
    ``<split>/nshards.txt``), or ``None``."""
    for path in candidate_dirs(root, name):
        if (path / split / "nshards.txt").is_file():
            return path
    return None


def _check_line(kind: str, text: str) -> str:
    if "\n" in text or "\r" in text:
        raise DataError(f"{kind} must be one line each (a line per entry in the file), got {text!r}")
    return text


def _image_bytes(image: ImageLike, image_format: str) -> tuple[bytes, str]:
    """(encoded bytes, extension): a PIL image saved as ``image_format``, a file's bytes with its
    own extension, or bytes taken as already encoded in ``image_format``."""
    if isinstance(image, Image.Image):
        out = io.BytesIO()
        image.save(out, **_SAVE[image_format])
        return out.getvalue(), image_format
    if isinstance(image, bytes | bytearray):
        return bytes(image), image_format
    path = Path(image)
    ext = path.suffix.lstrip(".").lower().replace("jpeg", "jpg")
    if ext not in IMAGE_EXTS:
        raise DataError(f"{path}: clip_benchmark reads {', '.join(IMAGE_EXTS)} images, not {ext or 'no suffix'}")
    return path.read_bytes(), ext


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uname = info.gname = "bigdata"  # what webdataset's TarWriter records
    tar.addfile(info, io.BytesIO(data))


def _write_shards(
    folder: Path, split: str, samples: Iterable[tuple[ImageLike, str, bytes]], shard_size: int, image_format: str
) -> int:
    """Write ``(image, label extension, label bytes)`` samples as ``split/{0..N-1}.tar`` of
    ``shard_size`` samples each and ``split/nshards.txt``; the number of samples."""
    if image_format not in _SAVE:
        raise DataError(f"image_format must be one of {', '.join(_SAVE)}, got {image_format!r}")
    if shard_size < 1:
        raise DataError(f"shard_size must be at least 1, got {shard_size}")
    out = folder / split
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.tar"):
        old.unlink()
    tar, count = None, 0
    try:
        for index, (image, label_ext, label) in enumerate(samples):
            if index % shard_size == 0:
                if tar is not None:
                    tar.close()
                tar = tarfile.open(out / f"{index // shard_size}.tar", "w", format=tarfile.USTAR_FORMAT)
            data, ext = _image_bytes(image, image_format)
            _add(tar, f"s{index:07d}.{ext}", data)
            _add(tar, f"s{index:07d}.{label_ext}", label)
            count = index + 1
    finally:
        if tar is not None:
            tar.close()
    if count == 0:
        raise DataError(f"{folder}: no samples to write")
    (out / "nshards.txt").write_text(f"{(count + shard_size - 1) // shard_size}\n")
    return count


def _lines(path: Path, lines: Sequence[str], kind: str) -> None:
    path.write_text("".join(_check_line(kind, s) + "\n" for s in lines))


def write_wds_classification(
    root: str | Path,
    name: str,
    images: Iterable[ImageLike],
    labels: Iterable[int],
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    split: str = TEST_SPLIT,
    shard_size: int = 10_000,
    image_format: str = "png",
) -> Path:
    """Write a zero-shot classification set in clip_benchmark's format at ``root/wds_<name>``
    (:func:`folder_name`) and return that folder.

    ``images``: PIL images (saved as ``image_format``: ``png`` or lossless ``webp`` keep the pixels),
    encoded bytes, or image files (copied). ``labels``: class indices into ``classnames``.
    ``templates``: prompts with ``{c}`` (``{}`` is accepted and written ``{c}``)."""
    if not classnames:
        raise DataError(f"{name}: a classification set needs class names")
    prompts = [t.replace("{}", "{c}") for t in templates]
    bad = [t for t in prompts if "{c}" not in t]
    if not prompts or bad:
        raise DataError(f"{name}: templates need a '{{c}}' placeholder, got {bad or 'none'}")
    folder = Path(root) / folder_name(name)
    folder.mkdir(parents=True, exist_ok=True)
    n = len(classnames)

    def samples() -> Iterable[tuple[ImageLike, str, bytes]]:
        for image, label in zip(images, labels, strict=True):
            if not 0 <= int(label) < n:
                raise DataError(f"{name}: label {label} is not a class index (0..{n - 1})")
            yield image, "cls", str(int(label)).encode("ascii")

    _write_shards(folder, split, samples(), shard_size, image_format)
    _lines(folder / "classnames.txt", classnames, "class names")
    _lines(folder / "zeroshot_classification_templates.txt", prompts, "templates")
    (folder / "dataset_type.txt").unlink(missing_ok=True)
    return folder


def write_wds_retrieval(
    root: str | Path,
    name: str,
    images: Iterable[ImageLike],
    captions_per_image: Iterable[Sequence[str]],
    *,
    split: str = TEST_SPLIT,
    shard_size: int = 10_000,
    image_format: str = "png",
) -> Path:
    """Write an image-text retrieval set in clip_benchmark's format at ``root/wds_<name>``:
    each image with its captions (one or more, e.g. COCO's five) and ``dataset_type.txt`` =
    ``retrieval``; return the folder."""
    folder = Path(root) / folder_name(name)
    folder.mkdir(parents=True, exist_ok=True)

    def samples() -> Iterable[tuple[ImageLike, str, bytes]]:
        for index, (image, captions) in enumerate(zip(images, captions_per_image, strict=True)):
            captions = [captions] if isinstance(captions, str) else list(captions)
            if not captions:
                raise DataError(f"{name}: image {index} has no caption")
            text = "\n".join(c.replace("\n", r"\n") for c in captions)
            yield image, "txt", text.encode("utf-8")

    _write_shards(folder, split, samples(), shard_size, image_format)
    (folder / "dataset_type.txt").write_text("retrieval\n")
    for stale in ("classnames.txt", "zeroshot_classification_templates.txt"):
        (folder / stale).unlink(missing_ok=True)
    return folder


# ------------------------------------------------------------------------------------------ reading


@dataclass
class WdsSetInfo:
    """What a clip_benchmark-format folder declares: ``kind`` (``classification``, ``retrieval`` or
    ``multilabel``), its shards, and for classification its class names and ``{c}`` templates."""

    path: Path
    kind: str
    shards: list[Path]
    classnames: list[str] | None = None
    templates: list[str] | None = None
    split: str = TEST_SPLIT
    extra: dict[str, Any] = field(default_factory=dict)


def _read_lines(path: Path) -> list[str] | None:
    """A text file's stripped lines as clip_benchmark reads them (``None`` if absent)."""
    return [line.strip() for line in path.read_text().splitlines()] if path.is_file() else None


def read_wds_info(path: str | Path, split: str = TEST_SPLIT) -> WdsSetInfo:
    """The description of the set in folder ``path`` (``nshards.txt`` is required, as in clip_benchmark)."""
    path = Path(path)
    nshards_file = path / split / "nshards.txt"
    if not nshards_file.is_file():
        raise DataError(f"{path}: not a clip_benchmark webdataset folder (no {split}/nshards.txt)")
    try:
        nshards = int(nshards_file.read_text().strip())
    except ValueError:
        raise DataError(f"{nshards_file}: not a number of shards") from None
    type_file = path / "dataset_type.txt"
    kind = type_file.read_text().strip().lower() if type_file.is_file() else "classification"
    if kind not in KINDS:
        raise DataError(f"{type_file}: unknown data set type {kind!r} (known: {', '.join(KINDS)})")
    shards = [path / split / f"{i}.tar" for i in range(nshards)]
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise DataError(f"{path}: {len(missing)} of {nshards} shards missing in {split}/ ({', '.join(missing[:5])})")
    info = WdsSetInfo(path, kind, shards, split=split)
    if kind != "retrieval":
        info.classnames = _read_lines(path / "classnames.txt")
        info.templates = _read_lines(path / "zeroshot_classification_templates.txt")
    return info


@dataclass(frozen=True)
class _Sample:
    shard: int
    offset: int  # of the image's payload in the shard
    size: int
    ext: str
    target: int | tuple[str, ...]


def _split_name(name: str) -> tuple[str, str] | None:
    """webdataset's split of a member name into (sample key, extension): at the first ``.`` of the
    file name (``dir/s0000001.png`` -> ``("dir/s0000001", "png")``)."""
    head, _, base = name.rpartition("/")
    key, dot, ext = base.partition(".")
    if not dot or not key:
        return None
    return (f"{head}/{key}" if head else key), ext.lower()


def _index_shard(shard: int, path: Path, label_ext: str) -> list[_Sample]:
    """The samples of one shard: each image's payload position and its decoded label / captions."""
    groups: dict[str, dict[str, tuple[int, int, bytes | None]]] = {}
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            parts = _split_name(info.name) if info.isreg() else None
            if parts is None or parts[0].startswith("__"):
                continue
            key, ext = parts
            data = tar.extractfile(info).read() if ext == label_ext else None  # type: ignore[union-attr]
            groups.setdefault(key, {})[ext] = (info.offset_data, info.size, data)
    out = []
    for key, members in groups.items():
        ext = next((e for e in IMAGE_EXTS if e in members), None)
        if ext is None or label_ext not in members:
            missing = "an image" if ext is None else f"a .{label_ext}"
            raise DataError(f"{path}: sample {key} has no {missing} member (has {', '.join(sorted(members))})")
        raw = members[label_ext][2] or b""
        target: int | tuple[str, ...]
        if label_ext == "cls":
            target = int(raw)
        else:
            target = tuple(raw.decode("utf-8").splitlines())
        offset, size, _ = members[ext]
        out.append(_Sample(shard, offset, size, ext, target))
    return out


class WdsEvalSet(Dataset):
    """The samples of a clip_benchmark-format folder in shard order: ``(image, label)`` for a
    classification set, ``(image, [captions...])`` for a retrieval set (``None`` for an image that
    cannot be decoded, counted as a bad sample by the collate). Multi-label sets are refused."""

    def __init__(self, path: str | Path, transform: Any = None, split: str = TEST_SPLIT) -> None:
        self.info = read_wds_info(path, split)
        if self.info.kind == "multilabel":
            raise DataError(f"{path}: multi-label sets (mean average precision) are not supported")
        self.transform = transform
        label_ext = "txt" if self.info.kind == "retrieval" else "cls"
        self.samples = [s for i, p in enumerate(self.info.shards) for s in _index_shard(i, p, label_ext)]
        if not self.samples:
            raise DataError(f"{path}: no samples in {split}/")
        if self.info.classnames is not None:
            n = len(self.info.classnames)
            bad = sorted({s.target for s in self.samples if not 0 <= int(s.target) < n})  # type: ignore[arg-type]
            if bad:
                raise DataError(f"{path}: labels {bad[:5]} are not indices of the {n} class names")

    @property
    def kind(self) -> str:
        return self.info.kind

    @property
    def labels(self) -> list[int]:
        """Class index of every sample (classification sets)."""
        return [int(s.target) for s in self.samples]  # type: ignore[arg-type]

    @property
    def captions(self) -> list[list[str]]:
        """Captions of every image (retrieval sets)."""
        return [list(s.target) for s in self.samples]  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, Any] | None:
        s = self.samples[index]
        shard = self.info.shards[s.shard]
        with open(shard, "rb") as f:
            f.seek(s.offset)
            data = f.read(s.size)
        name = f"{shard}#{index}"
        image = open_image(data, name)
        if image is None:
            return None
        out = apply_transform(self.transform, image, name)
        target = list(s.target) if isinstance(s.target, tuple) else s.target
        return None if out is None else (out, target)
