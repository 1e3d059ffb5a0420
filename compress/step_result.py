"""One optimizer step's outcome, decided on the host or on the device.

With the finite check decided on the device (:attr:`compress.train.Trainer.defer_finite_check`) the
skip flag is a :class:`DeviceFlag`, copied without blocking to pinned host memory and read one step
later, so the check does not drain the GPU queue every step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class DeviceFlag:
    """A 0-dim flag computed on the device, copied without blocking into pinned host memory: :meth:`read`
    waits for that copy only (read one step later, it is long done), not for the queue to drain."""

    def __init__(self, flag: Tensor) -> None:
        self._value: bool | None = None
        if flag.device.type == "cuda":
            self._host = torch.empty((), dtype=torch.bool, pin_memory=True)
            self._host.copy_(flag, non_blocking=True)
            self._event: Any = torch.cuda.Event()
            self._event.record()
        else:  # on the CPU the value is there already
            self._host, self._event = flag.detach().to("cpu", torch.bool), None

    @property
    def known(self) -> bool:
        return self._value is not None

    def read(self) -> bool:
        if self._value is None:
            if self._event is not None:
                self._event.synchronize()
            self._value = bool(self._host)
        return self._value


class StepResult:
    """One optimizer step: whether it was taken or skipped for a non-finite objective or gradient,
    the objective, its terms, the loss weights used and the weights' gradient norm (before clipping).

    With the finite check decided on the device (:attr:`~compress.train.Trainer.defer_finite_check`) the
    non-finite flag is a :class:`DeviceFlag`; reading :attr:`nonfinite` / :attr:`stepped` then waits for it."""

    def __init__(self, stepped: bool, nonfinite: bool | DeviceFlag, loss: Tensor, terms: dict[str, Tensor],
                 weights: list[float], grad_norm: Tensor | None = None) -> None:
        self._stepped, self._nonfinite = stepped, nonfinite
        self.loss, self.terms, self.weights, self.grad_norm = loss, terms, weights, grad_norm

    @property
    def known(self) -> bool:
        """Whether the outcome is on the host already (always, unless decided on the device and not read yet)."""
        return not isinstance(self._nonfinite, DeviceFlag) or self._nonfinite.known

    @property
    def nonfinite(self) -> bool:
        return self._nonfinite.read() if isinstance(self._nonfinite, DeviceFlag) else self._nonfinite

    @property
    def stepped(self) -> bool:
        return not self.nonfinite if isinstance(self._nonfinite, DeviceFlag) else self._stepped
