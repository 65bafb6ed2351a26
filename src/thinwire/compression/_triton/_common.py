"""Shared pieces of the compression kernels: the interpreter flag, launch constants and small
``@triton.jit`` helpers (round half to even, sign bit, LSB-first packing).

Imported by every kernel module, and only through the dispatch rule, so it is the first place
triton is imported. ``INTERPRETED`` records whether ``TRITON_INTERPRET=1`` was set at that moment:
``@triton.jit`` decides at decoration time whether a kernel is interpreted
(``triton/runtime/jit.py``), and ``thinwire.compression._dispatch`` refuses CPU tensors when the
kernels were decorated for the GPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = [
    "INTERPRETED",
    "LAUNCH_OPTIONS",
    "NUM_WARPS",
    "check_finite_flags",
    "count_nonfinite",
    "pack_lsb_first",
    "round_half_even",
    "signbit",
]

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Launch configuration. These are fixed constants, NOT tuned: no GPU was available when the
# kernels were written, so they are conventional starting points (4 warps per program, as in the
# Triton vector-add and softmax tutorials). They must be re-chosen from `benchmarks/kernels.py`
# on a GPU and the reason recorded here (launch configs stay fixed and justified by a benchmark;
# autotuning belongs in benchmarks/ only).
NUM_WARPS = 4

#: ``enable_fp_fusion=False``: the references round every product to float32 before adding it
#: (``p = round(decay * e) + round(scale * x)``, ``q * scale`` before the subtraction); Triton's
#: default would contract ``a * b + c`` into one FMA on the GPU and change the last bit. The
#: interpreter ignores this option (numpy never fuses).
LAUNCH_OPTIONS = {"enable_fp_fusion": False, "num_warps": NUM_WARPS}

#: Round-to-nearest-even by magic number: for ``|y| <= 2**22``, ``y + 1.5 * 2**23`` lies in
#: ``[2**23, 2**24)`` where one ulp is 1, so the IEEE add itself rounds ``y`` to an integer,
#: half to even (``torch.round``'s rule); subtracting the constant back is exact. libdevice's
#: ``rint`` would do the same on the GPU but the interpreter has no libdevice
#: (``create_extern_elementwise`` raises in ``triton/runtime/interpreter.py``).
RNE_MAGIC: tl.constexpr = tl.constexpr(1.5 * 2**23)
#: Bit pattern of float32 +inf; a non-negative float is finite iff its bits are below it.
F32_INF_BITS: tl.constexpr = tl.constexpr(0x7F800000)


@triton.jit
def round_half_even(y):
    """Round float32 ``y`` (``|y| <= 2**22``) to the nearest integer, ties to even."""
    return (y + RNE_MAGIC) - RNE_MAGIC


@triton.jit
def signbit(x):
    """``torch.signbit`` of float32 ``x`` as a boolean tensor (``-0.0`` gives True)."""
    return x.to(tl.int32, bitcast=True) < 0


@triton.jit
def count_nonfinite(x, mask):
    """Number of lanes of float32 ``x`` under ``mask`` that are NaN or infinite (int32)."""
    bad = (tl.abs(x).to(tl.int32, bitcast=True) >= F32_INF_BITS) & mask
    return tl.sum(bad.to(tl.int32))


@triton.jit
def pack_lsb_first(codes, ROWS: tl.constexpr, COLS: tl.constexpr, BITS: tl.constexpr):
    """Pack ``(ROWS, COLS)`` codes (each ``< 2**BITS``) into ``(ROWS, COLS * BITS // 8)`` bytes.

    Code ``j`` of a byte goes to bits ``[j * BITS, (j + 1) * BITS)`` (``pack_bits``'s LSB-first
    order); the shifted codes are disjoint, so their sum is their bitwise OR. Lanes that
    must be padding have to hold code 0.
    """
    if BITS == 8:
        return codes.to(tl.uint8)
    else:
        PER_BYTE: tl.constexpr = 8 // BITS
        grouped = tl.reshape(codes.to(tl.int32), (ROWS, COLS // PER_BYTE, PER_BYTE))
        shifts = tl.arange(0, PER_BYTE) * BITS
        return tl.sum(grouped << shifts[None, None, :], axis=2).to(tl.uint8)


def check_finite_flags(flags: torch.Tensor, name: str) -> None:
    """Raise the reference's ``ValueError`` if the kernel counted any non-finite value.

    ``flags`` holds one count per program; reading it synchronises with the device once.
    ``name`` is the argument the reference reports (``x`` for the quantizers, ``chunks`` for
    top-k), so both backends raise the same message.
    """
    bad = int(flags.sum()) if flags.numel() else 0
    if bad:
        raise ValueError(f"{name} must be finite, got {bad} non-finite values")
