"""Train the tiny model with DiLoCo across torchft replica groups that may die and come back.

torchft's Lighthouse forms a quorum of the replica groups before every sync; each replica group
here is one process. Start the Lighthouse (the binary ships in the torchft wheel), then one
process per replica group, each with its own ``--replica-id``::

    torchft_lighthouse --min_replicas 3 --join_timeout_ms 10000 --heartbeat_timeout_ms 1000 --bind "[::]:29510" &
    python examples/torchft_diloco.py --lighthouse http://localhost:29510 --replica-id 0 &
    python examples/torchft_diloco.py --lighthouse http://localhost:29510 --replica-id 1 &
    python examples/torchft_diloco.py --lighthouse http://localhost:29510 --replica-id 2

Kill one of them (``kill -9``) and start it again with the same command: it trains from a fresh
model until its first sync, where it joins the quorum and heals, taking a live replica's global
model, outer momentum and step counters; it contributes weight 0 to that round and its own
update from the next one. With ``--min_replicas 3`` the others wait for it at their next sync;
with ``--min_replicas 2`` they sync without it until it is back. Across machines, start the
Lighthouse where every replica reaches it, pass its address to ``--lighthouse`` and give each
replica a ``--host`` the others reach it by.

Expected output of each replica (losses vary with where a replica was killed; the global model
digest is the same on every replica)::

    replica 0: round 1 step 10 group 3 eval 3.12 (committed)
    replica 0: round 2 step 20 group 3 eval 2.68 (committed)
    ...
    replica 2: round 7 step 70 group 3 eval 2.02 (committed; healed: took a live replica's state, 433,432 B)
    ...
    replica 0: done, eval 1.6x after 200 steps; 20 rounds committed; global model 9c1e02ab

Each sync is one thinwire all-reduce of the fp32 pseudo-gradient over the quorum's gloo group
(``--compressor "quant(int8)"``: an all-gather of int8 payloads), then a commit vote and
torchft's ``should_commit``; a round a member did not finish is discarded everywhere.
"""

from __future__ import annotations

import argparse
import functools
import os

import torch

from thinwire.bench import MarkovLanguage, TinyGPT
from thinwire.collectives import TorchftCommunicator
from thinwire.optim import DiLoCo, SyncInfo


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer in [1, inf), got {text!r}")
    return value


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--lighthouse", default="http://localhost:29510", help="Lighthouse address")
    ap.add_argument("--replica-id", type=int, required=True, help="this replica group's number")
    ap.add_argument("--host", default=None, help="name others reach this replica by")
    ap.add_argument("--steps", type=_positive, default=200, help="training steps")
    ap.add_argument("--inner-steps", type=_positive, default=10, help="steps between syncs (H)")
    ap.add_argument("--compressor", default=None, help='e.g. "quant(int8)"; default fp32')
    ap.add_argument("--seed", type=int, default=0, help="seed of model and data")
    ap.add_argument(
        "--quorum-timeout", type=_positive, default=300, help="seconds to wait for a quorum"
    )
    args = ap.parse_args()
    if args.replica_id < 0:
        ap.error(f"argument --replica-id: must be an integer in [0, inf), got {args.replica_id}")
    if args.steps % args.inner_steps:
        ap.error(
            f"argument --steps: must be a multiple of --inner-steps ({args.inner_steps}), "
            f"got {args.steps}"
        )
    return args


def main() -> None:
    args = _args()
    me = args.replica_id

    torch.set_num_threads(1)
    os.environ.setdefault("RUST_LOG", "warn")  # torchft's Rust side logs every quorum at INFO
    comm = TorchftCommunicator(
        args.lighthouse,
        replica_id=str(me),
        hostname=args.host,
        quorum_timeout_s=args.quorum_timeout,
    )
    try:
        model = TinyGPT(seed=args.seed)  # same seed everywhere: identical start, nothing loaded
        opt = DiLoCo(
            model.parameters(),
            functools.partial(torch.optim.AdamW, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1),
            sync_every=args.inner_steps,
            comm=comm,
            compressor=args.compressor,
        )
        lang = MarkovLanguage(seed=args.seed)
        stream = lang.shard(me, args.seed)  # each replica group streams its own shard
        eval_set = lang.eval_set(64, model.cfg.context + 1, args.seed)
        seen = 0  # ledger records already looked at

        def evaluate() -> float:
            with torch.no_grad(), opt.global_params():
                return float(model(eval_set[:, :-1], eval_set[:, 1:]))

        def report(_opt: DiLoCo, info: SyncInfo) -> None:
            nonlocal seen
            records = comm.ledger.records[seen:]
            seen += len(records)
            fetched = sum(r.recv for r in records if r.op == "fetch_state")
            what = "committed" if info.committed else "discarded: a member did not finish it"
            if info.committed and not info.contributed:
                what += f"; healed: took a live replica's state, {fetched:,} B"
            print(
                f"replica {me}: round {info.sync_step} step {info.inner_step} group "
                f"{comm.world_size} eval {evaluate():.2f} ({what})",
                flush=True,
            )

        opt.register_sync_post_hook(report)
        # A replica that heals jumps to the live replicas' step: loop on the optimizer's count.
        while opt.inner_step < args.steps:
            x = lang.sample(16, model.cfg.context + 1, stream)
            loss = model(x[:, :-1], x[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(
            f"replica {me}: done, eval {evaluate():.2f} after {opt.inner_step} steps; "
            f"{opt.sync_step} rounds committed; global model {opt.consistency_digest()[:8]}",
            flush=True,
        )
    finally:
        comm.close()


if __name__ == "__main__":
    main()
