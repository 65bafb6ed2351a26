"""SparseLoCo: DiLoCo whose pseudo-gradient travels as top-k of an error-feedback buffer at 2 bits.

Sarfi, Thérien, Lidin, Belilovsky, "Communication Efficient LLM Pre-training with SparseLoCo",
arXiv:2508.15706v1; reference code tplr-ai/SparseLoCo ``src/tplr/sparseloco.py``. It is the DiLoCo
machinery with three settings changed, not a second implementation: outer SGD with lr α and no
momentum (the error buffer plays momentum's role), error feedback ``e ← β e + α Δ``, and a sparse
codec (per-chunk top-k, no DCT, centroid quantizer) whose payloads are aggregated with the
index-mean rule.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from thinwire._validate import check_float, check_int
from thinwire.collectives import Communicator
from thinwire.optim._outer import DiLoCoBase, InnerFactory
from thinwire.optim._reduce import DEFAULT_BUCKET_CAP_MB

__all__ = ["SparseLoCo", "sparseloco_compressor"]


def sparseloco_compressor(
    *, topk: int = 128, chunk: int = 64, bits: int = 2, index_coding: str = "entropy"
) -> dict[str, Any]:
    """Codec settings of SparseLoCo's wire format (bytes: ``docs/design.md``, "Byte formulas").

    ``topk`` entries per ``chunk x chunk`` elements (1-D chunks keep the same density), values on a
    ``2**bits``-bin centroid grid over ±3σ (6σ range, as tplr-ai/SparseLoCo and templar);
    ``bits=32`` sends float32 values.
    """
    check_int("chunk", chunk, 1, 65535)
    check_int("topk", topk, 1, chunk * chunk)
    if bits == 32:
        values: dict[str, Any] = {"values": "fp32"}
    else:
        check_int("bits", bits, 1, 8)
        values = {"values": "2bit", "n_bins": 2**bits}
    return dict(
        chunk=chunk,
        topk=topk,
        transform="none",
        topk_rule="density",
        index_coding=index_coding,
        **values,
    )


class SparseLoCo(DiLoCoBase):
    r"""SparseLoCo (arXiv:2508.15706v1, Algorithm 1; reference tplr-ai/SparseLoCo ``sparseloco.py``).

    .. code-block:: text

        every H inner steps, per parameter (worker r):
            e  ← β e + α Δ_r              (Δ_r = θ_g − θ_r; α scaling as the code, ef_scale_by_lr)
            (idx, v) = top-k per chunk of e      (k per 64x64 tile; no DCT)
            q  = centroid-quantize(v, 2 bits)     (μ + 4 bin means)
            e  ← e − scatter(idx, deq(q))         (quantization error stays in e)
            U  = index-mean over workers of scatter(idx_r, deq(q_r))
            θ_g ← θ_g − α U;  θ_r ← θ_g

    Args:
        params: parameters or param-group dicts; a group may set ``compressor=None`` to send its
            pseudo-gradient dense (e.g. norms and biases), or its own settings mapping.
        inner: factory ``param_groups -> torch.optim.Optimizer`` (tplr-ai/SparseLoCo: AdamW, lr
            1e-3, betas (0.9, 0.95), weight decay 0.1).
        outer_lr: α (default: 1.0, as tplr-ai/SparseLoCo and templar), range [0, inf).
        sync_every: H (default: 15, tplr-ai/SparseLoCo's 512M runs; templar uses 30).
        error_decay: β (default: 0.95), range [0, 1].
        topk: entries kept per 64x64 tile (default: 128, tplr-ai/SparseLoCo; templar 64),
            range [1, chunk²].
        chunk: tile side (default: 64).
        bits: value bits (default: 2); 32 sends float32 values.
        comm: communicator; ``None`` is a single worker.
        index_coding: ``"entropy"`` (Elias-Fano, ~8 bits/index at k=64) or ``"fixed"`` (12 bits).
        aggregate: ``"index_mean"`` (reference) or ``"global_mean"``.
        ef_scale_by_lr: scale Δ by α inside the buffer as tplr-ai/SparseLoCo does (default: True).
        on_nonfinite: ``"raise"`` or ``"skip"`` (as DiLoCo).
        robust: ``"mean"`` (default) or ``"clip"`` (each peer clipped to the median norm).
        trim: as :class:`~thinwire.optim.DiLoCo` (``robust="trimmed_mean"`` needs every group
            to be sent without the sparse compressor).
        backend: kernel backend of the sparse codec, as :class:`~thinwire.optim.DiLoCo`.
        bucket_cap_mb: largest bucket in MiB of float32 values (default: 25, DDP's
            ``bucket_cap_mb``); each bucket of a param group crosses the wire as one payload.
        init_sync: how the workers agree on the starting θ_g when the optimizer is built
            (collective; ledger tag ``"<method>/init"``): ``"broadcast"`` (default) takes rank
            0's parameters, as DDP does; ``"check"`` compares a digest per parameter and raises
            ``ValueError`` naming the first one that differs; ``"off"`` trusts the caller. An
            elastic engine (hivemind, torchft) gives a late joiner the live peers' state instead.

    Param-group keys: ``outer_lr``, ``ef_decay`` (β), ``compressor`` (a settings mapping or
    None), ``error_feedback``; the constructor's ``error_decay`` fills ``ef_decay``.

    State: as DiLoCo, with ``residual`` the error buffer e.

    Deviations: indices are Elias-Fano coded by default (tplr-ai/SparseLoCo and templar ship int64
    and 12-bit indices); values are bit-packed (both ship uint8 codes). Both are lossless changes of
    the wire format only.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        inner: InnerFactory,
        *,
        outer_lr: float = 1.0,
        sync_every: int = 15,
        error_decay: float = 0.95,
        topk: int = 128,
        chunk: int = 64,
        bits: int = 2,
        comm: Communicator | None = None,
        index_coding: str = "entropy",
        aggregate: str = "index_mean",
        ef_scale_by_lr: bool = True,
        on_nonfinite: str = "raise",
        robust: str = "mean",
        trim: int | None = None,
        backend: str = "auto",
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
        init_sync: str = "broadcast",
    ) -> None:
        check_float("error_decay", error_decay, 0.0, 1.0)
        super().__init__(
            params,
            inner,
            outer_lr=outer_lr,
            outer_momentum=0.0,
            nesterov=False,
            sync_every=sync_every,
            comm=comm,
            compressor=sparseloco_compressor(
                topk=topk, chunk=chunk, bits=bits, index_coding=index_coding
            ),
            error_feedback=True,
            ef_decay=error_decay,
            outer=None,
            on_nonfinite=on_nonfinite,
            robust=robust,
            trim=trim,
            backend=backend,
            bucket_cap_mb=bucket_cap_mb,
            init_sync=init_sync,
            fragments=1,
            fragment_pattern="strided",
            overlap_steps=0,
            mix_alpha=0.0,
            tag="sparseloco",
            aggregate=aggregate,
            ef_scale_by_lr=ef_scale_by_lr,
        )
