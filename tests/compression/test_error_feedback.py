"""Tests for thinwire.compression.error_feedback: the EF recursion, exact conservation, state."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from thinwire.compression.error_feedback import (
    ErrorFeedback,
    error_feedback_subtract,
    error_feedback_update,
)
from thinwire.compression.quant import dequantize_int8, quantize_int8


def _loop_update(e: list[float], x: list[float], decay: float, scale: float) -> list[float]:
    """Float64 oracle of one accumulate step, written as a plain loop (EF-SGD's update)."""
    return [decay * ei + scale * xi for ei, xi in zip(e, x, strict=True)]


def _topk_mask(p: torch.Tensor, k: int) -> torch.Tensor:
    """A sparsifying 'compressor': keep the k largest magnitudes, zero the rest."""
    out = torch.zeros_like(p)
    idx = p.abs().topk(k).indices
    out[idx] = p[idx]
    return out


def _grid_round(p: torch.Tensor, step: float) -> torch.Tensor:
    """A quantizing 'compressor': nearest multiple of a power-of-two step."""
    return torch.round(p / step) * step


@pytest.mark.parametrize(("decay", "scale"), [(0.9, 1.0), (0.999, 0.5), (0.0, 1.0), (1.0, 2.0)])
def test_update_equals_float64_loop(decay: float, scale: float) -> None:
    g = torch.Generator().manual_seed(1)
    e = torch.randn(257, generator=g, dtype=torch.float64)
    x = torch.randn(257, generator=g, dtype=torch.float64)
    expected = torch.tensor(_loop_update(e.tolist(), x.tolist(), decay, scale), dtype=torch.float64)
    out = error_feedback_update(e, x, decay=decay, scale=scale)
    assert out is e  # in place
    # Exact: one rounding of decay*e, scale is a power of two, one rounding of the sum.
    assert torch.equal(out, expected)


@pytest.mark.parametrize("compressor", ["topk", "grid"])
def test_conservation_exact_float64(compressor: str) -> None:
    """decay*e_before + input == transmitted + e_after, bit-exact in float64, every step.

    Exact because the compressors return, per element, either 0 or a value within a factor of 2
    of p (Sterbenz: p - t is then exact, and so is (p - t) + t).
    """
    g = torch.Generator().manual_seed(2)
    decay = 0.9
    e = torch.zeros(300, dtype=torch.float64)
    for _ in range(20):
        x = torch.randn(300, generator=g, dtype=torch.float64)
        oracle = torch.tensor(_loop_update(e.tolist(), x.tolist(), decay, 1.0), dtype=torch.float64)
        p = error_feedback_update(e, x, decay=decay)
        assert torch.equal(p, oracle)
        sent = _topk_mask(p, 30) if compressor == "topk" else _grid_round(p, 0.125)
        error_feedback_subtract(e, sent)
        assert torch.equal(sent + e, oracle)


def test_decay_one_telescopes() -> None:
    """With decay = 1: e_T + sum_t sent_t == sum_t input_t (nothing is lost, only delayed)."""
    g = torch.Generator().manual_seed(3)
    e = torch.zeros(128, dtype=torch.float64)
    sent_sum = torch.zeros(128, dtype=torch.float64)
    in_sum = torch.zeros(128, dtype=torch.float64)
    for _ in range(50):
        x = torch.randn(128, generator=g, dtype=torch.float64)
        in_sum += x
        p = error_feedback_update(e, x, decay=1.0)
        sent = _topk_mask(p, 8)
        sent_sum += sent
        error_feedback_subtract(e, sent)
    # atol: 100 float64 additions of O(10) values, each rounding <= 2**-49; 1e-12 is generous.
    torch.testing.assert_close(e + sent_sum, in_sum, rtol=0.0, atol=1e-12)


def test_int8_quantization_error_stays_in_buffer() -> None:
    """As SparseLoCo: subtracting the dequantized values keeps exactly p - deq in the buffer."""
    g = torch.Generator().manual_seed(4)
    e = torch.zeros(1000)
    x = torch.randn(1000, generator=g)
    p = error_feedback_update(e, x, decay=0.95).clone()
    r = quantize_int8(p, block=64)
    deq = dequantize_int8(r.codes, r.side, 1000, block=64)
    error_feedback_subtract(e, deq)
    p64, deq64 = p.double(), deq.double()
    # deq is 0 or within 2x of p (Sterbenz), so p - deq is exact in float32.
    assert torch.equal(e.double(), p64 - deq64)
    assert torch.equal(e + deq, p)


@settings(deadline=None, max_examples=40, derandomize=True)
@given(
    n=st.integers(0, 200),
    steps=st.integers(1, 6),
    decay=st.sampled_from([0.0, 0.5, 0.9, 0.99, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_conservation(n: int, steps: int, decay: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    e = torch.zeros(n, dtype=torch.float64)
    for _ in range(steps):
        x = torch.randn(n, generator=g, dtype=torch.float64) * 10.0 ** float(
            torch.randint(-3, 4, (), generator=g)
        )
        before = e.clone()
        p = error_feedback_update(e, x, decay=decay)
        k = int(torch.randint(0, n + 1, (), generator=g))
        sent = _topk_mask(p, k)
        error_feedback_subtract(e, sent)
        oracle = torch.tensor(
            _loop_update(before.tolist(), x.tolist(), decay, 1.0), dtype=torch.float64
        )
        assert torch.equal(sent + e, oracle)


def test_class_accumulate_commit_and_lazy_buffer() -> None:
    ef = ErrorFeedback(0.5)
    assert "w" not in ef and len(ef) == 0
    x = torch.tensor([1.0, -2.0, 3.0, 0.25], dtype=torch.bfloat16)
    buf = ef.accumulate("w", x)
    assert buf.dtype == torch.float32 and "w" in ef and list(ef) == ["w"]
    assert torch.equal(buf, torch.tensor([1.0, -2.0, 3.0, 0.25]))  # 0.5*0 + x
    ef.commit("w", torch.tensor([1.0, 0.0, 3.0, 0.0]))
    assert torch.equal(ef.residual("w"), torch.tensor([0.0, -2.0, 0.0, 0.25]))
    buf = ef.accumulate("w", torch.tensor([2.0, 2.0, 2.0, 2.0]))
    # Hand-computed: 0.5 * [0, -2, 0, 0.25] + 2.
    assert torch.equal(buf, torch.tensor([2.0, 1.0, 2.0, 2.125]))
    assert buf is ef.residual("w")


def test_class_state_dict_round_trip_is_bit_exact() -> None:
    def run(ef: ErrorFeedback, g: torch.Generator, steps: int) -> None:
        for _ in range(steps):
            for key, n in (("a", 37), ("b", 64)):
                p = ef.accumulate(key, torch.randn(n, generator=g))
                r = quantize_int8(p, block=16)
                ef.commit(key, dequantize_int8(r.codes, r.side, n, block=16))

    ref, g_ref = ErrorFeedback(0.9, scale=0.7), torch.Generator().manual_seed(5)
    run(ref, g_ref, 7)

    first, g = ErrorFeedback(0.9, scale=0.7), torch.Generator().manual_seed(5)
    run(first, g, 3)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = ErrorFeedback(0.1)
    resumed.load_state_dict(torch.load(buf))
    assert resumed.decay == 0.9 and resumed.scale == 0.7
    run(resumed, g, 4)
    assert sorted(resumed) == ["a", "b"]
    for key in ("a", "b"):
        assert torch.equal(resumed.residual(key), ref.residual(key))


def test_state_dict_is_a_copy() -> None:
    ef = ErrorFeedback(1.0)
    ef.accumulate(0, torch.ones(3))
    sd = ef.state_dict()
    ef.commit(0, torch.ones(3))
    assert torch.equal(sd["residuals"][0], torch.ones(3))


def test_validation() -> None:
    with pytest.raises(ValueError, match=r"decay must be in \[0.0, 1.0\], got 1.5"):
        ErrorFeedback(1.5)
    with pytest.raises(ValueError, match=r"decay must be in \[0.0, 1.0\], got -0.1"):
        error_feedback_update(torch.zeros(2), torch.zeros(2), decay=-0.1)
    with pytest.raises(ValueError, match=r"scale must be in"):
        ErrorFeedback(0.5, scale=float("nan"))
    with pytest.raises(ValueError, match=r"inp must have shape \(2,\)"):
        error_feedback_update(torch.zeros(2), torch.zeros(3), decay=0.5)
    with pytest.raises(TypeError, match="transmitted must be a floating-point tensor"):
        error_feedback_subtract(torch.zeros(2), torch.zeros(2, dtype=torch.int64))
    ef = ErrorFeedback(0.5)
    with pytest.raises(KeyError, match="accumulated before commit"):
        ef.commit("x", torch.zeros(2))
    ef.accumulate("x", torch.zeros(2))
    with pytest.raises(ValueError, match=r"inp must have shape \(2,\)"):
        ef.accumulate("x", torch.zeros(4))
    with pytest.raises(ValueError, match="missing"):
        ef.load_state_dict({"decay": 0.5})
