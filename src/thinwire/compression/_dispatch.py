"""The backend rule, written once, and the registry of (reference, kernel) pairs.

Every op that has a Triton kernel exists three times with one signature: the public op (takes
``backend=``), the pure-torch reference ``<op>_torch`` (the oracle and the CPU path) and the
launcher ``<op>_triton`` in :mod:`thinwire.compression._triton`. This module decides which of the
last two runs:

* ``"auto"``: the kernel when every tensor argument is on CUDA and ``triton`` imports, else the
  reference;
* ``"torch"``: always the reference;
* ``"triton"``: always the kernel; on CPU tensors only under ``TRITON_INTERPRET=1`` (Triton's
  interpreter, which ``@triton.jit`` picks at decoration time, so the variable must be set before
  the kernel modules are first imported), otherwise a ``ValueError`` that says why.

Kernel errors propagate: nothing here catches an exception and retries on the reference (a silent
fallback would hide a broken kernel). ``triton`` is imported lazily, on the first dispatch that
needs it, so ``import thinwire`` works without it. The chosen backend is logged once per
(op, backend) at DEBUG.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from thinwire._validate import check_choice, check_type

__all__ = [
    "BACKENDS",
    "KernelPair",
    "dispatch",
    "interpret_enabled",
    "register",
    "registered",
    "resolve_backend",
    "triton_available",
]

logger = logging.getLogger(__name__)

#: Accepted values of every op's ``backend`` argument.
BACKENDS = ("auto", "torch", "triton")

#: Module every kernel module imports first; it records whether the kernels were decorated for
#: the interpreter (see :func:`_check_interpreted_at_import`).
_KERNEL_COMMON = "thinwire.compression._triton._common"


@functools.cache
def triton_available() -> bool:
    """Whether ``import triton`` succeeds (cached; imports triton on the first call)."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def interpret_enabled() -> bool:
    """Whether ``TRITON_INTERPRET=1`` is set in the environment (Triton's CPU interpreter)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _tensors(values: Iterable[Any]) -> list[torch.Tensor]:
    """Every tensor in ``values``, looking one level into lists and tuples (peer lists)."""
    out: list[torch.Tensor] = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, list | tuple):
            out.extend(t for t in v if isinstance(t, torch.Tensor))
    return out


def _check_interpreted_at_import() -> None:
    """Raise if the kernel modules were imported (compiled for a GPU) without the interpreter."""
    common = sys.modules.get(_KERNEL_COMMON)
    if common is not None and not common.INTERPRETED:
        raise ValueError(
            "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before the kernel "
            "modules are first imported, got kernels already decorated for the GPU "
            "(TRITON_INTERPRET was unset when thinwire.compression._triton was imported)"
        )


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Apply the dispatch rule: which implementation runs for these tensors.

    Args:
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        *tensors: the op's tensor arguments (all of them: the rule needs every one on CUDA).

    Returns:
        ``"torch"`` or ``"triton"``. ``"auto"`` with no tensor gives ``"torch"``.

    Raises:
        ValueError: unknown ``backend``; ``backend="triton"`` with a tensor not on CUDA while
            ``TRITON_INTERPRET`` is not ``"1"`` (or was not when the kernels were imported).
        ImportError: ``backend="triton"`` and triton does not import.
    """
    check_choice("backend", backend, BACKENDS)
    for i, t in enumerate(tensors):
        check_type(f"tensors[{i}]", t, torch.Tensor)
    if backend == "torch":
        return "torch"
    on_cuda = bool(tensors) and all(t.is_cuda for t in tensors)
    if backend == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if not triton_available():
        raise ImportError(
            "backend='triton' needs the triton package (pip install 'thinwire[triton]'), "
            "got an ImportError on import triton"
        )
    if not on_cuda:
        devices = sorted({str(t.device) for t in tensors if not t.is_cuda}) or ["none"]
        if not interpret_enabled():
            raise ValueError(
                "backend='triton' needs CUDA tensors or TRITON_INTERPRET=1 set before import, "
                f"got device {', '.join(devices)}"
            )
        _check_interpreted_at_import()
    return "triton"


@dataclass(frozen=True)
class KernelPair:
    """A registered op: its reference and its kernel launcher.

    Attributes:
        name: op name (the public function's name).
        reference: the pure-torch reference.
        kernel: the launcher, or ``"module:attribute"`` naming it (imported on first use, so
            registering never imports triton).
    """

    name: str
    reference: Callable[..., Any]
    kernel: Callable[..., Any] | str

    def load_kernel(self) -> Callable[..., Any]:
        """The launcher itself (imports its module when ``kernel`` is a string)."""
        if callable(self.kernel):
            return self.kernel
        module, _, attr = self.kernel.partition(":")
        return getattr(importlib.import_module(module), attr)


_REGISTRY: dict[str, KernelPair] = {}
_LOGGED: set[tuple[str, str]] = set()


def register(
    name: str, reference: Callable[..., Any], kernel: Callable[..., Any] | str
) -> KernelPair:
    """Register the (reference, kernel) pair of op ``name``.

    Args:
        name: op name; registering a name twice replaces nothing and raises.
        reference: the pure-torch reference (same signature as the launcher).
        kernel: the launcher, or ``"module:attribute"`` to import it lazily.

    Returns:
        The registered :class:`KernelPair`.

    Raises:
        TypeError: ``reference`` not callable, or ``kernel`` neither callable nor a string.
        ValueError: ``name`` already registered, or a ``kernel`` string without ``":"``.
    """
    check_type("name", name, str)
    if not callable(reference):
        raise TypeError(f"reference must be callable, got {type(reference).__name__}")
    if not callable(kernel):
        check_type("kernel", kernel, str)
        if ":" not in kernel:
            raise ValueError(f"kernel must be callable or 'module:attribute', got {kernel!r}")
    if name in _REGISTRY:
        raise ValueError(f"name must not be registered yet, got {name!r} (already registered)")
    pair = KernelPair(name=name, reference=reference, kernel=kernel)
    _REGISTRY[name] = pair
    return pair


_INTERPRETER_LOCK = threading.Lock()


def registered() -> dict[str, KernelPair]:
    """A copy of the registry: op name -> :class:`KernelPair`."""
    return dict(_REGISTRY)


def dispatch(name: str, backend: str, *args: Any, **kwargs: Any) -> Any:
    """Run op ``name`` on the backend the rule picks for its tensor arguments.

    The tensors the rule looks at are every tensor in ``args`` and ``kwargs`` (and in lists or
    tuples passed there). Exceptions from the chosen implementation propagate unchanged.

    Args:
        name: a registered op.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see :func:`resolve_backend`).
        *args: positional arguments of the op (without ``backend``).
        **kwargs: keyword arguments of the op (without ``backend``).

    Returns:
        Whatever the chosen implementation returns.

    Raises:
        ValueError: unknown ``name`` or a backend the rule rejects.
    """
    check_choice("name", name, tuple(_REGISTRY))
    pair = _REGISTRY[name]
    chosen = resolve_backend(backend, *_tensors(args), *_tensors(kwargs.values()))
    if (name, chosen) not in _LOGGED:
        _LOGGED.add((name, chosen))
        logger.debug("%s: backend=%r resolved to %r", name, backend, chosen)
    if chosen == "torch":
        return pair.reference(*args, **kwargs)
    kernel = pair.load_kernel()
    if interpret_enabled():
        # Triton's interpreter patches module-level state while a kernel runs, so two threads
        # (in-process ranks) interpreting at once break each other; launches are serialised.
        with _INTERPRETER_LOCK:
            return kernel(*args, **kwargs)
    return kernel(*args, **kwargs)
