"""Runs every method side by side on real engines and collects bytes, loss and simulated time.

``run_bench(config)`` starts ``world_size`` ranks on the chosen engine (gloo processes on
127.0.0.1, threads with ``inproc``), and each rank runs every method in turn on the same
communicator: same seed, same initialisation (checked by hash across ranks), same token stream
per rank, same evaluation set. Communication goes through :class:`WanCommunicator` in virtual
mode, so simulated time = measured compute (forward and backward) + modelled communication under
the preset; bytes come from the communicator's ledger (:mod:`thinwire.collectives.accounting`).
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import queue
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from thinwire.bench.methods import METHODS, build_optimizer
from thinwire.bench.report import json_safe
from thinwire.bench.tiny import ByteCorpus, MarkovLanguage, TinyConfig, TinyGPT, param_hash
from thinwire.collectives import (
    PRESETS,
    Communicator,
    InprocCommunicator,
    WanCommunicator,
    WanConfig,
)

__all__ = ["BenchConfig", "run_bench", "run_rank"]

ENGINES = ("gloo", "inproc")
_PROGRESS_TENTHS = 10  # rank 0 reports a step event at each 10% of a run's steps


@dataclass
class BenchConfig:
    """Everything one benchmark run depends on (recorded in ``results.json``)."""

    methods: list[str] = field(default_factory=lambda: list(METHODS))
    engine: str = "gloo"
    world_size: int = 4
    preset: str = "home_broadband"
    topology: str | None = None
    wan_mode: str = "virtual"
    steps: int = 200
    inner_steps: int = 20
    seeds: list[int] = field(default_factory=lambda: [0])
    batch: int = 16
    eval_sequences: int = 64
    data: str | None = None
    timeout_s: float = 600.0
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> settings

    def validate(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods must be in {{{', '.join(METHODS)}}}, got {self.methods}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be in {{{', '.join(ENGINES)}}}, got {self.engine!r}")
        if self.preset != "none" and self.preset not in PRESETS:
            raise ValueError(
                f"preset must be in {{none, {', '.join(PRESETS)}}}, got {self.preset!r}"
            )
        for name, lo in (("world_size", 1), ("steps", 1), ("inner_steps", 1), ("batch", 1)):
            if int(getattr(self, name)) < lo:
                raise ValueError(f"{name} must be in [{lo}, inf), got {getattr(self, name)}")
        if self.steps % self.inner_steps:
            raise ValueError(
                f"steps must be a multiple of inner_steps={self.inner_steps}, got {self.steps}"
            )
        if "streaming-diloco" in self.methods and (self.inner_steps % 4 or self.inner_steps < 8):
            raise ValueError(
                f"inner_steps must be a multiple of 4 and >= 8 for streaming-diloco (4 fragments, "
                f"overlap 1), got {self.inner_steps}"
            )


class _Data:
    """Per-rank batches and the shared evaluation set of the built-in language or a byte file."""

    def __init__(self, cfg: BenchConfig, seed: int, model_cfg: TinyConfig) -> None:
        self.ctx = model_cfg.context
        if cfg.data:
            self.corpus: ByteCorpus | None = ByteCorpus(cfg.data)
            self.lang = None
            self.eval = self.corpus.eval_set(cfg.eval_sequences, self.ctx + 1)
        else:
            self.corpus = None
            self.lang = MarkovLanguage(model_cfg.vocab, seed=seed)
            self.eval = self.lang.eval_set(cfg.eval_sequences, self.ctx + 1, seed)

    def stream(self, rank: int, world: int, seed: int, batch: int):
        if self.lang is not None:
            g = self.lang.shard(rank, seed)
            while True:
                yield self.lang.sample(batch, self.ctx + 1, g)
        g = torch.Generator().manual_seed(seed * 1000 + rank)
        while True:
            yield self.corpus.batch(rank, world, batch, self.ctx + 1, g)  # type: ignore[union-attr]

    def floor(self) -> float:
        return self.lang.entropy_rate() if self.lang is not None else math.nan


def _wan_config(cfg: BenchConfig, seed: int) -> WanConfig | None:
    if cfg.topology:
        return WanConfig.from_json(cfg.topology)
    if cfg.preset == "none":
        return None
    return WanConfig.from_preset(cfg.preset, cfg.world_size, seed=seed, mode=cfg.wan_mode)


def _eval_loss(model: TinyGPT, data: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model(data[:, :-1], data[:, 1:]))


def _records_since(comm: Communicator, start: int) -> list[Any]:
    return comm.ledger.records[start:]


def _tenth(step: int, steps: int) -> int:
    """How many whole tenths of ``steps`` are done after ``step`` steps."""
    return step * _PROGRESS_TENTHS // steps


def _run_method(
    name: str, comm: Communicator, cfg: BenchConfig, seed: int, data: _Data, progress: Any
) -> dict[str, Any]:
    method = METHODS[name]
    rank, world = comm.rank, comm.world_size
    model_cfg = TinyConfig(vocab=256) if cfg.data else TinyConfig()
    model = TinyGPT(model_cfg, seed=seed)
    h = param_hash(model)
    hashes = comm.all_gather_bytes(h.encode(), tag="bench/init-hash")
    if any(x != h.encode() for x in hashes):
        raise RuntimeError(f"initial parameters differ across ranks (rank {rank} hash {h[:12]})")
    wan_cfg = _wan_config(cfg, seed)
    wan = WanCommunicator(comm, wan_cfg, measure_compute=False) if wan_cfg is not None else None
    ocomm: Communicator = wan if wan is not None else comm  # type: ignore[assignment]
    # The initial parameters are checked equal by hash above, so the optimizers skip their
    # start-state agreement (init_sync="off"): the bench times and counts training only.
    overrides = {"init_sync": "off", **cfg.overrides.get(name, {})}
    opt = build_optimizer(method, model, ocomm, sync_every=cfg.inner_steps, overrides=overrides)
    start = len(comm.ledger.records)
    stream = data.stream(rank, world, seed, cfg.batch)
    params = list(model.parameters())
    curve: list[dict[str, Any]] = []
    compute = 0.0
    t_real = time.perf_counter()
    n_params = sum(p.numel() for p in params)
    curve.append(
        {
            "step": 0,
            "tokens": 0,
            "bytes_sent_cum": 0,
            "sim_time_s": 0.0,
            "train_loss": math.nan,
            "eval_loss": _eval_loss(model, data.eval) if rank == 0 else math.nan,
        }
    )
    for step in range(1, cfg.steps + 1):
        if wan is not None:
            wan.mark_step(step)
        comm.ledger.mark_step(step)
        batch = next(stream)
        t0 = time.perf_counter()
        loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        dt = time.perf_counter() - t0
        compute += dt
        if wan is not None:
            wan.advance(dt)
        opt.step()  # ddp (DataParallel) all-reduces the gradients here
        if progress is not None and _tenth(step, cfg.steps) > _tenth(step - 1, cfg.steps):
            # Progress at each 10% of the steps, whatever H is (a long H would leave the bar
            # still between two syncs).
            progress.put(("step", name, seed, rank, step))
        if step % cfg.inner_steps == 0 or step == cfg.steps:
            recs = _records_since(comm, start)
            sent = sum(r.sent for r in recs if not r.tag.startswith("bench/"))
            ev = math.nan
            if rank == 0:
                if method.kind == "outer":
                    with opt.global_params():  # type: ignore[attr-defined]
                        ev = _eval_loss(model, data.eval)
                else:
                    ev = _eval_loss(model, data.eval)
            curve.append(
                {
                    "step": step,
                    "tokens": step * cfg.batch * model_cfg.context * world,
                    "bytes_sent_cum": sent,
                    "sim_time_s": wan.clock if wan is not None else time.perf_counter() - t_real,
                    "train_loss": float(loss.detach()),
                    "eval_loss": ev,
                }
            )
            if progress is not None and _tenth(step, cfg.steps) == _tenth(step - 1, cfg.steps):
                progress.put(("step", name, seed, rank, step))  # a sync between two tenths
    recs = [r for r in _records_since(comm, start) if not r.tag.startswith("bench/")]
    syncs = [r for r in recs if r.tag != "wan/clock"]
    wire = sum(r.payload_bytes for r in syncs)
    # Dense fp32 bytes of what the syncs carried: every parameter once per H steps for the
    # DiLoCo family (Streaming spreads that over its fragment events), once per step else.
    dense_syncs = cfg.steps // cfg.inner_steps if method.kind == "outer" else cfg.steps
    return {
        "method": name,
        "rank": rank,
        "n_params": n_params,
        "sent": sum(r.sent for r in recs),
        "recv": sum(r.recv for r in recs),
        "control_sent": sum(r.control_sent for r in recs),
        "ops": len(syncs),
        "wire_payload_bytes": wire,
        "dense_synced_bytes": n_params * 4 * dense_syncs,
        "algorithms": sorted({r.algorithm for r in syncs}),
        "sim_time_s": wan.clock if wan is not None else time.perf_counter() - t_real,
        "compute_s": compute,
        "comm_s": wan.comm_s if wan is not None else 0.0,
        "exposed_comm_s": wan.exposed_comm_s if wan is not None else 0.0,
        "real_time_s": time.perf_counter() - t_real,
        "curve": curve,
        "init_hash": h,
    }


def _nan_for_null(d: dict[str, Any]) -> dict[str, Any]:
    """A rank file's object with its nulls (non-finite floats, see ``json_safe``) as NaN."""
    return {k: math.nan if v is None else v for k, v in d.items()}


def run_rank(comm: Communicator, cfg: BenchConfig, progress: Any = None) -> list[dict[str, Any]]:
    """Every method and seed of ``cfg`` on this rank; returns one result per (seed, method)."""
    torch.set_num_threads(1)
    out = []
    for seed in cfg.seeds:
        data = _Data(cfg, seed, TinyConfig(vocab=256) if cfg.data else TinyConfig())
        for name in cfg.methods:
            res = _run_method(name, comm, cfg, seed, data, progress)
            res["seed"] = seed
            res["loss_floor"] = data.floor()
            out.append(res)
            if progress is not None:
                progress.put(("done", name, seed, comm.rank, cfg.steps))
    return out


def _gloo_worker(
    rank: int, cfg_dict: dict[str, Any], rdzv: str, out_dir: str, progress: Any
) -> None:
    import torch.distributed as dist

    from thinwire.bench.cli import _setup_logging
    from thinwire.collectives import TorchDistCommunicator

    # A spawned rank starts with no logging set up: give it the CLI's "thinwire: WARNING: ..."
    # handler, or its warnings (a peer's dropped payload, a WAN timeout) print bare.
    _setup_logging()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cfg = BenchConfig(**cfg_dict)
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{rdzv}", rank=rank, world_size=cfg.world_size
        )
        comm = TorchDistCommunicator(timeout_s=cfg.timeout_s)
        res = run_rank(comm, cfg, progress if rank == 0 else None)
        # Strict JSON: NaN (no train loss at step 0, eval on ranks > 0, no floor with --data)
        # is written as null and read back as NaN (_nan_for_null); no field is None otherwise.
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(json_safe(res), allow_nan=False))
    except BaseException:
        Path(out_dir, f"rank{rank}.error").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _drain(progress: Any, on_event: Any, alive: Any) -> None:
    """Pass ``progress`` events to ``on_event`` while the ranks run, then whatever is left.

    The ranks' last events ("done" of the last method) may still be queued when ``alive()``
    turns false; they are delivered too, so a progress display ends complete.
    """
    while alive():
        try:
            ev = progress.get(timeout=0.2)
        except queue.Empty:
            continue
        if on_event is not None:
            on_event(ev)
    while True:
        try:
            ev = progress.get_nowait()
        except queue.Empty:
            return
        if on_event is not None:
            on_event(ev)


def run_bench(cfg: BenchConfig, on_event: Any = None) -> list[list[dict[str, Any]]]:
    """Run the benchmark; returns, per rank, the list of per-(seed, method) results.

    ``on_event(("step"|"done", method, seed, rank, step))`` is called from a background thread
    as rank 0 progresses (progress bars).
    """
    cfg.validate()
    if cfg.engine == "inproc":
        comms = InprocCommunicator.group(cfg.world_size, timeout_s=cfg.timeout_s)
        results: list[Any] = [None] * cfg.world_size
        errors: list[BaseException] = []
        prog: queue.Queue = queue.Queue()

        def target(r: int) -> None:
            try:
                results[r] = run_rank(comms[r], cfg, prog if r == 0 else None)
            except BaseException as exc:  # re-raised in the caller below
                errors.append(exc)

        threads = [threading.Thread(target=target, args=(r,)) for r in range(cfg.world_size)]
        for t in threads:
            t.start()
        drainer = threading.Thread(
            target=_drain, args=(prog, on_event, lambda: any(t.is_alive() for t in threads))
        )
        drainer.start()
        for t in threads:
            t.join()
        drainer.join()
        if errors:
            raise errors[0]
        return results
    ctx = mp.get_context("spawn")
    prog = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="thinwire-bench-") as tmp:
        procs = [
            ctx.Process(target=_gloo_worker, args=(r, asdict(cfg), f"{tmp}/rdzv", tmp, prog))
            for r in range(cfg.world_size)
        ]
        for p in procs:
            p.start()
        drainer = threading.Thread(
            target=_drain, args=(prog, on_event, lambda: any(p.is_alive() for p in procs))
        )
        drainer.start()
        for p in procs:
            p.join()
        drainer.join()
        errs = [Path(tmp, f"rank{r}.error") for r in range(cfg.world_size)]
        for e in errs:
            if e.exists():
                raise RuntimeError(f"benchmark rank failed:\n{e.read_text()}")
        out = []
        for r in range(cfg.world_size):
            f = Path(tmp, f"rank{r}.json")
            if not f.exists():
                raise RuntimeError(
                    f"benchmark rank {r} exited with code {procs[r].exitcode} and no result"
                )
            out.append(json.loads(f.read_text(), object_hook=_nan_for_null))
        return out
