"""Shared machinery of the DiLoCo family: anchors, pseudo-gradients, fragments and the schedule.

One implementation serves DiLoCo (one fragment, no overlap), LocalSGD (outer SGD lr 1, momentum 0)
and Streaming DiLoCo (P fragments, overlap τ, mixing α); the subclasses only choose settings.

Schedule (Streaming DiLoCo, arXiv:2501.18512v1 §2, as torchft's ``_StreamingDiLoCoFragment`` runs
it): ``K = H / P``; sync event ``j`` serves fragment ``j mod P`` and completes after inner step
``(j + 1) K``. With overlap ``τ`` its pseudo-gradient ``Δ = θ_g − θ_i`` is formed and the
reduction launched after inner step ``(j + 1) K − τ``; after step ``(j + 1) K`` the averaged ``Δ̄``
is awaited, the outer optimizer steps the fragment's float32 global copy ``θ_g`` and the local
fragment becomes ``(1 − α) θ_g + α θ_i``. The event counter is derived from the inner-step
counter, which every worker advances identically and which ``state_dict`` saves — never from a
clock (torchft PR #206).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
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
from thinwire.compression import ROBUST_RULES, Codec, SparseCodec, build_codec
from thinwire.optim._finite import amp_step_skipped, first_nonfinite
from thinwire.optim._hooks import SyncHooks, SyncInfo
from thinwire.optim._reduce import DEFAULT_BUCKET_CAP_MB, PendingReduce, Reducer, make_reducer
from thinwire.optim._state import (
    INIT_SYNC_MODES,
    InflightWork,
    check_fields,
    check_groups,
    check_setting,
    check_shapes,
    like,
    load_keeping_width,
    local,
)
from thinwire.optim.functional import diloco_outer_step

__all__: list[str] = []

logger = logging.getLogger(__name__)

InnerFactory = Callable[[list[dict[str, Any]]], Optimizer]
# Format 2 adds the optimizer class, every global setting that changes the numerics and the
# parameter shapes; format 1 checkpoints still load (what they hold is checked).
_FORMAT = 2
_FORMATS = (1, 2)
_FIELDS_V1 = (
    "format",
    "inner_step",
    "outer_step",
    "sync_every",
    "fragments",
    "overlap_steps",
    "inflight",
)
_FIELDS_V2 = _FIELDS_V1 + (
    "optimizer",
    "fragment_pattern",
    "fragment_members",
    "mix_alpha",
    "robust",
    "trim",
    "aggregate",
    "ef_scale_by_lr",
    "bucket_cap_mb",
    "outer",
    "shapes",
)
# Per-group settings that change the numerics; the inner optimizer's keys (lr, betas, ...) load
# from the checkpoint as in torch.optim, so LR schedules resume.
_GROUP_SETTINGS = (
    "outer_lr",
    "outer_momentum",
    "outer_nesterov",
    "compressor",
    "error_feedback",
    "ef_decay",
)
# Group keys torch.optim itself may add: named parameters, and LR schedulers' resume point.
_TORCH_GROUP_KEYS = ("params", "param_names", "initial_lr")
_TRIM_RATIO = 0.25  # the reducers' default share of peers a trimmed mean drops at each end
_WIDE_STATE_KEYS = (
    "anchor",
    "residual",
    "inflight",
    "inflight_weight",
)  # fp32/fp64 whatever the param dtype


@dataclass
class _Inflight:
    """A sync event between launch and apply."""

    fragment: int
    apply_at: int
    contributed: bool
    # One (group index, params, pending reduction) per bucket of the fragment.
    buckets: list[tuple[int, list[torch.Tensor], PendingReduce | None]] = field(
        default_factory=list
    )
    # False once the round failed on this worker (an elastic engine's CommError): discarded.
    ok: bool = True
    # This worker's Δ was non-finite (on_nonfinite="skip"): its inner state is dropped.
    poisoned: bool = False
    # Residuals before this round's encode (elastic engines only): restored if it is discarded.
    residual_backup: dict[int, torch.Tensor] = field(default_factory=dict)


def _anchor_of(p: torch.Tensor) -> torch.Tensor:
    """θ_g for ``p``: float32 for fp32/bf16/fp16 params, float64 for float64 ones."""
    dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
    return p.detach().to(dtype, copy=True)


class _OuterSGD(torch.optim.SGD):
    """``torch.optim.SGD`` (its groups, state and ``state_dict``) whose step is
    :func:`~thinwire.optim.functional.diloco_outer_step`: the default outer optimizer.

    Only ``lr``, ``momentum`` and ``nesterov`` are read; the optimizer builds its groups with
    ``dampening``, ``weight_decay`` and ``maximize`` at SGD's defaults (0, 0, False).
    """

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One outer step over the anchors that have a ``.grad`` (the averaged Δ̄)."""
        if closure is not None:
            raise ValueError("closure must be None for the outer step, got a callable")
        for g in self.param_groups:
            anchors = [a for a in g["params"] if a.grad is not None]
            if not anchors:
                continue
            momentum = g["momentum"]
            bufs: list[torch.Tensor | None] = [
                self.state[a].get("momentum_buffer") if momentum else None for a in anchors
            ]
            diloco_outer_step(
                anchors,
                [a.grad for a in anchors],
                bufs,
                lr=g["lr"],
                momentum=momentum,
                nesterov=g["nesterov"],
            )
            if momentum:
                for a, b in zip(anchors, bufs, strict=True):
                    self.state[a]["momentum_buffer"] = b
        return None


def check_compressor(name: str, value: Any) -> Codec | None:
    """Build (and so validate) a compressor setting: None, a pipeline string or a mapping."""
    if value is None:
        return None
    if isinstance(value, Codec):
        raise TypeError(
            f"{name} must be None, a pipeline string or a mapping of settings (codec objects "
            f"do not pickle into param_groups), got {type(value).__name__}"
        )
    check_type(name, value, (str, Mapping))
    try:
        return build_codec(value if isinstance(value, str) else dict(value))
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"{name} {value!r}: {exc}") from exc


def _check_trim(robust: str, trim: Any, comm: Communicator | None) -> int | None:
    """Validate ``trim`` (peers a trimmed mean drops at each end) against ``robust`` and the group.

    With a communicator, a trimmed mean that cannot trim at its world size ``P`` (``2 * trim >=
    P``, or the default ``floor(0.25 * P)`` being 0 at ``P <= 3``) is refused: it would silently
    be a plain mean, or leave nothing to average.
    """
    if trim is not None:
        check_int("trim", trim, 1)
        if robust != "trimmed_mean":
            raise ValueError(
                f"trim applies only to robust='trimmed_mean', got trim={trim} with robust={robust!r}"
            )
    if robust == "trimmed_mean" and comm is not None:
        P = int(comm.world_size)
        t = trim if trim is not None else int(_TRIM_RATIO * P)
        if t < 1 or 2 * t >= P:
            given = f"trim={trim}" if trim is not None else f"trim=None (floor(0.25 * {P}) = {t})"
            raise ValueError(
                f"robust='trimmed_mean' cannot trim at world size {P} with {given}: it needs "
                "1 <= trim < world size / 2 (at least 3 workers); use robust='mean' or 'clip' "
                "here"
            )
    return trim


class DiLoCoBase(SyncHooks, Optimizer):
    """Base of :class:`~thinwire.optim.DiLoCo`, ``LocalSGD``, ``StreamingDiLoCo`` and ``SparseLoCo``.

    Not public: see the subclasses for the documented constructors.

    Mixed precision: ``torch.amp.GradScaler`` works as with any optimizer
    (``scaler.step(opt); scaler.update()``). The optimizer declares
    ``_step_supports_amp_scaling``, so the scaler calls ``step()`` on every iteration, also
    when it found inf/NaN gradients; such a step skips the inner update but still counts
    towards ``sync_every``, so every worker keeps the same sync schedule (a step the scaler
    skipped without telling the optimizer would put this worker a step behind the others).
    Call ``opt.step()`` only through the scaler then, once per iteration.
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        inner: InnerFactory,
        *,
        outer_lr: float,
        outer_momentum: float,
        nesterov: bool,
        sync_every: int,
        comm: Communicator | None,
        compressor: str | Mapping[str, Any] | None,
        error_feedback: bool,
        ef_decay: float,
        outer: Callable[[list[dict[str, Any]]], Optimizer] | None,
        on_nonfinite: str,
        fragments: int | list[list[torch.Tensor]],
        fragment_pattern: str,
        overlap_steps: int,
        mix_alpha: float,
        tag: str,
        aggregate: str = "index_mean",
        ef_scale_by_lr: bool = False,
        robust: str = "mean",
        backend: str = "auto",
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
        trim: int | None = None,
        init_sync: str = "broadcast",
    ) -> None:
        check_ordered_params("params", params)
        if not callable(inner):
            raise TypeError(f"inner must be a callable param_groups -> Optimizer, got {inner!r}")
        if outer is not None and not callable(outer):
            raise TypeError(
                f"outer must be None or a callable param_groups -> Optimizer, got {outer!r}"
            )
        check_type("nesterov", nesterov, bool)
        self.sync_every = check_int("sync_every", sync_every, 1)
        self.on_nonfinite = check_choice("on_nonfinite", on_nonfinite, ("raise", "skip"))
        self.fragment_pattern = check_choice(
            "fragment_pattern", fragment_pattern, ("strided", "sequential")
        )
        self.mix_alpha = check_float("mix_alpha", mix_alpha, 0.0, 1.0)
        self.comm = comm
        self.tag = tag
        self.aggregate = check_choice("aggregate", aggregate, ("index_mean", "global_mean"))
        self.ef_scale_by_lr = check_type("ef_scale_by_lr", ef_scale_by_lr, bool)
        self.robust = check_choice("robust", robust, ROBUST_RULES)
        self.trim = _check_trim(self.robust, trim, comm)
        self.backend = check_choice("backend", backend, ("auto", "torch", "triton"))
        self.bucket_cap_mb = check_float("bucket_cap_mb", bucket_cap_mb, 0.0, lo_open=True)
        self.init_sync = check_choice("init_sync", init_sync, INIT_SYNC_MODES)
        self._work = InflightWork()
        self._codecs: dict[str, Codec | None] = {}
        self._reducers: dict[str, Reducer] = {}
        self._inner_ready = False
        defaults = dict(
            outer_lr=outer_lr,
            outer_momentum=outer_momentum,
            outer_nesterov=nesterov,  # not "nesterov": the group dicts are the inner optimizer's too
            compressor=compressor,
            error_feedback=error_feedback,
            ef_decay=ef_decay,
        )
        super().__init__(params, defaults)
        self.inner = inner(self.param_groups)
        if not isinstance(self.inner, Optimizer):
            raise TypeError(
                f"inner must return a torch.optim.Optimizer, got {type(self.inner).__name__}"
            )
        inner_params = [p for g in self.inner.param_groups for p in g["params"]]
        own = [p for g in self.param_groups for p in g["params"]]
        if len(inner_params) != len(own) or any(
            a is not b for a, b in zip(inner_params, own, strict=True)
        ):
            raise ValueError("inner must build its optimizer on the param_groups it is given")
        # One list of group dicts: LR schedulers, clipping and users see the inner optimizer's groups.
        self.param_groups = self.inner.param_groups
        for gi, g in enumerate(self.param_groups):
            check_keys(f"keys of param group {gi}", g, self._group_keys())
        self._inner_ready = True

        all_params = own
        self._fragments = self._build_fragments(fragments, all_params)
        P = len(self._fragments)
        if self.sync_every % P:
            raise ValueError(
                f"sync_every must be a multiple of fragments={P}, got {self.sync_every}"
            )
        K = self.sync_every // P
        self.overlap_steps = check_int("overlap_steps", overlap_steps, 0, K - 1)

        for p in all_params:  # θ_g starts at the initial parameters, in float32
            self.state[p]["anchor"] = _anchor_of(p)
        self._outer_factory = outer
        self.outer = self._build_outer()
        self.inner_step = 0
        self.outer_step = 0
        self._inflight: _Inflight | None = None
        self.last_sync: dict[str, Any] = {}
        if comm is not None:
            # Serve θ_g to peers that join or heal, and start every worker from one θ_g.
            comm.attach_state(self._global_state, self._load_global_state)
            comm.agree_initial_state(self.init_sync, tag=f"{tag}/init")

    # ---------------------------------------------------------------- construction helpers
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (validated like the constructor's arguments) to the inner and outer optimizers."""
        if not getattr(self, "_inner_ready", False):
            # The group keys are checked once the inner optimizer exists (its keys are valid too).
            if isinstance(param_group, dict):
                check_ordered_params("params", param_group.get("params"))
            super().add_param_group(param_group)
            self._validate_group(self.param_groups[-1], len(self.param_groups) - 1)
            return
        if self._inflight is not None:
            raise RuntimeError("cannot add a param group while a sync is in flight")
        check_keys(f"keys of param group {len(self.param_groups)}", param_group, self._group_keys())
        params = check_ordered_params("params", param_group["params"])
        if isinstance(params, torch.Tensor):
            param_group["params"] = [params]
        else:
            param_group["params"] = list(params)  # a generator would be used up by validation
        for k, v in self.defaults.items():
            param_group.setdefault(k, v)
        self._validate_group(param_group, len(self.param_groups))
        self.inner.add_param_group(param_group)  # appends to the shared list
        group = self.param_groups[-1]
        for p in group["params"]:
            self.state[p]["anchor"] = _anchor_of(p)
        self._fragments[-1].extend(group["params"])
        self.outer = self._build_outer(keep_state=True)

    def _group_keys(self) -> set[str]:
        """Keys a param group may hold: this optimizer's, the inner optimizer's and torch's."""
        return {*self.defaults, *self.inner.defaults, *_TORCH_GROUP_KEYS}

    def _validate_group(self, g: dict[str, Any], gi: int) -> None:
        check_param_tensors(gi, g["params"])
        check_float("outer_lr", g["outer_lr"], 0.0)
        check_float("outer_momentum", g["outer_momentum"], 0.0, 1.0, hi_open=True)
        check_type("outer_nesterov", g["outer_nesterov"], bool)
        check_type("error_feedback", g["error_feedback"], bool)
        check_float("ef_decay", g["ef_decay"], 0.0, 1.0)
        codec = self._codec_of(g)
        if isinstance(codec, SparseCodec) and self.robust not in ("mean", "clip"):
            raise ValueError(
                f"robust must be in {{'mean', 'clip'}} with a sparse compressor, got {self.robust!r}"
            )

    def _reducer_of(self, g: Mapping[str, Any]) -> Reducer:
        """The reducer of this group's compressor (one per distinct setting)."""
        key = repr(g["compressor"])
        if key not in self._reducers:
            self._reducers[key] = make_reducer(
                self.comm,
                self._codec_of(g),
                robust=self.robust,
                # Weight-0 contributions need weights: a worker that skips a non-finite Δ, or a
                # replica of an elastic engine that healed at the start of the round.
                weighted=self.on_nonfinite == "skip"
                or (self.comm is not None and self.comm.elastic),
                aggregate=self.aggregate,
                bucket_cap_mb=self.bucket_cap_mb,
                trim=self.trim,
            )
        return self._reducers[key]

    def _codec_of(self, g: Mapping[str, Any]) -> Codec | None:
        spec = g["compressor"]
        key = repr(spec)
        if key not in self._codecs:
            codec = check_compressor("compressor", spec)
            if isinstance(codec, SparseCodec):
                codec.backend = self.backend  # kernels through the dispatch rule only
            self._codecs[key] = codec
        return self._codecs[key]

    def _build_fragments(
        self, fragments: int | list[list[torch.Tensor]], params: list[torch.Tensor]
    ) -> list[list[torch.Tensor]]:
        if isinstance(fragments, int) and not isinstance(fragments, bool):
            P = check_int("fragments", fragments, 1, max(1, len(params)))
            if self.fragment_pattern == "strided":
                return [params[i::P] for i in range(P)]
            bounds = [round(i * len(params) / P) for i in range(P + 1)]
            return [params[bounds[i] : bounds[i + 1]] for i in range(P)]
        check_type("fragments", fragments, list)
        ids = {id(p): p for p in params}
        seen: set[int] = set()
        out = []
        for i, frag in enumerate(fragments):
            frag = list(frag)
            if not frag:
                raise ValueError(f"fragments[{i}] must hold at least one parameter, got none")
            for p in frag:
                if id(p) not in ids:
                    raise ValueError(
                        f"fragments[{i}] holds a tensor that is not an optimized parameter"
                    )
                if id(p) in seen:
                    raise ValueError(
                        f"fragments[{i}] repeats a parameter already in another fragment"
                    )
                seen.add(id(p))
            out.append(frag)
        if len(seen) != len(ids):
            raise ValueError(
                f"fragments must cover every parameter exactly once, got {len(seen)} of {len(ids)}"
            )
        return out

    def _outer_groups(self) -> list[dict[str, Any]]:
        groups = []
        for g in self.param_groups:
            anchors = [self.state[p]["anchor"] for p in g["params"]]
            if self._outer_factory is not None:
                groups.append({"params": anchors})
            else:
                mom = g["outer_momentum"]
                groups.append(
                    {
                        "params": anchors,
                        "lr": g["outer_lr"],
                        "momentum": mom,
                        "nesterov": g["outer_nesterov"] and mom > 0,
                    }
                )
        return groups

    def _build_outer(self, keep_state: bool = False) -> Optimizer:
        old = getattr(self, "outer", None)
        if self._outer_factory is not None:
            outer = self._outer_factory(self._outer_groups())
        else:
            outer = _OuterSGD(self._outer_groups(), lr=self.defaults["outer_lr"])
        if keep_state and old is not None:
            for a, st in old.state.items():
                outer.state[a] = st
        return outer

    # ---------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One inner step, then whatever sync the schedule requires.

        Collective: every rank must call this once per inner step.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = self.inner.step(closure)
        elif not amp_step_skipped(self):
            loss = self.inner.step()
        # Counted whether or not GradScaler skipped the update: every rank syncs at the same call.
        self.inner_step += 1
        self._after_inner_step()
        return loss

    def _after_inner_step(self) -> None:
        s = self.inner_step
        K = self.sync_every // len(self._fragments)
        if self._inflight is not None and self._inflight.apply_at == s:
            self._apply()
        if (s + self.overlap_steps) % K == 0:
            event = (s + self.overlap_steps) // K - 1
            self._launch(event % len(self._fragments), apply_at=s + self.overlap_steps)
            if self.overlap_steps == 0 and self._inflight is not None:
                self._apply()

    def _buckets(self, fragment: int) -> list[tuple[int, list[torch.Tensor]]]:
        members = {id(p) for p in self._fragments[fragment]}
        out = []
        for gi, g in enumerate(self.param_groups):
            ps = [p for p in g["params"] if id(p) in members]
            if ps:
                out.append((gi, ps))
        return out

    def _launch(self, fragment: int, apply_at: int) -> None:
        start = self._begin_round(self.outer_step)
        if not start.take_part:
            # This worker's state was just replaced by a live peer's (it joined late or missed
            # rounds); it restarts from that θ_g and contributes from the next round on.
            logger.info("skipping round %d: state loaded from a live peer", self.outer_step)
            return
        if start.healed:
            # Healed at the start of this round (torchft): the loaded counters are the peers' at
            # the launch of this event; join it at their point of the schedule, with the
            # fragment their inner step selects (this worker's own counters chose another).
            K = self.sync_every // len(self._fragments)
            event = (self.inner_step + self.overlap_steps) // K - 1
            fragment = event % len(self._fragments)
            apply_at = self.inner_step + self.overlap_steps
        buckets = self._buckets(fragment)
        deltas = [
            [self.state[p]["anchor"] - p.detach().to(self.state[p]["anchor"].dtype) for p in ps]
            for _, ps in buckets
        ]
        bad = first_nonfinite(
            self.param_groups, [(gi, ps, ds) for (gi, ps), ds in zip(buckets, deltas, strict=True)]
        )
        finite = bad is None
        if not finite:
            gi, pi = bad
            msg = (
                f"pseudo-gradient of group {gi}, param {pi} is non-finite at inner step "
                f"{self.inner_step} (fragment {fragment}); nothing was sent"
            )
            if self.on_nonfinite == "raise":
                raise FloatingPointError(msg)
            logger.warning("%s; this worker contributes weight 0 to the round", msg)
        contribute = finite and start.contribute
        inflight = _Inflight(fragment, apply_at, contributed=contribute, poisoned=not finite)
        elastic = self.comm is not None and self.comm.elastic
        for (gi, ps), ds in zip(buckets, deltas, strict=True):
            g = self.param_groups[gi]
            ef = contribute and g["error_feedback"]
            if not contribute:
                ds = [torch.zeros_like(d) for d in ds]  # weight 0: nothing non-finite is sent
            if ef and elastic:
                for p in ps:
                    inflight.residual_backup[id(p)] = self._residual(p).clone()
            pend: PendingReduce | None = None
            if inflight.ok:  # an elastic round that already failed issues nothing more
                try:
                    pend = self._reducer_of(g).start(
                        ds,
                        residuals=[self._residual(p) for p in ps] if ef else None,
                        decay=g["ef_decay"],
                        scale=g["outer_lr"] if self.ef_scale_by_lr else 1.0,
                        contribute=contribute,
                        # elastic: errors surface in _resolve, where a failed round is discarded
                        async_op=self.overlap_steps > 0 or elastic,
                        tag=f"{self.tag}/sync/f{fragment}/g{gi}",
                    )
                except CommError as exc:
                    self._round_failed(inflight, exc)
            inflight.buckets.append((gi, ps, pend))
        self._inflight = inflight
        self._work.track(pend for _, _, pend in inflight.buckets)

    def _round_failed(self, inf: _Inflight, exc: CommError) -> None:
        """An op of the round failed: fatal on a static engine, a discarded round on an elastic one."""
        if self.comm is None or not self.comm.elastic or isinstance(exc, AllPeersLeft):
            raise exc
        # An elastic engine lost a peer or formed no group: the round is discarded on this
        # worker (it adopts the live peers' state at a later round if they went on without it).
        logger.warning("round %d failed on this worker (%s); discarding it", self.outer_step, exc)
        inf.ok = False

    def _begin_round(self, round: int) -> RoundStart:
        """``comm.begin_round``; an elastic engine that cannot open the round skips it."""
        if self.comm is None:
            return RoundStart()
        try:
            return self.comm.begin_round(round)
        except CommError as exc:
            if not self.comm.elastic or isinstance(exc, AllPeersLeft):
                raise
            logger.warning("round %d could not start (%s); skipping it", round, exc)
            return RoundStart(take_part=False, contribute=False)

    def _residual(self, p: torch.Tensor) -> torch.Tensor:
        st = self.state[p]
        if "residual" not in st:
            st["residual"] = torch.zeros_like(st["anchor"])
        return st["residual"]

    def _resolve(self) -> None:
        """Wait for the in-flight reduction and keep its result in state (``inflight``)."""
        inf = self._inflight
        if inf is None:
            return
        for i, (gi, ps, pend) in enumerate(inf.buckets):
            if pend is None:
                continue
            try:
                vecs, weight = pend.result()
            except CommError as exc:
                self._round_failed(inf, exc)
                inf.buckets[i] = (gi, ps, None)
                continue
            for p, v in zip(ps, vecs, strict=True):  # v: the local shard of Δ̄
                anchor = self.state[p]["anchor"]
                self.state[p]["inflight"] = like(anchor, v.to(anchor.dtype, copy=True))
            for p in ps:
                self.state[p]["inflight_weight"] = torch.tensor(weight, dtype=torch.float64)
            inf.buckets[i] = (gi, ps, None)
        self._work.clear()

    def _apply(self) -> None:
        inf = self._inflight
        assert inf is not None  # internal invariant: _apply follows _launch
        self._resolve()
        ok = self.comm.end_round(inf.ok) if self.comm is not None else inf.ok
        if not ok:
            self._discard(inf)
            return
        stepped = False
        total_weight = 0.0
        for gi, ps, _ in inf.buckets:
            weight = float(self.state[ps[0]]["inflight_weight"])
            for p in ps:  # one scalar per param (state_dict saves it); none outlives the sync
                self.state[p].pop("inflight_weight", None)
            total_weight = max(total_weight, weight)
            outer_group = self.outer.param_groups[gi]
            if self._outer_factory is None:  # per-group settings may have changed since
                g = self.param_groups[gi]
                outer_group["lr"] = g["outer_lr"]
                outer_group["momentum"] = g["outer_momentum"]
                outer_group["nesterov"] = g["outer_nesterov"] and g["outer_momentum"] > 0
            for p in ps:
                delta = self.state[p].pop("inflight")
                if weight > 0:
                    self.state[p]["anchor"].grad = delta
                    stepped = True
        if stepped:
            self.outer.step()
        for _, ps, _ in inf.buckets:
            for p in ps:
                anchor = self.state[p]["anchor"]
                anchor.grad = None
                if inf.contributed and self.mix_alpha > 0:
                    p.copy_(torch.lerp(anchor, p.detach().to(anchor.dtype), self.mix_alpha))
                else:
                    p.copy_(anchor)
        if inf.poisoned:
            # This worker's Δ was non-finite ("skip"): restart every fragment from θ_g and drop
            # the inner optimizer's state, which the same NaN has poisoned.
            for p in self._ordered_params():
                p.copy_(self.state[p]["anchor"])
                self.inner.state.pop(p, None)
        self._inflight = None
        self.outer_step += 1
        self._finish_round(inf, total_weight, committed=True)

    def _finish_round(self, inf: _Inflight, weight: float, committed: bool) -> None:
        """Record the round, tell the communicator it is over, run the sync hooks."""
        self.last_sync = {
            "fragment": inf.fragment,
            "inner_step": self.inner_step,
            "weight": weight,
            "contributed": inf.contributed,
            "committed": committed,
        }
        if self.comm is not None:
            self.comm.after_round(self.outer_step)
        self._after_sync(
            SyncInfo(
                sync_step=self.outer_step,
                inner_step=self.inner_step,
                fragment=inf.fragment,
                weight=weight,
                contributed=inf.contributed,
                committed=committed,
            )
        )

    def _discard(self, inf: _Inflight) -> None:
        """Drop a round that failed or was not committed: θ_g and the outer state stay, the
        fragment restarts from θ_g (its local progress of the round is lost, as in torchft's
        DiLoCo), error-feedback residuals return to their value before the round."""
        for _, ps, _ in inf.buckets:
            for p in ps:
                st = self.state[p]
                st.pop("inflight", None)
                st.pop("inflight_weight", None)
                backup = inf.residual_backup.get(id(p))
                if backup is not None:
                    st["residual"].copy_(backup)
                p.copy_(st["anchor"])
        self._inflight = None
        logger.warning("round %d discarded: θ_g unchanged", self.outer_step)
        self._finish_round(inf, 0.0, committed=False)

    @property
    def _sync_step(self) -> int:  # type: ignore[override]
        return self.outer_step

    # ---------------------------------------------------------------- user helpers
    def close(self) -> None:
        """Wait for the reduction in flight, if any; keep its result for its apply step.

        A process must not exit while a ``torch.distributed`` collective is running (gloo
        aborts it with "terminate called without an active exception"); call this before
        exiting after an overlapped step. Interpreter exit does the same for any work still
        in flight, even of an optimizer already garbage collected. Nothing is dropped: the result is applied after its step as usual if
        training continues, and ``state_dict()`` saves it. Idempotent.

        Issues no collective: it waits for the one every rank launched at the same step.
        """
        self._resolve()

    @torch.no_grad()
    def sync_now(self) -> None:
        """Finish any in-flight event, then sync every fragment at once without overlap.

        Collective: every rank must call this at the same point.
        """
        if self._inflight is not None:
            self._apply()
        for f in range(len(self._fragments)):
            self._launch(f, apply_at=self.inner_step)
            if self._inflight is not None:
                self._apply()

    @contextmanager
    def global_params(self) -> Iterator[None]:
        """Swap the float32 global copy θ_g into the model (evaluation, export); restore after."""
        saved = []
        with torch.no_grad():
            for g in self.param_groups:
                for p in g["params"]:
                    saved.append((p, p.detach().clone()))
                    p.copy_(self.state[p]["anchor"])
        try:
            yield
        finally:
            with torch.no_grad():
                for p, v in saved:
                    p.copy_(v)

    # ---------------------------------------------------------------- global state hand-off
    def _param_names(self) -> list[tuple[str, torch.Tensor]]:
        return [
            (f"group {gi} param {j}", p)
            for gi, g in enumerate(self.param_groups)
            for j, p in enumerate(g["params"])
        ]

    def _global_state(self) -> dict[str, torch.Tensor]:
        """What a peer that joins or heals needs: θ_g, the outer optimizer's tensors and the
        step counters (``[inner step of the last sync, outer_step]``), by name, in parameter order.

        Sharded (DTensor) parameters give this rank's local shards: the communicator's group
        holds one rank per site with the same shard, so what it exchanges is that shard.
        """
        out: dict[str, torch.Tensor] = {}
        for name, p in self._param_names():
            out[name] = local(self.state[p]["anchor"])
        for name, p in self._param_names():
            for k, v in sorted(self.outer.state.get(self.state[p]["anchor"], {}).items()):
                if isinstance(v, torch.Tensor):
                    out[f"{name} outer {k}"] = local(v)
        # Read right after a sync was applied (hivemind's snapshot) or when a round is launched
        # (torchft's heal): a peer that adopts them runs the same schedule from that point on.
        out[STEP_COUNTERS] = torch.tensor([self.inner_step, self.outer_step], dtype=torch.int64)
        return out

    @torch.no_grad()
    def _load_global_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Adopt a live peer's (or rank 0's) global state; every parameter restarts from θ_g.

        Everything is checked before anything changes (a peer may be faulty or hostile): the
        names, shapes and dtypes must be this optimizer's, floating values finite, counters
        non-negative. The inner optimizer's state and the error-feedback residuals are this
        worker's own and are kept.

        Raises:
            ValueError: the state does not fit this optimizer.
        """
        names = self._param_names()
        outer: dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}
        # (local shard of θ_g, its outer tensors): the state holds local shards (_global_state)
        for name, p in names:
            outer[name] = (local(self.state[p]["anchor"]), {})
        for key, v in state.items():
            if not isinstance(v, torch.Tensor):
                raise ValueError(f"global state {key!r} must be a tensor, got {type(v).__name__}")
            if key == STEP_COUNTERS:
                if v.dtype != torch.int64 or v.shape != (2,) or bool((v < 0).any()):
                    raise ValueError(f"global state 'step counters' must be 2 int64 >= 0, got {v}")
                continue
            owner, _, k = key.partition(" outer ")
            if owner not in outer:
                raise ValueError(f"global state holds {key!r}, which this optimizer does not have")
            anchor = outer[owner][0]
            if not k:
                if v.shape != anchor.shape or v.dtype != anchor.dtype:
                    raise ValueError(
                        f"global state {key!r} must be {anchor.dtype} of shape "
                        f"{tuple(anchor.shape)}, got {v.dtype} of shape {tuple(v.shape)}"
                    )
            elif v.shape != anchor.shape and v.numel() != 1:
                raise ValueError(
                    f"global state {key!r} must have shape {tuple(anchor.shape)} or one element, "
                    f"got shape {tuple(v.shape)}"
                )
            else:
                outer[owner][1][k] = v
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise ValueError(f"global state {key!r} holds non-finite values")
        missing = [n for n, _ in names if n not in state] + (
            [] if STEP_COUNTERS in state else [STEP_COUNTERS]
        )
        if missing:
            raise ValueError(f"global state is missing {missing[0]!r}")
        if self._inflight is not None:  # superseded by the state being loaded
            self._resolve()
            for _, ps, _ in self._inflight.buckets:
                for p in ps:
                    self.state[p].pop("inflight", None)
                    self.state[p].pop("inflight_weight", None)
            self._inflight = None
        for name, p in names:
            shard, extra = outer[name]
            anchor = self.state[p]["anchor"]
            shard.copy_(state[name])
            p.copy_(anchor)
            if extra:
                self.outer.state[anchor] = {
                    k: self._outer_tensor(anchor, shard, v) for k, v in extra.items()
                }
            else:
                self.outer.state.pop(anchor, None)
        counters = state[STEP_COUNTERS]
        self.inner_step, self.outer_step = (int(x) for x in counters.tolist())

    @staticmethod
    def _outer_tensor(anchor: torch.Tensor, shard: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """A copy of a received outer-state tensor ``v``, laid out as ``anchor`` when it has the
        shape of ``anchor``'s local ``shard`` (a momentum buffer), else plain (a step count)."""
        v = v.detach().to(shard.device, copy=True)
        return like(anchor, v) if v.shape == shard.shape else v

    def consistency_digest(self) -> str:
        """SHA-256 of θ_g and the outer optimizer state: equal on every worker after each sync.

        With sharded (DTensor) parameters it digests this rank's local shards: equal on the
        ranks of the communicator's group (one per site, same shard) after each sync.
        """
        h = hashlib.sha256()
        for g in self.param_groups:
            for p in g["params"]:
                h.update(
                    local(self.state[p]["anchor"]).detach().cpu().contiguous().numpy().tobytes()
                )
        for a in [a for og in self.outer.param_groups for a in og["params"]]:
            for k, v in sorted(self.outer.state.get(a, {}).items()):
                h.update(k.encode())
                if isinstance(v, torch.Tensor):
                    h.update(local(v).detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forward to the inner optimizer."""
        self.inner.zero_grad(set_to_none=set_to_none)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Optimizer state with ``inner``, ``outer`` and ``thinwire`` keys; waits for an in-flight sync.

        An in-flight reduction is completed (not dropped): its averaged result is saved in the
        per-param ``inflight`` state and applied after the recorded step on resume. ``thinwire``
        also records the optimizer class, every global setting that changes the numerics and
        the parameter shapes, which ``load_state_dict`` checks.
        """
        self._resolve()
        sd = super().state_dict()
        sd["inner"] = self.inner.state_dict()
        sd["outer"] = self.outer.state_dict()
        inf = self._inflight
        sd["thinwire"] = {
            "format": _FORMAT,
            "inner_step": self.inner_step,
            "outer_step": self.outer_step,
            "sync_every": self.sync_every,
            "fragments": len(self._fragments),
            "overlap_steps": self.overlap_steps,
            "inflight": None
            if inf is None
            else {
                "fragment": inf.fragment,
                "apply_at": inf.apply_at,
                "contributed": inf.contributed,
                "buckets": [(gi, [self._index_of(p) for p in ps]) for gi, ps, _ in inf.buckets],
            },
            **self._settings(),
        }
        return sd

    def _settings(self) -> dict[str, Any]:
        """The format-2 fields: class and global settings that change the numerics, shapes."""
        index = {id(p): i for i, p in enumerate(self._ordered_params())}
        return {
            "optimizer": type(self).__name__,
            "fragment_pattern": self.fragment_pattern,
            "fragment_members": [[index[id(p)] for p in frag] for frag in self._fragments],
            "mix_alpha": self.mix_alpha,
            "robust": self.robust,
            "trim": self.trim,
            "aggregate": self.aggregate,
            "ef_scale_by_lr": self.ef_scale_by_lr,
            "bucket_cap_mb": self.bucket_cap_mb,
            "outer": type(self.outer).__name__,
            "shapes": [list(p.shape) for p in self._ordered_params()],
        }

    def _ordered_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _index_of(self, p: torch.Tensor) -> int:
        for i, q in enumerate(self._ordered_params()):
            if q is p:
                return i
        raise KeyError("parameter not in this optimizer")

    def _same_group_setting(self, key: str, mine: Any, theirs: Any) -> bool:
        if key != "compressor" or mine == theirs:
            return mine == theirs
        try:  # equal settings written differently (a string and a mapping) are the same codec
            a, b = check_compressor("compressor", mine), check_compressor("compressor", theirs)
        except (TypeError, ValueError):
            return False
        if a is None or b is None:
            return a is b
        return (type(a), a.settings) == (type(b), b.settings)

    def _check_checkpoint(self, tw: dict[str, Any], sd: dict[str, Any]) -> None:
        """Every check ``load_state_dict`` runs before it changes anything."""
        check_fields(
            tw,
            sd,
            _FORMATS,
            {1: _FIELDS_V1, 2: _FIELDS_V2},
            ("state", "param_groups", "inner", "outer"),
        )
        ours = self._settings()
        if tw["format"] >= 2:  # format 1 did not record the class
            check_setting("optimizer", ours["optimizer"], tw["optimizer"])
        mine = (self.sync_every, len(self._fragments), self.overlap_steps)
        theirs = (tw["sync_every"], tw["fragments"], tw["overlap_steps"])
        check_setting("(sync_every, fragments, overlap_steps)", mine, theirs)
        if tw["format"] >= 2:  # format 1 recorded none of these: only what it holds is checked
            for key, value in ours.items():
                if key not in ("optimizer", "shapes"):
                    check_setting(key, value, tw[key])
        check_groups(
            self.param_groups, sd["param_groups"], _GROUP_SETTINGS, self._same_group_setting
        )
        check_shapes(
            self.param_groups, tw.get("shapes"), sd["state"], ("anchor", "residual", "inflight")
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a ``state_dict()``; float32 outer state stays float32 for bf16/fp16 params.

        Raises ``ValueError`` naming the setting and both values when the checkpoint was saved
        by another optimizer class or with other settings that change the numerics (the
        schedule, fragments, overlap, mixing, robust rule and trim, aggregation, bucket size,
        outer optimizer, per-group outer and compression settings) or other parameter shapes,
        before anything is changed. The inner optimizer's group settings (``lr``, ...) load
        from the checkpoint, as in ``torch.optim``. Checkpoints of the previous format (1)
        load too; the settings they did not record cannot be checked.
        """
        sd = dict(state_dict)
        tw = sd.pop("thinwire", None)
        if not isinstance(tw, dict):
            raise ValueError(
                "state_dict must hold a 'thinwire' entry (saved by a thinwire optimizer)"
            )
        self._check_checkpoint(tw, sd)
        self._work.drain()  # a reduction in flight is superseded by the checkpoint's state
        inner_sd = sd.pop("inner")
        outer_sd = sd.pop("outer")
        params = self._ordered_params()
        load_keeping_width(self, super().load_state_dict, sd, params, _WIDE_STATE_KEYS)
        self.inner.load_state_dict(inner_sd)
        self.param_groups = self.inner.param_groups
        self.outer.load_state_dict(outer_sd)
        self.inner_step = int(tw["inner_step"])
        self.outer_step = int(tw["outer_step"])
        inf = tw["inflight"]
        if inf is None:
            self._inflight = None
        else:
            self._inflight = _Inflight(
                inf["fragment"],
                inf["apply_at"],
                inf["contributed"],
                [(gi, [params[j] for j in idxs], None) for gi, idxs in inf["buckets"]],
            )
