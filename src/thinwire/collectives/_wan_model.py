"""WAN model: link configuration, presets and closed-form op times (private; public via ``wan``).

The model is described in ``docs/design.md``, "The WAN model". :class:`WanConfig` describes
per-rank links (:class:`NodeLink`) plus latency, jitter, loss and straggler knobs; :data:`PRESETS`
holds the five presets with their sources. :class:`WanModel` is a pure, deterministic function
from an :class:`~thinwire.collectives.base.OpRecord` to the op's modelled duration, identical on
every rank. The clock wrapper lives in :mod:`thinwire.collectives.wan`, which re-exports all of this.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from thinwire._validate import check_choice, check_float, check_int, check_type
from thinwire.collectives.base import OpRecord

__all__ = [
    "NodeLink",
    "Preset",
    "PRESETS",
    "WanConfig",
    "WanModel",
    "suggest_timeout",
    "ring_rs_or_ag_time",
    "halving_doubling_time",
    "parameter_server_time",
]

_MBIT = 1e6 / 8.0  # bytes/s per Mbit/s (configs are in 10^6 bit/s)
_JITTER, _STRAGGLER = 1, 2  # random-stream domains (the seed tuple's second entry)


@dataclass(frozen=True)
class NodeLink:
    """Access link of one rank.

    Args:
        up_mbps: upload bandwidth in Mbit/s (10^6 bit/s), > 0.
        down_mbps: download bandwidth in Mbit/s, > 0.
        access_latency_ms: one-way latency of this rank's access leg in ms, >= 0; added to
            ``base_rtt/2`` on every edge touching the rank.
    """

    up_mbps: float
    down_mbps: float
    access_latency_ms: float = 0.0

    def __post_init__(self) -> None:
        check_float("up_mbps", self.up_mbps, 0, lo_open=True)
        check_float("down_mbps", self.down_mbps, 0, lo_open=True)
        check_float("access_latency_ms", self.access_latency_ms, 0)


@dataclass(frozen=True)
class Preset:
    """One WAN preset; ``basis`` says where the numbers come from (keys in brackets, below)."""

    name: str
    up_mbps: float
    down_mbps: float
    rtt_ms: float
    jitter_ms: float
    basis: str
    loss: float = 0.0  # presets carry loss=0: the Mathis cap is harsh, so loss is opt-in


# Source keys of the ``basis`` strings: [AWS-LAT] the published "Latency Between AWS Global
# Regions" measurements; [PCCL] the Prime Collective Communications Library report,
# arXiv:2505.14065; [OOKLA] Ookla Speedtest market reports on US fixed broadband; [I1] the
# INTELLECT-1 technical report, arXiv:2412.01152.
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "datacenter", 100_000.0, 100_000.0, 1.0, 0.0,
            "project reference point; AWS inter-AZ pings 0.25-3.4 ms [AWS-LAT]",
        ),
        Preset(
            "cross_region", 10_000.0, 10_000.0, 80.0, 1.0,
            "us-east-1 <-> eu-west-1 ~80.5 ms [AWS-LAT]; 10 Gbit/s is below PCCL's 25 Gbit/s "
            "transatlantic [PCCL]",
        ),
        Preset(
            "home_broadband", 10.0, 50.0, 40.0, 5.0,
            "US fixed median upload 11.9 (2020) to 22.6 Mbit/s (2022), cable ISPs 10.7-29.8 "
            "Mbit/s up [OOKLA]; RTT is our assumption for two homes on one continent (Ookla's "
            "14 ms median is to the nearest test server)",
        ),
        Preset(
            "home_transatlantic", 10.0, 50.0, 100.0, 5.0,
            "80 ms US-East <-> Ireland [AWS-LAT] plus two access legs",
        ),
        Preset(
            "transpacific", 1_000.0, 1_000.0, 150.0, 5.0,
            "us-east-1 <-> Tokyo 145 ms, us-west-1 <-> Tokyo 102 ms, US-West <-> Singapore "
            "161-174 ms [AWS-LAT]; 1 Gbit/s per-flow assumption, inside the 0.35-2.5 Gbit/s "
            "INTELLECT-1 range [I1]",
        ),
    )
}  # fmt: skip


@dataclass
class WanConfig:
    """Links and impairments of a simulated WAN.

    Either ``nodes`` (one :class:`NodeLink` per rank) or ``preset`` (all ranks alike) is needed;
    with both, ``nodes`` gives the links and the preset the latency and jitter. ``base_rtt_ms``
    and ``jitter_ms`` left ``None`` take the preset's value (0 without a preset).

    Args:
        nodes: per-rank links, index = rank.
        preset: a key of :data:`PRESETS`.
        world_size: number of ranks; must equal ``len(nodes)`` when both are given.
        base_rtt_ms: round-trip time shared by every edge in ms, >= 0.
        jitter_ms: mean of the exponential per-edge additive delay in ms, >= 0.
        loss: packet loss rate in [0, 1); > 0 applies the TCP Reno bound of Mathis et al.,
            "The Macroscopic Behavior of the TCP Congestion Avoidance Algorithm", CCR 1997.
        mss: TCP maximum segment size in bytes (1448 = 1500 MTU - 52 bytes of IPv4+TCP+timestamps).
        tcp_window_bytes: receive window; caps an edge at ``window / RTT``. None = no cap.
        compute_slowdown: rank -> factor (> 0) applied to that rank's compute time.
        straggler_prob: probability in [0, 1] that a rank is delayed in a training step.
        straggler_delay_ms: mean of the exponential straggler delay in ms, >= 0.
        matchmaking_s: seconds added to every op; None = the engine's matchmaking time for
            hivemind, 0 otherwise.
        seed: seed of every random draw, >= 0.
        mode: ``"virtual"`` (simulated clock, no sleeping) or ``"sleep"`` (real delays).
        time_scale: factor on modelled time in sleep mode, > 0.
    """

    nodes: list[NodeLink] | None = None
    preset: str | None = None
    world_size: int | None = None
    base_rtt_ms: float | None = None
    jitter_ms: float | None = None
    loss: float = 0.0
    mss: int = 1448
    tcp_window_bytes: int | None = None
    compute_slowdown: dict[int, float] = field(default_factory=dict)
    straggler_prob: float = 0.0
    straggler_delay_ms: float = 0.0
    matchmaking_s: float | None = None
    seed: int = 0
    mode: str = "virtual"
    time_scale: float = 1.0

    def __post_init__(self) -> None:
        pre = None
        if self.preset is not None:
            pre = PRESETS[check_choice("preset", self.preset, tuple(PRESETS))]
        if self.world_size is not None:
            check_int("world_size", self.world_size, 1)
        if self.nodes is not None:
            check_type("nodes", self.nodes, list | tuple)
            self.nodes = [check_type(f"nodes[{i}]", n, NodeLink) for i, n in enumerate(self.nodes)]
            check_int("len(nodes)", len(self.nodes), 1)
            if self.world_size is not None and self.world_size != len(self.nodes):
                raise ValueError(
                    f"world_size must be in [{len(self.nodes)}, {len(self.nodes)}] "
                    f"(= len(nodes)), got {self.world_size}"
                )
        elif pre is None:
            raise ValueError("nodes or preset must be given, got neither")
        if self.base_rtt_ms is None:
            self.base_rtt_ms = pre.rtt_ms if pre else 0.0
        if self.jitter_ms is None:
            self.jitter_ms = pre.jitter_ms if pre else 0.0
        self.base_rtt_ms = check_float("base_rtt_ms", self.base_rtt_ms, 0)
        self.jitter_ms = check_float("jitter_ms", self.jitter_ms, 0)
        self.loss = check_float("loss", self.loss, 0, 1, hi_open=True)
        check_int("mss", self.mss, 1)
        if self.tcp_window_bytes is not None:
            check_int("tcp_window_bytes", self.tcp_window_bytes, 1)
        check_type("compute_slowdown", self.compute_slowdown, dict)
        hi = None if self.world_size is None and self.nodes is None else self.size() - 1
        self.compute_slowdown = {
            check_int("compute_slowdown rank", k, 0, hi): check_float(
                f"compute_slowdown[{k}]", v, 0, lo_open=True
            )
            for k, v in self.compute_slowdown.items()
        }
        self.straggler_prob = check_float("straggler_prob", self.straggler_prob, 0, 1)
        self.straggler_delay_ms = check_float("straggler_delay_ms", self.straggler_delay_ms, 0)
        if self.matchmaking_s is not None:
            self.matchmaking_s = check_float("matchmaking_s", self.matchmaking_s, 0)
        check_int("seed", self.seed, 0)
        check_choice("mode", self.mode, ("virtual", "sleep"))
        self.time_scale = check_float("time_scale", self.time_scale, 0, lo_open=True)

    def size(self) -> int | None:
        """Number of ranks the config fixes (``len(nodes)`` or ``world_size``), else None."""
        return len(self.nodes) if self.nodes is not None else self.world_size

    def links(self, world_size: int) -> list[NodeLink]:
        """Per-rank links for ``world_size`` ranks (preset links repeated when no nodes given).

        Raises:
            ValueError: ``world_size`` disagrees with the config's own size.
        """
        check_int("world_size", world_size, 1)
        n = self.size()
        if n is not None and n != world_size:
            raise ValueError(f"world_size must be in [{n}, {n}] (config size), got {world_size}")
        if self.nodes is not None:
            return list(self.nodes)
        p = PRESETS[self.preset]  # type: ignore[index]
        return [NodeLink(p.up_mbps, p.down_mbps, 0.0)] * world_size

    @property
    def basis(self) -> str:
        """Source string of the preset, or ``"custom topology"`` (recorded in benchmark JSON)."""
        return PRESETS[self.preset].basis if self.preset else "custom topology"

    @classmethod
    def from_preset(cls, name: str, world_size: int, **overrides: Any) -> WanConfig:
        """Config of preset ``name`` (a :data:`PRESETS` key) for ``world_size`` ranks; ``overrides``
        replace fields."""
        return cls(preset=name, world_size=world_size, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (see :meth:`from_json` for the schema)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["nodes"] = None if self.nodes is None else [asdict(n) for n in self.nodes]
        d["compute_slowdown"] = {str(k): v for k, v in self.compute_slowdown.items()}
        return d

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialise to JSON (schema in :meth:`from_json`); also write to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, path: str | Path) -> WanConfig:
        """Load a topology file.

        Schema: one JSON object whose keys are :class:`WanConfig` field names, all optional
        except that ``nodes`` or ``preset`` must appear::

            {"preset": "home_broadband", "base_rtt_ms": 40.0, "jitter_ms": 5.0,
             "nodes": [{"up_mbps": 10, "down_mbps": 50, "access_latency_ms": 2.5},
                       {"up_mbps": 100, "down_mbps": 100}],
             "loss": 0.0, "mss": 1448, "tcp_window_bytes": null,
             "compute_slowdown": {"1": 2.0}, "straggler_prob": 0.0, "straggler_delay_ms": 0.0,
             "matchmaking_s": null, "seed": 0, "mode": "virtual", "time_scale": 1.0,
             "world_size": 2}

        ``nodes[r]`` is rank r's link; ``compute_slowdown`` keys are rank numbers as strings.

        Raises:
            ValueError: unknown key, or any field fails validation.
        """
        raw = json.loads(Path(path).read_text())
        check_type("topology", raw, dict)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"topology key must be in {sorted(known)}, got {unknown}")
        if raw.get("nodes") is not None:
            raw["nodes"] = [NodeLink(**n) for n in raw["nodes"]]
        if raw.get("compute_slowdown"):
            raw["compute_slowdown"] = {int(k): v for k, v in raw["compute_slowdown"].items()}
        return cls(**raw)


def suggest_timeout(op_time: float) -> float:
    """Communicator timeout for an op modelled to take ``op_time`` s: ``3*T + 30``.

    ``docs/design.md``, "Failures and timeouts", says where it is used.
    """
    return 3.0 * check_float("op_time", op_time, 0) + 30.0


def ring_rs_or_ag_time(nbytes: float, P: int, alpha: float, bw: float) -> float:
    """Ring reduce-scatter or all-gather of an ``nbytes`` vector: ``(P-1)(alpha + S/(P B))``.

    Reference only (Thakur, Rabenseifner, Gropp, "Optimization of Collective Communication
    Operations in MPICH", IJHPCA 2005); ``alpha`` in s, ``bw`` in bytes/s.
    """
    return (P - 1) * (alpha + nbytes / (P * bw))


def halving_doubling_time(nbytes: float, P: int, alpha: float, bw: float) -> float:
    """Halving-doubling all-reduce, P a power of 2: ``2 log2(P) alpha + 2(P-1)/P S/B``."""
    return 2.0 * math.log2(P) * alpha + 2.0 * (P - 1) / P * nbytes / bw


def parameter_server_time(nbytes: float, P: int, alpha: float, bw: float) -> float:
    """One parameter server whose link is the bottleneck: ``2 alpha + 2 P S/B``."""
    return 2.0 * alpha + 2.0 * P * nbytes / bw


class _Incomplete(Exception):
    """The record does not yet carry what the model needs (sizes known only after the op)."""


class WanModel:
    """Closed-form, deterministic op times over a (possibly heterogeneous) WAN.

    Every quantity depends only on the config, the op's global shape and ``op_seq``, so every
    rank computes the same time without communicating. Ring steps last the slowest ring edge
    ``max_e(alpha_e + jitter_e + chunk/B_e)`` (ring = rank r -> r+1); a direct phase lasts
    ``max_r max(sent_r/up_r, recv_r/down_r, max_j bytes_rj/B_rj) + max_e(alpha_e + jitter_e)``
    over the edges that carry bytes. The per-flow term ``bytes_rj/B_rj`` only matters when the
    window or loss caps bind (each TCP flow is capped separately); without caps it never exceeds
    the access-link terms, so the homogeneous closed forms hold exactly.

    Args:
        config: the WAN description.
        world_size: ranks; an op with ``P < world_size`` uses the links of ranks ``0..P-1``.
    """

    def __init__(self, config: WanConfig, world_size: int) -> None:
        self.config = check_type("config", config, WanConfig)
        self.world_size = world_size
        self.nodes = config.links(world_size)
        acc = np.array([x.access_latency_ms for x in self.nodes]) / 1e3
        self.up = np.array([x.up_mbps for x in self.nodes]) * _MBIT  # bytes/s
        self.down = np.array([x.down_mbps for x in self.nodes]) * _MBIT
        base = config.base_rtt_ms / 1e3  # type: ignore[operator]
        self.alpha = base / 2.0 + acc[:, None] + acc[None, :]  # [n, n] one-way latency, s
        bw = np.minimum(self.up[:, None], self.down[None, :])  # [n, n] B_ij, bytes/s
        rtt = 2.0 * self.alpha
        with np.errstate(divide="ignore"):
            if config.tcp_window_bytes is not None:
                bw = np.minimum(bw, np.where(rtt > 0, config.tcp_window_bytes / rtt, np.inf))
            if config.loss > 0:  # Mathis et al. 1997: rate <= MSS * sqrt(3/2) / (RTT sqrt(p))
                cap = config.mss * math.sqrt(1.5) / (rtt * math.sqrt(config.loss))
                bw = np.minimum(bw, np.where(rtt > 0, cap, np.inf))
        self.bw = bw
        self._jit_s = config.jitter_ms / 1e3  # type: ignore[operator]

    # ---- random draws ------------------------------------------------------------------
    def _rng(self, domain: int, a: int, b: int, c: int) -> np.random.Generator:
        ss = np.random.SeedSequence([self.config.seed, domain, a, b, c])
        return np.random.Generator(np.random.PCG64(ss))

    def jitter(self, op_seq: int, phase: int, src: int, dst: int, P: int) -> float:
        """Additive delay in s of edge ``src->dst`` in ``phase`` of op ``op_seq`` (0 if off)."""
        if self._jit_s == 0.0:
            return 0.0
        return float(self._rng(_JITTER, op_seq, phase, src * P + dst).exponential(self._jit_s))

    def straggler_delay(self, train_step: int, rank: int) -> float:
        """Straggler delay in s of ``rank`` in ``train_step`` (0 unless the Bernoulli draw hits)."""
        c = self.config
        if c.straggler_prob == 0.0 or c.straggler_delay_ms == 0.0:
            return 0.0
        g = self._rng(_STRAGGLER, train_step, rank, 0)
        if g.random() >= c.straggler_prob:
            return 0.0
        return float(g.exponential(c.straggler_delay_ms / 1e3))

    # ---- building blocks -----------------------------------------------------------------
    def _ring_step(self, chunk: float, P: int, op_seq: int, phase: int) -> float:
        return max(
            self.alpha[r, (r + 1) % P]
            + self.jitter(op_seq, phase, r, (r + 1) % P, P)
            + chunk / self.bw[r, (r + 1) % P]
            for r in range(P)
        )

    def _direct_phase(self, nb: np.ndarray, op_seq: int, phase: int) -> float:
        """Phase where rank i sends ``nb[i, j]`` bytes to j, all flows concurrently."""
        P = nb.shape[0]
        edges = [(i, j) for i in range(P) for j in range(P) if i != j and nb[i, j] > 0]
        if not edges:
            return 0.0
        sent, recv = nb.sum(axis=1), nb.sum(axis=0)
        xfer = max(
            float(np.max(sent / self.up[:P])),
            float(np.max(recv / self.down[:P])),
            max(nb[i, j] / self.bw[i, j] for i, j in edges),
        )
        lat = max(self.alpha[i, j] + self.jitter(op_seq, phase, i, j, P) for i, j in edges)
        return xfer + lat

    def _binomial(self, nbytes: float, src: int, P: int, op_seq: int, phase0: int) -> float:
        total = 0.0
        for i in range(math.ceil(math.log2(P))):
            total += max(
                self.alpha[s, d] + self.jitter(op_seq, phase0 + i, s, d, P) + nbytes / self.bw[s, d]
                for v in range(2**i)
                if v + 2**i < P
                for s, d in [((v + src) % P, (v + 2**i + src) % P)]
            )
        return total

    # ---- per op --------------------------------------------------------------------------
    def op_time(self, record: OpRecord, op_seq: int = 0, *, matchmaking_s: float = 0.0) -> float:
        """Modelled duration in s of the op ``record`` describes; P = 1 gives 0.

        Args:
            record: the op's record (``op``, ``algorithm``, ``P``, ``numel``, ``itemsize``,
                ``sizes``, ``src``, ``sent`` as the engines fill them).
            op_seq: index of the op on this communicator (seeds the jitter draws).
            matchmaking_s: engine matchmaking time, used when ``config.matchmaking_s`` is None.

        Raises:
            ValueError: unknown op/algorithm pair, or a record lacking the sizes it needs.
        """
        try:
            return self._op_time(record, op_seq, matchmaking_s)
        except _Incomplete as exc:
            raise ValueError(
                f"record must carry the sizes of {record.op}/{record.algorithm}, got {exc}"
            ) from None

    def _op_time(self, rec: OpRecord, op_seq: int, mm: float) -> float:
        P = rec.P
        if P <= 1:
            return 0.0
        if P > self.world_size:
            raise ValueError(f"record.P must be in [1, {self.world_size}], got {P}")
        mm = self.config.matchmaking_s if self.config.matchmaking_s is not None else mm
        op, alg = rec.op, rec.algorithm
        if (
            op in ("all_reduce", "broadcast", "all_gather_into_tensor")
            and rec.itemsize
            and rec.numel == 0
        ):
            return 0.0  # engines complete an empty dense op locally (nothing on the wire)
        if op == "all_reduce" and alg == "ring":
            c = math.ceil(rec.numel / P) * rec.itemsize if rec.itemsize else _per(rec, 2 * (P - 1))
            t = sum(self._ring_step(c, P, op_seq, k) for k in range(2 * (P - 1)))
        elif op == "all_reduce" and alg == "butterfly":
            w = _sizes(rec)  # wire bytes of each peer's share w(e_j)
            nb1 = np.tile(w[None, :], (P, 1))  # phase 1: i sends its part of j's share to j
            np.fill_diagonal(nb1, 0.0)
            t = 2.0 * float(np.max(2.0 * self.alpha[:P, :P])) + mm  # 2 RTT, matchmaking
            t += self._direct_phase(nb1, op_seq, 0) + self._direct_phase(nb1.T.copy(), op_seq, 1)
            return float(t)
        elif op in ("all_gather_bytes", "all_gather_into_tensor") and alg == "direct":
            m = _sizes(rec)  # hivemind pulls: every payload with its 8-byte length header
            nb = np.tile(8.0 + m[:, None], (1, P))  # i sends 8 + m_i to every j
            np.fill_diagonal(nb, 0.0)
            t = self._direct_phase(nb, op_seq, 0)
        elif op == "all_gather_bytes" and alg == "ring":
            big = float(_sizes(rec).max()) if rec.sizes else _per(rec, P - 1) - 8.0
            t = sum(self._ring_step(8.0, P, op_seq, k) for k in range(P - 1))
            t += sum(self._ring_step(big, P, op_seq, k) for k in range(P - 1, 2 * (P - 1)))
        elif op == "all_gather_into_tensor" and alg == "ring":
            # equal sizes known from the shape: no length phase, P-1 ring steps of one tensor
            if rec.sizes:
                m = float(max(rec.sizes))
            else:
                m = float(rec.payload_bytes) if rec.payload_bytes else _per(rec, P - 1)
            t = sum(self._ring_step(m, P, op_seq, k) for k in range(P - 1))
        elif op == "broadcast" and alg == "binomial":
            nbytes = rec.numel * rec.itemsize if rec.itemsize else rec.payload_bytes
            t = self._binomial(float(nbytes), rec.src, P, op_seq, 0)
        elif op == "broadcast_bytes" and alg == "binomial":
            # engines set payload_bytes to src's length on every rank after the length phase
            d = math.ceil(math.log2(P))
            t = self._binomial(8.0, rec.src, P, op_seq, 0)
            t += self._binomial(float(rec.payload_bytes), rec.src, P, op_seq, d)
        elif op in ("broadcast", "broadcast_bytes") and alg == "pull":
            nbytes = float(rec.payload_bytes)  # src's length (hivemind fills it on every member)
            nb = np.zeros((P, P))
            nb[rec.src, :] = 8.0 + nbytes
            nb[rec.src, rec.src] = 0.0
            t = self._direct_phase(nb, op_seq, 0)
        else:
            raise ValueError(
                "op/algorithm must be in {all_reduce: ring|butterfly, all_gather_bytes: "
                "ring|direct, all_gather_into_tensor: ring|direct, broadcast(_bytes): "
                "binomial|pull}, "
                f"got {op}/{alg}"
            )
        return float(t) + mm

    def estimate(
        self,
        op: str,
        algorithm: str,
        *,
        P: int | None = None,
        numel: int = 0,
        itemsize: int = 0,
        sizes: tuple[int, ...] = (),
        src: int = 0,
        nbytes: int = 0,
        op_seq: int = 0,
    ) -> float:
        """:meth:`op_time` from explicit arguments instead of a record.

        ``numel``/``itemsize``: dense tensor (all_reduce ring, broadcast); ``sizes``: per-rank
        payload lengths (all_gather_bytes, all_gather_into_tensor) or per-peer share wire bytes
        ``w(e_j)`` (butterfly); ``nbytes``: payload length of ``src`` (broadcast_bytes, pull) or
        of every rank's tensor (all_gather_into_tensor ring, when ``sizes`` is empty); ``P``
        defaults to ``world_size``.
        """
        P = self.world_size if P is None else check_int("P", P, 1, self.world_size)
        rec = OpRecord(op, algorithm, "model", P=P, numel=numel, itemsize=itemsize,
                       sizes=tuple(sizes), src=src, payload_bytes=nbytes)  # fmt: skip
        return self.op_time(rec, op_seq)

    def is_complete(self, record: OpRecord) -> bool:
        """True when ``record`` already carries everything :meth:`op_time` needs."""
        if record.P <= 1:
            return True
        if record.op == "all_gather_bytes" and record.algorithm not in ("ring", "direct"):
            return False  # "auto" before the length exchange picked an algorithm
        try:
            self._op_time(record, 0, 0.0)
        except _Incomplete:
            return False
        return True


def _per(rec: OpRecord, k: int) -> float:
    """Bytes per unit from the symmetric ``sent = k * unit`` of a record."""
    if rec.sent <= 0:
        raise _Incomplete(f"sent={rec.sent}")
    return rec.sent / k


def _sizes(rec: OpRecord) -> np.ndarray:
    if len(rec.sizes) != rec.P:
        raise _Incomplete(f"sizes={rec.sizes!r} for P={rec.P}")
    return np.asarray(rec.sizes, dtype=np.float64)
