"""State helpers shared by thinwire optimizers: state-dict loading and checks, in-flight work.

``torch.optim.Optimizer.load_state_dict`` casts every floating state tensor to its parameter's
dtype (``_process_value_according_to_param_policy``, called as ``Optimizer._...`` so a subclass
cannot override it). thinwire keeps some state wider than the parameter on purpose — float32
θ_g, error-feedback and momentum buffers for bf16 models — so those keys are put back at full
width after the base class has loaded.

It also holds the checks ``load_state_dict`` runs before it changes anything: a checkpoint whose
settings differ from the optimizer's would otherwise be loaded silently (``torch.optim`` copies
the saved group settings over the constructor's), and the run would continue with other
numerics than the ones the optimizer was built with.

Sharded parameters (FSDP2's ``fully_shard``, or any ``torch.distributed.tensor.DTensor``): the
optimizers keep their per-parameter state as DTensors laid out like the parameter, so that
``torch.distributed.checkpoint`` saves it sharded, while everything that crosses a communicator
is the plain local shard. :func:`local` and :func:`like` convert between the two at those few
boundaries.
"""

from __future__ import annotations

import atexit
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from thinwire.collectives import STEP_COUNTERS

__all__: list[str] = []

#: Values of the optimizers' ``init_sync`` (see ``Communicator.agree_initial_state``).
INIT_SYNC_MODES = ("broadcast", "check", "off")

logger = logging.getLogger(__name__)

if torch.distributed.is_available():
    from torch.distributed.tensor import DTensor

    _SHARDED: tuple[type, ...] = (DTensor,)
else:  # a torch build without torch.distributed has no DTensor, so no sharded parameter
    _SHARDED = ()


def local(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor ``t`` holds on this rank: a DTensor's local shard, else ``t`` itself.

    The shard shares ``t``'s storage (in-place writes reach ``t``) and is detached from
    autograd. Communicators, codecs and digests only ever see such plain tensors: a DTensor
    operation there would run collectives of its own over the parameter's mesh.
    """
    if isinstance(t, _SHARDED):
        return t.detach().to_local()  # type: ignore[attr-defined]
    return t


def like(ref: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The plain tensor ``t`` (of ``ref``'s local shape) laid out as ``ref``.

    For a DTensor ``ref``: a DTensor over ``t`` (no copy) with ``ref``'s mesh, placements,
    global shape and stride (passed explicitly: uneven shards would otherwise be given a wrong
    global shape); for a plain ``ref``: ``t``.
    """
    if isinstance(ref, _SHARDED):
        return DTensor.from_local(
            t,
            ref.device_mesh,  # type: ignore[attr-defined]
            ref.placements,  # type: ignore[attr-defined]
            run_check=False,
            shape=ref.shape,
            stride=ref.stride(),
        )
    return t


def load_keeping_width(
    opt: torch.optim.Optimizer,
    load: Callable[[dict[str, Any]], None],
    state_dict: dict[str, Any],
    params: list[torch.Tensor],
    keys: Iterable[str],
) -> None:
    """Run the base ``load(state_dict)`` of ``opt``, then restore ``keys`` at their saved dtype.

    ``params`` are in the order the base class numbers them (groups, then params in a group).
    Tensors that existed before the load are updated in place, so objects that hold references
    (an outer optimizer over θ_g) keep seeing them.
    """
    keys = tuple(keys)
    saved = {
        int(i): {k: v for k, v in st.items() if k in keys and isinstance(v, torch.Tensor)}
        for i, st in state_dict["state"].items()
    }
    before = {
        i: {k: opt.state[p][k] for k in keys if k in opt.state.get(p, {})}
        for i, p in enumerate(params)
    }
    load(state_dict)  # replaces opt.state with a new mapping
    for i, p in enumerate(params):
        st = opt.state[p]
        for k, v in saved.get(i, {}).items():
            old = before[i].get(k)
            if old is not None and old.shape == v.shape and old.dtype == v.dtype:
                old.copy_(v)
                st[k] = old
            else:
                st[k] = v.detach().to(device=p.device, copy=True)


def check_fields(
    tw: Mapping[str, Any],
    sd: Mapping[str, Any],
    formats: Sequence[int],
    fields: Mapping[int, Sequence[str]],
    top: Sequence[str],
) -> None:
    """The checkpoint's ``thinwire`` entry has a known format and that format's fields, and the
    state dict its top-level fields; else ``ValueError`` naming what is missing."""
    if tw.get("format") not in formats:
        raise ValueError(
            f"state_dict format must be in {{{', '.join(map(str, formats))}}}, "
            f"got {tw.get('format')!r}"
        )
    for key in fields[tw["format"]]:
        if key not in tw:
            raise ValueError(f"state_dict['thinwire'] is missing field {key!r}")
    for key in top:
        if key not in sd:
            raise ValueError(f"state_dict is missing field {key!r}")


def check_setting(name: str, mine: Any, theirs: Any) -> None:
    """Raise ``ValueError`` unless the checkpoint's ``theirs`` equals the optimizer's ``mine``."""
    if mine != theirs:
        raise ValueError(
            f"state_dict {name} must be {mine!r}, got {theirs!r} (optimizer vs checkpoint; "
            "build the optimizer with the checkpoint's settings to resume)"
        )


def check_groups(
    groups: Sequence[Mapping[str, Any]],
    saved: Any,
    keys: Iterable[str],
    same: Callable[[str, Any, Any], bool] | None = None,
) -> None:
    """The saved param groups match the optimizer's: count, sizes and the settings ``keys``.

    ``same(key, mine, theirs)`` compares one setting (default ``==``); a key a group does not
    hold (an older checkpoint) is not compared.
    """
    if not isinstance(saved, list | tuple):
        raise ValueError(f"state_dict['param_groups'] must be a list, got {type(saved).__name__}")
    check_setting("number of param groups", len(groups), len(saved))
    keys = tuple(keys)
    for gi, (g, sg) in enumerate(zip(groups, saved, strict=True)):
        check_setting(f"size of param group {gi}", len(g["params"]), len(sg["params"]))
        for k in keys:
            if k not in g or k not in sg:
                continue
            equal = same(k, g[k], sg[k]) if same is not None else g[k] == sg[k]
            if not equal:
                check_setting(f"{k} of param group {gi}", g[k], sg[k])


def check_shapes(
    groups: Sequence[Mapping[str, Any]],
    saved_shapes: Sequence[Sequence[int]] | None,
    saved_state: Mapping[Any, Mapping[str, Any]],
    keys: Iterable[str],
) -> None:
    """Every parameter's shape matches the checkpoint's.

    ``saved_shapes`` (in ``state_dict`` order) when the checkpoint records them, else the shape
    of the first per-param state tensor among ``keys`` (older checkpoints; a parameter without
    such state cannot be checked).
    """
    keys = tuple(keys)
    state = {int(i): st for i, st in saved_state.items()}
    i = 0
    for gi, g in enumerate(groups):
        for j, p in enumerate(g["params"]):
            got: tuple[int, ...] | None = None
            if saved_shapes is not None:
                got = tuple(int(n) for n in saved_shapes[i])
            else:
                for k in keys:
                    t = state.get(i, {}).get(k)
                    if isinstance(t, torch.Tensor):
                        got = tuple(t.shape)
                        break
            if got is not None:
                check_setting(f"shape of param {j} of group {gi}", tuple(p.shape), got)
            i += 1


def params_and_step(groups: Sequence[Mapping[str, Any]], step: int) -> dict[str, torch.Tensor]:
    """A joiner's global state for optimizers whose parameters are equal on every worker after
    each sync (DDP, DeMo): the parameters by ``"group G param J"`` and the step counter under
    ``STEP_COUNTERS`` (the key the communicators leave out of their state digests)."""
    out: dict[str, torch.Tensor] = {
        f"group {gi} param {j}": p.detach()
        for gi, g in enumerate(groups)
        for j, p in enumerate(g["params"])
    }
    out[STEP_COUNTERS] = torch.tensor([step], dtype=torch.int64)
    return out


def check_params_and_step(state: Mapping[str, Any], mine: Mapping[str, torch.Tensor]) -> int:
    """Check a peer's :func:`params_and_step` against this optimizer's before anything changes
    (a peer may be faulty or hostile) and return its step.

    Raises:
        ValueError: other names, shapes or dtypes than ``mine``, non-finite values, a negative
            step.
    """
    if set(state) != set(mine):
        extra = sorted(set(state) - set(mine)) or sorted(set(mine) - set(state))
        raise ValueError(f"global state does not fit this optimizer: {extra[0]!r}")
    for key, v in state.items():
        want = mine[key]
        if not isinstance(v, torch.Tensor) or v.shape != want.shape or v.dtype != want.dtype:
            raise ValueError(
                f"global state {key!r} must be {want.dtype} of shape {tuple(want.shape)}, "
                f"got {v!r:.60}"
            )
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ValueError(f"global state {key!r} holds non-finite values")
    step = int(state[STEP_COUNTERS][0])
    if step < 0:
        raise ValueError(f"global state 'step counters' must be >= 0, got {step}")
    return step


# ------------------------------------------------------------------ in-flight work at exit
# Boxes holding work in flight, held strongly: an optimizer dropped (or a function returned)
# with a reduction running must still have it waited for before the process exits.
_PENDING: set[InflightWork] = set()
_EXIT_HOOK = False


class InflightWork:
    """The reductions an optimizer has launched and not yet waited for.

    A process that exits while a ``torch.distributed`` collective is still running aborts in
    the backend's threads ("terminate called without an active exception"). Each optimizer
    keeps its launched reductions here; ``close()`` waits for them, and one ``atexit`` hook
    waits for every box that still holds some at interpreter exit, also the boxes of
    optimizers already garbage collected (a box with work in flight is registered strongly
    until that work has been waited for).
    """

    def __init__(self) -> None:
        self.pending: list[Any] = []

    def track(self, pending: Iterable[Any]) -> None:
        """Remember the ``PendingReduce`` objects of a launch (None entries are skipped)."""
        global _EXIT_HOOK
        self.pending.extend(p for p in pending if p is not None)
        if self.pending:
            _PENDING.add(self)
            if not _EXIT_HOOK:
                atexit.register(_drain_at_exit)
                _EXIT_HOOK = True

    def clear(self) -> None:
        """Forget everything (the owner has waited for it)."""
        self.pending = []
        _PENDING.discard(self)

    def drain(self, *, at_exit: bool = False) -> None:
        """Wait for every tracked reduction; results stay cached in each ``PendingReduce``.

        Each wait is bounded by the communicator's timeout (a dead peer raises there). At
        exit (``at_exit``) a failure is logged, never raised.
        """
        pending = self.pending
        self.clear()
        for p in pending:
            try:
                p.result()
            except Exception as exc:
                if not at_exit:
                    raise
                logger.warning("a reduction in flight at exit failed: %s", exc)


def _drain_at_exit() -> None:
    for work in list(_PENDING):
        work.drain(at_exit=True)
