"""The value stage of a codec: quantize a flat vector of values and pack it into a byte body.

A :class:`ValueFormat` names a quantizer of :mod:`thinwire.compression.quant` (or ``"fp32"``,
raw little-endian float32) with its settings, and fixes the exact body size for ``n`` values:
the packed codes (1/2/4/8-bit codes with :func:`~thinwire.compression.bitpack.pack_bits`,
3/5/6/7-bit ones as fixed-width fields with :func:`~thinwire.compression.bitpack.pack_uint`,
the 16-bit casts as their raw bytes) followed by the quantizer's float32 side data.

Two ways to run it, producing the same bytes:

* :meth:`ValueFormat.encode` / :meth:`ValueFormat.decode` work on Python ``bytes`` through the
  checked public quantizers and raise ``ValueError`` on anything invalid (the reference path).
* :meth:`ValueFormat.encode_tensor` / :meth:`ValueFormat.decode_rows` stay on the tensor's
  device and never read a value back to the host, so they can run inside an optimizer step on a
  GPU; validity comes back as device bools (one per body) for the caller to read once.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from thinwire._validate import check_choice, check_dtype, check_int, check_type
from thinwire.compression import quant as _quant
from thinwire.compression.bitpack import (
    pack_bits,
    pack_bits_rows,
    pack_uint,
    pack_uint_rows,
    packed_nbytes,
    padding_ok_rows,
    uint_nbytes,
    unpack_bits,
    unpack_bits_rows,
    unpack_uint,
    unpack_uint_rows,
)

__all__ = ["VALUE_FORMATS", "ValueFormat"]

#: Value format names: ``"fp32"`` (raw float32) and every quantizer of
#: :data:`thinwire.compression.quant.QUANTIZERS`.
VALUE_FORMATS = ("fp32",) + tuple(_quant.QUANTIZERS)

# Widths packed as whole sub-byte slots; other widths below 8 are fixed-width bit fields.
_SLOT_WIDTHS = (1, 2, 4, 8)


def _fmt_params(params: Mapping[str, Any]) -> str:
    return "".join(f";{k}={params[k]}" for k in sorted(params))


def _bytes_tensor(body: bytes, start: int, nbytes: int) -> Tensor:
    """A uint8 tensor copy of ``body[start:start+nbytes]`` (the caller checked the bounds)."""
    if nbytes == 0:
        # An empty numpy-backed tensor has stride 0, which `.view(torch.float16)` rejects.
        return torch.zeros(0, dtype=torch.uint8)
    return torch.from_numpy(np.frombuffer(body, dtype=np.uint8, count=nbytes, offset=start).copy())


def _as_float32_rows(raw: Tensor) -> Tensor:
    """Reinterpret ``(R, 4m)`` uint8 rows as ``(R, m)`` little-endian float32.

    ``view(float32)`` needs unit stride along a row, a row stride and a storage offset that are
    multiples of 4 bytes; a slice of a larger buffer may have none of these (even a single row,
    which counts as contiguous), so it is copied first when needed.
    """
    rows, nbytes = raw.shape
    if raw.numel() == 0:  # empty tensors may carry strides that view(dtype) rejects
        return torch.zeros(rows, nbytes // 4, dtype=torch.float32, device=raw.device)
    if raw.stride() != (nbytes, 1) or raw.storage_offset() % 4:
        raw = raw.clone(memory_format=torch.contiguous_format)
    return raw.view(torch.float32)


class ValueFormat:
    """How a flat vector of values is quantized and packed, with its exact byte size.

    Args:
        name: one of :data:`VALUE_FORMATS`.
        **params: the quantizer's keyword settings (e.g. ``block=256``), validated by it.
    """

    def __init__(self, name: str, **params: Any) -> None:
        self.name = check_choice("values", name, VALUE_FORMATS)
        self.params = dict(params)
        if name == "fp32" and params:
            raise ValueError(f"values 'fp32' takes no settings, got {sorted(params)}")
        # Only quantizers with a `generator` keyword get one, and the dequantizer gets only the
        # keywords it takes (e.g. not `stochastic`).
        self._takes_generator = False
        self._deq_params: dict[str, Any] = {}
        if name != "fp32":
            qfn, dfn = _quant.QUANTIZERS[name]
            self._takes_generator = "generator" in inspect.signature(qfn).parameters
            dkeys = inspect.signature(dfn).parameters
            self._deq_params = {k: v for k, v in self.params.items() if k in dkeys}
            # Validate the settings once, on an empty vector, so a bad value fails at construction.
            # stochastic=True needs a generator to pass this check; a throwaway one suffices.
            probe = dict(self.params)
            if probe.get("stochastic") is True and self._takes_generator:
                probe.setdefault("generator", torch.Generator())
            qfn(torch.zeros(0), **probe)
        self.bits = 32 if name == "fp32" else _quant.code_bits(name, **self.params)

    @property
    def settings(self) -> str:
        """Canonical settings string, e.g. ``"v=int8;block=256"``."""
        return f"v={self.name}{_fmt_params(self.params)}"

    def _codes_nbytes(self, n: int) -> int:
        if self.bits in _SLOT_WIDTHS:
            return packed_nbytes(n, self.bits)
        if self.bits < 8:
            # 3/5/6/7-bit codes (2bit with n_bins 8, 32, 64, 128) as fixed-width fields.
            return uint_nbytes(n, self.bits)
        return n * self.bits // 8  # 16-bit casts and raw fp32: whole bytes per element

    def _side_len(self, n: int) -> int:
        return 0 if self.name == "fp32" else _quant.side_len(self.name, n, **self.params)

    def nbytes(self, n: int) -> int:
        """Exact body bytes for ``n`` values: packed codes then float32 side data."""
        return self._codes_nbytes(n) + 4 * self._side_len(n)

    # --- reference path on bytes (checked, raises) --------------------------------------------

    def encode(self, v: Tensor, generator: torch.Generator | None = None) -> tuple[bytes, Tensor]:
        """Quantize a flat vector; return the body bytes and the dequantized float32 values.

        Raises:
            TypeError: bad dtype. ValueError: non-finite ``v``, a missing generator for
            stochastic rounding, or values that quantize to non-finite side data or output.
        """
        n = v.numel()
        if self.name == "fp32":
            v32 = v.detach().to(torch.float32).contiguous().cpu()
            if n and not bool(torch.isfinite(v32).all()):
                raise ValueError(
                    f"x must be finite, got {int((~torch.isfinite(v32)).sum())} non-finite values"
                )
            return v32.numpy().tobytes(), v32.clone()
        kw = dict(self.params)
        if generator is not None and self._takes_generator:
            kw["generator"] = generator
        q = _quant.QUANTIZERS[self.name][0](v.detach().cpu(), **kw)
        if self.bits in _SLOT_WIDTHS:
            codes = pack_bits(q.codes, self.bits)
        elif self.bits < 8:
            codes = pack_uint(q.codes, self.bits)
        else:
            codes = q.codes
        side = q.side.to(torch.float32).contiguous()
        deq = _quant.QUANTIZERS[self.name][1](q.codes, side, n, **self._deq_params)
        # Finite inputs near the float32 limit can overflow a quantizer's side data (sign's mean
        # |x|, 2bit's mean/centroids give inf/NaN); every receiver would reject such a payload.
        if not (bool(torch.isfinite(side).all()) and bool(torch.isfinite(deq).all())):
            raise ValueError(
                f"x must quantize to finite values with {self.name!r}, got non-finite side "
                "data or dequantized values (|x| too close to the float32 limit)"
            )
        body = codes.contiguous().numpy().tobytes() + side.numpy().tobytes()
        return body, deq.to(torch.float32)

    def decode(self, body: bytes, start: int, n: int) -> Tensor:
        """Inverse of :meth:`encode` on ``body[start:start+nbytes(n)]`` (bounds checked by caller).

        Raises:
            ValueError: nonzero padding bits or invalid codes (from the checked dequantizer).
        """
        cn = self._codes_nbytes(n)
        if self.name == "fp32":
            arr = np.frombuffer(body, dtype="<f4", count=n, offset=start).copy()
            return torch.from_numpy(arr)
        codes = _bytes_tensor(body, start, cn)
        if self.bits in _SLOT_WIDTHS:
            codes = unpack_bits(codes, self.bits, n)
        elif self.bits < 8:
            codes = unpack_uint(codes, self.bits, n).to(torch.uint8)
        n_side = self._side_len(n)
        side = torch.from_numpy(
            np.frombuffer(body, dtype="<f4", count=n_side, offset=start + cn).copy()
        )
        deq = _quant.QUANTIZERS[self.name][1](codes, side, n, **self._deq_params)
        return deq.to(torch.float32)

    # --- device path (sync-free, flags instead of raising) ------------------------------------

    def encode_tensor(
        self, v: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Quantize and pack a flat vector on its own device, without reading values to the host.

        The body bytes equal :meth:`encode`'s for the same input (up to the device's float
        arithmetic). ``v`` is assumed finite; this is not checked.

        Args:
            v: float32/float16/bfloat16 tensor of ``n`` elements (flattened).
            generator: for stochastic rounding, on ``v.device`` (ignored by formats that do not
                take one).

        Returns:
            ``(body, deq, ok)``: ``body`` uint8 ``(nbytes(n),)``, ``deq`` float32 ``(n,)`` (the
            values every receiver decodes), ``ok`` 0-d bool, False when the side data or the
            dequantized values are not finite (inputs near the float32 limit; for fp16/bf16 any
            ``|v|`` above the format's max), all on ``v.device``.

        Raises:
            TypeError: bad type or dtype. ValueError: stochastic rounding without a generator.
        """
        check_type("v", v, Tensor)
        check_dtype("v.dtype", v.dtype, _quant.INPUT_DTYPES)
        flat = v.detach().reshape(-1).to(torch.float32)
        n = flat.numel()
        if self.name == "fp32":
            deq = flat.clone()
            body = deq.view(torch.uint8).clone() if n else flat.new_zeros(0, dtype=torch.uint8)
            return body, deq, torch.isfinite(deq).all()
        kw = dict(self.params)
        if self._takes_generator:
            if generator is not None:
                check_type("generator", generator, torch.Generator)
                kw["generator"] = generator
            elif kw.get("stochastic"):
                raise ValueError(
                    "generator must be a torch.Generator when stochastic=True, got None"
                )
        qcore, dcore = _quant.QUANTIZER_CORES[self.name]
        q = qcore(flat, **kw)
        side = q.side.to(torch.float32).reshape(1, -1)
        codes = q.codes.reshape(1, -1)
        if self.bits in _SLOT_WIDTHS:
            packed = pack_bits_rows(codes, self.bits)
        elif self.bits < 8:
            packed = pack_uint_rows(codes, self.bits)
        else:
            packed = codes
        deq = dcore(codes, side, n, **self.params).reshape(-1)
        ok = torch.isfinite(side).all() & torch.isfinite(deq).all()
        if self.bits == 16:
            # The public cast refuses |x| above the format's max even where it rounds down to it.
            fmax = torch.finfo(_quant.QUANTIZERS[self.name][0].keywords["dtype"]).max
            ok &= (flat.abs() <= fmax).all()
        body = torch.cat([packed, side.contiguous().view(torch.uint8)], dim=1).reshape(-1)
        return body, deq, ok

    def decode_rows(self, body: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """Decode ``R`` bodies at once on their device, flagging invalid ones instead of raising.

        Args:
            body: ``(R, nbytes(n))`` uint8, one encoded body per row.
            n: values per body, ``>= 0``.

        Returns:
            ``(values, ok)``: ``values`` float32 ``(R, n)``, ``ok`` bool ``(R,)``. Where ``ok``
            is True, ``values[r]`` equals :meth:`decode` of that row's bytes. ``ok`` is False for
            nonzero padding bits, codes outside the quantizer's range, non-finite side data or
            non-finite decoded values; those rows of ``values`` are zero.

        Raises:
            TypeError: ``body`` is not uint8. ValueError: ``n`` negative or ``body`` not of shape
            ``(R, nbytes(n))`` (metadata only).
        """
        check_int("n", n, 0)
        check_type("body", body, Tensor)
        check_dtype("body.dtype", body.dtype, (torch.uint8,))
        expected = self.nbytes(n)
        if body.dim() != 2 or body.shape[1] != expected:
            raise ValueError(
                f"body must have shape (R, {expected}) for n={n} {self.name!r} values, "
                f"got shape {tuple(body.shape)}"
            )
        if self.name == "fp32":
            vals = _as_float32_rows(body)
            ok = torch.isfinite(vals).all(dim=1)
            return torch.where(ok[:, None], vals, 0.0), ok
        cn = self._codes_nbytes(n)
        raw = body[:, :cn]
        side = _as_float32_rows(body[:, cn:])
        ok = torch.isfinite(side).all(dim=1)
        if self.bits in _SLOT_WIDTHS:
            codes = unpack_bits_rows(raw, self.bits, n)
            ok &= padding_ok_rows(raw, n * self.bits)
        elif self.bits < 8:
            codes = unpack_uint_rows(raw, self.bits, n).to(torch.uint8)
            ok &= padding_ok_rows(raw, n * self.bits)
        else:
            codes = raw
        code_range = _quant.code_range(self.name, **self.params)
        # A range spanning every code of the width holds by construction (2-bit's 4 bins).
        if code_range not in (None, (0, (1 << self.bits) - 1)):
            lo, hi = code_range
            ok &= ((codes >= lo) & (codes <= hi)).all(dim=1)
        vals = _quant.QUANTIZER_CORES[self.name][1](codes, side, n, **self.params)
        ok &= torch.isfinite(vals).all(dim=1)
        return torch.where(ok[:, None], vals, 0.0), ok
