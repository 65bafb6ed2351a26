"""Sync hooks: what a caller may observe of an optimizer's syncs, without reading private state.

``torch.optim.Optimizer`` lets callers observe each ``step()`` through
``register_step_post_hook``. A low-communication optimizer has a second clock, its syncs (an
outer step of the DiLoCo family, every step of DeMo), and code around it — an RL learner that
versions its policy by the global model, a weight publisher, a logger of contributors — must
see exactly those. :class:`SyncHooks` gives every thinwire optimizer the same two public
pieces: ``register_sync_post_hook(hook)`` and the ``sync_step`` counter.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch.utils.hooks import RemovableHandle

__all__ = ["SyncInfo", "SyncHook", "SyncHooks"]


@dataclass(frozen=True)
class SyncInfo:
    """What one completed sync did, as a sync post-hook receives it.

    Attributes:
        sync_step: syncs completed so far, this one included (the optimizer's ``sync_step``).
        inner_step: ``step()`` calls so far when the sync was applied.
        fragment: the fragment synced (Streaming DiLoCo); 0 for one-fragment optimizers.
        weight: contributors the round's average was taken over (0: nobody contributed and
            the global model did not move).
        contributed: whether this worker's own update was part of the round.
        committed: whether the round was applied; False when the communicator could not
            commit it (a failed quorum, a round that formed no group) and it was discarded.
    """

    sync_step: int
    inner_step: int
    fragment: int = 0
    weight: float = 1.0
    contributed: bool = True
    committed: bool = True


SyncHook = Callable[[Any, SyncInfo], None]


class SyncHooks:
    """Mixin of every thinwire optimizer: sync post-hooks and the ``sync_step`` counter.

    A subclass keeps ``_sync_step`` current and calls :meth:`_after_sync` once per completed
    (or discarded) sync, after the global model and the local parameters have their new values.
    """

    _sync_step: int = 0

    @property
    def sync_step(self) -> int:
        """Syncs completed so far (outer steps for the DiLoCo family, steps for DeMo).

        Saved by ``state_dict()`` and restored by ``load_state_dict()``; equal on every worker
        that took part in the same rounds.
        """
        return self._sync_step

    def register_sync_post_hook(self, hook: SyncHook) -> RemovableHandle:
        """Register ``hook(optimizer, info)``, called after every sync, in registration order.

        Mirrors ``torch.optim.Optimizer.register_step_post_hook``: the hook runs after the
        sync's result has been applied (the parameters, and for the DiLoCo family the global
        copy θ_g, hold their new values), receives a :class:`SyncInfo` and must return None.
        It is also called for a round that was discarded (``info.committed`` False). Hooks are
        not saved by ``state_dict()``.

        Returns:
            A handle whose ``remove()`` unregisters the hook.

        Raises:
            TypeError: ``hook`` is not callable.
        """
        if not callable(hook):
            raise TypeError(f"hook must be callable (optimizer, SyncInfo) -> None, got {hook!r}")
        hooks = self._sync_hooks_dict()
        handle = RemovableHandle(hooks)
        hooks[handle.id] = hook
        return handle

    def _sync_hooks_dict(self) -> OrderedDict[int, SyncHook]:
        hooks = self.__dict__.get("_sync_post_hooks")
        if hooks is None:  # created lazily: also on optimizers unpickled from older objects
            hooks = OrderedDict()
            self.__dict__["_sync_post_hooks"] = hooks
        return hooks

    def _after_sync(self, info: SyncInfo) -> None:
        """Run every registered hook with ``info`` (the subclass has set ``_sync_step``)."""
        for hook in list(self._sync_hooks_dict().values()):
            result = hook(self, info)
            if result is not None:
                raise RuntimeError(
                    f"sync post-hook {hook!r} must return None, got {type(result).__name__}"
                )
