"""Per-sample augmentation seeding (``compress.data.robust.torch_seeded``): the same draws as
``torch.random.fork_rng`` + ``torch.manual_seed`` (what every sample's augmentation was before, so
resumed runs and the demo's numbers do not move), the caller's CPU generator left as it was, and no
accelerator generator touched (``torch.manual_seed``'s cost on a CUDA build: issue 16, point 3)."""

from __future__ import annotations

import io
import itertools
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from open_clip.transform import PreprocessCfg
from PIL import Image
from torchvision import transforms as T

from compress.config import DataConfig, DatasetConfig
from compress.data import DistillTransform, build_train_loader, train_transform
from compress.data import sampling as sampling_module
from compress.data import shards as shards_module
from compress.data.robust import torch_seeded

#: seeds as the data path makes them: small, past 2**63, past 2**64 (taken mod 2**64)
SEEDS = [0, 1, 12345, (3 * 1_000_003 + 2) * 1_000_000_007 + 17, 2**63 + 5, 2**64 + 9, 7 * 2**70 + 3]


@contextmanager
def reference_torch_seeded(seed: int) -> Iterator[None]:
    """The seeding the data path used before issue 16 (kept here as the reference)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed % (1 << 64))
        yield


def _image(seed: int, w: int = 61, h: int = 47) -> Image.Image:
    pixels = torch.randint(0, 256, (h, w, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def _transforms() -> dict[str, object]:
    student, teacher = PreprocessCfg(size=(24, 24)), PreprocessCfg(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)
    return {
        "train_transform": train_transform(32),
        "distill": DistillTransform(student, teacher),
        # several draws of several kinds (crop box, flip coin, jitter factors and order, a normal draw)
        "many_draws": T.Compose([
            T.RandomResizedCrop(20, scale=(0.3, 1.0)),
            T.RandomHorizontalFlip(),
            T.ColorJitter(0.4, 0.4, 0.4, 0.1),
            T.ToTensor(),
            T.Lambda(lambda x: x + 0.01 * torch.randn_like(x)),
        ]),
    }


def _as_tensors(out: object) -> list[torch.Tensor]:
    return list(out.values()) if isinstance(out, dict) else [out]  # type: ignore[list-item]


@pytest.mark.parametrize("name", list(_transforms()))
def test_every_sample_draws_what_fork_rng_and_manual_seed_drew(name):
    transform = _transforms()[name]
    for i, seed in enumerate(SEEDS):
        img = _image(i)
        with reference_torch_seeded(seed):
            expected = _as_tensors(transform(img)) + [torch.rand(8)]  # and the generator goes on alike
        with torch_seeded(seed):
            got = _as_tensors(transform(img)) + [torch.rand(8)]
        assert len(got) == len(expected)
        for a, b in zip(got, expected, strict=True):
            assert torch.equal(a, b), (name, seed)
    with torch_seeded(SEEDS[0]):
        a = _as_tensors(transform(_image(0)))[0]
    with torch_seeded(SEEDS[1]):
        b = _as_tensors(transform(_image(0)))[0]
    assert not torch.equal(a, b)  # the seed matters


def test_the_callers_cpu_generator_is_left_as_it_was():
    torch.manual_seed(2024)
    torch.rand(3)
    before = torch.get_rng_state()
    with torch_seeded(99):
        torch.rand(100)
        inner = torch.get_rng_state()
    assert torch.equal(torch.get_rng_state(), before) and not torch.equal(inner, before)
    with pytest.raises(ValueError), torch_seeded(7):  # also when the block raises
        torch.rand(5)
        raise ValueError("a transform failed")
    assert torch.equal(torch.get_rng_state(), before)
    with torch_seeded(1), torch_seeded(2):  # nested blocks unwind to the outer state, then the caller's
        pass
    assert torch.equal(torch.get_rng_state(), before)


def test_seeding_a_sample_leaves_every_accelerator_generator_alone(monkeypatch):
    """``torch.manual_seed`` also seeds CUDA (and MPS, XPU, MTIA) generators: ~140 us a call on a CUDA build
    whose CUDA was never started (a lazy call with a stack trace), and with CUDA started it reseeds the
    GPUs' generators with the last sample's seed. The per-sample seeding must do neither."""
    called = []
    for module in (torch.cuda, torch.mps, torch.xpu, torch.mtia):
        for fn in ("manual_seed", "manual_seed_all"):
            if hasattr(module, fn):
                monkeypatch.setattr(module, fn, lambda *a, _n=f"{module.__name__}.{fn}", **k: called.append(_n))
    with torch_seeded(5):
        torch.rand(2)
    assert called == []


def _loader_images(data: DataConfig, transform: object, seeding: object, monkeypatch: pytest.MonkeyPatch,
                   batches: int) -> list[torch.Tensor]:
    monkeypatch.setattr(sampling_module, "torch_seeded", seeding)
    monkeypatch.setattr(shards_module, "torch_seeded", seeding)
    import open_clip

    tok = open_clip.get_tokenizer("ViT-B-32")
    loader = build_train_loader(data, transform, tok, batch_size=4, seed=11, pin_memory=False)
    return [b["images"] for b in itertools.islice(loader.forever(), batches)]


def _write_shard(path: Path, n: int) -> None:
    with tarfile.open(path, "w") as tar:
        for k in range(n):
            buf = io.BytesIO()
            _image(100 + k, 40, 36).save(buf, format="PNG")
            for suffix, payload in (("png", buf.getvalue()), ("txt", f"sample {k}".encode())):
                info = tarfile.TarInfo(f"k{k:03d}.{suffix}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


@pytest.mark.parametrize("kind", ["synthetic", "webdataset"])
def test_training_batches_are_those_of_the_old_seeding(tmp_path, monkeypatch, kind):
    """The training loader's images, over two epochs, equal what the old seeding gave: a resumed run
    (and the README's numbers) see the same crops."""
    if kind == "synthetic":
        data = DataConfig(train=DatasetConfig(num_samples=12))
    else:
        for s in range(2):
            _write_shard(tmp_path / f"s-{s}.tar", 6)
        data = DataConfig(train=DatasetConfig(kind="webdataset", path=str(tmp_path / "s-{0..1}.tar"),
                                              num_samples=12, options={"shuffle_buffer": 4}))
    transform = train_transform(24)
    new = _loader_images(data, transform, torch_seeded, monkeypatch, 6)
    old = _loader_images(data, transform, reference_torch_seeded, monkeypatch, 6)
    assert len(new) == len(old) == 6
    for a, b in zip(new, old, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(new[0], new[3])  # the crops vary (another epoch, another draw)
