"""Chunk geometry: how a parameter tensor is cut into DCT / top-k chunks.

Holds :func:`split` (the chunk side for one dimension) and :class:`ChunkGeometry` (the tiling of a
whole tensor, with exact ``to_tiles``/``from_tiles`` and ``to_chunks``/``from_chunks`` inverses).
The rules are those of the reference code: bloc97/DeMo ``demo.py``, Psyche ``distro.rs`` and
tplr-ai/SparseLoCo / templar (DeMo, arXiv:2411.19870v1; SparseLoCo, arXiv:2508.15706v1).

Layout. A tensor is viewed as ``(batch, R, C)``: leading dims of an N-D tensor (N > 2) fold into
``batch`` (Psyche's convention; bloc97/DeMo rejects such tensors), a 2-D tensor has
``batch = 1``, a 1-D tensor ``(n,)`` is ``(1, 1, n)`` and a 0-d tensor is ``(1, 1, 1)``. With
``n1 = split(R, target)`` and ``n2 = split(C, target)`` the canonical encoded layout is
``(batch, R/n1, C/n2, n1, n2)``; tiles are numbered batch-major, then tile-row, then
tile-column, and inside a tile the flat index is ``row_in_tile * n2 + col_in_tile`` (row-major),
range ``[0, n1*n2)``.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import einops
import torch

from thinwire._validate import check_int, check_type

__all__ = ["DEFAULT_TARGET", "ChunkGeometry", "split"]

logger = logging.getLogger(__name__)

#: Default chunk side ``s``: bloc97/DeMo ``compression_chunk``, tplr-ai/SparseLoCo ``chunk_size``
#: and templar ``target_chunk`` all use 64, so a 2-D chunk holds 64*64 = 4096 elements and a 1-D
#: chunk 64.
DEFAULT_TARGET = 64

#: A chunk side below ``target / 4`` is reported as degraded (a warning is logged); e.g. a prime
#: dimension larger than ``target`` gets side 1.
_DEGRADED_FRACTION = 4


@functools.cache
def _split_cached(n: int, target: int) -> int:
    if n <= target:
        return n
    # Largest divisor <= target: scan downwards from target. At most `target` modulo operations
    # per distinct (n, target), and the result is cached, so this is cheap even for n ~ 1e6.
    for d in range(target, 0, -1):
        if n % d == 0:
            return d
    return 1  # unreachable: 1 divides every n


def split(n: int, target: int) -> int:
    """Chunk side for one dimension: the largest divisor of ``n`` that is ``<= target``.

    ``split(n, target)`` returns ``n`` itself when ``n <= target``. Reference values:
    ``split(12, 5) = 4``, ``split(100, 26) = 25``, ``split(50257, 64) = 29``, ``split(97, 64) = 1``.
    Results are cached per ``(n, target)``.

    Args:
        n: dimension length, ``>= 1``.
        target: requested chunk side ``s``, ``>= 1`` (default elsewhere: 64).

    Returns:
        The chunk side, a divisor of ``n`` in ``[1, min(n, target)]``.

    Raises:
        TypeError: if ``n`` or ``target`` is not an int.
        ValueError: if ``n < 1`` or ``target < 1``.
    """
    check_int("n", n, 1)
    check_int("target", target, 1)
    return _split_cached(n, target)


@functools.cache
def _warn_degraded(dim: int, side: int, target: int) -> None:
    # The cache makes this log once per distinct (dim, side, target) per process, so an
    # optimizer over many same-shaped tensors does not flood the log.
    logger.warning(
        "dimension %d has chunk side %d < target/%d (target=%d): its largest divisor <= target "
        "is small (prime-like dimension), so chunks along it are thin and the DCT/top-k work "
        "per chunk degrades",
        dim,
        side,
        _DEGRADED_FRACTION,
        target,
    )


def _side(dim: int, target: int) -> int:
    """Chunk side for one dimension of a geometry; zero-length dims get side 1."""
    if dim == 0:
        # A zero-length dimension has no divisors to pick from; side 1 keeps chunk_len >= 1 and
        # makes num_chunks = 0, so every tensor op below works on empty batches.
        return 1
    side = _split_cached(dim, target)
    if side * _DEGRADED_FRACTION < target and dim > side:
        _warn_degraded(dim, side, target)
    return side


@dataclass(frozen=True)
class ChunkGeometry:
    """How one tensor shape is tiled into chunks (the layout in this module's docstring).

    Build with :meth:`ChunkGeometry.of`; the constructor does not validate.

    Attributes:
        shape: the original tensor shape (``()`` for a 0-d tensor).
        target: requested chunk side ``s``.
        n1: tile height (rows per tile); 1 for 0-d and 1-D tensors.
        n2: tile width (columns per tile).
        batch: product of the leading dims of an N-D tensor (N > 2), else 1.
        rows: ``R``, the second-to-last dim (1 for 0-d and 1-D tensors).
        cols: ``C``, the last dim (1 for 0-d tensors).
    """

    shape: tuple[int, ...]
    target: int
    n1: int
    n2: int
    batch: int
    rows: int
    cols: int

    @classmethod
    def of(cls, shape: Sequence[int] | torch.Size, target: int = DEFAULT_TARGET) -> ChunkGeometry:
        """Geometry for a tensor of ``shape`` with chunk side ``target``.

        Rules: a 0-d tensor is treated as ``(1,)``; a 1-D tensor ``(n,)`` has
        ``n1 = 1`` and ``n2 = split(n, target)``, so its chunks hold ``split(n, target)``
        elements; a 2-D tensor ``(R, C)`` has ``n1 = split(R, target)``,
        ``n2 = split(C, target)``; an N-D tensor chunks its last two dims and folds the leading
        dims into ``batch`` (as Psyche). A zero-length dimension gets side 1, so tensors with
        ``numel == 0`` have ``num_chunks == 0``. A side below ``target / 4`` on a longer dimension
        logs one warning per distinct dimension.

        Args:
            shape: tensor shape, non-negative ints.
            target: chunk side ``s``, ``>= 1`` (default: 64, as DeMo, SparseLoCo and templar).

        Returns:
            The geometry.

        Raises:
            TypeError: if ``shape`` is not a sequence of ints or ``target`` is not an int.
            ValueError: if a dim is negative or ``target < 1``.
        """
        check_type("shape", shape, (tuple, list, torch.Size))
        dims = tuple(check_int(f"shape[{i}]", d, 0) for i, d in enumerate(shape))
        check_int("target", target, 1)
        if len(dims) == 0:
            batch, rows, cols = 1, 1, 1
        elif len(dims) == 1:
            batch, rows, cols = 1, 1, dims[0]
        else:
            batch, rows, cols = math.prod(dims[:-2]), dims[-2], dims[-1]
        # 1-D tensors keep n1 = 1 (chunks run along the only dim).
        n1 = 1 if len(dims) < 2 else _side(rows, target)
        n2 = _side(cols, target)
        return cls(shape=dims, target=target, n1=n1, n2=n2, batch=batch, rows=rows, cols=cols)

    @property
    def chunk_len(self) -> int:
        """Elements per chunk, ``n1 * n2``."""
        return self.n1 * self.n2

    @property
    def grid(self) -> tuple[int, int]:
        """Tiles per matrix, ``(rows / n1, cols / n2)``."""
        return self.rows // self.n1, self.cols // self.n2

    @property
    def num_chunks(self) -> int:
        """Number of chunks, ``batch * (rows / n1) * (cols / n2)``; 0 when ``numel == 0``."""
        gy, gx = self.grid
        return self.batch * gy * gx

    @property
    def numel(self) -> int:
        """Elements of the original tensor (1 for a 0-d tensor)."""
        return math.prod(self.shape)

    def _check(self, name: str, t: torch.Tensor, expected: tuple[int, ...]) -> None:
        check_type(name, t, torch.Tensor)
        if tuple(t.shape) != expected:
            raise ValueError(f"{name}.shape must be {expected}, got {tuple(t.shape)}")

    def to_tiles(self, x: torch.Tensor) -> torch.Tensor:
        """Cut ``x`` into tiles in the canonical layout.

        Args:
            x: tensor of shape ``self.shape``, any dtype and device.

        Returns:
            ``(num_chunks, n1, n2)``, same dtype and device; tile ``i`` is
            ``(b, ty, tx)`` with ``i = (b * R/n1 + ty) * C/n2 + tx``. It may share storage with
            ``x`` (when no copy is needed); clone before mutating it in place.

        Raises:
            TypeError: if ``x`` is not a tensor.
            ValueError: if ``x.shape != self.shape``.
        """
        self._check("x", x, self.shape)
        m = x.reshape(self.batch, self.rows, self.cols)
        return einops.rearrange(m, "b (y h) (x w) -> (b y x) h w", h=self.n1, w=self.n2)

    def from_tiles(self, t: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_tiles`: reassemble tiles into a tensor of ``self.shape``.

        Args:
            t: ``(num_chunks, n1, n2)`` tiles in the canonical layout.

        Returns:
            Tensor of shape ``self.shape``, same dtype and device (may share storage with ``t``).

        Raises:
            TypeError: if ``t`` is not a tensor.
            ValueError: if ``t.shape != (num_chunks, n1, n2)``.
        """
        self._check("t", t, (self.num_chunks, self.n1, self.n2))
        gy, gx = self.grid
        m = einops.rearrange(t, "(b y x) h w -> b (y h) (x w)", b=self.batch, y=gy, x=gx)
        return m.reshape(self.shape)

    def to_chunks(self, x: torch.Tensor) -> torch.Tensor:
        """Flatten each tile of ``x``: ``(num_chunks, chunk_len)``, flat index ``r * n2 + c``.

        Args:
            x: tensor of shape ``self.shape``.

        Returns:
            ``(num_chunks, chunk_len)``, same dtype and device (may share storage with ``x``).

        Raises:
            TypeError: if ``x`` is not a tensor.
            ValueError: if ``x.shape != self.shape``.
        """
        return self.to_tiles(x).reshape(self.num_chunks, self.chunk_len)

    def from_chunks(self, c: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_chunks`.

        Args:
            c: ``(num_chunks, chunk_len)`` flattened tiles.

        Returns:
            Tensor of shape ``self.shape``, same dtype and device (may share storage with ``c``).

        Raises:
            TypeError: if ``c`` is not a tensor.
            ValueError: if ``c.shape != (num_chunks, chunk_len)``.
        """
        self._check("c", c, (self.num_chunks, self.chunk_len))
        return self.from_tiles(c.reshape(self.num_chunks, self.n1, self.n2))
