"""DiLoCo and LocalSGD as drop-in ``torch.optim`` optimizers.

DiLoCo (Douillard et al., arXiv:2311.08105v3, Algorithm 1): every worker runs ``H`` steps of its
inner optimizer, forms the pseudo-gradient ``Δ = θ_g − θ_local``, the workers average it, and a
Nesterov SGD outer step moves the float32 global copy ``θ_g``; every worker then restarts from it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch.optim import Optimizer

from thinwire.collectives import Communicator
from thinwire.optim._outer import DiLoCoBase, InnerFactory
from thinwire.optim._reduce import DEFAULT_BUCKET_CAP_MB

__all__ = ["DiLoCo", "LocalSGD"]


class DiLoCo(DiLoCoBase):
    r"""Distributed Low-Communication training (arXiv:2311.08105v3, Algorithm 1).

    .. code-block:: text

        θ_g ← θ (fp32 copy, identical on every worker)
        every inner step: inner.step()
        every H inner steps:
            Δ_i = θ_g − θ_i                  (pseudo-gradient, global minus local)
            Δ̄  = mean_i Δ_i                  (ring all-reduce, or all-gather of compressed Δ_i)
            θ_g ← OuterOpt(θ_g, grad=Δ̄)      (SGD, Nesterov, lr 0.7, momentum 0.9 by default)
            θ_i ← θ_g

    Args:
        params: parameters or param-group dicts (per-group keys: ``outer_lr``, ``outer_momentum``,
            ``outer_nesterov``, ``compressor``, ``error_feedback``, ``ef_decay``; the dicts are
            shared with the inner optimizer, so outer keys never reuse an inner key's name).
        inner: factory ``param_groups -> torch.optim.Optimizer``, e.g.
            ``functools.partial(torch.optim.AdamW, lr=4e-4, weight_decay=0.1)``. Its
            ``param_groups`` are this optimizer's, so LR schedulers work unchanged.
        outer_lr: outer learning rate (default: 0.7, the DiLoCo paper's), range [0, inf).
        outer_momentum: outer momentum μ (default: 0.9), range [0, 1).
        nesterov: Nesterov outer momentum (default: True); ignored when ``outer_momentum`` is 0.
        sync_every: inner steps between syncs, *H* in Algorithm 1 (default: 500).
        comm: communicator; ``None`` means a single worker (debugging).
        compressor: ``None`` (fp32 ring all-reduce) or a pipeline string / settings mapping for
            :func:`thinwire.compression.build_codec`, e.g. ``"quant(int4, block=128)"``. With a
            compressor each worker's payload is all-gathered and reduced in float32 in rank order.
        error_feedback: keep the compression residual and add it to the next Δ (default: False).
        ef_decay: residual decay (default: 1.0), range [0, 1].
        outer: optional factory ``param_groups -> torch.optim.Optimizer`` over the float32 global
            copies, replacing the default Nesterov SGD (then the three outer settings are unused).
        on_nonfinite: ``"raise"`` (default) raises before anything is sent when Δ is NaN/inf;
            ``"skip"`` makes this worker contribute weight 0 and restart from the new θ_g.
        robust: aggregation rule against faulty or hostile peers (default ``"mean"``): ``"clip"``
            (each peer's Δ scaled to at most the median norm), ``"trimmed_mean"`` or ``"median"``
            (per coordinate; dense and quantized compressors only). Anything but ``"mean"``
            all-gathers every peer's payload instead of a ring all-reduce
            (``(M-1)(8 + wire bytes)`` per worker instead of ``2(M-1)/M * 4N``).
        trim: for ``robust="trimmed_mean"``, workers dropped at each end per coordinate
            (default None: ``floor(0.25 * M)``), range [1, M/2). Refused at construction when
            the group cannot trim (``2 * trim >= M``, or the default trimming nobody at M <= 3),
            and with any other rule.
        backend: ``"auto"`` (Triton kernels on CUDA tensors when triton imports, else torch),
            ``"torch"`` or ``"triton"`` (on CPU only under ``TRITON_INTERPRET=1``) for the
            sparse compressors' fused DCT + top-k and aggregation.
        bucket_cap_mb: largest bucket in MiB of float32 values (default: 25, DDP's
            ``bucket_cap_mb``); each bucket of a param group crosses the wire as one payload.
        init_sync: how the workers agree on the starting θ_g when the optimizer is built
            (collective; ledger tag ``"<method>/init"``): ``"broadcast"`` (default) takes rank
            0's parameters, as DDP does; ``"check"`` compares a digest per parameter and raises
            ``ValueError`` naming the first one that differs; ``"off"`` trusts the caller. An
            elastic engine (hivemind, torchft) gives a late joiner the live peers' state instead.

    State (per parameter): ``anchor`` (θ_g, fp32), ``residual`` (error feedback, fp32),
    ``inflight`` (a reduced Δ̄ awaiting its apply step). ``state_dict()`` adds ``inner``,
    ``outer`` and ``thinwire`` (counters, in-flight record, the settings that change the
    numerics and the parameter shapes). ``load_state_dict`` refuses a checkpoint of another
    optimizer class or with other such settings (``ValueError`` naming the setting, this
    optimizer's value and the checkpoint's) instead of adopting them.

    The outer step is :func:`thinwire.optim.functional.diloco_outer_step` (the default outer
    optimizer is a ``torch.optim.SGD`` whose step calls it, so its ``state_dict`` is SGD's).

    Mixed precision: use ``torch.amp.GradScaler`` as usual (``scaler.step(opt)``). A step the
    scaler skips for inf/NaN gradients skips the inner update but counts towards
    ``sync_every``, so every worker keeps syncing at the same step.

    Exit: ``close()`` waits for a reduction still in flight (Streaming DiLoCo's overlap);
    interpreter exit does it for any reduction still in flight.

    Deviations: the inner optimizer's state is kept across syncs (as all reference codes do).

    Example::

        opt = DiLoCo(model.parameters(), partial(torch.optim.AdamW, lr=4e-4), sync_every=100, comm=comm)
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()

    Tuning: if loss jumps after every sync, lower ``outer_lr`` (0.4-0.7) or ``sync_every``; if
    bytes matter more than loss, add ``compressor="quant(int4)"`` with ``error_feedback=True``.

    Limitations: workers must call ``step()`` the same number of times; membership is static
    over torch.distributed (restart and resume from a checkpoint to change it).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        inner: InnerFactory,
        *,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        nesterov: bool = True,
        sync_every: int = 500,
        comm: Communicator | None = None,
        compressor: str | Mapping[str, Any] | None = None,
        error_feedback: bool = False,
        ef_decay: float = 1.0,
        outer: Callable[[list[dict[str, Any]]], Optimizer] | None = None,
        on_nonfinite: str = "raise",
        robust: str = "mean",
        trim: int | None = None,
        backend: str = "auto",
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
        init_sync: str = "broadcast",
    ) -> None:
        super().__init__(
            params,
            inner,
            outer_lr=outer_lr,
            outer_momentum=outer_momentum,
            nesterov=nesterov,
            sync_every=sync_every,
            comm=comm,
            compressor=compressor,
            error_feedback=error_feedback,
            ef_decay=ef_decay,
            outer=outer,
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
            tag="diloco",
        )


class LocalSGD(DiLoCo):
    """Periodic parameter averaging (LocalSGD / FedAvg): DiLoCo with outer SGD lr 1, momentum 0.

    ``θ_g ← θ_g − 1·mean_i(θ_g − θ_i) = mean_i θ_i``. Takes every
    argument of :class:`DiLoCo` except the outer optimizer settings.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        inner: InnerFactory,
        *,
        sync_every: int = 500,
        comm: Communicator | None = None,
        compressor: str | Mapping[str, Any] | None = None,
        error_feedback: bool = False,
        ef_decay: float = 1.0,
        on_nonfinite: str = "raise",
        robust: str = "mean",
        trim: int | None = None,
        backend: str = "auto",
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
        init_sync: str = "broadcast",
    ) -> None:
        super().__init__(
            params,
            inner,
            outer_lr=1.0,
            outer_momentum=0.0,
            nesterov=False,
            sync_every=sync_every,
            comm=comm,
            compressor=compressor,
            error_feedback=error_feedback,
            ef_decay=ef_decay,
            on_nonfinite=on_nonfinite,
            robust=robust,
            trim=trim,
            backend=backend,
            bucket_cap_mb=bucket_cap_mb,
            init_sync=init_sync,
        )
