"""``thinwire demo``: bytes and reconstruction error of every codec on a built-in tensor.

The tensor is a seeded stand-in for a pseudo-gradient (a smooth low-frequency field plus
Gaussian noise, 1024 x 1024 float32), built in-process, so the demo needs no download. Each row
encodes it, decodes it, and reports the exact wire size, the ratio against dense fp32, bits per
element, relative L2 error and, for sparse codecs, bits per index against the combinatorial bound
``log2 C(n, k) / k``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from thinwire.compression import (
    SparseCodec,
    build_codec,
    log2_binom,
)

__all__ = ["DEMO_CODECS", "CodecRow", "demo_tensor", "run_demo", "format_rows"]

# (label, pipeline) pairs: the wire formats of DiLoCo variants and of DeMo / Psyche /
# SparseLoCo / templar, each with thinwire's entropy-coded indices next to the fixed-width
# layout the references ship.
DEMO_CODECS: tuple[tuple[str, str], ...] = (
    ("dense fp32", "fp32"),
    ("dense fp16", "fp16"),
    ("dense bf16", "bf16"),
    ("dense fp8 e4m3", "quant(fp8_e4m3)"),
    ("dense int8 /256", "quant(int8, block=256)"),
    ("dense int4 /128", "quant(int4, block=128)"),
    ("dense fp4 e3m0 /128", "quant(fp4_e3m0, block=128)"),
    ("dense 2-bit centroid", "quant(2)"),
    ("dense sign + scale", "quant(sign)"),
    ("DeMo k=32 fp32, fixed idx", "dct > topk(32) > quant(32) > index(fixed)"),
    ("DeMo k=32 fp32, entropy idx", "dct > topk(32) > quant(32) > index(entropy)"),
    ("Psyche k=8 sign, entropy idx", "dct > topk(8) > quant(sign, scale=false) > index(entropy)"),
    ("SparseLoCo k=64 2-bit, fixed", "topk(64, rule=density) > quant(2) > index(fixed)"),
    ("SparseLoCo k=64 2-bit, entropy", "topk(64, rule=density) > quant(2) > index(entropy)"),
)


@dataclass(frozen=True)
class CodecRow:
    """One line of the demo table."""

    label: str
    pipeline: str
    nbytes: int
    ratio: float
    bits_per_element: float
    rel_l2: float
    bits_per_index: float | None
    bound_bits_per_index: float | None
    encode_s: float
    decode_s: float


def demo_tensor(rows: int = 1024, cols: int = 1024, seed: int = 0) -> torch.Tensor:
    """A seeded pseudo-gradient: smooth low-frequency structure plus unit Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linspace(0, 2 * math.pi, rows).unsqueeze(1)
    v = torch.linspace(0, 2 * math.pi, cols).unsqueeze(0)
    smooth = 3.0 * torch.sin(u) * torch.cos(2 * v) + torch.cos(3 * u + v)
    return (smooth + torch.randn(rows, cols, generator=g)).to(torch.float32)


def run_demo(x: torch.Tensor | None = None) -> list[CodecRow]:
    """Encode and decode ``x`` (default :func:`demo_tensor`) with every codec of the table."""
    x = demo_tensor() if x is None else x
    out: list[CodecRow] = []
    for label, spec in DEMO_CODECS:
        codec = build_codec(spec)
        t0 = time.perf_counter()
        payload = codec.encode(x)
        t1 = time.perf_counter()
        y = codec.decode(payload)
        t2 = time.perf_counter()
        if len(payload) != codec.wire_bytes(tuple(x.shape)):
            raise RuntimeError(f"{label}: wire_bytes disagrees with the payload length")
        rel = float((y.double() - x.double()).norm() / x.double().norm())
        bpi = bound = None
        if isinstance(codec, SparseCodec):
            g = codec.geometry(tuple(x.shape))
            k = codec.k_for(g.chunk_len)
            from thinwire.compression import INDEX_CODERS

            bpi = INDEX_CODERS[codec.index_coding].bits_per_index(k, g.chunk_len)
            bound = log2_binom(g.chunk_len, k) / k
        out.append(
            CodecRow(
                label,
                spec,
                len(payload),
                x.numel() * 4 / len(payload),
                8 * len(payload) / x.numel(),
                rel,
                bpi,
                bound,
                t1 - t0,
                t2 - t1,
            )
        )
    return out


def format_rows(rows: list[CodecRow]) -> list[list[str]]:
    """Rows as strings for a table: codec, bytes, ratio, bits/elem, rel. L2 error, bits/index."""
    table = []
    for r in rows:
        idx = (
            "-"
            if r.bits_per_index is None
            else f"{r.bits_per_index:.2f} / {r.bound_bits_per_index:.2f}"
        )
        table.append(
            [
                r.label,
                f"{r.nbytes:,}",
                f"{r.ratio:,.1f}x",
                f"{r.bits_per_element:.3f}",
                f"{r.rel_l2:.4f}",
                idx,
                f"{1e3 * r.encode_s:.1f} / {1e3 * r.decode_s:.1f}",
            ]
        )
    return table


HEADERS = [
    "codec",
    "bytes",
    "vs fp32",
    "bits/elem",
    "rel. L2 err",
    "bits/index (bound)",
    "enc/dec ms",
]
