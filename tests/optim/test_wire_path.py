"""The compressed sync path reads nothing back to the host but a few integers per bucket.

On a GPU every ``.item()``, ``.cpu()``, ``.tolist()`` or truth test of a device tensor stalls
the stream until the device catches up. The optimizers' compressed paths are written so that
the only values read back are the per-bucket integrity results (the finiteness flag of what is
about to be sent, one status per peer's frame). These tests run ``step()`` under a
``TorchFunctionMode`` that fails on any host pull of a tensor with more than a few elements
and counts the small ones, on real in-process ranks.
"""

from __future__ import annotations

import copy
import threading
from functools import partial

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from thinwire.collectives import InprocCommunicator
from thinwire.optim import DeMo, DiLoCo, SparseLoCo

_PULLS = {
    torch.Tensor.cpu,
    torch.Tensor.numpy,
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
}
#: Largest tensor a pull may read: P status codes or a flag, never a payload or a parameter.
_SMALL = 8


class HostPullGuard(TorchFunctionMode):
    """Fails on a host pull of a tensor with more than ``_SMALL`` elements; counts the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.small = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _PULLS and args and isinstance(args[0], torch.Tensor):
            n = args[0].numel()
            if n > _SMALL:
                raise AssertionError(f"host pull {func.__name__} of a tensor of {n} elements")
            self.small += 1
        return func(*args, **(kwargs or {}))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))


def _grads(model: nn.Module, gen: torch.Generator) -> None:
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)


def _run(make_opt, P: int = 2, steps: int = 4) -> list[int]:
    """Each rank steps ``steps`` times under the guard; returns the small pulls per rank."""
    comms = InprocCommunicator.group(P)
    base = _model()
    counts = [0] * P
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        try:
            model = copy.deepcopy(base)
            opt = make_opt(model.parameters(), comms[r])
            gen = torch.Generator().manual_seed(r)
            for _ in range(steps):
                _grads(model, gen)
                guard = HostPullGuard()
                with guard:
                    opt.step()
                counts[r] += guard.small
        except BaseException as exc:  # re-raised in the main thread with its traceback
            errors.append(exc)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(P)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return counts


inner = partial(torch.optim.SGD, lr=0.1)


@pytest.mark.parametrize("values", ["float", "sign"])
def test_demo_step_pulls_only_bucket_integrity_scalars(values):
    steps = 4
    counts = _run(
        lambda ps, c: DeMo(ps, lr=1e-3, topk=4, chunk=8, values=values, comm=c), steps=steps
    )
    # Per step and bucket (one bucket here): the outgoing finiteness flag and the P statuses.
    assert all(n <= 2 * steps for n in counts), counts


def test_sparseloco_sync_pulls_only_bucket_integrity_scalars():
    counts = _run(lambda ps, c: SparseLoCo(ps, inner, sync_every=2, topk=8, chunk=8, comm=c))
    # Per sync (two in four steps): the finiteness flag, the P statuses, the round's weight.
    assert all(n <= 3 * 2 for n in counts), counts


def test_diloco_int4_error_feedback_pulls_only_bucket_integrity_scalars():
    counts = _run(
        lambda ps, c: DiLoCo(
            ps,
            inner,
            sync_every=2,
            comm=c,
            compressor="quant(int4, block=32)",
            error_feedback=True,
        )
    )
    assert all(n <= 3 * 2 for n in counts), counts
