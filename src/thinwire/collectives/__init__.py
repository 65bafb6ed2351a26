"""Collectives: one communicator API over real engines, an exact byte ledger and a WAN model.

Engines: :class:`TorchDistCommunicator` (gloo on CPU,
NCCL on GPU, launched by ``torchrun``), :class:`HivemindCommunicator` (peers join and leave over a
DHT; hivemind is imported only when one is created), :class:`TorchftCommunicator` (replica groups
join, leave and heal through torchft's Lighthouse and Manager; torchft is imported only when one
is created) and :class:`InprocCommunicator` (ranks as
threads in one process, for fast tests; not a network engine). Every op records what it moved in
the communicator's :class:`ByteLedger`, by the formulas of :mod:`thinwire.collectives.accounting`.
:class:`WanCommunicator` wraps any of them with the WAN model (``docs/design.md``, "The WAN
model"; virtual clock or real sleeps).
"""

from __future__ import annotations

from typing import Any

from thinwire.collectives.base import (
    STEP_COUNTERS,
    AllPeersLeft,
    ByteLedger,
    CommError,
    CommTimeout,
    Communicator,
    GroupTooSmall,
    Handle,
    OpRecord,
    OrderMismatch,
    PeerInfo,
    PeerLost,
    RoundMismatch,
    RoundStart,
)
from thinwire.collectives.inproc import InprocCommunicator
from thinwire.collectives.netcheck import main as netcheck_main
from thinwire.collectives.netcheck import run_netcheck
from thinwire.collectives.torch_dist import TorchDistCommunicator
from thinwire.collectives.wan import (
    PRESETS,
    NodeLink,
    Preset,
    WanCommunicator,
    WanConfig,
    WanModel,
    suggest_timeout,
)

__all__ = [
    "AllPeersLeft",
    "ByteLedger",
    "CommError",
    "CommTimeout",
    "Communicator",
    "GroupTooSmall",
    "Handle",
    "HivemindCommunicator",
    "InprocCommunicator",
    "NodeLink",
    "OpRecord",
    "OrderMismatch",
    "PRESETS",
    "PeerInfo",
    "PeerLost",
    "Preset",
    "RoundMismatch",
    "RoundStart",
    "STEP_COUNTERS",
    "TorchDistCommunicator",
    "TorchftCommunicator",
    "WanCommunicator",
    "WanConfig",
    "WanModel",
    "netcheck_main",
    "run_netcheck",
    "suggest_timeout",
]


def __getattr__(name: str) -> Any:
    # hivemind is heavy and optional: load its engine module on first use only.
    if name == "HivemindCommunicator":
        from thinwire.collectives.hivemind import HivemindCommunicator

        return HivemindCommunicator
    if name == "TorchftCommunicator":  # torchft too: imported when one is created
        from thinwire.collectives.torchft import TorchftCommunicator

        return TorchftCommunicator
    raise AttributeError(f"module 'thinwire.collectives' has no attribute {name!r}")
