"""Error feedback (EF) residual buffers: accumulate what is to be sent, subtract what was sent.

EF-SGD (Karimireddy et al. 2019, "Error Feedback Fixes SignSGD and other Gradient Compression
Schemes", ICML 2019) keeps a residual ``e``; each step it compresses
``p = decay * e + scale * input``, transmits ``C(p)`` and keeps ``e' = p - C(p)``, so

    ``decay * e + scale * input == transmitted + e'``

and nothing the compressor drops is lost, only delayed. DeMo's momentum buffer and SparseLoCo's
error buffer (SparseLoCo, arXiv:2508.15706v1, Alg. 1: ``e <- beta * e + alpha * Delta``, then
``e <- e - reconstruction``) are this pattern. The two halves are separate functions because the
compressor runs between them: :func:`error_feedback_update` builds ``p`` in place, the caller
compresses it, and :func:`error_feedback_subtract` removes the *dequantized* reconstruction so
quantization error stays in the buffer (as SparseLoCo does). :class:`ErrorFeedback` keeps one
float32 buffer per key.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Any

import torch
from torch import Tensor

from thinwire._validate import check_float, check_type

__all__ = ["BUFFER_DTYPE", "ErrorFeedback", "error_feedback_update", "error_feedback_subtract"]

#: Residual buffers of :class:`ErrorFeedback` are float32, whatever the parameters' dtype.
BUFFER_DTYPE = torch.float32


def _check_pair(name_a: str, a: Any, name_b: str, b: Any) -> None:
    check_type(name_a, a, Tensor)
    check_type(name_b, b, Tensor)
    if not a.is_floating_point():
        raise TypeError(f"{name_a} must be a floating-point tensor, got {a.dtype}")
    if not b.is_floating_point():
        raise TypeError(f"{name_b} must be a floating-point tensor, got {b.dtype}")
    if a.shape != b.shape:
        raise ValueError(
            f"{name_b} must have shape {tuple(a.shape)} (as {name_a}), got {tuple(b.shape)}"
        )


def error_feedback_update(
    residual: Tensor, inp: Tensor, *, decay: float, scale: float = 1.0
) -> Tensor:
    """Accumulate in place: ``residual <- decay * residual + scale * inp``; return ``residual``.

    The returned buffer is what gets compressed (SparseLoCo's error-buffer update, with
    ``decay = beta`` and ``scale = alpha`` under ``ef_scale_by_lr=True``). Computed as
    ``residual.mul_(decay).add_(inp, alpha=scale)`` in ``residual``'s dtype.

    Args:
        residual: floating-point buffer, modified in place.
        inp: floating-point tensor of the same shape (e.g. gradient or pseudo-gradient).
        decay: multiplier of the old residual, in [0, 1].
        scale: multiplier of ``inp``, finite.

    Returns:
        ``residual`` (the same tensor object).

    Raises:
        TypeError: non-tensor or non-float input. ValueError: shape mismatch, bad decay/scale.
    """
    _check_pair("residual", residual, "inp", inp)
    check_float("decay", decay, 0.0, 1.0)
    check_float("scale", scale)
    return residual.mul_(decay).add_(inp, alpha=scale)


def error_feedback_subtract(residual: Tensor, transmitted: Tensor) -> Tensor:
    """Remove what was sent, in place: ``residual <- residual - transmitted``; return ``residual``.

    ``transmitted`` is the receiver-side reconstruction (dense, same shape).

    Raises:
        TypeError: non-tensor or non-float input. ValueError: shape mismatch.
    """
    _check_pair("residual", residual, "transmitted", transmitted)
    return residual.sub_(transmitted)


class ErrorFeedback:
    """One error-feedback residual per key (e.g. per parameter), created lazily as float32 zeros.

    Usage per step: ``p = ef.accumulate(key, grad)``; compress ``p``; ``ef.commit(key, deq)``.
    ``accumulate`` returns the live buffer, not a copy: read or compress it before ``commit``.

    Args:
        decay: residual decay in [0, 1] (1 = classic EF-SGD).
        scale: multiplier of each input, finite (default 1).

    Raises:
        ValueError: bad decay/scale.
    """

    def __init__(self, decay: float, *, scale: float = 1.0) -> None:
        self.decay = check_float("decay", decay, 0.0, 1.0)
        self.scale = check_float("scale", scale)
        self._buffers: dict[Hashable, Tensor] = {}

    def accumulate(self, key: Hashable, inp: Tensor) -> Tensor:
        """``e[key] <- decay * e[key] + scale * inp`` (buffer created on first use); return it.

        Raises:
            TypeError: ``inp`` not a float tensor. ValueError: shape differs from the buffer's.
        """
        check_type("inp", inp, Tensor)
        buf = self._buffers.get(key)
        if buf is None:
            buf = torch.zeros(inp.shape, dtype=BUFFER_DTYPE, device=inp.device)
            self._buffers[key] = buf
        return error_feedback_update(buf, inp, decay=self.decay, scale=self.scale)

    def commit(self, key: Hashable, transmitted: Tensor) -> None:
        """``e[key] <- e[key] - transmitted``.

        Raises:
            KeyError: ``key`` was never accumulated. TypeError/ValueError: as
            :func:`error_feedback_subtract`.
        """
        if key not in self._buffers:
            raise KeyError(f"key must have been accumulated before commit, got {key!r}")
        error_feedback_subtract(self._buffers[key], transmitted)

    def residual(self, key: Hashable) -> Tensor:
        """The live residual buffer of ``key`` (KeyError if absent)."""
        return self._buffers[key]

    def __contains__(self, key: object) -> bool:
        return key in self._buffers

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._buffers)

    def __len__(self) -> int:
        return len(self._buffers)

    def state_dict(self) -> dict[str, Any]:
        """``{"decay", "scale", "residuals": {key: clone}}``; restores bit-exactly."""
        return {
            "decay": self.decay,
            "scale": self.scale,
            "residuals": {k: v.detach().clone() for k, v in self._buffers.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Replace decay, scale and all residuals with those in ``state_dict`` (cloned, float32).

        Raises:
            TypeError: malformed state. ValueError: bad decay/scale.
        """
        check_type("state_dict", state_dict, dict)
        missing = sorted({"decay", "scale", "residuals"} - set(state_dict))
        if missing:
            raise ValueError(f"state_dict must contain decay, scale, residuals, missing {missing}")
        residuals = check_type("state_dict['residuals']", state_dict["residuals"], dict)
        buffers: dict[Hashable, Tensor] = {}
        for k, v in residuals.items():
            check_type(f"state_dict['residuals'][{k!r}]", v, Tensor)
            if v.dtype != BUFFER_DTYPE:
                raise TypeError(f"residual {k!r} must be {BUFFER_DTYPE}, got {v.dtype}")
            buffers[k] = v.detach().clone()
        self.decay = check_float("decay", state_dict["decay"], 0.0, 1.0)
        self.scale = check_float("scale", state_dict["scale"])
        self._buffers = buffers
