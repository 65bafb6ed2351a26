"""Weights on their way to rollout workers: fingerprints, the version history, codec frames.

* :func:`param_fingerprint`: 16 bytes of SHA-256 over a state's names, dtypes, shapes and bytes;
  a rollout carries the fingerprint of the weights that sampled it.
* :class:`PolicyStore`: the last ``keep`` published versions (state and fingerprint), which the
  verifier and lagged workers read.
* :class:`WeightPublisher` / :class:`WeightReceiver`: one bucket frame of
  :mod:`thinwire.compression` per published version (its envelope: a keyed CRC32), sent by
  the caller through a communicator's ``broadcast``. Without a codec the frame carries the fp32
  weights themselves (lossless). With a lossy codec it carries the update since the last
  version through :meth:`thinwire.compression.DenseBucket.encode_ef` with error feedback
  (EF-SGD, Karimireddy et al., arXiv:1901.09847v2 §3) — the one implementation the optimizers'
  wire path uses for the same formats — so what the quantizer drops is sent with the next
  version, and the publisher keeps, by decoding its own frame, a bit-exact copy (the *mirror*)
  of the weights the receivers rebuild: their fingerprints are known without asking them.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from thinwire._validate import check_int
from thinwire.compression import (
    EF_FORMATS,
    STATUS_OK,
    STATUS_REASONS,
    DenseBucket,
    DenseCodec,
    build_codec,
)

__all__ = [
    "FINGERPRINT_BYTES",
    "PolicySnapshot",
    "PolicyStore",
    "WeightPublisher",
    "WeightReceiver",
    "param_fingerprint",
]

FINGERPRINT_BYTES = 16  # 128 bits of SHA-256: a collision needs ~2^64 tries
State = Mapping[str, torch.Tensor]


def param_fingerprint(state: State | torch.nn.Module) -> bytes:
    """16-byte digest of a parameter set: SHA-256 over each entry's name, dtype, shape and bytes.

    Two replicas have the same fingerprint exactly when every tensor is bitwise equal (up to
    SHA-256 collisions), so a rollout's fingerprint names the weights that produced it.
    """
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    h = hashlib.sha256()
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.digest()[:FINGERPRINT_BYTES]


@dataclass(frozen=True)
class PolicySnapshot:
    """Published weights: ``version``, a private copy of the state, and its fingerprint."""

    version: int
    state: dict[str, torch.Tensor]
    fingerprint: bytes


class PolicyStore:
    """The newest published versions of one weight stream (the last ``keep``).

    Args:
        keep: versions kept, range [1, inf) (default: 8).
    """

    def __init__(self, *, keep: int = 8) -> None:
        self.keep = check_int("keep", keep, 1)
        self._snaps: OrderedDict[int, PolicySnapshot] = OrderedDict()

    def publish(self, state: State | torch.nn.Module, version: int) -> PolicySnapshot:
        """Store a copy of ``state`` as ``version``, strictly newer than the latest.

        Raises:
            ValueError: ``version`` is not newer than the latest published one.
        """
        if isinstance(state, torch.nn.Module):
            state = state.state_dict()
        check_int("version", version, self.version + 1)
        copy = {k: v.detach().clone() for k, v in state.items()}
        snap = PolicySnapshot(version, copy, param_fingerprint(copy))
        self._snaps[version] = snap
        while len(self._snaps) > self.keep:
            self._snaps.popitem(last=False)
        return snap

    @property
    def version(self) -> int:
        """Latest published version, −1 before the first publish."""
        return next(reversed(self._snaps)) if self._snaps else -1

    def versions(self) -> list[int]:
        """Versions currently kept, oldest first."""
        return list(self._snaps)

    def latest(self) -> PolicySnapshot:
        """The newest snapshot (``LookupError`` before the first publish)."""
        if not self._snaps:
            raise LookupError("the policy store is empty: publish() the initial weights first")
        return next(reversed(self._snaps.values()))

    def get(self, version: int) -> PolicySnapshot:
        """The snapshot of ``version``.

        Raises:
            KeyError: the version was never published or is no longer kept (raise ``keep``).
        """
        snap = self._snaps.get(version)
        if snap is None:
            raise KeyError(
                f"version {version} is not kept by this store (kept: {list(self._snaps)}; "
                f"keep={self.keep})"
            )
        return snap

    def fingerprint(self, version: int) -> bytes:
        """Fingerprint of the weights of ``version`` (see :meth:`get` for errors)."""
        return self.get(version).fingerprint


def _flat(state: State) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).to(torch.float32) for t in state.values()])


def _unflat(vec: torch.Tensor, like: State) -> dict[str, torch.Tensor]:
    out, off = {}, 0
    for k, t in like.items():
        out[k] = vec[off : off + t.numel()].reshape(t.shape).to(t.dtype).clone()
        off += t.numel()
    return out


class _Frames:
    """The bucket codec both ends build from the same codec setting and state layout."""

    def __init__(self, like: State, codec: str | None) -> None:
        self.like = {k: v.detach().clone() for k, v in like.items()}
        shapes = [(sum(t.numel() for t in self.like.values()),)]
        if codec is None:
            self.codec = DenseCodec("fp32")
            self.lossless = True
        else:
            built = build_codec(codec)
            if not isinstance(built, DenseCodec) or built.values.name not in EF_FORMATS:
                raise ValueError(
                    f"codec must be None (fp32 weights) or a dense quantizer with error "
                    f"feedback, quant({{{', '.join(EF_FORMATS)}}}[, block=B]), got {codec!r}"
                )
            self.codec, self.lossless = built, False
        self.bucket = DenseBucket(self.codec, shapes)

    @property
    def nbytes(self) -> int:
        """Exact size of one frame."""
        return int(self.bucket.nbytes)

    def decode(self, frame: torch.Tensor) -> torch.Tensor:
        vals, status = self.bucket.decode(frame.reshape(1, -1))
        code = int(status[0])
        if code != STATUS_OK:
            raise ValueError(f"weight frame rejected: {STATUS_REASONS[code]}")
        return vals[0]


class WeightPublisher:
    """Encodes each published version as one frame for the rollout workers.

    Args:
        initial: the weights every receiver starts from (its :class:`WeightReceiver` is built
            with the same ones).
        codec: ``None`` (default) sends the fp32 weights, ``4P + 4`` bytes per version; a
            pipeline string such as ``"quant(int8)"`` sends the error-feedback-quantized update
            (int8: ``P`` bytes plus one float32 scale per 256-value block, plus 4).
        keep: versions kept in :attr:`view`.

    Attributes:
        view: :class:`PolicyStore` of the weights the receivers hold after each frame (the
            mirror; equal to the published weights when lossless), so their rollouts can be
            checked against the right fingerprint.
    """

    def __init__(self, initial: State, *, codec: str | None = None, keep: int = 8) -> None:
        self._frames = _Frames(initial, codec)
        self.codec = codec
        self._last = _flat(initial)  # the published weights the next update is taken from
        self._mirror = self._last.clone()  # what the receivers hold
        self._residual = torch.zeros_like(self._last)
        self.view = PolicyStore(keep=keep)
        self.frames_sent = 0

    @property
    def frame_nbytes(self) -> int:
        """Exact size of every frame."""
        return self._frames.nbytes

    @torch.no_grad()
    def publish(self, state: State, version: int) -> torch.Tensor:
        """The frame (uint8 tensor of :attr:`frame_nbytes`) that brings receivers to ``version``."""
        flat = _flat(state)
        fr = self._frames
        if fr.lossless:
            frame, _, _ = fr.bucket.encode(flat)
            self._mirror = fr.decode(frame)
        else:
            frame, new, ok = fr.bucket.encode_ef(self._residual, flat - self._last)
            self._residual = torch.where(ok, new, self._residual)
            self._mirror = self._mirror + fr.decode(frame)
        self._last = flat
        self.view.publish(_unflat(self._mirror, fr.like), version)
        self.frames_sent += 1
        return frame


class WeightReceiver:
    """The worker's end of a :class:`WeightPublisher`: rebuilds the weights from frames.

    Args:
        initial: the weights the publisher was built with.
        codec: the publisher's codec setting.
    """

    def __init__(self, initial: State, *, codec: str | None = None) -> None:
        self._frames = _Frames(initial, codec)
        self._weights = _flat(initial)
        self.version = -1

    @property
    def frame_nbytes(self) -> int:
        """Exact size of every frame (allocate the receive buffer with it)."""
        return self._frames.nbytes

    def apply(self, frame: torch.Tensor, version: int) -> dict[str, torch.Tensor]:
        """Apply one frame; return the rebuilt state of ``version``.

        Raises:
            ValueError: a corrupted or truncated frame (the envelope's CRC, layout or length
                check names it), or a version not newer than the current one.
        """
        check_int("version", version, self.version + 1)
        vals = self._frames.decode(frame)
        self._weights = vals if self._frames.lossless else self._weights + vals
        self.version = version
        return _unflat(self._weights, self._frames.like)
