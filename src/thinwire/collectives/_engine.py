"""Algorithm layer shared by the in-process and ``torch.distributed`` communicators.

:class:`_CollectiveEngine` implements the public ops of
:class:`~thinwire.collectives.base.Communicator` (validation, the ``ring`` / ``direct`` /
``binomial`` algorithms, the ledger of :mod:`thinwire.collectives.accounting`, debug signatures and
the failure state that ``docs/design.md``, "Failures and timeouts", describes) over six transport
primitives that each engine supplies: ``_prim_allreduce`` (SUM or MAX, in place),
``_prim_allgather`` (equal-size tensors), ``_prim_alltoall`` (equal-size rows), ``_prim_exchange``
(point-to-point, variable sizes), ``_prim_broadcast`` (in place) and ``_prim_barrier``. A primitive
starts at once and returns a :class:`_Pending` whose ``wait(timeout)`` yields its result.

Ordering: phases before an op's last one (length exchanges) block at issue, and only the last
phase is asynchronous. Every rank therefore issues primitives in the
same order as it issues ops, whatever order it later waits in.

Untrusted lengths: ``all_gather_bytes`` checks every announced length against ``max_bytes``
before allocating anything of that size, and never returns bytes a peer did not send. A transport
whose all-gather cannot guarantee that (gloo copies each row out of an internal, uninitialised
buffer, and accepts a message shorter than the row) sets ``_RING_END_MARK``: every ring row then
ends with an 8-byte mark that a short row cannot carry (see ``_end_mark``).
"""

from __future__ import annotations

import logging
import struct
import time
import zlib
from collections.abc import Callable
from typing import Any

import torch

from thinwire._validate import check_choice, check_dtype, check_float, check_int, check_type
from thinwire.collectives import accounting as acct
from thinwire.collectives._rounds import StaticRounds
from thinwire.collectives.base import (
    ByteLedger,
    CommError,
    CommTimeout,
    Handle,
    OpRecord,
    OrderMismatch,
    PeerInfo,
    PeerLost,
    ReduceOpName,
)

__all__: list[str] = []  # private module: the engines re-export what users need

logger = logging.getLogger(__name__)

# Dtypes gloo reduces on CPU (PyTorch's ProcessGroupGloo.cpp); bool is broadcast-only.
REDUCE_DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.uint8,
    torch.int32,
    torch.int64,
)
BROADCAST_DTYPES = (*REDUCE_DTYPES, torch.bool)
# Half-precision sums are accumulated in float32, so they travel as float32.
_UPCAST = {torch.float16: torch.float32, torch.bfloat16: torch.float32}

# Debug signature (checks that every rank issues the same ops in the same order): op_seq, op code,
# crc32(tag), numel as four uint32 = 16 bytes.
_SIG = struct.Struct("<IIII")
_OP_CODES = {
    "all_reduce": 1,
    # code 2 is retired (its op no longer exists)
    "all_gather_bytes": 3,
    "broadcast": 4,
    "broadcast_bytes": 5,
    "control_max": 6,
    "all_gather_into_tensor": 7,
}
_OP_NAMES = {v: k for k, v in _OP_CODES.items()}

#: Default ``max_bytes`` of ``all_gather_bytes``: the longest payload a rank may announce (1 GiB).
DEFAULT_MAX_BYTES = 2**30

# Substrings of gloo/torch error messages, mapped to the CommError classes.
_TIMEOUT_HINTS = ("timed out", "timeout")
_LOST_HINTS = ("closed by peer", "connection reset", "broken pipe", "connection refused", "eof")


class _Pending:
    """A started primitive. ``wait(timeout)`` returns its result; ``done()`` never blocks."""

    def wait(self, timeout: float) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def done(self) -> bool:  # pragma: no cover - interface
        raise NotImplementedError


class _Ready(_Pending):
    """A primitive with nothing to move (``P == 1``, zero-length payloads)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def wait(self, timeout: float) -> Any:
        return self.value

    def done(self) -> bool:
        return True


def _payload_to_bytes(payload: Any) -> bytes:
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload)
    if isinstance(payload, torch.Tensor):
        flat = payload.detach().reshape(-1).contiguous().cpu()
        return flat.view(torch.uint8).numpy().tobytes()
    raise TypeError(
        f"payload must be bytes, bytearray, memoryview or Tensor, got {type(payload).__name__}"
    )


def _bytes_tensor(data: bytes, size: int, device: torch.device) -> torch.Tensor:
    """uint8 tensor of ``size`` bytes holding ``data`` then zero padding."""
    out = torch.zeros(size, dtype=torch.uint8)
    if data:
        out[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return out.to(device)


def _end_mark(seq: int, j: int, M: int, salt: int) -> bytes:
    """The 8 bytes that end rank ``j``'s ring row of op ``seq`` (rows of ``M`` payload bytes).

    Every rank computes the same mark for a row; it differs between ops, rows, row sizes and
    (through ``salt``) groups, so bytes left over from an earlier collective do not carry the
    mark of this one. A transport that delivers a short row leaves the mark unwritten.
    """
    body = struct.pack("<QQQ", seq, j, M)
    return struct.pack("<II", seq & 0xFFFFFFFF, zlib.crc32(body, salt & 0xFFFFFFFF))


def _ring_row(data: bytes, M: int, mark: bytes, device: torch.device) -> torch.Tensor:
    """``data``, zero padding up to ``M`` bytes, then ``mark``."""
    out = torch.zeros(M + len(mark), dtype=torch.uint8)
    if data:
        out[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if mark:
        out[M:] = torch.frombuffer(bytearray(mark), dtype=torch.uint8)
    return out.to(device)


def _tensor_bytes(t: torch.Tensor, n: int | None = None) -> bytes:
    flat = t.reshape(-1).cpu()
    return flat[: flat.numel() if n is None else n].numpy().tobytes()


def wrap_error(exc: BaseException, what: str) -> CommError:
    """Map a transport error onto the CommError hierarchy (the original is kept as ``__cause__``)."""
    if isinstance(exc, CommError):
        return exc
    msg = str(exc)
    low = msg.lower()
    if isinstance(exc, TimeoutError) or any(h in low for h in _TIMEOUT_HINTS):
        cls: type[CommError] = CommTimeout
    elif isinstance(exc, ConnectionError) or any(h in low for h in _LOST_HINTS):
        cls = PeerLost
    else:
        cls = CommError
    err = cls(f"{what} failed: {type(exc).__name__}: {msg}")
    err.__cause__ = exc
    return err


class _CollectiveEngine(StaticRounds):
    """Public ops over the transport primitives; subclasses set the attributes in ``_setup``."""

    # Bytes of the end mark appended to each ring row of ``all_gather_bytes`` (0 or 8): set by a
    # transport whose all-gather can hand back a row the peer did not fully send.
    _RING_END_MARK = 0
    # Mixed into the end mark so that rows of another group's op do not carry this group's mark.
    _mark_salt = 0

    rank: int
    world_size: int
    engine: str
    epoch: int
    ledger: ByteLedger
    timeout_s: float
    debug_checks: bool
    _device: torch.device

    def _setup(
        self, rank: int, world_size: int, engine: str, timeout_s: float, debug_checks: bool
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.engine = engine
        self.epoch = 0  # static membership: restart the job to change it
        self.ledger = ByteLedger()
        self.timeout_s = check_float("timeout_s", timeout_s, 0.0, lo_open=True)
        self.debug_checks = bool(check_type("debug_checks", debug_checks, bool))
        self.failed: CommError | None = None
        self.closed = False
        self._op_seq = 0

    # ----------------------------------------------------------------------------- primitives
    def _prim_allreduce(self, buf: torch.Tensor, op: str) -> _Pending:
        raise NotImplementedError

    def _prim_allgather(self, buf: torch.Tensor) -> _Pending:
        raise NotImplementedError

    def _prim_alltoall(self, rows: torch.Tensor) -> _Pending:
        raise NotImplementedError

    def _prim_exchange(
        self, sends: dict[int, torch.Tensor], recv_sizes: dict[int, int], tag: int
    ) -> _Pending:
        raise NotImplementedError

    def _prim_broadcast(self, buf: torch.Tensor, src: int) -> _Pending:
        raise NotImplementedError

    def _prim_barrier(self) -> _Pending:
        raise NotImplementedError

    # ------------------------------------------------------------------------------- plumbing
    def peers(self) -> list[PeerInfo]:
        """Every rank of the group (static membership)."""
        alive = self.failed is None and not self.closed
        return [PeerInfo(r, f"rank{r}", "", alive) for r in range(self.world_size)]

    @property
    def _group_ids(self) -> tuple[str, ...]:
        return tuple(f"rank{r}" for r in range(self.world_size))

    def _check_usable(self) -> None:
        if self.failed is not None:
            raise self.failed
        if self.closed:
            raise CommError(f"{self.engine} communicator (rank {self.rank}) is closed")

    def _run(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` (which talks to peers); an error goes to :meth:`_fail` and is raised."""
        self._check_usable()
        try:
            return fn()
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            err = wrap_error(exc, f"{self.engine} {what} on rank {self.rank}{self._where()}")
            self._fail(err)
            if err is exc:
                raise
            raise err from exc

    def _where(self) -> str:
        """Context appended to error messages after the rank (an elastic engine's round)."""
        return ""

    def _fail(self, err: CommError) -> None:
        """A static group's state is unknown after a broken collective: stay ``failed``."""
        self.failed = err
        logger.error("communicator failed: %s", err)

    def _timeout(self, timeout: float | None) -> float:
        return self.timeout_s if timeout is None else float(timeout)

    def _begin(self, op: str, tag: str, numel: int) -> tuple[int, tuple[int, int]]:
        """Count the op and, with ``debug_checks``, compare signatures (returns control bytes)."""
        seq = self._op_seq
        self._op_seq += 1
        if not self.debug_checks or self.world_size == 1:
            return seq, (0, 0)
        sig = _SIG.pack(
            seq & 0xFFFFFFFF, _OP_CODES[op], zlib.crc32(tag.encode()), numel & 0xFFFFFFFF
        )
        rows = self._prim_allgather(_bytes_tensor(sig, _SIG.size, self._device)).wait(
            self.timeout_s
        )
        mine = _SIG.unpack(sig)
        for j, row in enumerate(rows):
            other = _SIG.unpack(_tensor_bytes(row))
            if other != mine:
                raise OrderMismatch(
                    f"rank {self.rank} issued op #{seq} {op}(tag={tag!r}, numel={numel}) but rank "
                    f"{j} issued op #{other[0]} {_OP_NAMES.get(other[1], '?')}(tag crc32="
                    f"{other[2]:#010x}, numel={other[3]}); every rank must issue collectives in "
                    "the same order with the same tag"
                )
        # A fixed-size all-gather: no length header, so (P-1) * 16 bytes each way.
        ctl = (self.world_size - 1) * _SIG.size
        return seq, (ctl, ctl)

    def _record(
        self, op: str, algorithm: str, tag: str, ctl: tuple[int, int], **kw: Any
    ) -> OpRecord:
        rec = OpRecord(
            op=op,
            algorithm=algorithm,
            engine=self.engine,
            tag=tag,
            P=self.world_size,
            rank=self.rank,
            control_sent=ctl[0],
            control_recv=ctl[1],
            **kw,
        )
        return self.ledger.add(rec)

    def _finish(
        self,
        what: str,
        rec: OpRecord,
        pending: _Pending,
        post: Callable[[Any], Any],
        async_op: bool,
        t0: float,
    ) -> Any:
        """Wrap the last phase in a Handle; ``post`` runs once, inside ``wait()``."""

        def wait_fn(timeout: float | None) -> Any:
            value = self._run(what, lambda: post(pending.wait(self._timeout(timeout))))
            rec.t_real_s = time.perf_counter() - t0
            return value

        handle: Handle[Any] = Handle(rec, wait_fn, pending.done, group=self._group_ids)
        return handle if async_op else handle.wait()

    def _local(
        self, code: str, alg: str, tag: str, sig_numel: int, value: Any, async_op: bool, **kw: Any
    ) -> Any:
        """An op with nothing to move (``P == 1`` or empty): zero bytes, already complete."""
        op = code.split("[")[0]
        ctl = self._run(op, lambda: self._begin(code, tag, sig_numel)[1])
        rec = self._record(op, alg, tag, ctl, **kw)
        return Handle.completed(rec, value, group=self._group_ids) if async_op else value

    # ------------------------------------------------------------------------------------ ops
    def all_reduce(
        self,
        t: torch.Tensor,
        op: ReduceOpName = "mean",
        *,
        async_op: bool = False,
        tag: str = "",
    ) -> Handle[torch.Tensor] | torch.Tensor:
        """Reduce ``t`` in place across ranks (``ring``).

        Collective: every rank must call this, in the same order, with the same ``tag``.

        Args:
            t: tensor of a dtype gloo reduces (fp32/64, fp16, bf16, int8, uint8, int32, int64).
                fp16/bf16 are summed in a float32 copy (so they travel, and are counted, as
                4 bytes per element) and cast back.
            op: ``"mean"`` (SUM, then a local divide by ``P``; ReduceOp.AVG is never used) or
                ``"sum"``.
            async_op: return a :class:`Handle`; the divide/cast runs in ``wait()``.
            tag: label for the ledger and the debug signature.

        Returns:
            ``t`` (reduced), or a Handle whose ``wait()`` returns it.

        Raises:
            TypeError: ``mean`` on an integer tensor, unsupported dtype.
            CommError: transport failure (the communicator then stays ``failed``).
        """
        check_type("t", t, torch.Tensor)
        check_choice("op", op, ("mean", "sum"))
        check_type("tag", tag, str)
        check_dtype("t.dtype", t.dtype, REDUCE_DTYPES)
        if op == "mean" and not t.is_floating_point():
            raise TypeError(f"op must be in {{'sum'}} for integer tensors, got {op!r} ({t.dtype})")
        self._check_usable()
        t0 = time.perf_counter()
        P = self.world_size
        wire_dtype = _UPCAST.get(t.dtype, t.dtype)
        inplace = wire_dtype == t.dtype and t.is_contiguous() and t.device == self._device
        sent, recv = acct.ring_allreduce_bytes(t.numel(), wire_dtype.itemsize, P)
        fields = dict(
            numel=t.numel(),
            itemsize=wire_dtype.itemsize,
            payload_bytes=t.numel() * t.element_size(),
            sent=sent,
            recv=recv,
        )
        if P == 1 or t.numel() == 0:
            return self._local("all_reduce", "ring", tag, t.numel(), t, async_op, **fields)

        def issue() -> tuple[tuple[int, int], _Pending, torch.Tensor]:
            _, ctl = self._begin("all_reduce", tag, t.numel())
            with torch.no_grad():
                buf = (
                    t.detach() if inplace else t.detach().to(self._device, wire_dtype).contiguous()
                )
            return ctl, self._prim_allreduce(buf.view(-1), "sum"), buf

        ctl, pending, buf = self._run("all_reduce", issue)
        rec = self._record("all_reduce", "ring", tag, ctl, **fields)

        def post(_: Any) -> torch.Tensor:
            with torch.no_grad():
                if op == "mean":
                    buf.div_(P)
                if not inplace:
                    t.copy_(buf.view(t.shape))
            return t

        return self._finish("all_reduce", rec, pending, post, async_op, t0)

    def all_gather_bytes(
        self,
        payload: bytes | memoryview | torch.Tensor,
        *,
        algorithm: str = "auto",
        async_op: bool = False,
        tag: str = "",
        max_bytes: int | None = DEFAULT_MAX_BYTES,
    ) -> Handle[list[bytes | None]] | list[bytes | None]:
        """Gather one variable-length payload per rank; index ``j`` of the result is rank ``j``'s.

        Collective: every rank must call this. A length exchange (int64 per rank) runs first and
        blocks; ``ring`` then all-gathers payloads padded to the longest ``M``, ``direct`` sends
        each payload to every peer, ``auto`` picks ``ring`` iff all lengths are equal (the choice
        is stored in ``OpRecord.algorithm``). Ledger: ``accounting.allgather_*``.

        Peers are not trusted to tell the truth about lengths. Every rank checks every announced
        length, its own included, against ``[0, max_bytes]`` right after the length exchange,
        before it allocates anything of that size; a length outside raises :class:`CommError`
        naming the rank, the length and the cap. As for any peer error the communicator then
        stays ``failed``: the announcing rank may already be in the payload phase, so the ranks'
        streams of collectives are no longer in step. Pass the same ``max_bytes`` on every rank,
        or they disagree on whether to go on. The result never holds bytes a peer did not send:
        a rank's entry has exactly its announced length; ``direct`` receives into zeroed buffers,
        so a peer that sends fewer bytes than it announced (which point-to-point transports such
        as gloo accept) yields what it sent followed by zeros up to its announced length, and
        with ``ring`` an engine whose all-gather cannot tell (``TorchDistCommunicator``) ends each
        row with an 8-byte mark, counted as control bytes, and raises :class:`CommError` for a
        row that arrives without it. The in-process engine checks exact sizes.

        Args:
            payload: bytes-like, or a tensor (its raw bytes are sent).
            algorithm: ``"auto"``, ``"ring"`` or ``"direct"``.
            async_op: return a Handle; unpadding runs in ``wait()``.
            tag: label for the ledger and the debug signature.
            max_bytes: the longest payload any rank may announce (default
                ``DEFAULT_MAX_BYTES`` = 2**30, 1 GiB); ``None`` trusts every length.

        Raises:
            CommError: a length outside ``[0, max_bytes]``, a row without its end mark, a
                transport failure (the communicator then stays ``failed``).
        """
        check_choice("algorithm", algorithm, ("auto", "ring", "direct"))
        check_type("tag", tag, str)
        if max_bytes is not None:
            check_int("max_bytes", max_bytes, 0)
        data = _payload_to_bytes(payload)
        self._check_usable()
        t0 = time.perf_counter()
        P, r, m = self.world_size, self.rank, len(data)
        if P == 1:
            alg = "ring" if algorithm == "auto" else algorithm
            op = "all_gather_bytes"
            # Same rule as with peers, so a payload refused at P > 1 is refused here too.
            self._run(op, lambda: self._check_lengths([m], max_bytes))
            return self._local(op, alg, tag, 0, [data], async_op, payload_bytes=m, sizes=(m,))
        E = self._RING_END_MARK

        def issue() -> tuple[int, tuple[int, int], list[int], str, _Pending]:
            seq, ctl = self._begin("all_gather_bytes", tag, 0)
            lens = torch.tensor([m], dtype=torch.int64, device=self._device)
            sizes = [int(x.item()) for x in self._prim_allgather(lens).wait(self.timeout_s)]
            self._check_lengths(sizes, max_bytes)  # before anything of those sizes exists
            alg = algorithm
            if alg == "auto":
                alg = "ring" if len(set(sizes)) == 1 else "direct"
            M = max(sizes)
            if alg == "ring":
                mark = _end_mark(seq, r, M, self._mark_salt) if E else b""
                pending = (
                    self._prim_allgather(_ring_row(data, M, mark, self._device))
                    if M
                    else _Ready(None)
                )
                if M and E:
                    ctl = (ctl[0] + (P - 1) * E, ctl[1] + (P - 1) * E)
            else:
                buf = _bytes_tensor(data, m, self._device)
                sends = {j: buf for j in range(P) if j != r and m}
                need = {j: sizes[j] for j in range(P) if j != r and sizes[j]}
                pending = self._prim_exchange(sends, need, self._op_seq)
            return seq, ctl, sizes, alg, pending

        seq, ctl, sizes, alg, pending = self._run("all_gather_bytes", issue)
        if alg == "ring":
            sent, recv = acct.allgather_ring_bytes(sizes)
        else:
            sent, recv = acct.allgather_direct_bytes(sizes, r)
        rec = self._record(
            "all_gather_bytes",
            alg,
            tag,
            ctl,
            payload_bytes=m,
            sizes=tuple(sizes),
            sent=sent,
            recv=recv,
        )

        def post(got: Any) -> list[bytes | None]:
            if alg == "ring" and E and got is not None:
                self._check_end_marks(got, seq, sizes)
            out: list[bytes | None] = []
            for j in range(P):
                if j == r:
                    out.append(data)
                elif sizes[j] == 0:
                    out.append(b"")
                elif alg == "ring":
                    out.append(_tensor_bytes(got[j], sizes[j]))
                else:
                    out.append(_tensor_bytes(got[j]))
            return out

        return self._finish("all_gather_bytes", rec, pending, post, async_op, t0)

    def _check_lengths(self, sizes: list[int], max_bytes: int | None) -> None:
        """Raise :class:`CommError` for an announced length outside ``[0, max_bytes]``."""
        for j, n in enumerate(sizes):
            if n < 0 or (max_bytes is not None and n > max_bytes):
                cap = "inf" if max_bytes is None else str(max_bytes)
                raise CommError(
                    f"{self.engine} all_gather_bytes on rank {self.rank}: rank {j} announced a "
                    f"payload of {n} bytes, outside [0, {cap}] (max_bytes); refused before "
                    "allocating it"
                )

    def _check_end_marks(self, rows: list[torch.Tensor], seq: int, sizes: list[int]) -> None:
        """Raise :class:`CommError` if a peer's ring row does not end with its mark."""
        M, E = max(sizes), self._RING_END_MARK
        for j, row in enumerate(rows):
            if j == self.rank:
                continue
            tail = _tensor_bytes(row.reshape(-1)[M : M + E])
            if tail != _end_mark(seq, j, M, self._mark_salt):
                raise CommError(
                    f"{self.engine} all_gather_bytes on rank {self.rank}: rank {j}'s ring row "
                    f"({M} + {E} bytes, {sizes[j]} announced) arrived without its end mark: the "
                    "rank sent fewer bytes than the row holds, or another op's row; none of it "
                    "is returned"
                )

    def all_gather_into_tensor(
        self, t: torch.Tensor, *, async_op: bool = False, tag: str = ""
    ) -> Handle[torch.Tensor] | torch.Tensor:
        """Gather one equal-shape tensor per rank into a new ``(P, *t.shape)`` tensor (``ring``).

        Collective: every rank must call this with a tensor of the same shape and dtype. Sizes
        are known from the shape, so there is no length exchange: the bytes of ``t`` (viewed as
        uint8, any dtype) go straight to the transport's all-gather on the engine's device
        (CUDA with NCCL; never through host memory there). Row ``j`` of the result is rank
        ``j``'s tensor; the result is a new tensor on ``t.device``. Ledger:
        ``accounting.allgather_tensor_bytes`` ((P-1) * nbytes each way, no header).

        Args:
            t: tensor of any dtype; typically a 1-D uint8 payload.
            async_op: return a Handle; stacking the rows runs in ``wait()``. The transport reads
                ``t`` in place, so leave it unchanged until then.
            tag: label for the ledger and the debug signature.

        Returns:
            the gathered ``(P, *t.shape)`` tensor, or a Handle whose ``wait()`` returns it.
        """
        check_type("t", t, torch.Tensor)
        check_type("tag", tag, str)
        self._check_usable()
        t0 = time.perf_counter()
        P, nbytes = self.world_size, t.numel() * t.element_size()
        sent, recv = acct.allgather_tensor_bytes(nbytes, P)
        fields = dict(
            numel=t.numel(),
            itemsize=t.element_size(),
            payload_bytes=nbytes,
            sizes=(nbytes,) * P,
            sent=sent,
            recv=recv,
        )
        if P == 1:
            out = t.detach().clone(memory_format=torch.contiguous_format).unsqueeze(0)
            op = "all_gather_into_tensor"
            return self._local(op, "ring", tag, t.numel(), out, async_op, **fields)

        def issue() -> tuple[tuple[int, int], _Pending]:
            _, ctl = self._begin("all_gather_into_tensor", tag, t.numel())
            if not nbytes:
                return ctl, _Ready(None)
            # reshape copies only a non-contiguous t; the uint8 view moves any dtype as raw bytes
            buf = t.detach().to(self._device).reshape(-1).view(torch.uint8)
            return ctl, self._prim_allgather(buf)

        ctl, pending = self._run("all_gather_into_tensor", issue)
        rec = self._record("all_gather_into_tensor", "ring", tag, ctl, **fields)

        def post(rows: list[torch.Tensor] | None) -> torch.Tensor:
            if rows is None:  # nothing to move: an empty (P, *t.shape) result
                return torch.empty((P, *t.shape), dtype=t.dtype, device=t.device)
            out = torch.stack(rows)  # [P, nbytes] uint8
            return out.view(t.dtype).reshape(P, *t.shape).to(t.device)

        return self._finish("all_gather_into_tensor", rec, pending, post, async_op, t0)

    def broadcast(
        self, t: torch.Tensor, src: int = 0, *, async_op: bool = False, tag: str = ""
    ) -> Handle[torch.Tensor] | torch.Tensor:
        """Copy ``src``'s ``t`` into ``t`` on every rank (``binomial`` in the ledger).

        Collective: every rank must call this with the same ``src`` and a tensor of the same
        shape and dtype.
        """
        check_type("t", t, torch.Tensor)
        check_int("src", src, 0, self.world_size - 1)
        check_type("tag", tag, str)
        check_dtype("t.dtype", t.dtype, BROADCAST_DTYPES)
        self._check_usable()
        t0 = time.perf_counter()
        P, S = self.world_size, t.numel() * t.element_size()
        sent, recv = acct.broadcast_binomial_bytes(S, self.rank, src, P)
        fields = dict(
            numel=t.numel(),
            itemsize=t.element_size(),
            payload_bytes=S,
            src=src,
            sent=sent,
            recv=recv,
        )
        if P == 1:
            return self._local("broadcast", "binomial", tag, t.numel(), t, async_op, **fields)
        inplace = t.is_contiguous() and t.device == self._device

        def issue() -> tuple[tuple[int, int], _Pending, torch.Tensor]:
            _, ctl = self._begin("broadcast", tag, t.numel())
            buf = t.detach() if inplace else t.detach().to(self._device).contiguous()
            pending = self._prim_broadcast(buf.view(-1), src) if t.numel() else _Ready(None)
            return ctl, pending, buf

        ctl, pending, buf = self._run("broadcast", issue)
        rec = self._record("broadcast", "binomial", tag, ctl, **fields)

        def post(_: Any) -> torch.Tensor:
            if not inplace:
                with torch.no_grad():
                    t.copy_(buf)
            return t

        return self._finish("broadcast", rec, pending, post, async_op, t0)

    def broadcast_bytes(
        self, payload: bytes | None, src: int = 0, *, async_op: bool = False, tag: str = ""
    ) -> Handle[bytes] | bytes:
        """Send ``src``'s payload to every rank: an 8-byte length broadcast, then the bytes.

        Collective: every rank must call this. ``payload`` is read on ``src`` only (other ranks
        may pass None). The length phase blocks; the payload phase honours ``async_op``.
        """
        check_int("src", src, 0, self.world_size - 1)
        check_type("tag", tag, str)
        if self.rank == src:
            if payload is None:
                raise TypeError("payload must be bytes-like on the src rank, got None")
            data = _payload_to_bytes(payload)
        else:
            data = b""
        self._check_usable()
        t0 = time.perf_counter()
        P, r = self.world_size, self.rank
        if P == 1:
            op, n = "broadcast_bytes", len(data)
            kw = dict(payload_bytes=n, src=src, sizes=(n,))
            return self._local(op, "binomial", tag, 0, data, async_op, **kw)

        def issue() -> tuple[tuple[int, int], int, _Pending, torch.Tensor]:
            _, ctl = self._begin("broadcast_bytes", tag, 0)
            length = torch.tensor([len(data)], dtype=torch.int64, device=self._device)
            N = int(self._prim_broadcast(length, src).wait(self.timeout_s).item())
            buf = _bytes_tensor(data, N, self._device)
            return ctl, N, (self._prim_broadcast(buf, src) if N else _Ready(None)), buf

        ctl, N, pending, buf = self._run("broadcast_bytes", issue)
        sent, recv = acct.broadcast_payload_bytes(N, r, src, P)
        rec = self._record(
            "broadcast_bytes",
            "binomial",
            tag,
            ctl,
            payload_bytes=N,
            src=src,
            sizes=(N,),
            sent=sent,
            recv=recv,
        )

        def post(_: Any) -> bytes:
            return data if r == src else _tensor_bytes(buf)

        return self._finish("broadcast_bytes", rec, pending, post, async_op, t0)

    def control_max(self, values: list[float], *, tag: str = "") -> list[float]:
        """Element-wise MAX of a few float64 values across ranks, counted as control bytes only.

        Collective: every rank must call this with the same number of values. Ledger: ring
        all-reduce bytes of ``8 * len(values)`` in ``control_sent``/``control_recv``; payload
        ``sent``/``recv`` stay 0.
        """
        vals = [check_float(f"values[{i}]", v) for i, v in enumerate(values)]
        check_type("tag", tag, str)
        self._check_usable()
        t0 = time.perf_counter()
        P = self.world_size
        if P == 1 or not vals:
            op = "control_max"
            return self._local(op, "ring", tag, len(vals), vals, False, numel=len(vals), itemsize=8)
        cs, cr = acct.ring_allreduce_bytes(len(vals), 8, P)

        def issue() -> tuple[tuple[int, int], list[float]]:
            _, ctl = self._begin("control_max", tag, len(vals))
            buf = torch.tensor(vals, dtype=torch.float64, device=self._device)
            out = self._prim_allreduce(buf, "max").wait(self.timeout_s)
            return ctl, [float(x) for x in out.cpu().tolist()]

        ctl, out = self._run("control_max", issue)
        rec = self._record(
            "control_max", "ring", tag, (ctl[0] + cs, ctl[1] + cr), numel=len(vals), itemsize=8
        )
        rec.t_real_s = time.perf_counter() - t0
        return out

    def barrier(self, timeout: float | None = None) -> None:
        """Block until every rank arrives (no ledger record: nothing thinwire counts moves).

        Collective: every rank must call this.
        """
        if timeout is not None:
            check_float("timeout", timeout, 0.0, lo_open=True)
        self._check_usable()
        if self.world_size == 1:
            return
        self._run("barrier", lambda: self._prim_barrier().wait(self._timeout(timeout)))
