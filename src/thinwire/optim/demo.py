"""DeMo (Decoupled Momentum) and its Psyche "DisTrO" 1-bit production variant.

Peng, Quesnelle, Kingma, "DeMo: Decoupled Momentum Optimization", arXiv:2411.19870v1, Algorithm 1,
with the released code (bloc97/DeMo ``demo.py``) as the numerical reference; Psyche's variant
(PsycheFoundation/psyche ``distro.rs``) sends one sign bit per kept coefficient. Each step only the
fast DCT components of the momentum cross the wire; what was sent is subtracted from the momentum,
the rest keeps accumulating.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch.optim import Optimizer

from thinwire._validate import (
    check_choice,
    check_float,
    check_int,
    check_keys,
    check_ordered_params,
    check_param_tensors,
    check_type,
)
from thinwire.collectives import STEP_COUNTERS, AllPeersLeft, CommError, Communicator, RoundStart
from thinwire.compression import SparseCodec
from thinwire.optim._finite import amp_step_skipped, first_nonfinite
from thinwire.optim._hooks import SyncHooks, SyncInfo
from thinwire.optim._reduce import DEFAULT_BUCKET_CAP_MB, PendingReduce, Reducer, make_reducer
from thinwire.optim._state import (
    INIT_SYNC_MODES,
    InflightWork,
    check_fields,
    check_groups,
    check_params_and_step,
    check_setting,
    check_shapes,
    load_keeping_width,
    params_and_step,
)
from thinwire.optim.functional import demo_update

__all__ = ["DeMo", "demo_compressor"]

logger = logging.getLogger(__name__)
# Format 2 adds the class, the global settings that change the numerics and the param shapes.
_FORMAT = 2
_FORMATS = (1, 2)
_FIELDS_V1 = ("format", "step", "pending")
_FIELDS_V2 = _FIELDS_V1 + (
    "optimizer",
    "overlap",
    "subtract",
    "robust",
    "aggregate",
    "bucket_cap_mb",
    "shapes",
)
# Per-group settings that change the numerics; lr and weight_decay load from the checkpoint as
# in torch.optim, so LR schedules resume.
_GROUP_SETTINGS = ("compress", "topk", "chunk", "values", "index_coding", "momentum_decay")
_TORCH_GROUP_KEYS = ("params", "param_names", "initial_lr")


def demo_compressor(
    *,
    topk: int = 32,
    chunk: int = 64,
    values: str = "float",
    index_coding: str = "entropy",
    backend: str = "auto",
) -> SparseCodec:
    """DeMo's wire codec: chunked DCT, ``topk`` coefficients per chunk, float32 or sign values.

    ``values="sign"`` sends the sign bit only (``signbit``: 1 is negative) and receivers expand
    to ±1 (Psyche); ``"float"`` sends float32 values (bloc97/DeMo).
    """
    check_choice("values", values, ("float", "sign"))
    vals: dict[str, Any] = (
        {"values": "fp32"} if values == "float" else {"values": "sign", "scale": False}
    )
    return SparseCodec(
        chunk=chunk,
        topk=topk,
        transform="dct",
        topk_rule="per_chunk",
        index_coding=index_coding,
        backend=backend,
        **vals,
    )


class DeMo(SyncHooks, Optimizer):
    r"""Decoupled Momentum optimization (arXiv:2411.19870v1, Algorithm 1; bloc97/DeMo ``demo.py``).

    .. code-block:: text

        per parameter, every step:
            p      ← p (1 − lr·wd)                     decoupled weight decay
            δ      ← β δ + lr·g                        momentum, lr folded in (as the code)
            (i, v) = top-k per chunk of DCT(δ)         fast components
            δ      ← δ − IDCT(scatter(i, v))           what is sent leaves the momentum
            U      = IDCT(index-mean over workers of scatter(i_r, v_r))
            p      ← p − lr·sign(U)

    Args:
        params: parameters or param-group dicts (per-group keys: ``lr``, ``momentum_decay``,
            ``topk``, ``chunk``, ``values``, ``weight_decay``, ``index_coding``, ``compress``;
            ``compress=False`` sends that group's momentum dense, e.g. for 1-D params).
        lr: learning rate (bloc97/DeMo's OLMo configs: 4e-4 with cosine decay), range (0, inf).
        momentum_decay: β (default: 0.999, bloc97/DeMo), range [0, 1).
        topk: coefficients kept per chunk (default: 32, bloc97/DeMo; Psyche 8, or 4 at 40B),
            range [1, inf).
        chunk: chunk side s (default: 64); 2-D tensors use s x s tiles, 1-D tensors chunks of s.
        values: ``"float"`` (bloc97/DeMo, float32 values) or ``"sign"`` (Psyche, 1 bit per value).
        weight_decay: decoupled weight decay (default: 0.0, bloc97/DeMo's OLMo runs),
            range [0, inf).
        comm: communicator; ``None`` is a single worker.
        index_coding: ``"entropy"`` (Elias-Fano) or ``"fixed"`` (``ceil(log2 chunk_len)`` bits).
        subtract: what leaves the momentum when values are quantized: ``"unquantized"`` (Psyche:
            the selected coefficients themselves) or ``"quantized"`` (what receivers decode, as
            SparseLoCo does). Identical for ``values="float"``. Default ``"unquantized"``.
        overlap: apply each step's aggregate one step late, so the all-gather overlaps the next
            forward/backward (Psyche's overlapped apply, without its lookahead point).
        aggregate: ``"index_mean"`` (reference) or ``"global_mean"``.
        on_nonfinite: ``"raise"`` or ``"skip"`` (this worker sends nothing that step and its
            momentum is reset to zero).
        robust: ``"mean"`` (default) or ``"clip"``: each peer's sparse contribution is scaled to
            at most the median norm of all peers' before aggregation.
        backend: ``"auto"`` (Triton on CUDA when available, else torch), ``"torch"`` or
            ``"triton"`` (CPU only under ``TRITON_INTERPRET=1``) for the fused DCT + top-k and the
            aggregation fold (``thinwire.compression._dispatch`` rule).
        bucket_cap_mb: largest bucket in MiB of float32 values (default: 25, DDP's
            ``bucket_cap_mb``); each bucket of a param group crosses the wire as one payload.
        init_sync: how the workers agree on the starting θ_g when the optimizer is built
            (collective; ledger tag ``"<method>/init"``): ``"broadcast"`` (default) takes rank
            0's parameters, as DDP does; ``"check"`` compares a digest per parameter and raises
            ``ValueError`` naming the first one that differs; ``"off"`` trusts the caller. An
            elastic engine (hivemind, torchft) gives a late joiner the live peers' state instead.

    State (per parameter): ``delta`` (momentum, float32), ``pending`` (with ``overlap``, the
    aggregate to apply next step). ``state_dict()`` adds ``thinwire`` (step, pending lr, the
    settings that change the numerics and the parameter shapes); ``load_state_dict`` refuses a
    checkpoint saved with other such settings (``ValueError`` naming the setting, this
    optimizer's value and the checkpoint's) instead of adopting them.

    The update is :func:`thinwire.optim.functional.demo_update`.

    Mixed precision: use ``torch.amp.GradScaler`` as usual (``scaler.step(opt)``). On a step the
    scaler skips for inf/NaN gradients this worker still takes part in the exchange (so no
    peer waits for it), contributes nothing, leaves its momentum as it was and applies the
    others' aggregate, so every replica stays identical.

    Exit: with ``overlap`` a step leaves its exchange running; ``close()`` waits for it (and
    interpreter exit does, for any exchange still in flight), keeping the aggregate for the next
    step.

    Deviations: momentum is kept in float32 for bf16/fp16 params (bloc97/DeMo keeps the param
    dtype); indices are Elias-Fano coded by default (bloc97/DeMo sends int64, Psyche u16).

    Tuning: if loss is noisy, lower ``lr`` (sign updates move every coordinate by lr); if the
    link is the bottleneck, use ``values="sign"`` and ``topk=8``.

    Limitations: the framework's own gradient all-reduce must be off (no DDP wrapper); every
    rank must produce gradients for the same parameters.
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        *,
        momentum_decay: float = 0.999,
        topk: int = 32,
        chunk: int = 64,
        values: str = "float",
        weight_decay: float = 0.0,
        comm: Communicator | None = None,
        index_coding: str = "entropy",
        subtract: str = "unquantized",
        overlap: bool = False,
        aggregate: str = "index_mean",
        on_nonfinite: str = "raise",
        robust: str = "mean",
        backend: str = "auto",
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
        init_sync: str = "broadcast",
    ) -> None:
        check_ordered_params("params", params)
        self.comm = comm
        self.init_sync = check_choice("init_sync", init_sync, INIT_SYNC_MODES)
        self.bucket_cap_mb = check_float("bucket_cap_mb", bucket_cap_mb, 0.0, lo_open=True)
        self.backend = check_choice("backend", backend, ("auto", "torch", "triton"))
        self.robust = check_choice("robust", robust, ("mean", "clip"))
        self.subtract = check_choice("subtract", subtract, ("unquantized", "quantized"))
        self.overlap = check_type("overlap", overlap, bool)
        self.aggregate = check_choice("aggregate", aggregate, ("index_mean", "global_mean"))
        self.on_nonfinite = check_choice("on_nonfinite", on_nonfinite, ("raise", "skip"))
        self._codecs: dict[tuple, SparseCodec] = {}
        self._reducers: dict[tuple, Reducer] = {}
        self._work = InflightWork()
        defaults = dict(
            lr=lr,
            momentum_decay=momentum_decay,
            topk=topk,
            chunk=chunk,
            values=values,
            weight_decay=weight_decay,
            index_coding=index_coding,
            compress=True,
        )
        super().__init__(params, defaults)
        self.step_count = 0
        self._pending: list[tuple[int, list[torch.Tensor], PendingReduce | None, float]] = []
        self._pending_contributed = True  # whether this worker took part in the pending exchange
        if comm is not None:
            # Serve the parameters to peers that join or heal; start every worker from the same.
            comm.attach_state(self._global_state, self._load_global_state)
            comm.agree_initial_state(self.init_sync, tag="demo/init")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, validated like the constructor's arguments."""
        gi = len(self.param_groups)
        if isinstance(param_group, dict):
            check_keys(
                f"keys of param group {gi}", param_group, {*self.defaults, *_TORCH_GROUP_KEYS}
            )
            check_ordered_params("params", param_group.get("params"))
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        try:
            check_param_tensors(gi, g["params"])
            check_float("lr", g["lr"], 0.0, lo_open=True)
            check_float("momentum_decay", g["momentum_decay"], 0.0, 1.0, hi_open=True)
            check_float("weight_decay", g["weight_decay"], 0.0)
            check_type("compress", g["compress"], bool)
            check_int("topk", g["topk"], 1)
            self._codec_of(g)
        except (TypeError, ValueError):
            self.param_groups.pop()  # a rejected group leaves the optimizer as it was
            raise

    def _reducer_of(self, g: dict[str, Any]) -> Reducer:
        """The reducer of this group's codec (one per distinct setting)."""
        key = (g["compress"], g["topk"], g["chunk"], g["values"], g["index_coding"])
        if key not in self._reducers:
            self._reducers[key] = make_reducer(
                self.comm,
                self._codec_of(g),
                robust=self.robust,
                weighted=self.on_nonfinite == "skip",
                aggregate=self.aggregate,
                bucket_cap_mb=self.bucket_cap_mb,
            )
        return self._reducers[key]

    def _codec_of(self, g: dict[str, Any]) -> SparseCodec | None:
        if not g["compress"]:
            return None
        key = (g["topk"], g["chunk"], g["values"], g["index_coding"])
        if key not in self._codecs:
            check_int("topk", g["topk"], 1)
            self._codecs[key] = demo_compressor(
                topk=g["topk"],
                chunk=g["chunk"],
                values=g["values"],
                index_coding=g["index_coding"],
                backend=self.backend,
            )
        return self._codecs[key]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One DeMo step: momentum, select, exchange, sign update.

        Collective: every rank must call this once per step.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # GradScaler found inf/NaN gradients: take part in the exchange (no peer waits for this
        # worker), send nothing, keep the momentum as it was.
        amp_skipped = closure is None and amp_step_skipped(self)
        groups = []
        for gi, g in enumerate(self.param_groups):
            ps = [p for p in g["params"] if p.grad is not None]
            if ps:
                groups.append((gi, ps, [p.grad for p in ps]))
        # Checked before anything changes: a non-finite gradient leaves the optimizer untouched.
        bad = None if amp_skipped else first_nonfinite(self.param_groups, groups)
        if bad is not None:
            gi, pi = bad
            msg = f"gradient of group {gi}, param {pi} is non-finite at step {self.step_count + 1}; nothing was sent"
            if self.on_nonfinite == "raise":
                raise FloatingPointError(msg)
            logger.warning("%s; this worker contributes nothing and resets its momentum", msg)
        start = RoundStart()
        if self.comm is not None:
            try:
                start = self.comm.begin_round(self.step_count)
            except CommError as exc:
                if not self.comm.elastic or isinstance(exc, AllPeersLeft):
                    raise
                logger.warning("step %d could not start its round (%s)", self.step_count, exc)
                start = RoundStart(take_part=False, contribute=False)
        if not start.take_part:
            # The parameters were just replaced by a live peer's (a late join or missed rounds):
            # this step's gradients belong to the old ones, so the step is skipped.
            logger.info("skipping step %d: state loaded from a live peer", self.step_count)
            return loss
        contribute = bad is None and not amp_skipped and start.contribute
        self.step_count += 1
        launched = []
        for gi, ps, grads in groups:
            g = self.param_groups[gi]
            deltas = []
            for p in ps:
                st = self.state[p]
                if "delta" not in st:
                    st["delta"] = torch.zeros_like(p, dtype=torch.float32)
                elif bad is not None:
                    st["delta"].zero_()
                deltas.append(st["delta"])
                if g["weight_decay"]:  # also on a skipped step: every replica decays alike
                    p.mul_(1.0 - g["lr"] * g["weight_decay"])
            # The momentum is the error-feedback buffer: δ <- β δ + lr g, send top-k of DCT(δ),
            # δ <- δ - what was taken (as bloc97/DeMo), all inside the reducer.
            try:
                pend: PendingReduce | None = self._reducer_of(g).start(
                    grads if contribute else [torch.zeros_like(d) for d in deltas],
                    residuals=deltas if contribute else None,
                    decay=g["momentum_decay"],
                    scale=g["lr"],
                    subtract="raw" if self.subtract == "unquantized" else "sent",
                    contribute=contribute,
                    # elastic: errors surface in _apply, where a failed round is discarded
                    async_op=self.overlap or (self.comm is not None and self.comm.elastic),
                    tag=f"demo/g{gi}",
                )
            except CommError as exc:
                if self.comm is None or not self.comm.elastic or isinstance(exc, AllPeersLeft):
                    raise
                logger.warning("exchange of step %d failed (%s)", self.step_count, exc)
                pend = None  # no "pending" state either: _apply discards the step
            launched.append((gi, ps, pend, g["lr"]))
        if self.overlap:
            previous, self._pending = self._pending, launched
            prev_contributed, self._pending_contributed = self._pending_contributed, contribute
            self._work.clear()
            self._work.track(pend for _, _, pend, _ in launched)
            self._apply(previous, prev_contributed)
        else:
            self._apply(launched, contribute)
        return loss

    def _apply(
        self,
        launched: list[tuple[int, list[torch.Tensor], PendingReduce | None, float]],
        contributed: bool,
    ) -> None:
        if not launched:
            return
        weight, ok, results = 0.0, True, []
        for _, ps, pend, lr in launched:
            if pend is None:
                if "pending" not in self.state[ps[0]]:  # failed before it was saved
                    ok = False
                    continue
                updates = [self.state[p].pop("pending") for p in ps]
                w = float(self.state[ps[0]].pop("pending_weight", 1.0))
            else:
                try:
                    updates, w = pend.result()
                except CommError as exc:
                    if self.comm is None or not self.comm.elastic or isinstance(exc, AllPeersLeft):
                        raise
                    logger.warning("exchange of step %d failed (%s)", self.step_count, exc)
                    ok = False
                    continue
            weight = max(weight, float(w))
            results.append((ps, updates, lr))
        if self.comm is not None:
            ok = self.comm.end_round(ok)
        if ok:
            for ps, updates, lr in results:
                demo_update(ps, updates, lr=lr)
        else:  # every replica discards the round alike: the parameters stay equal
            logger.warning("step %d discarded: parameters unchanged", self.step_count)
            for _, ps, _, _ in launched:
                for p in ps:
                    self.state[p].pop("pending", None)
                    self.state[p].pop("pending_weight", None)
        if self.comm is not None:
            self.comm.after_round(self._sync_step)
        self._after_sync(
            SyncInfo(
                sync_step=self._sync_step,
                inner_step=self.step_count,
                weight=weight if ok else 0.0,
                contributed=contributed,
                committed=ok,
            )
        )

    def _global_state(self) -> dict[str, torch.Tensor]:
        """What a peer that joins or heals needs: the parameters (equal on every replica) and
        the step counter. The momentum is this worker's own and stays."""
        return params_and_step(self.param_groups, self.step_count)

    @torch.no_grad()
    def _load_global_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Adopt a live peer's (or rank 0's) parameters and step; checked before anything changes.

        Raises:
            ValueError: other names, shapes or dtypes than this optimizer's, non-finite values.
        """
        mine = self._global_state()
        step = check_params_and_step(state, mine)
        self._resolve()
        for key, p in mine.items():
            if key != STEP_COUNTERS:
                p.copy_(state[key])
        for _, ps, _, _ in self._pending:  # an aggregate of the replaced parameters is void
            for p in ps:
                self.state[p].pop("pending", None)
                self.state[p].pop("pending_weight", None)
        self._pending = []
        self.step_count = step

    @property
    def _sync_step(self) -> int:  # type: ignore[override]
        # With overlap, step t applies the exchange of step t - 1.
        return self.step_count - (1 if self.overlap and self.step_count > 0 else 0)

    def _resolve(self) -> None:
        """Wait for the overlapped exchange in flight; keep its aggregate in state (``pending``)."""
        resolved = []
        for gi, ps, pend, lr in self._pending:
            if pend is not None:
                updates, weight = pend.result()
                for p, u in zip(ps, updates, strict=True):
                    self.state[p]["pending"] = u.to(torch.float32).clone()
                    self.state[p]["pending_weight"] = torch.tensor(weight, dtype=torch.float64)
            resolved.append((gi, ps, None, lr))
        self._pending = resolved
        self._work.clear()

    def close(self) -> None:
        """Wait for the overlapped exchange in flight, if any; keep its aggregate for next step.

        A process must not exit while a ``torch.distributed`` collective is running (gloo aborts
        it with "terminate called without an active exception"); call this before exiting after
        a step with ``overlap=True``. Interpreter exit does the same for any work still in flight.
        Nothing is dropped: the next ``step()`` applies the aggregate as usual, and
        ``state_dict()`` saves it. Idempotent.

        Issues no collective: it waits for the one every rank launched at the same step.
        """
        self._resolve()

    def _settings(self) -> dict[str, Any]:
        """The format-2 fields: class and global settings that change the numerics, shapes."""
        return {
            "optimizer": type(self).__name__,
            "overlap": self.overlap,
            "subtract": self.subtract,
            "robust": self.robust,
            "aggregate": self.aggregate,
            "bucket_cap_mb": self.bucket_cap_mb,
            "shapes": [list(p.shape) for g in self.param_groups for p in g["params"]],
        }

    def state_dict(self) -> dict[str, Any]:
        """State with a ``thinwire`` entry; a pending overlapped aggregate is saved, never dropped.

        ``thinwire`` also records the class, the settings that change the numerics and the
        parameter shapes, which ``load_state_dict`` checks.
        """
        self._resolve()
        sd = super().state_dict()
        order = [p for g in self.param_groups for p in g["params"]]
        ids = {id(p): i for i, p in enumerate(order)}
        sd["thinwire"] = {
            "format": _FORMAT,
            "step": self.step_count,
            "pending": [(gi, [ids[id(p)] for p in ps], lr) for gi, ps, _, lr in self._pending],
            "pending_contributed": self._pending_contributed,
            **self._settings(),
        }
        return sd

    def _check_checkpoint(self, tw: dict[str, Any], sd: dict[str, Any]) -> None:
        """Every check ``load_state_dict`` runs before it changes anything."""
        check_fields(tw, sd, _FORMATS, {1: _FIELDS_V1, 2: _FIELDS_V2}, ("state", "param_groups"))
        ours = self._settings()
        if tw["format"] >= 2:
            for key, value in ours.items():
                if key != "shapes":
                    check_setting(key, value, tw[key])
        elif tw["pending"] and not self.overlap:
            # Format 1 did not record overlap, but only an overlapped run leaves an aggregate
            # pending; without overlap it would never be applied.
            check_setting("overlap", self.overlap, True)
        check_groups(self.param_groups, sd["param_groups"], _GROUP_SETTINGS)
        check_shapes(self.param_groups, tw.get("shapes"), sd["state"], ("delta", "pending"))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a ``state_dict()``; the float32 momentum stays float32 for bf16 params.

        Raises ``ValueError`` naming the setting and both values when the checkpoint was saved
        by another class or with other settings that change the numerics (``overlap``,
        ``subtract``, ``robust``, ``aggregate``, ``bucket_cap_mb``, per-group ``compress``,
        ``topk``, ``chunk``, ``values``, ``index_coding``, ``momentum_decay``) or other
        parameter shapes, before anything is changed. ``lr`` and ``weight_decay`` load from the
        checkpoint, as in ``torch.optim``. Checkpoints of the previous format (1) load too; the
        settings they did not record cannot be checked.
        """
        sd = dict(state_dict)
        tw = sd.pop("thinwire", None)
        if not isinstance(tw, dict):
            raise ValueError(
                "state_dict must hold a 'thinwire' entry (saved by a thinwire optimizer)"
            )
        self._check_checkpoint(tw, sd)
        self._resolve()  # an exchange in flight is superseded by the checkpoint's state
        order = [p for g in self.param_groups for p in g["params"]]
        load_keeping_width(self, super().load_state_dict, sd, order, ("delta", "pending"))
        self.step_count = int(tw["step"])
        self._pending = [(gi, [order[i] for i in idxs], None, lr) for gi, idxs, lr in tw["pending"]]
        self._pending_contributed = bool(tw.get("pending_contributed", True))
