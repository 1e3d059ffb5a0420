"""Fixed augmentation views: each training sample has ``A`` crop boxes, drawn once from a key, and an epoch
trains on one of them (the views a teacher-output cache stores its teacher's outputs for).

View ``v`` of sample ``i`` is the crop :meth:`CropViews.draw <compress.data.transforms.CropViews.draw>` makes under
torch's CPU generator seeded with :func:`view_seed` ``(cache_seed, i, v)``; epoch ``e`` of a run seeded ``s`` trains
on view :func:`view_of` ``(s, e, i, A) = (e + offset(s, i)) mod A``: every view once in ``A`` epochs, in an order
that differs between samples and between run seeds (MobileCLIP's reinforced data draws one stored augmentation
per sample and epoch).
"""

from __future__ import annotations

_MASK = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit hash of an integer (the same in every process)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def view_seed(cache_seed: int, index: int, view: int) -> int:
    """The seed of view ``view`` of sample ``index`` (a 64-bit integer)."""
    return _mix(_mix(_mix(int(cache_seed)) ^ int(index)) ^ int(view))


def view_of(run_seed: int, epoch: int, index: int, num_views: int) -> int:
    """The view sample ``index`` is trained on in ``epoch``: ``(epoch + offset(run_seed, index)) % num_views``."""
    return (int(epoch) + _mix(_mix(int(run_seed) ^ 0x5EED) ^ int(index))) % int(num_views)
