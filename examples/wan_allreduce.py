"""Gloo collectives on one machine, timed as if the ranks sat behind home broadband links.

Launch (4 ranks over loopback, simulated WAN)::

    OMP_NUM_THREADS=1 torchrun --standalone --nnodes=1 --nproc-per-node=4 examples/wan_allreduce.py --preset home_broadband

Each step models ``--compute-s`` of compute, overlaps it with an async all-reduce of a 1e6-element
fp32 tensor, then all-gathers the reduced tensor's bytes. Real bytes move over gloo; time is the WAN
model's virtual clock (``docs/design.md``, "The WAN model"), so the run takes seconds while
reporting WAN minutes.
Expected output (jitter is seeded, so the numbers repeat exactly)::

    preset home_broadband: up 10 Mbit/s, down 50 Mbit/s, RTT 40 ms, jitter 5 ms, P=4
    modelled all_reduce of 4000000 B: 4.92 s (jitter off; suggested timeout_s >= 45 s)
    rank 0: sent 54000072 B, recv 54000072 B (ring formula 54000072 B), control 360 B, simulated 44.30 s (comm 44.30 s, exposed 41.30 s, compute 3.00 s)
    rank 1: sent 54000072 B, recv 54000072 B (ring formula 54000072 B), control 360 B, simulated 44.30 s (comm 44.30 s, exposed 41.30 s, compute 3.00 s)
    rank 2: sent 54000072 B, recv 54000072 B (ring formula 54000072 B), control 360 B, simulated 44.30 s (comm 44.30 s, exposed 41.30 s, compute 3.00 s)
    rank 3: sent 54000072 B, recv 54000072 B (ring formula 54000072 B), control 360 B, simulated 44.30 s (comm 44.30 s, exposed 41.30 s, compute 3.00 s)

Bytes, as ``thinwire.collectives.accounting`` counts them: a ring all-reduce sends
``2(P-1) ceil(n/P) * 4`` bytes per rank, an equal-size all_gather_bytes ``(P-1)(8 + m)``; the
clock exchange and gloo's 8-byte end mark on each ring row are counted as control bytes.
"""

from __future__ import annotations

import argparse
import math

import torch

from thinwire.collectives import (
    PRESETS,
    TorchDistCommunicator,
    WanCommunicator,
    WanConfig,
    WanModel,
    suggest_timeout,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="home_broadband", choices=sorted(PRESETS))
    ap.add_argument("--numel", type=int, default=1_000_000, help="fp32 elements per tensor")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--compute-s", type=float, default=1.0, help="modelled compute per step")
    ap.add_argument("--seed", type=int, default=0, help="seed of the jitter draws")
    ap.add_argument("--jitter-ms", type=float, default=None, help="override the preset's jitter")
    args = ap.parse_args()

    comm = TorchDistCommunicator(backend="gloo")  # reads torchrun's RANK, WORLD_SIZE, MASTER_*
    P, rank = comm.world_size, comm.rank
    cfg = WanConfig.from_preset(args.preset, P, seed=args.seed, jitter_ms=args.jitter_ms)
    # modelled compute via advance() keeps the printed times independent of this machine's speed
    wan = WanCommunicator(comm, cfg, measure_compute=False)

    if rank == 0:
        p = PRESETS[args.preset]
        t_ar = WanModel(WanConfig.from_preset(args.preset, P, jitter_ms=0.0), P).estimate(
            "all_reduce", "ring", numel=args.numel, itemsize=4
        )
        print(f"preset {p.name}: up {p.up_mbps:g} Mbit/s, down {p.down_mbps:g} Mbit/s, "
              f"RTT {p.rtt_ms:g} ms, jitter {p.jitter_ms:g} ms, P={P}")  # fmt: skip
        print(f"modelled all_reduce of {4 * args.numel} B: {t_ar:.2f} s "
              f"(jitter off; suggested timeout_s >= {suggest_timeout(t_ar):.0f} s)")  # fmt: skip

    x = torch.full((args.numel,), float(rank))
    for step in range(args.steps):
        wan.mark_step(step)
        handle = wan.all_reduce(x, "mean", async_op=True, tag="grad")
        wan.advance(args.compute_s)  # compute overlapping the all-reduce
        handle.wait()
        gathered = wan.all_gather_bytes(x.numpy().tobytes(), tag="gather")
        if len(gathered) != P or x[0].item() != (P - 1) / 2:  # mean of 0..P-1, exact in fp32
            raise RuntimeError(f"unexpected result on rank {rank}: {x[0].item()}")

    tot = wan.ledger.totals()
    ring = 2 * (P - 1) * math.ceil(args.numel / P) * 4 + (P - 1) * (8 + 4 * args.numel)
    for r in range(P):  # one line per rank, in rank order
        if r == rank:
            print(f"rank {rank}: sent {tot['sent']} B, recv {tot['recv']} B (ring formula "
                  f"{args.steps * ring} B), control {tot['control_sent']} B, simulated "
                  f"{wan.clock:.2f} s (comm {wan.comm_s:.2f} s, exposed {wan.exposed_comm_s:.2f} s, "
                  f"compute {wan.compute_s:.2f} s)", flush=True)  # fmt: skip
        comm.barrier()
    comm.close()


if __name__ == "__main__":
    main()
