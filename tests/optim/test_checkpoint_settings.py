"""``load_state_dict`` refuses a checkpoint saved with settings other than the optimizer's.

``torch.optim.Optimizer.load_state_dict`` copies every saved group setting over the
constructor's, so before these checks a checkpoint silently replaced the compressor, DeMo's
``topk``, the fragment pattern, even the optimizer's class (a SparseLoCo checkpoint turned a
DiLoCo into SparseLoCo), and a model of other shapes failed only at the first sync. Each case
here saves with one setting, loads into an optimizer built with another, and expects a
``ValueError`` naming the setting, the optimizer's value and the checkpoint's, with the
optimizer left as it was. The previous checkpoint format (1) still loads: a format-1 dict
resumes bit-exactly, and what it records is still checked.
"""

from __future__ import annotations

import copy
import io
from functools import partial
from typing import Any

import pytest
import torch
from _optim_db import DEFAULT_INNER, assert_same_state, batches, tiny_model, train
from torch import nn

from thinwire.optim import DeMo, DiLoCo, LocalSGD, SparseLoCo, StreamingDiLoCo

SGD_INNER = partial(torch.optim.SGD, lr=0.05)


def _diloco(**kw: Any):
    return lambda ps: DiLoCo(ps, DEFAULT_INNER, **{"sync_every": 2, **kw})


def _stream(**kw: Any):
    base = {"sync_every": 4, "fragments": 2, "overlap_steps": 1}
    return lambda ps: StreamingDiLoCo(ps, DEFAULT_INNER, **{**base, **kw})


def _sparse(**kw: Any):
    return lambda ps: SparseLoCo(
        ps, DEFAULT_INNER, **{"sync_every": 2, "topk": 4, "chunk": 4, **kw}
    )


def _demo(**kw: Any):
    return lambda ps: DeMo(ps, **{"lr": 1e-2, "topk": 4, "chunk": 4, **kw})


def _saved(make: Any, steps: int = 3, model: nn.Module | None = None) -> dict[str, Any]:
    model = model if model is not None else tiny_model()
    opt = make(list(model.parameters()))
    train(opt, model, batches(steps, seed=0), 0, steps)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# (saved with, loaded into, the message: setting, optimizer's value, checkpoint's value)
MISMATCHES = [
    pytest.param(
        _sparse(),
        _diloco(),
        r"state_dict optimizer must be 'DiLoCo', got 'SparseLoCo'",
        id="class-sparseloco-into-diloco",
    ),
    pytest.param(
        _diloco(outer_lr=1.0, outer_momentum=0.0, nesterov=False),
        lambda ps: LocalSGD(ps, DEFAULT_INNER, sync_every=2),
        r"state_dict optimizer must be 'LocalSGD', got 'DiLoCo'",
        id="class-diloco-into-localsgd",
    ),
    pytest.param(
        _diloco(compressor="quant(int4, block=16)"),
        _diloco(),
        r"compressor of param group 0 must be None, got 'quant\(int4, block=16\)'",
        id="compressor",
    ),
    pytest.param(
        _diloco(compressor="quant(int4, block=16)"),
        _diloco(compressor="quant(int8, block=16)"),
        r"compressor of param group 0 must be 'quant\(int8, block=16\)', got 'quant\(int4",
        id="compressor-bits",
    ),
    pytest.param(
        _diloco(compressor="fp16", error_feedback=True),
        _diloco(compressor="fp16"),
        r"error_feedback of param group 0 must be False, got True",
        id="error-feedback",
    ),
    pytest.param(
        _diloco(compressor="fp16", error_feedback=True, ef_decay=0.9),
        _diloco(compressor="fp16", error_feedback=True),
        r"ef_decay of param group 0 must be 1\.0, got 0\.9",
        id="ef-decay",
    ),
    pytest.param(
        _diloco(outer_lr=0.5),
        _diloco(),
        r"outer_lr of param group 0 must be 0\.7, got 0\.5",
        id="outer-lr",
    ),
    pytest.param(
        _diloco(outer_momentum=0.5),
        _diloco(),
        r"outer_momentum of param group 0 must be 0\.9, got 0\.5",
        id="outer-momentum",
    ),
    pytest.param(
        _diloco(nesterov=False),
        _diloco(),
        r"outer_nesterov of param group 0 must be True, got False",
        id="nesterov",
    ),
    pytest.param(
        _diloco(robust="clip"), _diloco(), r"robust must be 'mean', got 'clip'", id="robust"
    ),
    pytest.param(
        _diloco(bucket_cap_mb=1.0),
        _diloco(),
        r"bucket_cap_mb must be 25\.0, got 1\.0",
        id="bucket-cap",
    ),
    pytest.param(
        _stream(fragment_pattern="sequential"),
        _stream(),
        r"fragment_pattern must be 'strided', got 'sequential'",
        id="fragment-pattern",
    ),
    pytest.param(
        _stream(mix_alpha=0.0), _stream(), r"mix_alpha must be 0\.5, got 0\.0", id="mix-alpha"
    ),
    pytest.param(
        _stream(overlap_steps=0),
        _stream(),
        r"\(sync_every, fragments, overlap_steps\) must be \(4, 2, 1\), got \(4, 2, 0\)",
        id="overlap-steps",
    ),
    pytest.param(
        _sparse(topk=2),
        _sparse(),
        r"compressor of param group 0 must be \{.*'topk': 4.*\}, got \{.*'topk': 2.*\}",
        id="sparseloco-topk",
    ),
    pytest.param(
        _sparse(aggregate="global_mean"),
        _sparse(),
        r"aggregate must be 'index_mean', got 'global_mean'",
        id="sparseloco-aggregate",
    ),
    pytest.param(
        _sparse(ef_scale_by_lr=False),
        _sparse(),
        r"ef_scale_by_lr must be True, got False",
        id="sparseloco-ef-scale",
    ),
    pytest.param(_demo(topk=2), _demo(), r"topk of param group 0 must be 4, got 2", id="demo-topk"),
    pytest.param(
        _demo(chunk=8), _demo(), r"chunk of param group 0 must be 4, got 8", id="demo-chunk"
    ),
    pytest.param(
        _demo(values="sign"),
        _demo(),
        r"values of param group 0 must be 'float', got 'sign'",
        id="demo-values",
    ),
    pytest.param(
        _demo(index_coding="fixed"),
        _demo(),
        r"index_coding of param group 0 must be 'entropy', got 'fixed'",
        id="demo-index-coding",
    ),
    pytest.param(
        _demo(momentum_decay=0.9),
        _demo(),
        r"momentum_decay of param group 0 must be 0\.999, got 0\.9",
        id="demo-momentum-decay",
    ),
    pytest.param(
        _demo(overlap=True), _demo(), r"overlap must be False, got True", id="demo-overlap"
    ),
    pytest.param(
        _demo(subtract="quantized", values="sign"),
        _demo(values="sign"),
        r"subtract must be 'unquantized', got 'quantized'",
        id="demo-subtract",
    ),
    pytest.param(
        _demo(aggregate="global_mean"),
        _demo(),
        r"aggregate must be 'index_mean', got 'global_mean'",
        id="demo-aggregate",
    ),
    pytest.param(
        _demo(robust="clip"), _demo(), r"robust must be 'mean', got 'clip'", id="demo-robust"
    ),
    pytest.param(
        _demo(bucket_cap_mb=1.0),
        _demo(),
        r"bucket_cap_mb must be 25\.0, got 1\.0",
        id="demo-bucket-cap",
    ),
    pytest.param(
        _demo(),
        _diloco(),
        r"state_dict\['thinwire'\] is missing field 'inner_step'",
        id="class-demo-into-diloco",
    ),
]


def _snapshot(opt: Any, model: nn.Module) -> Any:
    return copy.deepcopy((model.state_dict(), opt.state_dict()))


@pytest.mark.parametrize("saved_with,loaded_into,match", MISMATCHES)
def test_mismatched_setting_is_refused_naming_both_values(
    saved_with: Any, loaded_into: Any, match: str
) -> None:
    sd = _saved(saved_with)
    model = tiny_model(seed=5)
    opt = loaded_into(list(model.parameters()))
    train(opt, model, batches(1, seed=1), 0, 1)
    before = _snapshot(opt, model)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    after = _snapshot(opt, model)  # a refused checkpoint changes nothing
    assert_same_state(after, before)


@pytest.mark.parametrize(
    "make",
    [_diloco(), _stream(), _sparse(), _demo(), _demo(overlap=True)],
    ids=["diloco", "streaming", "sparseloco", "demo", "demo-overlap"],
)
def test_other_param_shapes_are_refused_at_load(make: Any) -> None:
    # Same number of elements, transposed: before the check this failed only at the first sync
    # (or, for DeMo, produced a momentum of the wrong shape).
    sd = _saved(make)
    other = tiny_model()
    with torch.no_grad():
        other.fc1.weight = nn.Parameter(torch.zeros(5, 8))
    opt = make(list(other.parameters()))
    with pytest.raises(
        ValueError, match=r"shape of param 0 of group 0 must be \(5, 8\), got \(8, 5\)"
    ):
        opt.load_state_dict(sd)


def test_equivalent_compressor_spellings_load() -> None:
    # The same codec written as a pipeline string and as a settings mapping is the same setting.
    sd = _saved(_diloco(compressor="fp16"))
    model = tiny_model()
    opt = DiLoCo(model.parameters(), DEFAULT_INNER, sync_every=2, compressor={"values": "fp16"})
    opt.load_state_dict(sd)


def test_inner_lr_still_loads_from_the_checkpoint() -> None:
    # As in torch.optim, the inner optimizer's group settings (lr: LR schedules) come from the
    # checkpoint; only settings that change thinwire's numerics are compared.
    sd = _saved(_diloco())
    model = tiny_model()
    opt = DiLoCo(model.parameters(), partial(torch.optim.AdamW, lr=0.5), sync_every=2)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == DEFAULT_INNER.keywords["lr"]


# ------------------------------------------------------------------ the previous format
def _as_format_1(sd: dict[str, Any]) -> dict[str, Any]:
    """The same checkpoint as format 1 wrote it: the 'thinwire' entry without the new fields."""
    sd = copy.deepcopy(sd)
    tw = sd["thinwire"]
    keep = (
        ("format", "step", "pending")
        if "step" in tw
        else (
            "format",
            "inner_step",
            "outer_step",
            "sync_every",
            "fragments",
            "overlap_steps",
            "inflight",
        )
    )
    sd["thinwire"] = {k: tw[k] for k in keep}
    sd["thinwire"]["format"] = 1
    return sd


@pytest.mark.parametrize(
    "make,T,k",
    [
        (_diloco(compressor="quant(int4, block=16)", error_feedback=True), 7, 3),
        (_stream(), 9, 3),  # k = 3: a fragment in flight at the save
        (_sparse(), 7, 3),
        (_demo(overlap=True), 5, 2),  # an aggregate pending at the save
    ],
    ids=["diloco", "streaming", "sparseloco", "demo-overlap"],
)
def test_previous_format_loads_and_resumes_bit_exactly(make: Any, T: int, k: int) -> None:
    data = batches(T, seed=0)
    model = tiny_model()
    opt = make(list(model.parameters()))
    train(opt, model, data, 0, T)
    ref = copy.deepcopy(model.state_dict())

    model = tiny_model()
    opt = make(list(model.parameters()))
    train(opt, model, data, 0, k)
    sd = _as_format_1(opt.state_dict())
    assert sd["thinwire"]["format"] == 1
    saved_model = copy.deepcopy(model.state_dict())
    model = tiny_model(seed=9)
    opt = make(list(model.parameters()))
    model.load_state_dict(saved_model)
    opt.load_state_dict(sd)
    train(opt, model, data, k, T)
    assert_same_state(model.state_dict(), ref)
    assert opt.state_dict()["thinwire"]["format"] == 2


@pytest.mark.parametrize(
    "saved_with,loaded_into,match",
    [
        (_demo(topk=2), _demo(), r"topk of param group 0 must be 4, got 2"),
        # No class recorded, but SparseLoCo's outer step (lr 1, no momentum) differs.
        (_sparse(), _diloco(), r"outer_lr of param group 0 must be 0\.7, got 1\.0"),
        (_diloco(outer_lr=0.5), _diloco(), r"outer_lr of param group 0 must be 0\.7, got 0\.5"),
        # Format 1 did not record overlap, but an aggregate pending proves it.
        (_demo(overlap=True), _demo(), r"overlap must be False, got True"),
    ],
    ids=["demo-topk", "sparseloco-into-diloco", "outer-lr", "demo-overlap"],
)
def test_previous_format_is_checked_where_it_can_be(
    saved_with: Any, loaded_into: Any, match: str
) -> None:
    sd = _as_format_1(_saved(saved_with))
    opt = loaded_into(list(tiny_model().parameters()))
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)


def test_previous_format_shapes_checked_from_state() -> None:
    sd = _as_format_1(_saved(_diloco()))
    other = tiny_model()
    with torch.no_grad():
        other.fc1.weight = nn.Parameter(torch.zeros(5, 8))
    opt = DiLoCo(other.parameters(), DEFAULT_INNER, sync_every=2)
    with pytest.raises(
        ValueError, match=r"shape of param 0 of group 0 must be \(5, 8\), got \(8, 5\)"
    ):
        opt.load_state_dict(sd)


def test_unknown_format_is_refused() -> None:
    sd = _saved(_diloco())
    sd["thinwire"]["format"] = 3
    opt = DiLoCo(tiny_model().parameters(), DEFAULT_INNER, sync_every=2)
    with pytest.raises(ValueError, match=r"state_dict format must be in \{1, 2\}, got 3"):
        opt.load_state_dict(sd)
    sd = _saved(_diloco())
    del sd["thinwire"]["fragment_pattern"]
    with pytest.raises(ValueError, match=r"missing field 'fragment_pattern'"):
        opt.load_state_dict(sd)
