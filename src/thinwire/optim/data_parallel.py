"""``DataParallel``: the plain data-parallel baseline as a drop-in optimizer.

Every ``step()`` averages the gradients over the workers (fp32, bucketed, through the
communicator's ``all_reduce``) and then steps the inner optimizer, so every worker applies the
same update: the synchronous data parallelism of ``torch.nn.parallel.DistributedDataParallel``
(Li et al., "PyTorch Distributed", arXiv:2006.15704v1, §3.2: gradient buckets all-reduced, then
a local optimizer step), written as an optimizer so the benchmark, the RL learners and the
examples build it from the same method table as the low-communication optimizers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from thinwire._validate import (
    check_choice,
    check_float,
    check_keys,
    check_ordered_params,
    check_param_tensors,
    check_type,
)
from thinwire.collectives import (
    STEP_COUNTERS,
    AllPeersLeft,
    CommError,
    Communicator,
    Handle,
    RoundStart,
)
from thinwire.optim._finite import first_nonfinite
from thinwire.optim._hooks import SyncHooks, SyncInfo
from thinwire.optim._reduce import DEFAULT_BUCKET_CAP_MB, split_buckets
from thinwire.optim._state import (
    INIT_SYNC_MODES,
    check_fields,
    check_groups,
    check_params_and_step,
    check_setting,
    check_shapes,
    params_and_step,
)

__all__ = ["DataParallel"]

logger = logging.getLogger(__name__)

InnerFactory = Callable[[list[dict[str, Any]]], Optimizer]
_FORMAT = 1
_FIELDS = ("format", "optimizer", "step", "sync_step", "bucket_cap_mb", "shapes")
_TORCH_GROUP_KEYS = ("params", "param_names", "initial_lr")


class DataParallel(SyncHooks, Optimizer):
    r"""Data parallelism: average the gradients every step, then step the inner optimizer.

    .. code-block:: text

        every step, on every worker i:
            g_i = ∇ loss_i                      (the caller's backward)
            ḡ   = mean_i g_i                    (fp32 ring all-reduce, one per bucket)
            inner.step() with ḡ in every .grad

    This is the reference every thinwire method is measured against: ``2(M − 1)/M · 4N`` bytes
    sent per worker per step for ``N`` parameters and ``M`` workers (ring all-reduce).

    Args:
        params: parameters or param-group dicts; the groups are the inner optimizer's (no keys
            of its own), so LR schedulers and ``clip_grad_norm_`` work unchanged.
        inner: factory ``param_groups -> torch.optim.Optimizer``, e.g.
            ``functools.partial(torch.optim.AdamW, lr=3e-3)``.
        comm: communicator (:mod:`thinwire.collectives`); ``None`` is one worker (the inner
            optimizer alone).
        bucket_cap_mb: largest bucket in MiB of float32 values (default: 25, DDP's
            ``bucket_cap_mb``), range (0, inf); each bucket is one ``all_reduce``.
        init_sync: ``"broadcast"`` (default) copies rank 0's parameters to every worker when the
            optimizer is built (collective, ledger tag ``"ddp/init"``), as DDP's constructor
            does; ``"check"`` compares a digest per parameter and raises ``ValueError`` naming
            the first one that differs; ``"off"`` trusts the caller. An elastic engine
            (hivemind, torchft) gives a late joiner the live peers' parameters instead.
        tag: ledger tag of the gradient all-reduces (default: ``"ddp/grads"``).

    A parameter whose ``.grad`` is None is skipped (as ``torch.optim`` does); every worker must
    then skip the same parameters, as DDP without ``find_unused_parameters`` requires.

    State: none of its own; ``state_dict()`` holds the inner optimizer's under ``inner`` and the
    step count, bucket size and parameter shapes under ``thinwire`` (``load_state_dict`` checks
    them, and the class, before changing anything). Every step is a sync: ``sync_step`` equals
    the number of steps, and sync post-hooks run after each inner step.

    Example::

        opt = DataParallel(model.parameters(), partial(torch.optim.AdamW, lr=3e-3), comm=comm)
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()

    Limitations: ``torch.amp.GradScaler`` is not supported (a scaler that skips ``step()`` on
    one worker would leave the others waiting in the all-reduce); a non-finite gradient raises
    ``FloatingPointError`` on its worker before anything is sent, and its peers then fail with
    the communicator's timeout.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        inner: InnerFactory,
        *,
        comm: Communicator | None = None,
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
        init_sync: str = "broadcast",
        tag: str = "ddp/grads",
    ) -> None:
        check_ordered_params("params", params)
        if not callable(inner):
            raise TypeError(f"inner must be a callable param_groups -> Optimizer, got {inner!r}")
        self.comm = comm
        self.bucket_cap_mb = check_float("bucket_cap_mb", bucket_cap_mb, 0.0, lo_open=True)
        self.init_sync = check_choice("init_sync", init_sync, INIT_SYNC_MODES)
        self.tag = check_type("tag", tag, str)
        self._inner_ready = False
        super().__init__(params, {})
        self.inner = inner(self.param_groups)
        if not isinstance(self.inner, Optimizer):
            raise TypeError(
                f"inner must return a torch.optim.Optimizer, got {type(self.inner).__name__}"
            )
        own = [p for g in self.param_groups for p in g["params"]]
        theirs = [p for g in self.inner.param_groups for p in g["params"]]
        if len(own) != len(theirs) or any(a is not b for a, b in zip(own, theirs, strict=True)):
            raise ValueError("inner must build its optimizer on the param_groups it is given")
        self.param_groups = self.inner.param_groups  # one list: schedulers see the inner groups
        for gi, g in enumerate(self.param_groups):
            check_keys(f"keys of param group {gi}", g, self._group_keys())
        self._inner_ready = True
        self.step_count = 0
        if comm is not None:
            # Serve the parameters to peers that join or heal; start every worker from one set.
            comm.attach_state(self._global_state, self._load_global_state)
            comm.agree_initial_state(self.init_sync, tag="ddp/init")

    # ---------------------------------------------------------------- construction helpers
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (validated like the constructor's) to the inner optimizer."""
        if not getattr(self, "_inner_ready", False):
            if isinstance(param_group, dict):
                check_ordered_params("params", param_group.get("params"))
            super().add_param_group(param_group)
            check_param_tensors(len(self.param_groups) - 1, self.param_groups[-1]["params"])
            return
        check_keys(f"keys of param group {len(self.param_groups)}", param_group, self._group_keys())
        params = check_ordered_params("params", param_group["params"])
        param_group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
        check_param_tensors(len(self.param_groups), param_group["params"])
        self.inner.add_param_group(param_group)  # appends to the shared list

    def _group_keys(self) -> set[str]:
        return {*self.inner.defaults, *_TORCH_GROUP_KEYS}

    def _global_state(self) -> dict[str, torch.Tensor]:
        """The parameters (equal on every worker) and the step count: what a joiner needs."""
        return params_and_step(self.param_groups, self.step_count)

    @torch.no_grad()
    def _load_global_state(self, state: dict[str, torch.Tensor]) -> None:
        """Adopt rank 0's (or a live peer's) parameters and step; checked before any change.

        Raises:
            ValueError: other names, shapes or dtypes than this optimizer's, non-finite values.
        """
        mine = self._global_state()
        step = check_params_and_step(state, mine)
        for key, p in mine.items():
            if key != STEP_COUNTERS:
                p.copy_(state[key])
        self.step_count = self._sync_step = step

    def _begin_round(self) -> RoundStart:
        if self.comm is None:
            return RoundStart()
        try:
            return self.comm.begin_round(self.step_count)
        except CommError as exc:
            if not self.comm.elastic or isinstance(exc, AllPeersLeft):
                raise
            logger.warning("step %d could not start its round (%s)", self.step_count, exc)
            return RoundStart(take_part=False, contribute=False)

    # ---------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Average the gradients over the workers, then one inner step.

        Collective: every rank must call this once per step.

        Raises:
            FloatingPointError: a gradient is non-finite (group, param and step named); nothing
                was sent.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        start = self._begin_round()
        if not start.take_part:
            # The parameters were just replaced by a live peer's: this step's gradients belong
            # to the old ones, so the step is skipped.
            logger.info("skipping step %d: state loaded from a live peer", self.step_count)
            return loss
        ok, weight = True, float(self.comm.world_size if self.comm else 1)
        try:
            weight = self._sync_grads(start.contribute)
        except CommError as exc:
            if self.comm is None or not self.comm.elastic or isinstance(exc, AllPeersLeft):
                raise
            logger.warning("gradient exchange of step %d failed (%s)", self.step_count, exc)
            ok = False
        if self.comm is not None:
            ok = self.comm.end_round(ok)
        if ok and weight > 0:
            self.inner.step()
            self.step_count += 1
            self._sync_step = self.step_count
        else:  # every member discards the step alike: the parameters stay equal
            logger.warning("step %d discarded: parameters unchanged", self.step_count)
        if self.comm is not None:
            self.comm.after_round(self._sync_step)
        self._after_sync(SyncInfo(sync_step=self._sync_step, inner_step=self.step_count,
                                  weight=weight if ok else 0.0, contributed=start.contribute,
                                  committed=ok and weight > 0))  # fmt: skip
        return loss

    def sync_grads(self) -> None:
        """Replace every ``.grad`` by its mean over the workers (no-op with one worker).

        Collective: every rank must call this with gradients on the same parameters.
        """
        self._sync_grads(True)

    def _sync_grads(self, contribute: bool) -> float:
        """:meth:`sync_grads`; returns the number of contributors (the mean's weight).

        On an elastic engine every bucket carries a contributor weight (sum, then divide by
        the summed weight), so a worker that sends weight 0 (``contribute=False``: it just
        healed) is left out of the mean.
        """
        parts = [
            (gi, ps, [p.grad for p in ps])
            for gi, g in enumerate(self.param_groups)
            if (ps := [p for p in g["params"] if p.grad is not None])
        ]
        bad = first_nonfinite(self.param_groups, parts)
        if bad is not None:
            raise FloatingPointError(
                f"gradient of group {bad[0]}, param {bad[1]} is non-finite at step "
                f"{self.step_count}; nothing was sent"
            )
        if self.comm is None or self.comm.world_size == 1:
            return 1.0
        weighted = self.comm.elastic
        # float32 buckets (float64 for float64 gradients), each one all_reduce, all in flight
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for _, _, gs in parts:
            for gr in gs:
                wide = torch.float64 if gr.dtype == torch.float64 else torch.float32
                by_dtype.setdefault(wide, []).append(gr)
        pending = []
        for wide in sorted(by_dtype, key=str):  # the same order on every rank
            grads = by_dtype[wide]
            for sl in split_buckets(grads, self.bucket_cap_mb):
                flat = torch.cat([gr.reshape(-1).to(wide) for gr in grads[sl]])
                if weighted:
                    w = torch.full((1,), float(contribute), dtype=wide, device=flat.device)
                    flat = torch.cat([flat * float(contribute), w])
                if weighted:
                    handle = self.comm.all_reduce(flat, "sum", async_op=True, tag=self.tag)
                else:
                    handle = self.comm.all_reduce(flat, "mean", async_op=True, tag=self.tag)
                assert isinstance(handle, Handle)  # internal invariant: async_op=True
                pending.append((grads[sl], handle))
        weight = float(self.comm.world_size)
        for bucket, handle in pending:
            mean = handle.wait()
            if weighted:  # one host read per bucket: the contributor count
                weight = float(mean[-1])
                mean = mean[:-1] / weight if weight > 0 else mean[:-1]
            off = 0
            for gr in bucket:
                gr.copy_(mean[off : off + gr.numel()].view_as(gr))
                off += gr.numel()
        return weight

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forward to the inner optimizer."""
        self.inner.zero_grad(set_to_none=set_to_none)

    # ---------------------------------------------------------------- state
    def _shapes(self) -> list[list[int]]:
        return [list(p.shape) for g in self.param_groups for p in g["params"]]

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state under ``inner``; step count and settings under ``thinwire``."""
        sd = super().state_dict()
        sd["inner"] = self.inner.state_dict()
        sd["thinwire"] = {
            "format": _FORMAT,
            "optimizer": type(self).__name__,
            "step": self.step_count,
            "sync_step": self._sync_step,
            "bucket_cap_mb": self.bucket_cap_mb,
            "shapes": self._shapes(),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a ``state_dict()``, after checking class, bucket size, groups and shapes.

        Raises:
            ValueError: the checkpoint is not a ``DataParallel`` one of this model (the message
                names the field and both values); nothing was changed.
        """
        sd = dict(state_dict)
        tw = sd.pop("thinwire", None)
        if not isinstance(tw, dict):
            raise ValueError("state_dict must hold a 'thinwire' entry (saved by DataParallel)")
        check_fields(tw, sd, (_FORMAT,), {_FORMAT: _FIELDS}, ("state", "param_groups", "inner"))
        check_setting("optimizer", type(self).__name__, tw["optimizer"])
        check_setting("bucket_cap_mb", self.bucket_cap_mb, tw["bucket_cap_mb"])
        check_groups(self.param_groups, sd["param_groups"], ())
        check_shapes(self.param_groups, tw["shapes"], sd["state"], ())
        inner_sd = sd.pop("inner")
        super().load_state_dict(sd)
        self.inner.load_state_dict(inner_sd)
        self.param_groups = self.inner.param_groups
        self.step_count = int(tw["step"])
        self._sync_step = int(tw["sync_step"])
