"""Weights for rollout workers: the version store, fingerprints, and codec frames with EF.

Oracles: fingerprints against a second digest of the same bits; frames against the compression
toolkit's reference quantizer and packer composed by hand (the publisher must send exactly what
``quantize_int8`` + ``pack_bits`` inside the 16-byte envelope give for ``residual + update``);
the receiver's weights against the publisher's mirror (bit for bit) and against the true weights
(error feedback keeps the gap at one frame's quantization error: no drift).
"""

from __future__ import annotations

import pytest
import torch
from _rl_common import P, _one_thread  # noqa: F401  (_one_thread: autouse fixture)

from thinwire.compression import DenseBucket, build_codec, dequantize_int8, pack_bits, quantize_int8
from thinwire.rl import PolicyStore, WeightPublisher, WeightReceiver, param_fingerprint
from thinwire.rl.policies import TinyCausalLM


def _flat(state):
    return torch.cat([t.reshape(-1).float() for t in state.values()])


def test_store_versions_keep_and_fingerprints():
    store = PolicyStore(keep=2)
    pol = TinyCausalLM(seed=1)
    s0 = store.publish(pol.state_dict(), 0)
    with torch.no_grad():
        next(pol.parameters()).view(-1)[5] += 1e-7  # one element, one ulp-scale change
    s1 = store.publish(pol, 3)
    assert s0.fingerprint != s1.fingerprint and len(s1.fingerprint) == 16
    assert param_fingerprint(pol) == s1.fingerprint  # same bits, same digest
    with pytest.raises(ValueError, match=r"version must be in \[4, inf\), got 3"):
        store.publish(pol.state_dict(), 3)
    store.publish(pol.state_dict(), 4)
    assert store.versions() == [3, 4] and store.version == 4 and store.latest().version == 4
    with pytest.raises(KeyError, match="version 0 is not kept"):
        store.get(0)


def test_lossless_frames_carry_the_weights_bit_exactly():
    pol = TinyCausalLM(seed=2)
    pub = WeightPublisher(pol.state_dict())
    rx = WeightReceiver(TinyCausalLM(seed=2).state_dict())
    assert pub.frame_nbytes == rx.frame_nbytes == 4 * P + 4  # fp32 values + the CRC32
    for v in (1, 2):
        with torch.no_grad():
            for p in pol.parameters():
                p.mul_(1.01)
        state = rx.apply(pub.publish(pol.state_dict(), v), v)
        assert param_fingerprint(state) == param_fingerprint(pol) == pub.view.fingerprint(v)


def test_int8_frames_are_the_toolkit_quantizer_with_error_feedback_and_do_not_drift():
    pol = TinyCausalLM(seed=2)
    start = {k: v.clone() for k, v in pol.state_dict().items()}
    pub = WeightPublisher(start, codec="quant(int8)")
    rx = WeightReceiver(start, codec="quant(int8)")
    bucket = DenseBucket(build_codec("quant(int8)"), [(P,)])
    assert pub.frame_nbytes == bucket.nbytes == P + 4 * -(-P // 256) + 4
    g = torch.Generator().manual_seed(0)
    residual, last, worst = torch.zeros(P), _flat(start), 0.0
    for v in range(1, 13):
        with torch.no_grad():
            for p in pol.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 1e-2)
        frame = pub.publish(pol.state_dict(), v)
        # the oracle: p = residual + update, int8 absmax codes packed, in the envelope
        flat = _flat(pol.state_dict())
        p_in = residual + (flat - last)
        q = quantize_int8(p_in)
        body = torch.cat([pack_bits(q.codes, q.bits), q.side.reshape(-1).view(torch.uint8)])
        assert torch.equal(frame, bucket.envelope.seal(body, True))
        residual, last = p_in - dequantize_int8(q.codes, q.side, P), flat
        state = rx.apply(frame, v)
        assert param_fingerprint(state) == pub.view.fingerprint(v)  # receiver == mirror
        worst = max(worst, float((_flat(state) - flat).abs().max()))
    # no drift: the gap is one frame's rounding, <= absmax/127/2 per block (updates ~4e-2 max)
    assert worst < 4e-2 / 127


def test_frame_rejections_and_codec_choice():
    pol = TinyCausalLM(seed=2)
    pub = WeightPublisher(pol.state_dict(), codec="quant(int4, block=128)")
    frame = pub.publish(pol.state_dict(), 1)
    rx = WeightReceiver(pol.state_dict(), codec="quant(int4, block=128)")
    bad = frame.clone()
    bad[100] ^= 1
    with pytest.raises(ValueError, match="weight frame rejected"):
        rx.apply(bad, 1)
    rx.apply(frame, 1)
    with pytest.raises(ValueError, match=r"version must be in \[2, inf\), got 1"):
        rx.apply(frame, 1)
    with pytest.raises(ValueError, match=r"codec must be None .*quant\(\{int8, int4, 2bit, sign"):
        WeightPublisher(pol.state_dict(), codec="fp16")
