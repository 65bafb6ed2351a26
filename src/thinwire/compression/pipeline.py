"""Composable codecs: ``transform -> select -> quantize -> pack`` with one encode/decode pair.

Two codecs cover every optimizer's wire format:

* :class:`DenseCodec` — quantize every element (DiLoCo's fp16 / int8 / int4 / FP4 / 2-bit
  pseudo-gradients; byte counts in ``docs/design.md``, "Byte formulas").
* :class:`SparseCodec` — chunk, optionally DCT, keep the top-k per chunk, quantize the kept values,
  code their indices (DeMo, arXiv:2411.19870v1; Psyche DisTrO; SparseLoCo, arXiv:2508.15706v1).

Both are built from plain settings, by keyword or from a pipeline string such as
``"dct > topk(32) > quant(sign) > pack"`` (see :func:`build_codec`), so optimizers only configure
them. Every payload carries the codec's canonical settings; the byte count is exact from the shape.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from thinwire._validate import check_choice, check_int, check_type
from thinwire.compression.aggregate import SparseMessage, densify
from thinwire.compression.base import Codec, ShapeLike, as_shape
from thinwire.compression.chunk import ChunkGeometry
from thinwire.compression.dct import dct_basis, dct_tiles
from thinwire.compression.fused import dct_topk
from thinwire.compression.index_coding import INDEX_CODERS
from thinwire.compression.payload import PayloadError, body_tensor, pack_payload
from thinwire.compression.topk import k_for_chunk, topk_chunks
from thinwire.compression.values import VALUE_FORMATS, ValueFormat

__all__ = [
    "VALUE_FORMATS",
    "ValueFormat",
    "DenseCodec",
    "SparseCodec",
    "SparseEncoding",
    "build_codec",
]

_BITS_TO_FORMAT = {1: "sign", 2: "2bit", 4: "int4", 8: "int8", 16: "fp16", 32: "fp32"}
_ACCEPTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_input(x: Any) -> torch.Tensor:
    check_type("x", x, torch.Tensor)
    if x.dtype not in _ACCEPTED_DTYPES:
        raise TypeError(
            f"x.dtype must be in {{torch.float32, torch.float16, torch.bfloat16}}, got {x.dtype}"
        )
    return x


def _finite_or_raise(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise PayloadError(
            f"payload decodes to {int((~torch.isfinite(t)).sum())} non-finite {what}"
        )
    return t


class DenseCodec(Codec):
    """Quantize every element of a tensor (the dense wire formats of the DiLoCo family).

    Args:
        values: value format, one of :data:`VALUE_FORMATS` (default ``"fp32"``).
        **params: settings of that format's quantizer (e.g. ``block=128``).

    Wire bytes: header + packed codes (``ceil(numel * bits / 8)``) + 4 bytes per side value.
    """

    codec_id = 1

    def __init__(self, values: str = "fp32", **params: Any) -> None:
        self.values = ValueFormat(values, **params)

    @property
    def settings(self) -> str:
        return "dense;" + self.values.settings

    def body_nbytes(self, shape: tuple[int, ...]) -> int:
        return self.values.nbytes(math.prod(shape))

    def _encode(
        self, x: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[bytes, torch.Tensor]:
        x = _check_input(x)
        body, deq = self.values.encode(x.reshape(-1), generator)
        payload = pack_payload(self.codec_id, x.dtype, tuple(x.shape), self.settings, body)
        return payload, deq.reshape(x.shape)

    def encode(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> bytes:
        return self._encode(x, generator)[0]

    def roundtrip(self, x: torch.Tensor, *, generator: torch.Generator | None = None):
        return self._encode(x, generator)

    def decode(
        self,
        payload,
        numel: int | None = None,
        *,
        shape: ShapeLike | None = None,
        max_numel: int | None = None,
    ) -> torch.Tensor:
        """Decode a payload; its shape is checked against ``numel``/``shape``/``max_numel``.

        See :meth:`Codec.decode`: without ``shape`` or ``numel`` a payload of more than
        ``max_numel`` (default :data:`~thinwire.compression.base.DEFAULT_MAX_NUMEL`) elements
        raises :class:`PayloadError` before the output is allocated.
        """
        header, body = self._open(payload, numel, shape, max_numel)
        try:
            out = self.values.decode(body, 0, header.numel)
        except PayloadError:
            raise
        except (ValueError, RuntimeError) as exc:
            raise PayloadError(f"payload body does not decode: {exc}") from exc
        _finite_or_raise(out, "values")
        return out if numel is not None else out.reshape(header.shape)


@dataclass(frozen=True)
class SparseEncoding:
    """Everything an optimizer needs from one sparse encode.

    Attributes:
        payload: the bytes to send.
        message: the message as every receiver will decode it (dequantized values).
        raw_val: the selected values before quantization, ``(num_chunks, k)`` float32 — DeMo's
            Psyche variant subtracts these from momentum.
    """

    payload: bytes
    message: SparseMessage
    raw_val: torch.Tensor


class SparseCodec(Codec):
    """Chunk -> (DCT) -> per-chunk top-k -> quantize values -> code indices.

    Args:
        chunk: target chunk side ``s`` (the :func:`thinwire.compression.split` rule); default 64.
        topk: kept entries per chunk (``topk_rule="per_chunk"``: ``min(topk, chunk_len)``, DeMo)
            or per ``s*s`` elements (``"density"``: ``max(1, round(chunk_len*topk/s^2))``,
            SparseLoCo); default 32.
        transform: ``"dct"`` (DeMo) or ``"none"`` (SparseLoCo).
        values: value format of the kept entries (default ``"fp32"``).
        index_coding: ``"entropy"`` (Elias-Fano, ~1.09x the bound at k=64 of 4096) or ``"fixed"``
            (``ceil(log2 chunk_len)`` bits, as templar and Psyche).
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` for the fused DCT + top-k and the
            aggregation fold (``compression._dispatch`` rule); not part of the wire format.
        **params: settings of the value quantizer.
    """

    codec_id = 2

    def __init__(
        self,
        *,
        chunk: int = 64,
        topk: int = 32,
        transform: str = "dct",
        topk_rule: str = "per_chunk",
        values: str = "fp32",
        index_coding: str = "entropy",
        backend: str = "auto",
        **params: Any,
    ) -> None:
        self.backend = check_choice("backend", backend, ("auto", "torch", "triton"))
        self.chunk = check_int("chunk", chunk, 1, 65535)
        self.topk = check_int("topk", topk, 1, 2**31 - 1)
        self.transform = check_choice("transform", transform, ("dct", "none"))
        self.topk_rule = check_choice("topk_rule", topk_rule, ("per_chunk", "density"))
        if self.topk_rule == "density":
            # FIX: k_for_chunk needs topk <= chunk**2; check it here, not at the first encode.
            check_int("topk", topk, 1, self.chunk * self.chunk)
        self.index_coding = check_choice("index_coding", index_coding, tuple(INDEX_CODERS))
        self.values = ValueFormat(values, **params)
        self._coder = INDEX_CODERS[index_coding]

    @property
    def settings(self) -> str:
        return (
            f"sparse;s={self.chunk};k={self.topk};t={self.transform};r={self.topk_rule};"
            f"i={self.index_coding};{self.values.settings}"
        )

    def geometry(self, shape: tuple[int, ...]) -> ChunkGeometry:
        """Chunk geometry this codec uses for a tensor of ``shape``."""
        return ChunkGeometry.of(shape, self.chunk)

    def k_for(self, chunk_len: int) -> int:
        """Entries kept per chunk of ``chunk_len`` elements."""
        if self.topk_rule == "density":
            return k_for_chunk(chunk_len, self.topk, self.chunk)
        return min(self.topk, chunk_len)

    def body_nbytes(self, shape: tuple[int, ...]) -> int:
        g = self.geometry(as_shape(shape))
        if g.num_chunks == 0:
            return 0
        k = self.k_for(g.chunk_len)
        return self._coder.nbytes(g.num_chunks, k, g.chunk_len) + self.values.nbytes(
            g.num_chunks * k
        )

    def coefficients(self, x: torch.Tensor) -> tuple[ChunkGeometry, torch.Tensor]:
        """The transformed chunks ``(num_chunks, chunk_len)`` in float32 that top-k selects from."""
        x = _check_input(x)
        g = self.geometry(tuple(x.shape))
        tiles = g.to_tiles(x.detach().to(torch.float32))
        if self.transform == "dct":
            tiles = dct_tiles(tiles)
        return g, tiles.reshape(g.num_chunks, g.chunk_len)

    def encode_sparse(
        self, x: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> SparseEncoding:
        """Encode ``x``; return the payload, the local decoded message and the raw kept values."""
        x = _check_input(x)
        g = self.geometry(tuple(x.shape))
        coeffs = (
            None
            if self.transform == "dct"
            else g.to_tiles(x.detach().to(torch.float32)).reshape(g.num_chunks, g.chunk_len)
        )
        if g.num_chunks == 0:
            empty = torch.zeros(0, 0)
            msg = SparseMessage(g, self.transform, empty.long(), empty)
            payload = pack_payload(self.codec_id, x.dtype, tuple(x.shape), self.settings, b"")
            return SparseEncoding(payload, msg, empty)
        k = self.k_for(g.chunk_len)
        if self.transform == "dct":  # DCT fused with the selection: one pass over the data
            tiles = g.to_tiles(x.detach().to(torch.float32))
            basis1 = dct_basis(g.n1, torch.float32, tiles.device)
            basis2 = dct_basis(g.n2, torch.float32, tiles.device)
            idx, val = dct_topk(tiles, basis1, basis2, k, backend=self.backend)
        else:
            idx, val = topk_chunks(coeffs, k)  # (N, k) each, ascending indices
        index_body = self._coder.encode(idx, g.chunk_len).contiguous().cpu().numpy().tobytes()
        value_body, deq = self.values.encode(val.reshape(-1), generator)
        body = index_body + value_body
        payload = pack_payload(self.codec_id, x.dtype, tuple(x.shape), self.settings, body)
        msg = SparseMessage(g, self.transform, idx, deq.reshape(idx.shape))
        return SparseEncoding(payload, msg, val)

    def encode(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> bytes:
        return self.encode_sparse(x, generator=generator).payload

    def roundtrip(self, x: torch.Tensor, *, generator: torch.Generator | None = None):
        enc = self.encode_sparse(x, generator=generator)
        return enc.payload, densify(enc.message)

    def decode_sparse(
        self,
        payload,
        numel: int | None = None,
        *,
        shape: ShapeLike | None = None,
        max_numel: int | None = None,
    ) -> SparseMessage:
        """Decode a payload into its message (indices and dequantized values), not densified.

        The declared shape is checked as in :meth:`Codec.decode` before anything is decoded:
        it must equal ``shape`` / hold ``numel`` elements when given, and hold at most
        ``max_numel`` elements (default :data:`~thinwire.compression.base.DEFAULT_MAX_NUMEL`
        when neither is given). The message holds ``num_chunks * k <= numel`` entries, and
        densifying it allocates ``numel`` float32 values, so both stay within that bound.

        Raises:
            PayloadError: as :meth:`Codec.decode`.
        """
        header, body = self._open(payload, numel, shape, max_numel)
        g = self.geometry(header.shape)
        if g.num_chunks == 0:
            empty = torch.zeros(0, 0)
            return SparseMessage(g, self.transform, empty.long(), empty)
        k = self.k_for(g.chunk_len)
        ib = self._coder.nbytes(g.num_chunks, k, g.chunk_len)
        try:
            idx = self._coder.decode(body_tensor(body, 0, ib), g.num_chunks, k, g.chunk_len)
            val = self.values.decode(body, ib, g.num_chunks * k)
        except PayloadError:
            raise
        except (ValueError, RuntimeError) as exc:
            raise PayloadError(f"payload body does not decode: {exc}") from exc
        _finite_or_raise(val, "values")
        return SparseMessage(g, self.transform, idx, val.reshape(g.num_chunks, k))

    def decode(
        self,
        payload,
        numel: int | None = None,
        *,
        shape: ShapeLike | None = None,
        max_numel: int | None = None,
    ) -> torch.Tensor:
        """:meth:`decode_sparse`, densified (same bounds on the declared shape)."""
        out = densify(self.decode_sparse(payload, numel, shape=shape, max_numel=max_numel))
        # FIX: finite DCT coefficients near the float32 limit can overflow in the inverse DCT;
        # a payload that decodes to inf must be rejected, not returned.
        _finite_or_raise(out, "elements after the inverse transform")
        return out.reshape(-1) if numel is not None else out


_STAGE = re.compile(r"^\s*([a-z_0-9]+)\s*(?:\((.*)\))?\s*$")


def _parse_value(text: str) -> Any:
    text = text.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def _parse_stage(stage: str) -> tuple[str, list[Any], dict[str, Any]]:
    m = _STAGE.match(stage)
    if not m:
        raise ValueError(f"pipeline stage must look like name or name(args), got {stage!r}")
    name, inner = m.group(1), m.group(2)
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    if inner and inner.strip():
        for part in inner.split(","):
            if "=" in part:
                key, val = part.split("=", 1)
                kwargs[key.strip()] = _parse_value(val)
            else:
                args.append(_parse_value(part))
    return name, args, kwargs


def build_codec(spec: str | Mapping[str, Any] | Codec) -> Codec:
    """Build a codec from plain settings.

    Accepted forms:

    * a :class:`Codec` (returned as is);
    * a mapping of :class:`SparseCodec` keywords when it has ``topk``, else :class:`DenseCodec`
      keywords (``{"values": "int8", "block": 256}``);
    * a pipeline string of stages joined by ``>``: ``chunk(s)``, ``dct``, ``topk(k[, rule=density])``,
      ``quant(bits | name[, key=value...])`` (bits 1 sign, 2 2bit, 4 int4, 8 int8, 16 fp16, 32 fp32),
      ``index(entropy | fixed)`` and ``pack`` (packing is always on; accepted for readability).
      Examples: ``"dct > topk(32) > quant(sign) > pack"``, ``"topk(64, rule=density) > quant(2)"``,
      ``"quant(int8, block=256)"``, ``"fp16"`` (a bare format name).

    Raises:
        ValueError: an unknown stage, a stage given twice, or a setting out of range.
    """
    if isinstance(spec, Codec):
        return spec
    if isinstance(spec, Mapping):
        kw = dict(spec)
        return SparseCodec(**kw) if "topk" in kw else DenseCodec(**kw)
    check_type("spec", spec, str)
    if spec.strip() in VALUE_FORMATS:
        return DenseCodec(spec.strip())
    sparse: dict[str, Any] = {}
    values: str | None = None
    vparams: dict[str, Any] = {}
    seen: set[str] = set()
    for stage in re.split(r">|→", spec):
        name, args, kwargs = _parse_stage(stage)
        if name in seen:
            raise ValueError(f"pipeline stage {name!r} must appear once, got it twice in {spec!r}")
        seen.add(name)
        if name == "chunk" and len(args) == 1 and not kwargs:
            sparse["chunk"] = args[0]
        elif name == "dct" and not args and not kwargs:
            sparse["transform"] = "dct"
        elif name == "topk" and len(args) == 1 and set(kwargs) <= {"rule"}:
            sparse["topk"] = args[0]
            if "rule" in kwargs:
                sparse["topk_rule"] = "density" if kwargs["rule"] == "density" else kwargs["rule"]
        elif name == "quant" and len(args) == 1:
            fmt = args[0]
            values = _BITS_TO_FORMAT.get(fmt, fmt) if isinstance(fmt, int) else str(fmt)
            if values not in VALUE_FORMATS:
                raise ValueError(
                    f"quant must be in {{1, 2, 4, 8, 16, 32, {', '.join(VALUE_FORMATS)}}}, got {fmt!r}"
                )
            vparams = kwargs
        elif name == "index" and len(args) == 1 and not kwargs:
            sparse["index_coding"] = args[0]
        elif name == "pack" and not args and not kwargs:
            pass
        else:
            raise ValueError(
                "pipeline stage must be in {chunk(s), dct, topk(k), quant(bits|name), "
                f"index(entropy|fixed), pack}}, got {stage.strip()!r}"
            )
    if "topk" in sparse:
        sparse.setdefault("transform", "none")
        return SparseCodec(values=values or "fp32", **sparse, **vparams)
    if sparse:
        raise ValueError(f"pipeline stages {sorted(sparse)} need a topk(k) stage, got {spec!r}")
    return DenseCodec(values or "fp32", **vparams)
