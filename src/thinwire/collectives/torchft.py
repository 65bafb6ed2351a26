"""The torchft engine: :class:`TorchftCommunicator`, collectives over a torchft ``Manager``'s quorum.

torchft (``pip install 'thinwire[torchft]'``, torchft 0.2.0) supplies membership: its Lighthouse
forms a quorum of replica groups before every sync, its ``Manager`` rebuilds a process group over
the quorum and heals members that fell behind. thinwire keeps everything else: the optimizer
(torchft's own ``DiLoCo``, ``torchft/local_sgd.py``, is not used) and the algorithms and byte
ledger of :mod:`thinwire.collectives._engine`, which run over the quorum's process group as
:class:`~thinwire.collectives.TorchDistCommunicator` runs over a ``torch.distributed`` group. The
class docstring says how quorum, healing and commit map onto the round API.
"""

from __future__ import annotations

import datetime
import importlib
import logging
import os
import socket
import struct
import time
import weakref
import zlib
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

import torch

from thinwire._validate import check_choice, check_float, check_int, check_type
from thinwire.collectives._engine import _CollectiveEngine, _Pending, wrap_error
from thinwire.collectives._rounds import INIT_SYNC_MODES
from thinwire.collectives.base import CommError, OpRecord, PeerInfo, RoundStart

__all__ = ["TorchftCommunicator"]

logger = logging.getLogger(__name__)

#: Ledger tag of the commit vote that ends every round (control bytes only).
VOTE_TAG = "torchft/commit"
#: Ledger tag of a state fetched from a live member (heal or first-round sync).
HEAL_TAG = "torchft/heal"
_STATE_KEY = "thinwire"  # key of thinwire's state in torchft's state dict
_LIGHTHOUSE_ENV = "TORCHFT_LIGHTHOUSE"  # where torchft's Manager looks without an address
# gloo message tag of the commit vote: above every op sequence number a round reaches. A vote
# message left unreceived by a failed round cannot reach a later vote: every failed commit makes
# the Lighthouse issue a new quorum id, and the group is rebuilt.
_VOTE_MSG_TAG = 2**31 - 1


def _import_torchft() -> ModuleType:
    """torchft, or an ImportError that names the extra to install."""
    try:
        return importlib.import_module("torchft")
    except ImportError as exc:
        raise ImportError(
            "TorchftCommunicator needs the torchft package (pip install 'thinwire[torchft]')"
        ) from exc


def _seconds(name: str, value: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=check_float(name, value, 0.0, lo_open=True))


def _state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def _first_difference(
    own: Mapping[str, torch.Tensor], theirs: Mapping[str, torch.Tensor]
) -> str | None:
    """Name of the first tensor (in ``own``'s order) that is not bitwise equal, else None."""
    for name, a in own.items():
        b = theirs.get(name)
        if b is None or a.dtype != b.dtype or a.shape != b.shape:
            return name
        ab = a.detach().reshape(-1).contiguous().view(torch.uint8)
        bb = b.detach().to(a.device).reshape(-1).contiguous().view(torch.uint8)
        if not torch.equal(ab, bb):
            return name
    extra = [k for k in theirs if k not in own]
    return extra[0] if extra else None


class _WorkPending(_Pending):
    """Work objects of one primitive on a torchft process group and the function reading its result."""

    def __init__(self, works: list[Any], result: Callable[[], Any]) -> None:
        self._works = works
        self._result = result

    def done(self) -> bool:
        try:
            return all(w.is_completed() for w in self._works)
        except (RuntimeError, NotImplementedError):  # a wrapper work without is_completed
            return False

    def wait(self, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        for w in self._works:
            left = max(deadline - time.monotonic(), 0.001)
            if w.wait(datetime.timedelta(seconds=left)) is False:
                raise CommError(f"a torchft process-group op did not complete within {timeout} s")
        return self._result()


class TorchftCommunicator(_CollectiveEngine):
    """thinwire's communicator over a torchft ``Manager`` and its reconfigurable process group.

    Replica groups join and leave between syncs; a failed round is discarded by the optimizer
    and the next one forms a new quorum; a restarted replica heals from a live one. One
    optimizer sync is one torchft step:

    * :meth:`begin_round` calls ``Manager.start_quorum()`` in torchft's synchronous quorum mode
      (``use_async_quorum=False``, the mode torchft's DiLoCo needs). The quorum's members become
      the round's group: ``rank`` and ``world_size`` change with it, and every op of the round
      runs over its process group (``torchft.ProcessGroupGloo`` on CPU,
      ``torchft.ProcessGroupNCCL`` on GPU). A member whose committed step is behind the quorum's
      highest heals inside that call: torchft fetches a live member's state over HTTP
      (``torchft/checkpointing/http_transport.py``) and hands it to the optimizer's ``set_state``
      (registered as torchft's ``load_state_dict`` callback). The live member's state is read
      while it waits in its own ``begin_round``, so it holds the global model, outer state and
      counters of the round both are about to run. The healed member takes part in that round
      with weight 0 (``RoundStart.contribute`` False): its inner steps started from a stale model.
    * An op that fails (a member died, an op timed out) is reported to the Manager and raised as
      :class:`CommError`; every later op of the round raises it at once. Nothing sticks: the next
      ``begin_round`` forms a new quorum, and torchft rebuilds the group when its members changed
      or a member failed to commit (the Lighthouse then issues a new quorum id).
    * :meth:`end_round` first runs a commit vote: each member sends every other member one byte
      saying whether the round completed on it, then ``Manager.should_commit()`` commits if this
      replica group saw no error and the quorum had at least ``min_replica_size`` members.
      torchft's ``should_commit`` agrees only among the ranks of one replica group
      (``torchft/manager.py``), so without the vote a member that died after sending its last
      bytes would leave the others committing a round it never finished; with it, a round is
      applied only if every member of its quorum was alive and done when the round ended.

    The first round (``agree_initial_state``) follows torchft's ``init_sync``: at the first
    quorum of a fresh run (every member at step 0) each member but the quorum's primary fetches
    the primary's state. A member whose state is bitwise equal keeps its own and contributes as
    usual, so identically seeded replicas lose nothing; otherwise ``"broadcast"`` loads it (weight
    0 in that round), ``"check"`` raises :class:`ValueError` naming the first tensor that
    differs, and ``"off"`` keeps its own. Nothing is sent when the optimizer is built; the global
    model does not change before the first sync.

    Bytes: every op is counted as :mod:`thinwire.collectives.accounting` defines it, at the group
    size of its round; the vote is ``P - 1`` control bytes each way (tag ``torchft/commit``). A
    fetched state is recorded on the member that fetched it as a ``fetch_state`` record (tag
    ``torchft/heal``, ``recv`` = the tensors' bytes, without torchft's HTTP and ``torch.save``
    framing); the serving member records nothing, as torchft does not say who fetched.

    Limitations: a restarted replica trains from its own start until its first sync, where the
    heal discards those steps. gloo reports a dead process only to the processes that wait on
    it, so a member that dies inside a ring op of a quorum larger than three can leave the
    others waiting up to ``timeout_s`` before the round fails (the vote is point to point: a
    death after the reductions is seen at once). A healed member adopts the live member's step
    counters inside ``begin_round``; the optimizer then joins the event the others launch (for
    Streaming DiLoCo, their fragment), not the one its own counters had chosen.

    This object creates the Manager, its process group and the TCPStore the Manager needs (one
    process per replica group), and shuts them down in :meth:`close`. Or pass ``manager`` and
    ``process_group`` you built yourself (several ranks per replica group, a custom checkpoint
    transport): the Manager must use ``use_async_quorum=False`` and be built with that process
    group; thinwire registers its state under the key ``"thinwire"`` and ``close()`` leaves both
    running.

    Before the first round ``rank`` is 0 and ``world_size`` is ``min_replica_size`` (what an
    optimizer's constructor-time checks, such as a trimmed mean's, see); ops raise
    :class:`CommError` until a round has started. From then on they are the quorum's.

    Timeouts: torchft's environment variables ``TORCHFT_TIMEOUT_SEC``,
    ``TORCHFT_QUORUM_TIMEOUT_SEC`` and ``TORCHFT_CONNECT_TIMEOUT_SEC`` override the values given
    here for the Manager (``torchft/manager.py``).

    Args:
        lighthouse_addr: the Lighthouse's address, e.g. ``"http://10.0.0.1:29510"`` (default: the
            ``TORCHFT_LIGHTHOUSE`` environment variable, as torchft reads it).
        replica_id: name of this replica group; torchft appends a fresh UUID, so a restarted
            replica is a new member, and orders ranks by it (default: a UUID alone).
        min_replica_size: fewest members a round may commit with (torchft's
            ``min_replica_size``; default 1). The Lighthouse's ``--min_replicas`` decides when a
            quorum forms at all.
        backend: ``"gloo"`` (CPU tensors) or ``"nccl"`` (CUDA; not exercised by the CPU test
            suite). Default ``"gloo"``.
        hostname: the name other replicas reach this one by, advertised for the Manager's
            server and its TCPStore, which listen on every interface (default
            ``socket.gethostname()``, torchft's default; torchft's checkpoint server advertises
            that name whatever is given here, so it must resolve to a reachable address on
            every replica).
        timeout_s: seconds an op, the commit RPC or a state fetch may take (default 60).
        quorum_timeout_s: seconds ``begin_round`` waits for a quorum (default 300). A replica
            that (re)joins waits for the others' next sync, so allow at least one round of
            inner steps.
        connect_timeout_s: seconds to connect to the Lighthouse and to other managers (default 30).
        heartbeat_interval_s: how often the Manager tells the Lighthouse it is alive (default
            0.1). A replica whose heartbeats stop for the Lighthouse's ``--heartbeat_timeout_ms``
            is left out of the next quorum.
        manager: a ``torchft.Manager`` to use instead of creating one (with ``process_group``).
        process_group: the torchft process group ``manager`` was built with.
        debug_checks: exchange op signatures and raise
            :class:`~thinwire.collectives.OrderMismatch` on divergence.

    Raises:
        ImportError: torchft is not installed.
        ValueError, TypeError: an argument outside its range, naming it.

    Example::

        comm = TorchftCommunicator("http://localhost:29510", replica_id="0", min_replica_size=2)
        opt = DiLoCo(model.parameters(), inner, sync_every=50, comm=comm)
    """

    elastic = True
    # gloo's all-gather can hand back a row its sender did not fully send: mark ring rows.
    _RING_END_MARK = 8

    def __init__(
        self,
        lighthouse_addr: str | None = None,
        *,
        replica_id: str | None = None,
        min_replica_size: int = 1,
        backend: str = "gloo",
        hostname: str | None = None,
        timeout_s: float = 60.0,
        quorum_timeout_s: float = 300.0,
        connect_timeout_s: float = 30.0,
        heartbeat_interval_s: float = 0.1,
        manager: Any = None,
        process_group: Any = None,
        debug_checks: bool = False,
    ) -> None:
        if lighthouse_addr is not None:
            check_type("lighthouse_addr", lighthouse_addr, str)
        if replica_id is not None:
            check_type("replica_id", replica_id, str)
        check_int("min_replica_size", min_replica_size, 1)
        check_choice("backend", backend, ("gloo", "nccl"))
        if hostname is not None:
            check_type("hostname", hostname, str)
        timeout = _seconds("timeout_s", timeout_s)
        quorum_timeout = _seconds("quorum_timeout_s", quorum_timeout_s)
        connect_timeout = _seconds("connect_timeout_s", connect_timeout_s)
        heartbeat = _seconds("heartbeat_interval_s", heartbeat_interval_s)
        if manager is None and lighthouse_addr is None and not os.environ.get(_LIGHTHOUSE_ENV):
            raise ValueError(
                f"lighthouse_addr must be given (or {_LIGHTHOUSE_ENV} set), e.g. "
                "'http://localhost:29510', got None"
            )
        if (manager is None) != (process_group is None):
            raise ValueError(
                "manager and process_group must be given together (the Manager's own process "
                f"group), got manager={type(manager).__name__}, "
                f"process_group={type(process_group).__name__}"
            )
        torchft = _import_torchft()
        self.quorum_timeout_s = float(quorum_timeout_s)
        self._owns = manager is None
        self._store: Any = None
        if manager is None:
            host = hostname if hostname is not None else socket.gethostname()
            # One process per replica group: its Manager needs a TCPStore of its own, which also
            # serves as the quorum's rendezvous when this replica is the quorum's primary.
            self._store = torch.distributed.TCPStore(
                host_name=host, port=0, is_master=True, wait_for_workers=False, timeout=timeout
            )
            if backend == "gloo":
                process_group = torchft.ProcessGroupGloo(timeout=timeout)
            else:
                process_group = torchft.ProcessGroupNCCL(timeout=timeout)
            try:
                manager = torchft.Manager(
                    pg=process_group,
                    load_state_dict=None,
                    state_dict=None,
                    min_replica_size=min_replica_size,
                    use_async_quorum=False,
                    timeout=timeout,
                    quorum_timeout=quorum_timeout,
                    connect_timeout=connect_timeout,
                    rank=0,
                    world_size=1,
                    store_addr=host,
                    store_port=self._store.port,
                    lighthouse_addr=lighthouse_addr,
                    replica_id=replica_id,
                    hostname=host,
                    heartbeat_interval=heartbeat,
                    init_sync=True,
                )
            except RuntimeError as exc:  # the Lighthouse is unreachable
                raise CommError(
                    f"could not start a torchft Manager against the Lighthouse at "
                    f"{lighthouse_addr or os.environ.get(_LIGHTHOUSE_ENV)} (connect_timeout_s="
                    f"{connect_timeout_s}): {exc}"
                ) from exc
        else:
            if not isinstance(manager, torchft.Manager):
                raise TypeError(f"manager must be a torchft.Manager, got {type(manager).__name__}")
            if getattr(manager, "_use_async_quorum", False):
                raise ValueError(
                    "manager must be built with use_async_quorum=False: a sync heals at its "
                    "quorum, before its collectives (torchft's DiLoCo needs the same mode), got "
                    "use_async_quorum=True"
                )
        self.manager = manager
        self._pg = process_group
        engine = str(process_group.getBackendName())  # "torchft-gloo" or "torchft-nccl"
        self._setup(0, min_replica_size, engine, float(timeout_s), debug_checks)
        if backend == "nccl" and self._owns:
            self._device = torch.device("cuda", torch.cuda.current_device())
        elif self._owns:
            self._device = torch.device("cpu")
        else:
            self._device = torch.device("cuda" if "nccl" in engine else "cpu")
            if self._device.type == "cuda":
                self._device = torch.device("cuda", torch.cuda.current_device())
        # Through a weak reference: the Manager holds its callbacks, and a communicator kept
        # alive by a cycle until interpreter shutdown would take its gloo group down with it then.
        me = weakref.ref(self)

        def load(state: Any) -> None:
            comm = me()
            if comm is not None:
                comm._load_from_peer(state)

        def serve() -> dict[str, torch.Tensor]:
            comm = me()
            if comm is None:
                raise RuntimeError("the TorchftCommunicator serving this state was closed")
            return comm._state_for_peer()

        manager.register_state_dict_fn(_STATE_KEY, load, serve)
        self._init_mode = "broadcast"
        self._quorum_ready = False  # a quorum has formed: ops have a group
        self._in_round = False
        self._round_error: CommError | None = None
        self._healed = False
        self._init_error: ValueError | None = None
        self._fetched: int | None = None
        logger.debug("TorchftCommunicator on %s (owns manager: %s)", engine, self._owns)

    # ------------------------------------------------------------------------------- rounds
    def agree_initial_state(self, mode: str = "broadcast", *, tag: str = "") -> None:
        """Set how the first quorum of a fresh run reconciles start states; sends nothing now.

        torchft's ``init_sync`` fetches the quorum primary's state at the first quorum of a
        fresh run (every member at step 0); ``mode`` says what a member does with it when it is
        not bitwise equal to its own: ``"broadcast"`` loads it (and contributes weight 0 to that
        first round), ``"check"`` raises :class:`ValueError` from that round's ``begin_round``
        naming the first tensor that differs, ``"off"`` keeps its own. ``tag`` is accepted for
        the protocol; the fetch is recorded under ``torchft/heal``.

        Raises:
            ValueError: ``mode`` is not one of them, or a Manager passed in was built with
                ``init_sync=False`` (it never fetches at step 0) and ``mode`` is not ``"off"``.
        """
        check_choice("mode", mode, INIT_SYNC_MODES)
        check_type("tag", tag, str)
        if mode != "off" and not getattr(self.manager, "_init_sync", True):
            raise ValueError(
                f"init_sync={mode!r} needs a torchft Manager built with init_sync=True (the "
                "first quorum then fetches the primary's state); use init_sync='off' with this one"
            )
        self._init_mode = mode

    def begin_round(self, round: int) -> RoundStart:
        """Form this sync's quorum (``Manager.start_quorum``) and heal from a live member if behind.

        Returns ``RoundStart(take_part=True, contribute=c, healed=h)``: every quorum member runs
        the round's collectives; ``h`` when this member's state was replaced by a live member's
        (``c`` is then False: its inner steps started from a stale global model), ``c`` also
        False when the heal failed (the round then fails on this member at ``end_round``).

        Collective: every member of the quorum calls it once per sync.

        Raises:
            CommError: no quorum formed within ``quorum_timeout_s``, or the group could not be
                built (the optimizer skips the round).
            ValueError: ``init_sync="check"`` and this member's start state differs from the
                primary's (names the tensor).
        """
        check_int("round", round, 0)
        if self.closed:
            raise CommError(f"{self.engine} communicator is closed")
        self._round_error = None
        self._in_round = False
        self._healed = False
        self._init_error = None
        self._fetched = None
        # Reads of this worker's state by torchft (serving a healing peer) are allowed again;
        # end_round forbids them while the optimizer changes that state.
        self.manager.allow_state_dict_read()
        timeout = datetime.timedelta(seconds=self.quorum_timeout_s)
        try:
            self.manager.start_quorum(allow_heal=True, timeout=timeout)
        except Exception as exc:
            # torchft 0.2.0 keeps a failed quorum's future and re-raises its error from every
            # later start_quorum (manager.py, start_quorum); drop it so the next round can try.
            self.manager._quorum_future = None
            raise CommError(
                f"{self.engine}: no quorum for round {round} within {self.quorum_timeout_s} s "
                f"(quorum_timeout_s): {type(exc).__name__}: {exc}"
            ) from exc
        try:
            rank, size = int(self._pg.parent.rank()), int(self._pg.size())
        except Exception as exc:  # the group could not be rebuilt for this quorum
            err = self.manager.errored() or exc
            # Fail this round's commit, so that the next quorum gets a new id and rebuilds it.
            self.manager.report_error(exc)
            self.manager.should_commit(datetime.timedelta(seconds=self.timeout_s))
            raise CommError(
                f"{self.engine}: the process group of round {round}'s quorum is unusable: {err}"
            ) from exc
        self.rank, self.world_size = rank, size
        # The quorum id (torchft 0.2.0 keeps it in a private attribute; it has no getter).
        self.epoch = int(getattr(self.manager, "_quorum_id", self.epoch))
        step = self.manager.current_step()  # equal on every member once healing is done
        self._mark_salt = zlib.crc32(struct.pack("<qqq", self.epoch, step, size))
        self._op_seq = 0  # every member numbers this round's ops from 0
        self._quorum_ready = True
        self._in_round = True
        if self._fetched is not None:
            self._record_fetch(self._fetched)
        if self._init_error is not None:
            raise self._init_error
        errored = self.manager.errored()
        if errored is not None:
            logger.warning("round %d: this member cannot contribute (%s)", round, errored)
        contribute = self.manager.is_participating() and not self._healed and errored is None
        return RoundStart(take_part=True, contribute=contribute, healed=self._healed)

    def after_round(self, round: int) -> None:
        """Nothing to do: torchft reads this worker's state only during a quorum, while the
        worker waits in :meth:`begin_round`, and the read is a copy."""

    def end_round(self, ok: bool) -> bool:
        """Vote on the round across the quorum, then ask torchft whether to commit it.

        ``ok``: the round completed on this worker. The vote (one byte to and from every other
        member, control bytes under ``torchft/commit``) fails the round for every member if any
        member did not complete it, or died before voting; ``Manager.should_commit`` then decides for this
        replica group (no error, at least ``min_replica_size`` members). True: apply the round.

        Collective: every member of the quorum calls it once per sync.

        Raises:
            CommError: this replica group's manager did not answer (``timeout_s``), or torchft
                gave up after its ``max_retries`` failed commits.
        """
        if not self._in_round:
            return False
        self._in_round = False
        agreed = self._vote(bool(ok) and self._round_error is None)
        if not agreed and self.manager.errored() is None:
            self.manager.report_error(
                CommError("the round did not complete on every member of its quorum")
            )
        try:
            committed = bool(self.manager.should_commit(datetime.timedelta(seconds=self.timeout_s)))
        except Exception as exc:
            raise CommError(f"{self.engine} should_commit failed: {exc}") from exc
        finally:
            # The optimizer now changes its state: keep torchft from reading it meanwhile.
            self.manager.disallow_state_dict_read()
        if not committed:
            logger.warning(
                "round not committed (vote %s, errored %s)", agreed, self.manager.errored()
            )
        return committed

    def _vote(self, done: bool) -> bool:
        """True if every member of the round's group says it completed the round.

        Each member sends one byte (0: done) to every other member and posts a receive from
        every other one, point to point. So every member waits on every other directly: a dead
        member fails each receive from it at once (gloo reports a closed connection only to the
        processes that wait on it, so a ring op would leave some members waiting out their
        timeout), and a member whose round failed still sends its 1. Counted as control bytes:
        ``P - 1`` each way.
        """
        if self.closed or not self._quorum_ready:
            return False
        P, r = self.world_size, self.rank
        flag = torch.tensor([0 if done else 1], dtype=torch.uint8, device=self._device)
        others = [j for j in range(P) if j != r]
        try:
            got = (
                self._prim_exchange(
                    dict.fromkeys(others, flag), dict.fromkeys(others, 1), _VOTE_MSG_TAG
                ).wait(self.timeout_s)
                if others
                else {}
            )
            agreed = done and all(int(got[j][0]) == 0 for j in others)
        except Exception as exc:
            err = wrap_error(exc, f"{self.engine} commit vote on rank {r} of quorum {self.epoch}")
            self._round_error = self._round_error or err
            self.manager.report_error(err)
            logger.warning("%s", err)
            agreed = False
        self.ledger.add(
            OpRecord(
                op="vote",
                algorithm="direct",
                engine=self.engine,
                tag=VOTE_TAG,
                P=P,
                rank=r,
                control_sent=P - 1,
                control_recv=P - 1,
            )
        )
        return agreed

    # ----------------------------------------------------------------- state for torchft
    def _state_for_peer(self) -> dict[str, torch.Tensor]:
        """torchft's ``state_dict`` callback: a copy of the attached global state (quorum thread)."""
        get_state, _ = self._attached("serving a healing peer")
        # A host copy: torchft's HTTP server sends it after this call returns, and it moves
        # device tensors to the host anyway (torchft/checkpointing/http_transport.py).
        return {k: v.detach().to("cpu", copy=True) for k, v in get_state().items()}

    def _load_from_peer(self, state: Any) -> None:
        """torchft's ``load_state_dict`` callback, called inside ``start_quorum`` when healing.

        Never raises into torchft: a state that does not fit is reported to the Manager (the
        round then fails on this member only) and the first-round check's error is raised by
        :meth:`begin_round`.
        """
        try:
            get_state, set_state = self._attached("healing from a peer")
            if not isinstance(state, Mapping) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
            ):
                raise ValueError(
                    f"a peer's state must map names to tensors, got {type(state).__name__}"
                )
            self._fetched = _state_bytes(state)
            own = get_state()
            differs = _first_difference(own, state)
            if differs is None:
                return  # bitwise what this worker holds: keep it (and its own update)
            if self.manager.current_step() == 0:  # torchft's init_sync fetch of a fresh run
                if self._init_mode == "off":
                    return
                if self._init_mode == "check":
                    self._init_error = ValueError(
                        f"init_sync='check': {differs} differs from the state of the first "
                        "quorum's primary replica; start every replica from the same weights "
                        "(seed the model identically, or load one checkpoint), or use "
                        "init_sync='broadcast' to take the primary's"
                    )
                    return
            set_state(dict(state))
            self._healed = True
            logger.info("healed from a live member (step %d)", self.manager.current_step())
        except Exception as exc:
            self.manager.report_error(exc)
            logger.error("could not load a live member's state: %s", exc)

    def _record_fetch(self, nbytes: int) -> None:
        self.ledger.add(
            OpRecord(
                op="fetch_state",
                algorithm="http",
                engine=self.engine,
                tag=HEAL_TAG,
                P=self.world_size,
                rank=self.rank,
                payload_bytes=nbytes,
                recv=nbytes,
            )
        )

    # ----------------------------------------------------------------------------- plumbing
    def peers(self) -> list[PeerInfo]:
        """The members of the current quorum (empty before the first round)."""
        if not self._quorum_ready:
            return []
        alive = not self.closed
        return [
            PeerInfo(r, f"quorum{self.epoch}/rank{r}", "", alive) for r in range(self.world_size)
        ]

    @property
    def _group_ids(self) -> tuple[str, ...]:
        return tuple(f"quorum{self.epoch}/rank{r}" for r in range(self.world_size))

    def _check_usable(self) -> None:
        if self.closed:
            raise CommError(f"{self.engine} communicator (rank {self.rank}) is closed")
        if not self._quorum_ready:
            raise CommError(
                f"{self.engine}: no round has started yet; ops need a quorum (begin_round)"
            )
        if self._round_error is not None:
            raise self._round_error

    def _where(self) -> str:
        return f" of quorum {self.epoch}"

    def _fail(self, err: CommError) -> None:
        """An error fails this round only (the Manager hears of it), not the object."""
        self._round_error = err
        self.manager.report_error(err)
        logger.warning("round failed on this member: %s", err)

    # ---------------------------------------------------------------------------- transport
    def _prim_allreduce(self, buf: torch.Tensor, op: str) -> _Pending:
        from torch.distributed.distributed_c10d import AllreduceOptions, ReduceOp

        opts = AllreduceOptions()
        opts.reduceOp = ReduceOp(ReduceOp.SUM if op == "sum" else ReduceOp.MAX)
        return _WorkPending([self._pg.allreduce([buf], opts)], lambda: buf)

    def _prim_allgather(self, buf: torch.Tensor) -> _Pending:
        from torch.distributed.distributed_c10d import AllgatherOptions

        outs = [torch.empty_like(buf) for _ in range(self.world_size)]
        work = self._pg.allgather([outs], [buf], AllgatherOptions())
        return _WorkPending([work], lambda: outs)

    def _prim_alltoall(self, rows: torch.Tensor) -> _Pending:
        from torch.distributed.distributed_c10d import AllToAllOptions

        out = torch.zeros_like(rows)  # written in place: a short message leaves zeros
        work = self._pg.alltoall_base(out, rows, [], [], AllToAllOptions())
        return _WorkPending([work], lambda: out)

    def _prim_exchange(
        self, sends: dict[int, torch.Tensor], recv_sizes: dict[int, int], tag: int
    ) -> _Pending:
        # As in TorchDistCommunicator: messages are matched by (peer, tag = op sequence number),
        # and receive buffers start zeroed, so bytes a peer did not send read as zeros. Ranks are
        # the quorum group's own.
        tag = tag % 2**31
        got = {
            j: torch.zeros(n, dtype=torch.uint8, device=self._device) for j, n in recv_sizes.items()
        }
        works = [self._pg.recv([buf], j, tag) for j, buf in got.items()]
        works += [self._pg.send([buf], j, tag) for j, buf in sends.items()]
        return _WorkPending(works, lambda: got)

    def _prim_broadcast(self, buf: torch.Tensor, src: int) -> _Pending:
        from torch.distributed.distributed_c10d import BroadcastOptions

        opts = BroadcastOptions()
        opts.rootRank = src
        opts.rootTensor = 0
        return _WorkPending([self._pg.broadcast([buf], opts)], lambda: buf)

    def _prim_barrier(self) -> _Pending:
        from torch.distributed.distributed_c10d import BarrierOptions

        return _WorkPending([self._pg.barrier(BarrierOptions())], lambda: None)

    def close(self) -> None:
        """Leave the run: shut down the Manager (its Lighthouse heartbeats stop, so the next
        quorum forms without this replica), its process group and TCPStore, if this object
        created them. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self._in_round = False
        if not self._owns:
            return
        try:
            self.manager.shutdown(wait=True)
        finally:
            try:
                self._pg.abort(errored=False)  # drops the gloo group it holds
            finally:
                self._store = None
