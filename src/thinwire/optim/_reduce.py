"""How optimizers average a flat float32 vector across workers, dense or compressed.

One function for every optimizer of the DiLoCo family:

* no codec: a ring ``all_reduce`` (SUM, then divide locally; spec ``collectives_wan_bench.md``
  §2.3) — bytes ``2(M-1)/M * 4N`` per worker;
* a codec: each worker encodes its vector once, the payloads are all-gathered, and every worker
  decodes them and sums in rank order in float32 — bytes ``(M-1) * wire_bytes(N)`` per worker
  (``specs/diloco.md`` §3, "all-gather of compressed Δ_i, local fp32 reduce"). Every worker
  decodes the same bytes in the same order, so the result is bit-identical everywhere, and error
  feedback knows exactly what this worker transmitted.

With ``weighted=True`` a worker may contribute weight 0 (non-finite pseudo-gradient, ``"skip"``
policy): the dense path appends the weight to the vector (4 extra bytes), the gathered path sends
an empty payload; the mean divides by the total weight of the contributors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from thinwire.collectives import Communicator, Handle
from thinwire.compression import Codec

__all__: list[str] = []


@dataclass
class PendingReduce:
    """An issued (possibly asynchronous) reduction; ``result()`` waits and finishes it."""

    numel: int
    codec: Codec | None
    weighted: bool
    handle: Handle | None = None
    local: torch.Tensor | None = None  # single-worker result, no communication
    world: int = 1
    _value: tuple[torch.Tensor, float] | None = None

    def done(self) -> bool:
        return self._value is not None or self.handle is None or self.handle.done()

    def result(self) -> tuple[torch.Tensor, float]:
        """The averaged vector (float32) and the total weight that contributed (0: nobody)."""
        if self._value is not None:
            return self._value
        if self.handle is None:  # one worker: its own contribution is the mean
            self._value = (self.local, 1.0)  # type: ignore[assignment]
            return self._value
        out = self.handle.wait()
        if self.codec is None:
            buf = out
            if self.weighted:
                total = float(buf[-1])
                vec = buf[:-1] / total if total > 0 else torch.zeros_like(buf[:-1])
                self._value = (vec, total)
            else:
                self._value = (buf, float(self.world))
            return self._value
        acc = torch.zeros(self.numel, dtype=torch.float32)
        count = 0
        for payload in out:  # rank order: identical fold on every worker
            if payload is None or len(payload) == 0:
                continue
            acc += self.codec.decode(payload, self.numel)
            count += 1
        if count:
            acc /= count
        self._value = (acc, float(count))
        return self._value


def start_reduce(
    comm: Communicator | None,
    flat: torch.Tensor,
    *,
    codec: Codec | None,
    contribute: bool = True,
    weighted: bool = False,
    async_op: bool = False,
    tag: str = "",
) -> tuple[PendingReduce, torch.Tensor]:
    """Issue the mean of ``flat`` (float32, 1-D) over workers.

    Collective: every rank must call this, in the same order, with the same ``tag``.

    Returns:
        The pending reduction, and what this worker transmitted (its decoded payload; ``flat``
        itself without a codec; zeros when it does not contribute) — error feedback subtracts it.
    """
    n = flat.numel()
    if codec is not None:
        if contribute:
            payload, sent = codec.roundtrip(flat.to(torch.float32))
            sent = sent.reshape(-1).to(flat.dtype)
        else:
            payload, sent = b"", torch.zeros_like(flat)
        if comm is None or comm.world_size == 1:
            pend = PendingReduce(n, codec, weighted, local=sent.clone())
            if not contribute:
                pend._value = (torch.zeros_like(flat), 0.0)
            return pend, sent
        handle = comm.all_gather_bytes(payload, async_op=True, tag=tag)
        pend = PendingReduce(n, codec, weighted, handle=handle)
        if not async_op:
            pend.result()
        return pend, sent
    sent = flat if contribute else torch.zeros_like(flat)
    if comm is None or comm.world_size == 1:
        pend = PendingReduce(n, None, weighted, local=sent.clone())
        if not contribute:
            pend._value = (torch.zeros_like(flat), 0.0)
        return pend, sent
    if weighted:
        buf = torch.cat([sent, torch.full((1,), 1.0 if contribute else 0.0, dtype=sent.dtype)])
        handle = comm.all_reduce(buf, "sum", async_op=True, tag=tag)
    else:
        buf = sent.clone()
        handle = comm.all_reduce(buf, "mean", async_op=True, tag=tag)
    pend = PendingReduce(n, None, weighted, handle=handle, world=comm.world_size)
    if not async_op:
        pend.result()
    return pend, sent
