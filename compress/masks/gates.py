"""Hard-concrete gates: the L0 relaxation behind structured pruning masks.

Louizos et al., "Learning Sparse Neural Networks through L0 Regularization" (ICLR 2018), as
used by CoFi (Xia et al., ACL 2022) and TinyCLIP (Wu et al., ICCV 2023):

- training sample: u ~ U(eps, 1 - eps), s = sigmoid((log u - log(1 - u) + log_alpha) / beta),
  z = clamp(s * (r - l) + l, 0, 1);
- keep probability: P(z != 0) = sigmoid(log_alpha - beta * log(-l / r));
- deterministic mask (evaluation, pruning): the soft values sigmoid(0.8 * log_alpha / beta),
  with the round(expected number of zeros) smallest of each segment set to 0; with ``round_to``
  r > 1 the kept count is then moved to the nearest multiple of r (:func:`round_kept`), so that
  pruning leaves widths that GEMM kernels tile well (as torch-pruning's ``round_to``).

The kept values of the deterministic mask are those soft values, not 1 (CoFi and TinyCLIP
multiply them into the weights when pruning, and so do we). ``log_alpha`` is clamped to
[ln 0.01, ln 100] (CoFi's ``constrain_parameters``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

LIMIT_L = -0.1
LIMIT_R = 1.1
BETA = 2.0 / 3.0
EPS = 1e-6
#: sigmoid(MAGIC * log_alpha / beta) ranks the units of the deterministic mask (Wang et al. 2020)
MAGIC = 0.8
LOG_ALPHA_MIN = math.log(1e-2)
LOG_ALPHA_MAX = math.log(1e2)
#: TinyCLIP initialises every log_alpha to 10 (clamped to ln 100 after the first step): nothing pruned
LOG_ALPHA_INIT = 10.0


def keep_probability(log_alpha: Tensor) -> Tensor:
    """P(z != 0) = sigmoid(log_alpha - beta * log(-l / r)) (Louizos et al. 2018, eq. 12)."""
    return torch.sigmoid(log_alpha - BETA * math.log(-LIMIT_L / LIMIT_R))


def logistic_noise(like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """log u - log(1 - u) with u ~ U(eps, 1 - eps), shaped like ``like`` (no gradient); with a
    ``generator`` u is drawn from it on the generator's device (a CUDA generator: no host copy;
    seeded alike, every rank draws the same u) and lands on ``like``'s device."""
    if generator is None:
        u = torch.empty_like(like, requires_grad=False).uniform_(EPS, 1.0 - EPS)
    else:
        u = torch.empty(like.shape, dtype=like.dtype, device=generator.device)
        u = u.uniform_(EPS, 1.0 - EPS, generator=generator).to(like.device)
    return torch.log(u) - torch.log1p(-u)


def sample_gates(log_alpha: Tensor, noise: Tensor | None = None) -> Tensor:
    """One training sample z = clamp(sigmoid((log u - log(1-u) + log_alpha) / beta) (r - l) + l, 0, 1);
    ``noise`` (log u - log(1-u)) is drawn here unless given."""
    noise = logistic_noise(log_alpha.detach()) if noise is None else noise
    s = torch.sigmoid((noise + log_alpha) / BETA)
    return (s * (LIMIT_R - LIMIT_L) + LIMIT_L).clamp(0.0, 1.0)


def round_kept(kept: int, size: int, round_to: int) -> int:
    """``kept`` of ``size`` units moved to the nearest allowed count: 0 stays 0, else a multiple of
    ``round_to`` in [round_to, size] or ``size`` itself (the unpruned width need not be a multiple);
    a tie goes up (keeps more)."""
    if round_to <= 1 or kept <= 0 or kept >= size:
        return kept
    lower = kept // round_to * round_to
    upper = min(lower + round_to, size)
    if lower == 0:  # a segment that keeps something keeps at least round_to (or all of it)
        return upper
    return upper if upper - kept <= kept - lower else lower


def deterministic_gates(log_alpha: Tensor, round_to: int = 1) -> Tensor:
    """sigmoid(0.8 log_alpha / beta) with the round(sum(1 - P(z != 0))) smallest values zeroed (CoFi);
    with ``round_to`` > 1 the number kept is first moved to :func:`round_kept`'s nearest multiple:
    the units kept or dropped by rounding are those next in the ranking (by log_alpha), and a unit
    kept by rounding up keeps its soft value, as every kept unit does."""
    log_alpha = log_alpha.detach()
    soft = torch.sigmoid(MAGIC * log_alpha / BETA)
    zeros = round(float((1.0 - keep_probability(log_alpha)).sum()))
    zeros = soft.numel() - round_kept(soft.numel() - zeros, soft.numel(), round_to)
    if zeros > 0:
        soft = soft.clone()
        soft[torch.topk(soft, k=min(zeros, soft.numel()), largest=False).indices] = 0.0
    return soft


class HardConcreteGates(nn.Module):
    """``n`` hard-concrete gates with learnable ``log_alpha``, split into segments.

    A segment is the unit of the deterministic mask's zero count (one layer's heads, one
    layer's MLP neurons, all residual channels of a tower, one layer gate); sampling and keep
    probabilities are computed for all gates at once. ``forward()`` samples in training mode
    and returns the deterministic mask in evaluation mode (cached until ``log_alpha`` changes).

    ``round_to`` (default 1: none) rounds each segment's kept count in the deterministic mask
    (:func:`deterministic_gates`); training samples and keep probabilities do not see it.

    ``hold_sample()`` draws the noise u once and reuses it in every ``sample()`` until
    ``release_sample()``: all forward passes of one optimizer step (the cached and the live
    passes of gradient accumulation) then see the same gates, recomputed from ``log_alpha``
    each time so that every pass has its own autograd graph.
    """

    def __init__(self, segments: Sequence[int], init: float = LOG_ALPHA_INIT, round_to: int = 1) -> None:
        super().__init__()
        self.segments = [int(s) for s in segments]
        if any(s < 0 for s in self.segments):
            raise ValueError(f"segment sizes must be >= 0, got {self.segments}")
        if int(round_to) != round_to or round_to < 1:
            raise ValueError(f"round_to must be an integer >= 1, got {round_to}")
        self.round_to = int(round_to)
        self.log_alpha = nn.Parameter(torch.full((sum(self.segments),), float(init)))
        self.clamp_()
        self._cache: tuple[Tensor, Tensor] | None = None
        self._noise: Tensor | None = None

    @torch.no_grad()
    def clamp_(self) -> None:
        """log_alpha <- clamp(log_alpha, ln 0.01, ln 100), in place (after every optimizer step)."""
        self.log_alpha.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)

    def keep_probability(self) -> Tensor:
        return keep_probability(self.log_alpha)

    def sample(self) -> Tensor:
        return sample_gates(self.log_alpha, self._noise)

    def hold_sample(self, generator: torch.Generator | None = None, noise: Tensor | None = None) -> None:
        """Draw the noise of one sample now (from ``generator`` if given), or take ``noise`` (log u - log(1 - u),
        shaped like ``log_alpha``), and reuse it until :meth:`release_sample`."""
        self._noise = logistic_noise(self.log_alpha.detach(), generator) if noise is None else noise

    def release_sample(self) -> None:
        self._noise = None

    def deterministic(self) -> Tensor:
        """The deterministic mask of every segment, concatenated (no gradient)."""
        log_alpha = self.log_alpha.detach()
        if self._cache is None or not _same(self._cache[0], log_alpha):
            parts = [deterministic_gates(p, self.round_to) for p in torch.split(log_alpha, self.segments)]
            values = torch.cat(parts) if parts else log_alpha.clone()
            self._cache = (log_alpha.clone(), values)
        return self._cache[1]

    def forward(self) -> Tensor:
        return self.sample() if self.training else self.deterministic()

    def split(self, values: Tensor) -> tuple[Tensor, ...]:
        """Per-segment views of a [n] tensor of gate values."""
        return torch.split(values, self.segments)

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_cache": None, "_noise": None}

    def extra_repr(self) -> str:
        return f"segments={self.segments}" + (f", round_to={self.round_to}" if self.round_to > 1 else "")


def _same(a: Tensor, b: Tensor) -> bool:
    return a.device == b.device and a.shape == b.shape and bool(torch.equal(a, b))
