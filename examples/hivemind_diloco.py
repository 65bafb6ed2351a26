"""Train the tiny model with DiLoCo between hivemind peers that find each other through a DHT.

Each peer is a separate process (on one machine or across the internet). Start the first one,
then start the others with the address it prints::

    python examples/hivemind_diloco.py --world-size 2 --host 127.0.0.1
    # prints: peer 0 listening; join with --initial-peers /ip4/127.0.0.1/tcp/PORT/p2p/PEERID
    python examples/hivemind_diloco.py --world-size 2 --host 127.0.0.1 --initial-peers /ip4/127.0.0.1/tcp/PORT/p2p/PEERID

Across machines use ``--host 0.0.0.0`` and the first peer's public address; at least one peer must
be reachable from the others (hivemind has no NAT traversal without a relay).

Expected output of each peer (losses vary with the CPU timing of rounds, bytes do not)::

    peer LTsKVyxQ: round 1 step 10 train 3.09 eval 2.81 group 2 sent 433,156 B
    peer LTsKVyxQ: round 2 step 20 train 2.16 eval 1.85 group 2 sent 866,312 B
    ...
    peer LTsKVyxQ: done, eval 1.4x after 40 steps; sent 1,732,624 B in 4 syncs

Each sync is one hivemind butterfly all-reduce of the fp32 pseudo-gradient and its contributor
weight (or, with ``--compressor "quant(int8)"``, an all-gather of thinwire int8 payloads), counted
in the ledger under ``diloco/sync``. The peers start from the longest-running peer's weights, and
a peer that joins late (or misses rounds) downloads the current global state from a live one
(ledger tags ``diloco/init`` and ``diloco/state``).
"""

from __future__ import annotations

import argparse
import functools

import torch

from thinwire.bench import MarkovLanguage, TinyGPT
from thinwire.collectives import HivemindCommunicator
from thinwire.optim import DiLoCo


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
    ap.add_argument("--initial-peers", nargs="*", default=[], help="multiaddrs of running peers")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on")
    ap.add_argument("--world-size", type=_positive, default=2, help="peers each round waits for")
    ap.add_argument("--steps", type=_positive, default=40, help="training steps")
    ap.add_argument("--inner-steps", type=_positive, default=10, help="steps between syncs (H)")
    ap.add_argument("--compressor", default=None, help='e.g. "quant(int8)"; default fp32')
    ap.add_argument("--seed", type=int, default=0, help="seed of model and data")
    ap.add_argument("--run-id", default="thinwire-example", help="swarm name on the DHT")
    args = ap.parse_args()
    if args.steps % args.inner_steps:
        ap.error(
            f"argument --steps: must be a multiple of --inner-steps ({args.inner_steps}), "
            f"got {args.steps}"
        )
    return args


def main() -> None:
    args = _args()

    torch.set_num_threads(1)
    comm = HivemindCommunicator.create(
        args.run_id,
        initial_peers=args.initial_peers,
        host_maddrs=[f"/ip4/{args.host}/tcp/0"],
        expected_world_size=args.world_size,
        matchmaking_time=2.0,
        request_timeout=1.0,
        round_wait_timeout=120.0,
    )
    try:
        me = comm.peer_id[-8:]
        if not args.initial_peers:
            print(
                f"peer 0 listening; join with --initial-peers {comm.visible_maddrs()[0]}",
                flush=True,
            )
        model = TinyGPT(seed=args.seed)  # same seed on every peer: identical initial parameters
        opt = DiLoCo(
            model.parameters(),
            functools.partial(torch.optim.AdamW, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1),
            sync_every=args.inner_steps,
            comm=comm,
            compressor=args.compressor,
        )
        lang = MarkovLanguage(seed=args.seed)
        # Each peer streams its own shard: seed it from the peer id, which is unique in the swarm.
        stream = lang.shard(int.from_bytes(comm.peer_id.encode()[-4:], "little"), args.seed)
        eval_set = lang.eval_set(64, model.cfg.context + 1, args.seed)
        for step in range(1, args.steps + 1):
            x = lang.sample(16, model.cfg.context + 1, stream)
            loss = model(x[:, :-1], x[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % args.inner_steps == 0:
                with torch.no_grad(), opt.global_params():
                    ev = float(model(eval_set[:, :-1], eval_set[:, 1:]))
                print(
                    f"peer {me}: round {step // args.inner_steps} step {step} train {float(loss.detach()):.2f} "
                    f"eval {ev:.2f} group {comm.world_size} sent {comm.ledger.totals('diloco/sync')['sent']:,} B",
                    flush=True,
                )
        with torch.no_grad(), opt.global_params():  # the global model after the last sync
            ev = float(model(eval_set[:, :-1], eval_set[:, 1:]))
        syncs = sum(1 for r in comm.ledger.records if r.tag.startswith("diloco/sync"))
        print(
            f"peer {me}: done, eval {ev:.2f} after {args.steps} steps; sent {comm.ledger.totals('diloco/sync')['sent']:,} B in {syncs} syncs",
            flush=True,
        )
    finally:
        comm.close()


if __name__ == "__main__":
    main()
