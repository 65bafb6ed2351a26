"""Generic tests over the optimizer table (``_optim_db.OPTIM_DB``, shaped like torch's ``optim_db``).

For every optimizer of the table: validation messages (constructor, param-group dicts and
``add_param_group``), a bit-exact ``state_dict`` round trip through ``io.BytesIO`` at every step of
two periods (mid-interval, in flight, bf16 params with float32 outer state, compressor + error
feedback; single process and an inproc group of 2), param groups with different settings against
one optimizer per group, ``step(closure)``, params without grad, ``zero_grad`` and an LR scheduler.
Oracles: an uninterrupted run, separate optimizers, and the bare inner optimizer.
"""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
from _optim_db import (
    OPTIM_DB,
    ErrorCase,
    OptimInfo,
    assert_same_state,
    batches,
    loss_fn,
    run_ranks,
    tiny_model,
    train,
)

__all__: list[str] = []


def _cases(attr: str) -> list[Any]:
    out = []
    for info in OPTIM_DB:
        for i, case in enumerate(getattr(info, attr)):
            out.append(pytest.param(info, case, id=f"{info.name}-{i}"))
    return out


def _configs() -> list[Any]:
    return [
        pytest.param(info, kw, id=f"{info.name}-{i}")
        for info in OPTIM_DB
        for i, kw in enumerate(info.valid_kwargs())
    ]


BY_NAME = [pytest.param(info, id=info.name) for info in OPTIM_DB]
# Optimizers that wrap an inner torch optimizer (all but DeMo): the closure and scheduler tests
# compare them with that bare inner optimizer before the first sync.
WITH_INNER = [pytest.param(info, id=info.name) for info in OPTIM_DB if info.bare_inner is not None]


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("info,case", _cases("invalid_kwargs"))
def test_invalid_constructor_kwargs(info: OptimInfo, case: ErrorCase) -> None:
    params = list(tiny_model().parameters())
    with pytest.raises(case.exc, match=case.match):
        info.make(params, **case.resolve(params))


@pytest.mark.parametrize("info,case", _cases("invalid_group"))
def test_invalid_group_override_in_constructor(info: OptimInfo, case: ErrorCase) -> None:
    ps = list(tiny_model().parameters())
    groups = [{"params": ps[:2]}, {"params": ps[2:], **case.resolve(ps)}]
    with pytest.raises(case.exc, match=case.match):
        info.make(groups, **info.group_kwargs)


@pytest.mark.parametrize("info,case", _cases("invalid_group"))
def test_invalid_group_override_in_add_param_group(info: OptimInfo, case: ErrorCase) -> None:
    ps = list(tiny_model().parameters())
    opt = info.make(ps[:2], **info.group_kwargs)
    with pytest.raises(case.exc, match=case.match):
        opt.add_param_group({"params": ps[2:], **case.resolve(ps)})
    # A rejected group leaves the optimizer as it was.
    assert len(opt.param_groups) == 1
    assert [p for g in opt.param_groups for p in g["params"]] == ps[:2]


@pytest.mark.parametrize("where", ["constructor", "add_param_group"])
@pytest.mark.parametrize("info", BY_NAME)
def test_complex_param_is_refused_naming_its_index(info: OptimInfo, where: str) -> None:
    # DeMo used to take the real part silently (its momentum is float32).
    ps = list(tiny_model().parameters())
    bad = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    if where == "constructor":
        with pytest.raises(
            TypeError,
            match=r"param 2 of group 1 must be a real floating-point "
            r"tensor, got torch\.complex64",
        ):
            info.make([{"params": ps[:2]}, {"params": [ps[2], ps[3], bad]}], **info.group_kwargs)
    else:
        opt = info.make(ps, **info.group_kwargs)
        with pytest.raises(TypeError, match=r"param 0 of group 1 must be a real floating-point"):
            opt.add_param_group({"params": [bad]})
        assert len(opt.param_groups) == 1


@pytest.mark.parametrize("where", ["constructor", "add_param_group"])
@pytest.mark.parametrize("info", BY_NAME)
def test_meta_param_is_refused_at_construction(info: OptimInfo, where: str) -> None:
    # It used to be accepted and to fail at the first step with a message naming nothing.
    ps = list(tiny_model().parameters())
    meta = torch.nn.Parameter(torch.empty(4, 3, device="meta"))
    match = r"param 1 of group 0 must be on a device that holds data, got device 'meta'"
    if where == "constructor":
        with pytest.raises(ValueError, match=match):
            info.make([ps[0], meta, *ps[1:]], **info.group_kwargs)
    else:
        opt = info.make(ps[:2], **info.group_kwargs)
        with pytest.raises(ValueError, match=r"param 0 of group 1 must be on a device"):
            opt.add_param_group({"params": [meta]})
        assert len(opt.param_groups) == 1


@pytest.mark.parametrize("info", BY_NAME)
def test_a_set_of_params_is_refused(info: OptimInfo) -> None:
    # A set's iteration order differs between processes, so ranks would pair other tensors.
    ps = list(tiny_model().parameters())
    match = r"params must be an ordered iterable of tensors .*got set"
    with pytest.raises(TypeError, match=match):
        info.make(set(ps), **info.group_kwargs)
    with pytest.raises(TypeError, match=match):
        info.make([{"params": set(ps)}], **info.group_kwargs)
    opt = info.make(ps[:2], **info.group_kwargs)
    with pytest.raises(TypeError, match=match):
        opt.add_param_group({"params": set(ps[2:])})
    with pytest.raises(TypeError, match=r"params must be an ordered iterable .*got frozenset"):
        opt.add_param_group({"params": frozenset(ps[2:])})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("where", ["constructor", "add_param_group"])
@pytest.mark.parametrize("info", BY_NAME)
def test_unknown_group_key_is_refused_listing_the_accepted_keys(
    info: OptimInfo, where: str
) -> None:
    ps = list(tiny_model().parameters())
    known = next(iter(info.group_overrides[1]))  # a per-group key this optimizer accepts
    match = rf"keys of param group 1 must be in \{{.*'{known}'.*\}}, got 'outer_lrr'"
    if where == "constructor":
        with pytest.raises(ValueError, match=match):
            info.make(
                [{"params": ps[:2]}, {"params": ps[2:], "outer_lrr": 0.5}], **info.group_kwargs
            )
    else:
        opt = info.make(ps[:2], **info.group_kwargs)
        with pytest.raises(ValueError, match=match):
            opt.add_param_group({"params": ps[2:], "outer_lrr": 0.5})
        assert len(opt.param_groups) == 1
        opt.add_param_group({"params": ps[2:], known: info.group_overrides[1][known]})


@pytest.mark.parametrize("info", BY_NAME)
def test_add_param_group_accepts_a_generator(info: OptimInfo) -> None:
    # torch.optim accepts any iterable of tensors as a group's "params".
    ps = list(tiny_model().parameters())
    opt = info.make(ps[:2], **info.group_kwargs)
    opt.add_param_group({"params": (p for p in ps[2:])})
    assert [len(g["params"]) for g in opt.param_groups] == [2, 2]


# ------------------------------------------------------------------------------ round trip
def _checkpoint(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _resume(info: OptimInfo, kw: dict[str, Any], dtype: torch.dtype, ck: dict[str, Any], comm: Any):
    # A fresh model with other weights: everything must come from the checkpoint.
    model = tiny_model(seed=99, dtype=dtype)
    opt = info.make(model.parameters(), comm=comm, **kw)
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["opt"])
    for p in model.parameters():
        for key in info.fp32_state_keys:
            if key in opt.state[p]:
                assert opt.state[p][key].dtype == torch.float32, (key, p.dtype)
    return model, opt


def _final(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[Any, Any]:
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("info,kw", _configs())
def test_round_trip_bit_exact(info: OptimInfo, kw: dict[str, Any], dtype: torch.dtype) -> None:
    H = info.period(kw)
    T = 2 * H + 2
    data = batches(T, seed=0, dtype=dtype)
    model = tiny_model(dtype=dtype)
    opt = info.make(model.parameters(), **kw)
    train(opt, model, data, 0, T)
    ref = _final(model, opt)

    inflight_saves = 0
    for k in range(1, 2 * H + 1):  # every step of two periods: mid-interval, at syncs, in flight
        model = tiny_model(dtype=dtype)
        opt = info.make(model.parameters(), **kw)
        train(opt, model, data, 0, k)
        ck = _checkpoint(model, opt)
        inflight_saves += info.saved_inflight(ck["opt"])
        model, opt = _resume(info, kw, dtype, ck, comm=None)
        train(opt, model, data, k, T)
        got = _final(model, opt)
        assert_same_state(got[0], ref[0], f"k={k} model")
        assert_same_state(got[1], ref[1], f"k={k} opt")
    assert (inflight_saves > 0) == info.overlaps(kw)


@pytest.mark.parametrize("info,kw", _configs())
def test_round_trip_bit_exact_inproc_group(info: OptimInfo, kw: dict[str, Any]) -> None:
    H = info.period(kw)
    T = 2 * H + 2
    base = tiny_model()

    def uninterrupted(comm: Any, rank: int) -> Any:
        model = copy.deepcopy(base)
        opt = info.make(model.parameters(), comm=comm, **kw)
        train(opt, model, batches(T, seed=rank), 0, T)
        return _final(model, opt)

    ref = run_ranks(2, uninterrupted)
    for k in range(1, 2 * H + 1):

        def resumed(comm: Any, rank: int, k: int = k) -> Any:
            data = batches(T, seed=rank)
            model = copy.deepcopy(base)
            opt = info.make(model.parameters(), comm=comm, **kw)
            train(opt, model, data, 0, k)
            ck = _checkpoint(model, opt)
            model, opt = _resume(info, kw, torch.float32, ck, comm)
            train(opt, model, data, k, T)
            return _final(model, opt)

        for r, got in enumerate(run_ranks(2, resumed)):
            assert_same_state(got[0], ref[r][0], f"k={k} rank {r} model")
            assert_same_state(got[1], ref[r][1], f"k={k} rank {r} opt")


# ------------------------------------------------------------------------------ param groups
def _lockstep(
    models: list[torch.nn.Module], opts: list[list[torch.optim.Optimizer]], steps: int
) -> None:
    data = batches(steps, seed=3)
    for i in range(steps):
        for model, group in zip(models, opts, strict=True):
            for o in group:
                o.zero_grad()
            loss_fn(model, data[i]).backward()
            for o in group:
                o.step()


@pytest.mark.parametrize("info", BY_NAME)
def test_param_groups_equal_one_optimizer_per_group(info: OptimInfo) -> None:
    a, b = info.group_overrides
    m1 = tiny_model()
    m2 = copy.deepcopy(m1)
    p1, p2 = list(m1.parameters()), list(m2.parameters())
    together = info.make([{"params": p1[:2], **a}, {"params": p1[2:], **b}], **info.group_kwargs)
    for key, value in b.items():
        assert together.param_groups[1][key] == value
    # Each separate optimizer gets its setting as a one-group dict (not every per-group key is
    # also a constructor argument, e.g. DeMo's compress or SparseLoCo's compressor).
    apart = [
        info.make([{"params": p2[:2], **a}], **info.group_kwargs),
        info.make([{"params": p2[2:], **b}], **info.group_kwargs),
    ]
    steps = 3 * info.period(info.group_kwargs) + 1
    _lockstep([m1, m2], [[together], apart], steps)
    for x, y in zip(p1, p2, strict=True):
        assert torch.equal(x, y)
    # The overrides matter: the same run with both groups on the first setting differs.
    m3 = copy.deepcopy(tiny_model())
    same = info.make(
        [{"params": list(m3.parameters())[:2], **a}, {"params": list(m3.parameters())[2:], **a}],
        **info.group_kwargs,
    )
    _lockstep([m3], [[same]], steps)
    assert not all(torch.equal(x, y) for x, y in zip(p1, m3.parameters(), strict=True))


@pytest.mark.parametrize("info", BY_NAME)
def test_add_param_group_equals_one_optimizer_per_group(info: OptimInfo) -> None:
    a, b = info.group_overrides
    m1 = tiny_model()
    m2 = copy.deepcopy(m1)
    p1, p2 = list(m1.parameters()), list(m2.parameters())
    grown = info.make([{"params": p1[:2], **a}], **info.group_kwargs)
    grown.add_param_group({"params": p1[2:], **a, **b})
    apart = [
        info.make([{"params": p2[:2], **a}], **info.group_kwargs),
        info.make([{"params": p2[2:], **a, **b}], **info.group_kwargs),
    ]
    _lockstep([m1, m2], [[grown], apart], 3 * info.period(info.group_kwargs) + 1)
    for x, y in zip(p1, p2, strict=True):
        assert torch.equal(x, y)


# ------------------------------------------------------------------------------ step API
@pytest.mark.parametrize("info", WITH_INNER)
def test_step_closure_returns_the_loss(info: OptimInfo) -> None:
    model = tiny_model()
    ref_model = copy.deepcopy(model)
    opt = info.make(model.parameters(), **info.no_sync_kwargs)
    ref = info.bare_inner(ref_model.parameters())
    data = batches(4, seed=1)
    for batch in data:

        def closure(batch: Any = batch) -> torch.Tensor:
            opt.zero_grad()
            loss = loss_fn(model, batch)
            loss.backward()  # fails if step() ran the closure under no_grad
            return loss

        ref.zero_grad()
        expected = loss_fn(ref_model, batch)
        expected.backward()
        ref.step()
        got = opt.step(closure)
        assert isinstance(got, torch.Tensor) and got.item() == expected.item()
        for x, y in zip(model.parameters(), ref_model.parameters(), strict=True):
            assert torch.equal(x, y)


@pytest.mark.parametrize("info", BY_NAME)
def test_params_without_grad_are_left_alone(info: OptimInfo) -> None:
    model = tiny_model(extra=True)
    unused = model.unused
    before = unused.detach().clone()
    others = {n: p.detach().clone() for n, p in model.named_parameters() if n != "unused"}
    opt = info.make(model.parameters(), **info.group_kwargs)
    steps = 2 * info.period(info.group_kwargs) + 1
    train(opt, model, batches(steps, seed=2), 0, steps)
    assert unused.grad is None
    assert torch.equal(unused, before)
    assert all(not torch.equal(p, others[n]) for n, p in model.named_parameters() if n != "unused")


@pytest.mark.parametrize("info", BY_NAME)
def test_zero_grad(info: OptimInfo) -> None:
    model = tiny_model()
    opt = info.make(model.parameters(), **info.group_kwargs)
    data = batches(1, seed=0)
    loss_fn(model, data[0]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    loss_fn(model, data[0]).backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


@pytest.mark.parametrize("info", WITH_INNER)
def test_lr_scheduler_drives_the_inner_lr(info: OptimInfo) -> None:
    model = tiny_model()
    ref_model = copy.deepcopy(model)
    opt = info.make(model.parameters(), **info.no_sync_kwargs)
    ref = info.bare_inner(ref_model.parameters())
    base_lr = opt.param_groups[0]["lr"]
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref, step_size=2, gamma=0.5)
    data = batches(6, seed=4)
    for i in range(6):
        for o, m in ((opt, model), (ref, ref_model)):
            o.zero_grad()
            loss_fn(m, data[i]).backward()
            o.step()
        sched.step()
        ref_sched.step()
        assert opt.param_groups[0]["lr"] == base_lr * 0.5 ** ((i + 1) // 2)
        for x, y in zip(model.parameters(), ref_model.parameters(), strict=True):
            assert torch.equal(x, y)


# ------------------------------------------------------------------------------ DeMo (no inner)
DEMO = next(info for info in OPTIM_DB if info.name == "DeMo")


def test_demo_closure_equals_a_step_after_backward() -> None:
    """``step(closure)`` returns the closure's loss and moves params exactly as backward + step."""
    model = tiny_model()
    ref_model = copy.deepcopy(model)
    opt = DEMO.make(model.parameters(), **DEMO.group_kwargs)
    ref = DEMO.make(ref_model.parameters(), **DEMO.group_kwargs)
    for batch in batches(4, seed=1):

        def closure(batch: Any = batch) -> torch.Tensor:
            opt.zero_grad()
            loss = loss_fn(model, batch)
            loss.backward()
            return loss

        ref.zero_grad()
        expected = loss_fn(ref_model, batch)
        expected.backward()
        ref.step()
        got = opt.step(closure)
        assert got.item() == expected.item()
        for x, y in zip(model.parameters(), ref_model.parameters(), strict=True):
            assert torch.equal(x, y)


def test_demo_lr_scheduler_sets_the_step_size() -> None:
    """A StepLR on DeMo equals setting the halved lr by hand before each step."""
    model = tiny_model()
    ref_model = copy.deepcopy(model)
    opt = DEMO.make(model.parameters(), **DEMO.group_kwargs)
    ref = DEMO.make(ref_model.parameters(), **DEMO.group_kwargs)
    base_lr = opt.param_groups[0]["lr"]
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for i, batch in enumerate(batches(6, seed=4)):
        for g in ref.param_groups:
            g["lr"] = base_lr * 0.5 ** (i // 2)
        for o, m in ((opt, model), (ref, ref_model)):
            o.zero_grad()
            loss_fn(m, batch).backward()
            o.step()
        sched.step()
        for x, y in zip(model.parameters(), ref_model.parameters(), strict=True):
            assert torch.equal(x, y)
    assert opt.param_groups[0]["lr"] == base_lr * 0.5**3
