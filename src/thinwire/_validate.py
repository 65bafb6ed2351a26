"""Uniform argument checks for every public thinwire entry point.

Every message has one shape — ``name must be in RANGE, got VALUE`` — so a user can fix a call
without reading the source. Wrong types raise ``TypeError``, wrong values
``ValueError``; nothing here uses ``assert``, which ``python -O`` strips.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Sequence
from typing import Any

import torch

__all__ = [
    "check_type",
    "check_int",
    "check_float",
    "check_choice",
    "check_dtype",
    "check_keys",
    "check_ordered_params",
    "check_param_tensors",
]


def _fmt_range(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    left = "(" if lo_open or lo is None else "["
    right = ")" if hi_open or hi is None else "]"
    lo_s = "-inf" if lo is None else repr(lo)
    hi_s = "inf" if hi is None else repr(hi)
    return f"{left}{lo_s}, {hi_s}{right}"


def check_type(name: str, value: Any, types: type | tuple[type, ...]) -> Any:
    """Raise ``TypeError`` unless ``value`` is an instance of ``types``; return it."""
    if not isinstance(value, types):
        names = (
            " or ".join(t.__name__ for t in types) if isinstance(types, tuple) else types.__name__
        )
        raise TypeError(f"{name} must be {names}, got {type(value).__name__} ({value!r})")
    return value


def check_int(
    name: str,
    value: Any,
    lo: int | None = None,
    hi: int | None = None,
) -> int:
    """Check an integer (bool rejected) lies in the closed range ``[lo, hi]``; return it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be int in {_fmt_range(lo, hi, False, False)}, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name} must be in {_fmt_range(lo, hi, False, False)}, got {value!r}")
    return value


def check_float(
    name: str,
    value: Any,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
) -> float:
    """Check a finite real number lies in the range (open or closed at each end); return it.

    Ints are accepted (``lr=1`` is a valid learning rate); bools, NaN and infinities are not.
    """
    rng = _fmt_range(lo, hi, lo_open, hi_open)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a real number in {rng}, got {value!r}")
    v = float(value)
    bad = not math.isfinite(v)
    if lo is not None:
        bad = bad or (v <= lo if lo_open else v < lo)
    if hi is not None:
        bad = bad or (v >= hi if hi_open else v > hi)
    if bad:
        raise ValueError(f"{name} must be in {rng}, got {value!r}")
    return v


def check_choice(name: str, value: Any, choices: Collection[Any]) -> Any:
    """Check ``value`` is one of ``choices``; return it."""
    if value not in choices:
        opts = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be in {{{opts}}}, got {value!r}")
    return value


def check_dtype(name: str, value: Any, dtypes: Collection[Any]) -> Any:
    """Check a tensor dtype is one of ``dtypes`` (raises ``TypeError``); return it."""
    if value not in dtypes:
        opts = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must be in {{{opts}}}, got {value}")
    return value


def check_keys(name: str, keys: Iterable[str], accepted: Collection[str]) -> None:
    """Refuse keys outside ``accepted`` (a misspelt setting would otherwise be ignored)."""
    unknown = sorted(k for k in keys if k not in accepted)
    if unknown:
        opts = ", ".join(repr(k) for k in sorted(accepted))
        got = ", ".join(repr(k) for k in unknown)
        raise ValueError(f"{name} must be in {{{opts}}}, got {got}")


def check_ordered_params(name: str, params: Any) -> Any:
    """Refuse a set of parameters (``TypeError``): its iteration order differs between processes,
    so ranks would pair different tensors in every collective. Return ``params``."""
    if isinstance(params, set | frozenset):
        raise TypeError(
            f"{name} must be an ordered iterable of tensors (a list, tuple or generator), got "
            f"{type(params).__name__}: a set's order differs between processes"
        )
    return params


def check_param_tensors(group: int, params: Sequence[Any]) -> None:
    """Check the tensors of param group ``group``: real floating point, on a real device.

    Raises:
        TypeError: a complex or non-floating-point parameter (its imaginary part or integer
            values would be silently mangled by real-valued optimizer math).
        ValueError: a parameter on the ``meta`` device (it holds no data to optimize).
    """
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            continue  # torch.optim.Optimizer refuses non-tensors with its own message
        if p.is_complex() or not p.is_floating_point():
            raise TypeError(
                f"param {i} of group {group} must be a real floating-point tensor, got {p.dtype}"
            )
        if p.is_meta:
            raise ValueError(
                f"param {i} of group {group} must be on a device that holds data, got device "
                "'meta' (materialize the model, e.g. to_empty() and init, before building the "
                "optimizer)"
            )
