"""A hivemind butterfly whose result is bit-identical on every peer of the group.

hivemind 1.1.12's ``AllReduceRunner`` returns *differences*: the reducer of a part sends every
sender ``codec(avg - x_sender)``, the sender adds it to its own ``x_sender``, and the reducer adds
the unencoded ``avg - x_own`` to its own part (``allreduce.py``, ``_accumulate_parts_streaming``
and ``_communicate_with_peer``). ``x + (avg - x)`` rounds differently for every ``x``, and a lossy
codec encodes a different delta for every sender, so peers end up with results that differ in the
last bits (fp32) or by whole quantization bins (int8). Its ``TensorPartReducer`` also sums the
parts in arrival order.

Here the owner of a part sums the senders' parts in rank order (sorted peer ids, the order
thinwire numbers ranks in), divides once, encodes the average once with the op's codec, sends
that same message to every sender and keeps the decoded message itself; every peer copies it into
its tensor verbatim. The wire carries one encoded average per part and sender instead of one
encoded delta, so the byte counts do not change. Where the claim stops: a part whose reducer
failed keeps each peer's own values (hivemind's partial-average fallback), so after a failed
reducer results differ across peers by design.

Also here: :func:`native_codec`, the hivemind compression object per thinwire codec name.
Importing this module imports hivemind; the engine does so only when it builds an averager.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import hivemind.compression as hc
import hivemind.compression.serialization as hs
import numpy as np
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllReduceRunner, AveragingMode
from hivemind.averaging.partition import AllreduceException, BannedException, TensorPartReducer
from hivemind.compression import CompressionInfo, deserialize_torch_tensor
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import amap_in_executor, as_aiter, azip
from hivemind.utils.timed_storage import get_dht_time

__all__ = ["ExactAverager", "native_codec"]

logger = logging.getLogger(__name__)
# hivemind codec class per thinwire codec name
_NATIVE = {None: "NoCompression", "fp16": "Float16Compression", "int8": "Uniform8BitQuantization"}

_Encoded = tuple[torch.Tensor, Any]  # (decoded average, the message every sender receives)


class _RankOrderReducer(TensorPartReducer):
    """``TensorPartReducer`` that sums a part's contributions in a fixed sender order."""

    def __init__(self, part_shapes: Sequence[torch.Size], num_senders: int, order: Sequence[int],
                 encode: Callable[[torch.Tensor], _Encoded]) -> None:  # fmt: skip
        self._order, self._encode = list(order), encode
        self._inbox: dict[int, tuple[torch.Tensor, float]] = {}
        super().__init__(part_shapes, num_senders)

    def reset_accumulators(self) -> None:
        self._inbox = {}
        super().reset_accumulators()

    async def accumulate_part(self, sender_index: int, part_index: int, tensor_part: torch.Tensor,
                              weight: float = 1.0) -> _Encoded:  # fmt: skip
        # hivemind's accumulate_part with the running sum replaced by an inbox
        assert 0 <= sender_index < self.num_senders, "invalid sender index"
        assert 0 <= part_index < self.num_parts, "invalid part index"
        self.num_parts_received[sender_index] += 1
        while part_index > self.current_part_index:
            await asyncio.wait(
                {self.current_part_future, asyncio.create_task(self.finished.wait())},
                return_when=asyncio.FIRST_COMPLETED,
            )
            if self.finished.is_set():
                raise AllreduceException(f"attempted to aggregate part in a finalized {self!r}")
        if self.sender_failed_after[sender_index] != float("inf"):
            raise BannedException(f"sender {sender_index} was banned in background")
        assert part_index == self.current_part_index
        current_part_future = self.current_part_future
        if part_index < self.sender_failed_after[sender_index]:
            self._inbox[sender_index] = (tensor_part, weight)
            self.current_part_accumulated_from += 1
            self.denominator += weight
            self.check_current_part_finished()
        return await current_part_future

    def check_current_part_finished(self) -> None:
        assert self.current_part_accumulated_from <= self.num_current_senders
        if self.current_part_accumulated_from == self.num_current_senders:
            acc = self.accumulator  # float32 zeros, as hivemind's; widened for float64 parts
            for i in self._order:
                if i in self._inbox:
                    part, w = self._inbox[i]
                    if acc.dtype != torch.promote_types(acc.dtype, part.dtype):
                        acc = acc.to(torch.promote_types(acc.dtype, part.dtype))
                    acc.add_(part, alpha=w)
            self.current_part_future.set_result(self._encode(acc.div_(self.denominator)))
            self.reset_accumulators()


class _ExactRunner(AllReduceRunner):
    """``AllReduceRunner`` yielding the owner's encoded average, identical on every peer."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        container = self.tensor_part_container
        container.return_deltas = False  # a failed reducer leaves our own part in place
        compression = container.compression
        order = sorted(range(len(self.sender_peer_ids)),
                       key=lambda i: self.sender_peer_ids[i].to_base58())  # fmt: skip

        def encode(avg: torch.Tensor) -> _Encoded:
            msg = compression.compress(avg, CompressionInfo.from_tensor(avg))
            return deserialize_torch_tensor(msg), msg

        self.tensor_part_reducer.finished.set()  # unused: no "received 0%" warning at __del__
        self.tensor_part_reducer = _RankOrderReducer(
            tuple(part.shape for part in self.parts_for_local_averaging),
            len(self.sender_peer_ids), order, encode,
        )  # fmt: skip

    async def _communicate_with_peer(self, peer_id: Any) -> None:
        if peer_id != self.peer_id:  # remote reducers: their messages are averages now
            return await super()._communicate_with_peer(peer_id)
        peer_index = self.ordered_peer_ids.index(peer_id)
        sender_index = self.sender_peer_ids.index(peer_id)
        for part_index, tensor_part in enumerate(self.parts_for_local_averaging):
            decoded, _ = await self.tensor_part_reducer.accumulate_part(
                sender_index, part_index, tensor_part, weight=self.weight
            )
            self.tensor_part_container.register_processed_part(peer_index, part_index, decoded)

    async def _accumulate_parts_streaming(self, stream: AsyncIterator[Any],
                                          sender_index: int) -> AsyncIterator[Any]:  # fmt: skip
        part_index = 0
        try:
            async for tensor_part, weight in amap_in_executor(
                lambda msg: (deserialize_torch_tensor(msg.tensor_part), msg.weight),
                stream,
                max_prefetch=self.tensor_part_container.prefetch,
            ):
                try:
                    _, msg = await self.tensor_part_reducer.accumulate_part(
                        sender_index, part_index, tensor_part, weight=weight
                    )
                    part_index += 1
                except BannedException:
                    break  # sender was banned, we no longer need to aggregate it
                yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=msg)
        finally:
            if part_index != self.tensor_part_reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])


class ExactAverager(DecentralizedAverager):
    """``DecentralizedAverager`` that runs :class:`_ExactRunner` and copies its result verbatim.

    The RPC names carry the class name, so only peers running this class join its groups.
    """

    _rpc_handlers = None  # hivemind caches these per class; never inherit the parent's
    _stub_type = None

    async def _run_allreduce_inplace_(self, tensors: Sequence[torch.Tensor], group_info: Any,
                                      group_id: bytes | None = None, **kwargs: Any) -> None:  # fmt: skip
        group_id = group_info.group_id if group_id is None else group_id
        runner = _ExactRunner(
            p2p=self._p2p, servicer_type=type(self), prefix=self.prefix, tensors=tensors,
            group_id=group_id, ordered_peer_ids=group_info.peer_ids, **kwargs,
        )  # fmt: skip
        assert group_id in self._running_groups, f"group {group_id!r} was not registered"
        self._running_groups[group_id].set_result(runner)
        if runner.modes[group_info.peer_ids.index(self.peer_id)] != AveragingMode.AUX:
            async for tensor, result in azip(as_aiter(*tensors), runner):
                tensor.copy_(result)
                self.last_updated = get_dht_time()
                self._state_updated.set()
        else:
            async for _ in runner:
                raise ValueError("aux peers should not receive averaged tensors")


def native_codec(codec: str | None) -> Any:
    """The hivemind compression object for a thinwire ``codec`` name (None, "fp16", "int8").

    hivemind 1.1.12's ``Uniform8BitQuantization.extract`` calls ``int()`` on a one-element
    array, a TypeError since NumPy 2.4 ("raise TypeError on attempt to convert array with
    ndim > 0 to scalar", NumPy 2.4.0 release notes). When a probe shows that failure, the
    UNIFORM_8BIT entry of hivemind's deserializer table is replaced (once, logged) by a subclass
    whose ``extract`` reads the same wire format: int64 codebook length, float32 codebook,
    uint8 codes. Averagers fork after this, so their processes inherit the fix.
    """
    if codec != "int8":
        return getattr(hc, _NATIVE[codec])()
    table = hs._BASE_COMPRESSION_TYPES
    probe = torch.linspace(-1.0, 1.0, 16)
    try:
        table["UNIFORM_8BIT"].extract(
            table["UNIFORM_8BIT"].compress(probe, hc.CompressionInfo.from_tensor(probe))
        )
    except TypeError:

        class _Uniform8BitNumpy24(hc.Uniform8BitQuantization):
            def extract(self, msg: Any) -> torch.Tensor:
                k = int(np.frombuffer(msg.buffer, dtype=np.int64, count=1)[0])
                book = np.frombuffer(msg.buffer, dtype=np.float32, count=k, offset=8)
                codes = np.frombuffer(msg.buffer, dtype=np.uint8, offset=8 + 4 * k)
                table_t = torch.as_tensor(book.copy()).to(getattr(torch, msg.dtype))
                out = table_t[torch.as_tensor(codes.copy(), dtype=torch.int64)]
                return out.reshape(tuple(msg.size)).requires_grad_(msg.requires_grad)

        logger.warning("hivemind Uniform8BitQuantization.extract fails under NumPy %s; installing "
                       "a deserializer for the same wire format", np.__version__)  # fmt: skip
        table["UNIFORM_8BIT"] = _Uniform8BitNumpy24()
    return table["UNIFORM_8BIT"]
