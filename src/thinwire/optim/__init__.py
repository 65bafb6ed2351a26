"""Drop-in low-communication optimizers, used exactly like ``torch.optim`` optimizers.

* :class:`DiLoCo` (arXiv:2311.08105) and :class:`LocalSGD` — inner optimizer for H steps, then an
  outer step on the averaged pseudo-gradient;
* :class:`StreamingDiLoCo` (arXiv:2501.18512) — fragments synced in turn, overlapped with training;
* :class:`SparseLoCo` (arXiv:2508.15706) — top-k of an error-feedback buffer, 2-bit values;
* :class:`DeMo` (arXiv:2411.19870) — only the fast DCT components of momentum cross the wire
  (``values="sign"`` is Psyche's 1-bit DisTrO);
* :class:`DataParallel` — the baseline: fp32 gradients averaged every step, then the inner step.

:data:`METHODS` is the one table of methods (each a :class:`Method`: optimizer class and tuned
settings) and :func:`build_optimizer` the one factory that the benchmark, the RL learners and
the examples build their optimizers with.

Every one takes a ``comm`` (:mod:`thinwire.collectives`) and an optional ``compressor`` setting
(:func:`thinwire.compression.build_codec`). Their update rules are free functions in
:mod:`thinwire.optim.functional` (:func:`diloco_outer_step`, :func:`demo_update`), as
``torch.optim`` splits each optimizer into a class and a functional form. Code around an
optimizer observes its syncs through ``register_sync_post_hook`` and ``sync_step`` (each hook
receives a :class:`SyncInfo`), as ``torch.optim`` exposes ``register_step_post_hook``; every one
is a :class:`SyncHooks`.
"""

from __future__ import annotations

from thinwire.optim._hooks import SyncHooks, SyncInfo
from thinwire.optim.data_parallel import DataParallel
from thinwire.optim.demo import DeMo, demo_compressor
from thinwire.optim.diloco import DiLoCo, LocalSGD
from thinwire.optim.functional import demo_update, diloco_outer_step
from thinwire.optim.methods import (
    DEFAULT_METHODS,
    INNER_LR,
    METHODS,
    Method,
    build_optimizer,
    inner_adamw,
)
from thinwire.optim.sparseloco import SparseLoCo, sparseloco_compressor
from thinwire.optim.streaming import StreamingDiLoCo

__all__ = [
    "DEFAULT_METHODS",
    "DataParallel",
    "DeMo",
    "DiLoCo",
    "INNER_LR",
    "LocalSGD",
    "METHODS",
    "Method",
    "SparseLoCo",
    "StreamingDiLoCo",
    "SyncHooks",
    "SyncInfo",
    "build_optimizer",
    "demo_compressor",
    "demo_update",
    "diloco_outer_step",
    "inner_adamw",
    "sparseloco_compressor",
]
