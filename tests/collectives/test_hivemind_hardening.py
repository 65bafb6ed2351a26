"""Hostile-peer tests of :class:`thinwire.collectives.hivemind.HivemindCommunicator`.

Every peer is a real communicator on 127.0.0.1 (its own DHT process, p2p daemon and averagers),
as in ``test_hivemind.py``. A hostile peer is a real peer whose behaviour the test changes through
hivemind's own APIs: it joins a gather round with metadata of its choosing (``_form_group``) and
answers fetches with a handler of its own (``P2P.add_protobuf_handler``), or it is a bare
``hivemind.DHT`` that writes forged membership records. Oracles: the handler's request count, the
payloads themselves, the DHT table the honest peers read, the listening sockets in
``/proc/net/tcp``, and bitwise equality across peers.

Figures the review measured before these fixes (one-off runs of the same scenarios): a
``len = 2**40`` announcement grew an honest peer by ~200 MB/s; one chunk per 4 s held
``all_gather_bytes`` past 60 s; 30 gathers of 4 MB left 120 MB served per peer; a dead peer with
``expected_world_size`` cost every later round its full ``round_wait_timeout``.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import struct
import threading
import time

import pytest
import torch
from test_hivemind import (  # noqa: F401  (_reap_children: the session-wide reaper fixture)
    KW,
    _close,
    _descendants,
    _inputs,
    _kill,
    _mean64,
    _reap_children,
    _swarm,
    _together,
)

from thinwire.collectives.hivemind import HivemindCommunicator

CHUNK = 2**19  # the engine's fetch chunk (hivemind's DEFAULT_PART_SIZE_BYTES)


def _served_bytes(comm: HivemindCommunicator) -> int:
    return comm._table.nbytes()


def _serve_with(comm: HivemindCommunicator, handler) -> None:
    """Replace ``comm``'s fetch handler by ``handler`` (an async generator function)."""
    from hivemind.proto import runtime_pb2

    async def swap() -> None:
        await comm._p2p.remove_protobuf_handler(comm._fetch_name, stream_output=True)
        await comm._p2p.add_protobuf_handler(
            comm._fetch_name, handler, runtime_pb2.ExpertRequest, stream_output=True
        )

    comm._on_loop(swap(), 10.0)


def _join_with(comm: HivemindCommunicator, tag: str, rid: int, meta: dict) -> threading.Thread:
    """``comm`` joins round ``rid`` of ``tag`` announcing ``meta`` (in a thread), fetches nothing."""

    def run() -> None:
        try:
            comm._form_group(comm._gather_slot(tag), tag, rid, meta)
        except Exception:  # the honest side's outcome is what the tests assert
            pass

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


class _Hostile:
    """A fetch handler that answers every request with ``header`` then ``chunks`` (bytes each),
    sleeping ``gap`` s before each chunk; counts the requests it got."""

    def __init__(self, header: int, chunks: list[bytes], gap: float = 0.0) -> None:
        self.header, self.chunks, self.gap, self.requests = header, chunks, gap, 0

    async def __call__(self, request, context):
        from hivemind.proto import runtime_pb2

        self.requests += 1
        yield runtime_pb2.ExpertResponse(metadata=struct.pack("<Q", self.header))
        for c in self.chunks:
            await asyncio.sleep(self.gap)
            yield runtime_pb2.ExpertResponse(metadata=c)


def _meta(n: int, data: bytes = b"") -> dict:
    return {"len": n, "sha256": hashlib.sha256(data).hexdigest(), "uid": secrets.token_hex(16)}


@pytest.fixture(scope="module")
def pair():
    """An honest peer and one that turns hostile; fetches of one op share a 10 s deadline
    (max(allreduce_timeout, next_chunk_timeout)). At allreduce_timeout 3 s a group's exchange of
    the announcements timed out once on a loaded CI machine, which is not what these tests are
    about."""
    peers = _swarm(2, "tw-hostile", expected_world_size=2, round_wait_timeout=2.0,
                   allreduce_timeout=10.0)  # fmt: skip
    yield peers
    _close(peers)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_oversized_announcements_are_refused_before_fetching(pair):
    honest, hostile = pair
    # header = announced 2^40 bytes, then 32 MiB as fast as it can: the old engine buffered it all
    evil = _Hostile(2**40, [bytes(CHUNK)] * 64)
    _serve_with(hostile, evil)
    th = _join_with(hostile, "big", 0, _meta(2**40))
    h = honest.all_gather_bytes(b"honest", tag="big", round=0, async_op=True)
    out = h.wait(timeout=60)
    th.join(timeout=30)
    me = sorted(h.group).index(honest.peer_id)
    assert h.missing == (hostile.peer_id,) and out[me] == b"honest" and out[1 - me] is None
    assert evil.requests == 0  # refused on the announcement alone
    # one byte above max_bytes is refused too; exactly max_bytes is fetched
    for n, fetched in ((101, False), (100, True)):
        data = bytes(range(n))
        ok = _Hostile(n, [data])
        _serve_with(hostile, ok)
        th = _join_with(hostile, f"cap{n}", 0, _meta(n, data))
        h = honest.all_gather_bytes(b"x", tag=f"cap{n}", round=0, max_bytes=100, async_op=True)
        out = h.wait(timeout=60)
        th.join(timeout=30)
        assert ok.requests == int(fetched) and (data in out) == fetched
        assert h.missing == (() if fetched else (hostile.peer_id,))
    # all_gather_into_tensor knows the size exactly: 2^40 and t's size + 1 are both refused
    for n in (2**40, 4 * 6 + 1):
        evil = _Hostile(n, [bytes(CHUNK)] * 4)
        _serve_with(hostile, evil)
        th = _join_with(hostile, f"t{n}", 0, _meta(n))
        t = torch.arange(6.0)
        h = honest.all_gather_into_tensor(t, tag=f"t{n}", round=0, async_op=True)
        rows = h.wait(timeout=60)
        th.join(timeout=30)
        me = sorted(h.group).index(honest.peer_id)
        assert evil.requests == 0 and h.missing == (hostile.peer_id,)
        assert torch.equal(rows[me], t) and not rows[1 - me].any()
    # the hostile peer never fetched the honest payloads: they are freed when the round ends
    deadline = time.monotonic() + 30
    while _served_bytes(honest) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _served_bytes(honest) == 0


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_trickling_peer_is_dropped_at_the_op_deadline(pair):
    honest, hostile = pair
    # 40 chunks, one every 4 s (each inside next_chunk_timeout = 5 s): 160 s for the whole payload
    data = bytes(40 * CHUNK)
    slow = _Hostile(len(data), [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)], gap=4.0)
    _serve_with(hostile, slow)
    th = _join_with(hostile, "slow", 0, _meta(len(data), data))
    t0 = time.monotonic()
    h = honest.all_gather_bytes(b"honest", tag="slow", round=0, async_op=True)
    out = h.wait(timeout=45)  # the old engine returned after ~160 s
    took = time.monotonic() - t0
    th.join(timeout=30)
    assert h.missing == (hostile.peer_id,) and out.count(None) == 1 and b"honest" in out
    print(f"trickling peer dropped after {took:.1f} s (fetch deadline {honest._fetch_s} s)")


def _listening_ips(port: int) -> set[str]:
    """Local IPv4/IPv6 addresses with a TCP socket in LISTEN state on ``port`` (/proc/net)."""
    out = set()
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(path) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                ip, p = local.split(":")
                if state == "0A" and int(p, 16) == port:
                    out.add(ip)
    return out


@pytest.mark.timeout(60)
def test_default_listens_on_loopback_only():
    comm = HivemindCommunicator.create("tw-listen", expected_world_size=1)
    try:
        addrs = comm.visible_maddrs()
        port = int(addrs[0].split("/tcp/")[1].split("/")[0])
        ips = _listening_ips(port)
        assert ips == {"0100007F"}, (addrs, ips)  # 127.0.0.1 little-endian; never 0.0.0.0
        assert all(a.startswith("/ip4/127.0.0.1/") for a in addrs)
    finally:
        comm.close()


@pytest.fixture(scope="module")
def exposed():
    """Three honest peers that wait for every live member (expected_world_size=None)."""
    peers = _swarm(3, "tw-exposed", round_wait_timeout=20.0)
    yield peers
    _close(peers)


def _fetch_as(comm: HivemindCommunicator, victim: str, uid: str) -> bytes | None:
    """What ``comm``'s p2p gets back asking ``victim`` for ``uid`` (None: nothing)."""
    from hivemind.p2p import PeerID
    from hivemind.proto import runtime_pb2

    async def get() -> bytes | None:
        stream = await comm._p2p.iterate_protobuf_handler(
            PeerID.from_base58(victim), comm._fetch_name, runtime_pb2.ExpertRequest(uid=uid),
            runtime_pb2.ExpertResponse,
        )  # fmt: skip
        msgs = [m.metadata async for m in stream]
        return b"".join(msgs[1:]) if msgs else None

    return comm._on_loop(get(), 20.0)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_payloads_cannot_be_fetched_by_a_guessed_id(exposed):
    a, b, x = exposed
    ha = a.all_gather_bytes(b"secret-a", tag="u", round=0, async_op=True)
    hb = b.all_gather_bytes(b"secret-b", tag="u", round=0, async_op=True)
    time.sleep(1.0)  # a and b have offered their payloads and wait for x to register
    assert _fetch_as(x, a.peer_id, "0:u") is None  # the old id: f"{round}:{tag}"
    assert _fetch_as(x, a.peer_id, secrets.token_hex(16)) is None
    hx = x.all_gather_bytes(b"secret-x", tag="u", round=0, async_op=True)
    outs = [h.wait(timeout=60) for h in (ha, hb, hx)]
    assert outs[0] == outs[1] == outs[2] and sorted(map(bytes, outs[0])) == sorted(
        [b"secret-a", b"secret-b", b"secret-x"]
    )
    # every member fetched every payload: nothing stays served
    assert [_served_bytes(c) for c in exposed] == [0, 0, 0]


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_forged_membership_records_are_refused(exposed):
    import hivemind
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.utils.crypto import RSAPrivateKey
    from hivemind.utils.timed_storage import get_dht_time

    a, b, x = exposed
    signer = RSASignatureValidator(RSAPrivateKey())  # signs what it stores under its own marker
    evil = hivemind.DHT(initial_peers=a.visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                        record_validators=[signer], start=True)  # fmt: skip
    try:
        # distinct expirations: hivemind's storage heap compares subkeys of equal expiration,
        # and a str and a bytes subkey do not compare
        exps = iter(get_dht_time() + 600 + 0.01 * k for k in range(1000))
        for key in (f"{a.run_id}.members", f"{a.run_id}_members"):  # the old and the new table
            table = evil.get(key, latest=True)
            subs = list(table.value) if table is not None else [a.peer_id, b.peer_id, x.peer_id]
            for sub in subs:  # tombstone every member, reusing its own subkey
                evil.store(key, {"alive": False, "addr": ""}, next(exps), subkey=sub)
            for i in range(20):  # 20 members that do not exist, unsigned and signed
                fake = f"QmFake{i:02d}" + "x" * 40
                evil.store(key, {"alive": True, "addr": ""}, next(exps), subkey=fake)
                evil.store(key, {"alive": True, "addr": ""}, next(exps),
                           subkey=fake.encode() + signer.local_public_key)  # fmt: skip
        want = sorted(c.peer_id for c in exposed)
        for c in exposed:
            assert [p.peer_id for p in c.peers()] == want
        t0 = time.monotonic()
        hs = [c.all_gather_bytes(bytes([i]), tag="f", round=0, async_op=True)
              for i, c in enumerate(exposed)]  # fmt: skip
        outs = [h.wait(timeout=15) for h in hs]  # round_wait_timeout is 20 s
        print(f"round with forged records formed after {time.monotonic() - t0:.1f} s")
        assert all(h.group == tuple(want) and h.missing == () for h in hs)
        assert outs[0] == outs[1] == outs[2]
    finally:
        evil.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_many_gathers_leave_nothing_served():
    peers = _swarm(
        2, "tw-serve", expected_world_size=2, round_wait_timeout=2.0, allreduce_timeout=10.0
    )
    try:
        payloads = [bytes([k]) * (4 << 20) for k in range(2)]  # 4 MB each, 8 gathers
        for r in range(8):
            outs = _together([lambda c=c, p=p, r=r: c.all_gather_bytes(p, tag="s", round=r)
                              for c, p in zip(peers, payloads, strict=True)])  # fmt: skip
            assert all(sorted(o) == sorted(payloads) for o in outs), outs
        # the old engine kept all 8 x 4 MB per peer for 2 * round_wait_timeout + find time
        assert [_served_bytes(c) for c in peers] == [0, 0]
    finally:
        _close(peers)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_dead_peer_is_forgotten_with_expected_world_size():
    peers = _swarm(3, "tw-dead", expected_world_size=3, round_wait_timeout=30.0)
    try:
        a, b, c = peers
        assert (
            _together([lambda p=p: p.control_max([1.0], tag="warm") for p in peers]) == [[1.0]] * 3
        )
        _kill([c._dht.pid] + _descendants(c._dht.pid) + [av.pid for av in c._slots.values()])
        deadline = time.monotonic() + 30  # its entry expires 3 heartbeats (3 s) after the last
        while c.peer_id in [p.peer_id for p in a.peers()] and time.monotonic() < deadline:
            time.sleep(0.5)
        ab = tuple(sorted((a.peer_id, b.peer_id)))
        for r in range(2):  # every later round, not only the first
            t0 = time.monotonic()
            hs = [p.all_gather_bytes(bytes([k]), tag="d", round=r, async_op=True)
                  for k, p in enumerate((a, b))]  # fmt: skip
            outs = [h.wait(timeout=20) for h in hs]  # the old engine waited the full 30 s
            print(f"round {r} without the dead peer formed after {time.monotonic() - t0:.1f} s")
            assert outs[0] == outs[1] and all(h.group == ab for h in hs)
    finally:
        _close(peers)


@pytest.fixture(scope="module")
def trio():
    peers = _swarm(
        3, "tw-exact", expected_world_size=3, round_wait_timeout=5.0, allreduce_timeout=10.0
    )
    yield peers
    _close(peers)


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "codec,op,dtype",
    [
        (None, "mean", torch.float32),
        (None, "sum", torch.float32),
        (None, "mean", torch.float64),
        ("fp16", "mean", torch.float32),
        ("int8", "mean", torch.float32),
    ],
)
def test_butterfly_results_are_bit_identical(trio, codec, op, dtype):
    # 300001 elements, 3 peers: three reducers for fp32 (parts of 2^17), uneven shares
    xs = [x.to(dtype) for x in _inputs(3, 300_001, seed=11, uniform=codec == "int8")]
    ts = [x.clone() for x in xs]
    _together([lambda c=c, t=t: c.all_reduce(t, op, codec=codec, tag=f"x{codec}{op}{dtype}")
               for c, t in zip(trio, ts, strict=True)])  # fmt: skip
    differ = [int((ts[0] != t).sum()) for t in ts[1:]]
    assert differ == [0, 0], f"elements differing from peer 0: {differ}"
    ref = _mean64(xs) * (3 if op == "sum" else 1)
    # tolerances as in test_hivemind.py: fp32 rounding of a 3-term mean (x3 for sum); fp16 and
    # int8: their codec error bounds (unit roundoff 2^-11; 1.5 bins of 6 sigma / 256)
    if codec is None:
        tol = 1e-6 * (3 if op == "sum" else 1)
        torch.testing.assert_close(ts[0].double(), ref, rtol=0, atol=tol)
    elif codec == "fp16":
        bound = 4 * 2.0**-11 * torch.stack(xs).abs().amax(0).double() + 1e-7
        assert bool(((ts[0].double() - ref).abs() <= bound).all())
    else:
        sigma = torch.stack(xs).double().std().item()
        assert (ts[0].double() - ref).abs().max().item() <= 1.5 * 6 * sigma / 256
