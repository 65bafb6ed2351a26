"""The optimizer table behind the generic optimizer tests (one table, generic tests over it).

Shaped like ``optim_db`` in ``torch/testing/_internal/common_optimizers.py``: every entry is data —
a constructor ``make(params, **kw)``, a factory of valid keyword configurations, invalid keyword
cases and invalid per-group overrides, each with the exception type and a regex that names the
parameter and its accepted range. ``test_optim_table.py`` runs the same tests over every entry;
DeMo and SparseLoCo join by appending an :class:`OptimInfo` to :data:`OPTIM_DB`.

Also holds the small shared fixtures of those tests: a tiny MLP initialised from a seeded
``torch.Generator`` (``torch.manual_seed`` is process-global and inproc ranks are threads),
per-rank batches, a training loop, a runner for :class:`InprocCommunicator` groups, a recursive
``torch.equal`` over state dicts, and observation helpers for oracle tests: :class:`RecordingComm`
(the real inproc engine keeping a copy of each gathered payload) and :func:`capture` (θ_i, θ_g
and Δ̄ through public torch optimizer hooks).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.optim import Optimizer

from thinwire.collectives import InprocCommunicator
from thinwire.compression import DenseBucket, DenseCodec
from thinwire.optim import DataParallel, DeMo, DiLoCo, LocalSGD, SparseLoCo, StreamingDiLoCo

__all__ = [
    "ErrorCase",
    "OptimInfo",
    "OPTIM_DB",
    "DEFAULT_INNER",
    "TinyMLP",
    "tiny_model",
    "batches",
    "loss_fn",
    "train",
    "run_ranks",
    "assert_same_state",
    "F32",
    "F64",
    "U32",
    "U64",
    "RecordingComm",
    "capture",
    "anchors",
    "step",
    "flat",
]

# DiLoCo's inner optimizer is AdamW (arXiv:2311.08105v3); a larger lr than 4e-4 so that a few
# steps move the tiny model visibly. AdamW's group keys do not overlap the outer keys.
DEFAULT_INNER = partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.01)


@dataclass(frozen=True)
class ErrorCase:
    """An invalid input: keyword arguments (or ``params -> kwargs``), exception type, message regex."""

    kwargs: Mapping[str, Any] | Callable[[list[torch.Tensor]], Mapping[str, Any]]
    exc: type[Exception]
    match: str

    def resolve(self, params: list[torch.Tensor]) -> dict[str, Any]:
        return dict(self.kwargs(params) if callable(self.kwargs) else self.kwargs)


@dataclass(frozen=True)
class OptimInfo:
    """One optimizer's row of the table.

    Attributes:
        name: test id.
        make: ``make(params, **kw) -> Optimizer``; ``kw`` may carry ``comm``.
        valid_kwargs: factory of valid configurations (round trip runs each one).
        invalid_kwargs: constructor cases that must raise.
        invalid_group: per-group overrides that must raise, both in a param-group dict given to
            the constructor and through ``add_param_group``.
        group_kwargs: base configuration of the param-group, closure, zero_grad and no-grad tests.
        group_overrides: two per-group settings that differ (param-group test).
        period: steps of one communication period for a configuration (save points span two).
        no_sync_kwargs: a configuration that does not communicate during the first few steps.
        bare_inner: ``params -> Optimizer`` whose trajectory equals ``make(params,
            **no_sync_kwargs)`` until the first sync (scheduler and closure tests); None for an
            optimizer without an inner one (DeMo), which has its own tests of those.
        fp32_state_keys: per-param state that must stay float32 for bf16 params.
        saved_inflight: ``state_dict -> bool``: the checkpoint holds a communication in flight.
        overlaps: ``kwargs -> bool``: that configuration keeps a communication in flight across
            some step boundary (then the round trip must have saved one in flight).
    """

    name: str
    make: Callable[..., Optimizer]
    valid_kwargs: Callable[[], list[dict[str, Any]]]
    invalid_kwargs: tuple[ErrorCase, ...]
    invalid_group: tuple[ErrorCase, ...]
    group_kwargs: dict[str, Any]
    group_overrides: tuple[dict[str, Any], dict[str, Any]]
    period: Callable[[Mapping[str, Any]], int]
    no_sync_kwargs: dict[str, Any]
    bare_inner: Callable[[Any], Optimizer] | None
    fp32_state_keys: tuple[str, ...] = ()
    saved_inflight: Callable[[Mapping[str, Any]], bool] = lambda sd: False
    overlaps: Callable[[Mapping[str, Any]], bool] = lambda kw: False


# ------------------------------------------------------------------------------ fixtures
IN_DIM, HID, OUT_DIM, BATCH = 5, 8, 3, 4


class TinyMLP(nn.Module):
    """``Linear(5,8) -> Tanh -> Linear(8,3)``: four params (two weights, two biases).

    The forward computes in float32 whatever the parameter dtype (bf16 ``linear`` takes ~25 ms a
    call on this CPU); parameters and their gradients keep the model's dtype.
    """

    def __init__(self, extra: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN_DIM, HID)
        self.fc2 = nn.Linear(HID, OUT_DIM)
        if extra:
            self.unused = nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.float64 if x.dtype == torch.float64 else torch.float32
        w1, b1, w2, b2 = (
            t.to(f) for t in (self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
        )
        return F.linear(torch.tanh(F.linear(x.to(f), w1, b1)), w2, b2)


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32, extra: bool = False) -> nn.Module:
    """A :class:`TinyMLP` initialised from a generator seeded by ``seed``.

    With ``extra`` a fifth parameter ``unused`` is added that no loss touches (no-grad tests).
    """
    g = torch.Generator().manual_seed(seed)
    m = TinyMLP(extra)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return m.to(dtype)


def batches(
    n: int, seed: int, dtype: torch.dtype = torch.float32
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` (x, y) batches from a generator seeded by ``seed`` (one seed per rank)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    return [
        (
            torch.randn(BATCH, IN_DIM, generator=g, dtype=torch.float64).to(dtype),
            torch.randn(BATCH, OUT_DIM, generator=g, dtype=torch.float64).to(dtype),
        )
        for _ in range(n)
    ]


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return (
        (model(x) - y.to(torch.float64 if y.dtype == torch.float64 else torch.float32)) ** 2
    ).mean()


def train(opt: Optimizer, model: nn.Module, data: Sequence[Any], start: int, stop: int) -> None:
    """Inner steps ``start .. stop-1`` on ``data``."""
    for i in range(start, stop):
        opt.zero_grad()
        loss_fn(model, data[i]).backward()
        opt.step()


def run_ranks(
    P: int, fn: Callable[[InprocCommunicator | None, int], Any], comm_cls: type = InprocCommunicator
) -> list[Any]:
    """Run ``fn(comm, rank)`` on ``P`` threads of one inproc group; re-raise the first failure.

    ``P == 0`` runs ``fn(None, 0)`` in this thread (no communicator at all).
    """
    if P == 0:
        return [fn(None, 0)]
    comms = comm_cls.group(P, timeout_s=30.0)
    out: list[Any] = [None] * P
    errors: list[BaseException | None] = [None] * P

    def body(r: int) -> None:
        try:
            out[r] = fn(comms[r], r)
        except BaseException as exc:  # re-raised in the test thread below
            errors[r] = exc
            comms[r].close()  # partners waiting on this rank fail fast instead of timing out

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(P)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        if t.is_alive():
            raise RuntimeError("an inproc rank hung")
    for e in errors:  # the root cause first: PeerLost on the others is a consequence
        if e is not None and "closed before joining" not in str(e):
            raise e
    for e in errors:
        if e is not None:
            raise e
    return out


def assert_same_state(a: Any, b: Any, path: str = "") -> None:
    """Recursive equality of two state dicts: tensors by ``torch.equal`` and dtype, the rest by ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype, f"{path}: {a.dtype} != {b.dtype}"
        assert torch.equal(a, b), f"{path} differs"
    elif isinstance(a, Mapping):
        assert isinstance(b, Mapping) and set(a) == set(b), f"{path}: keys {set(a)} != {set(b)}"
        for k in a:
            assert_same_state(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


# ------------------------------------------------------------------------------ observation
F64, F32 = torch.float64, torch.float32
U32, U64 = 2.0**-24, 2.0**-53  # unit roundoff of float32 / float64 (IEEE 754 binary32/64)


class RecordingComm(InprocCommunicator):
    """The real inproc engine, keeping a copy of every frame this rank all-gathers."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.payloads: list[torch.Tensor] = []

    def all_gather_into_tensor(self, t: torch.Tensor, **kw: Any) -> Any:
        self.payloads.append(t.detach().clone())
        return super().all_gather_into_tensor(t, **kw)


def frame_values(codec: DenseCodec, frame: torch.Tensor, shapes: Sequence[tuple]) -> torch.Tensor:
    """Decode one dense bucket frame to its flat float32 values, checking that it opens cleanly."""
    vals, status = DenseBucket(codec, shapes).decode(frame[None])
    assert status.tolist() == [0], "the frame must open cleanly"
    return vals[0]


def capture(opt: Any) -> dict[str, list[Any]]:
    """Record, per inner step, θ_i and θ_g right before any sync, and per outer step Δ̄.

    Uses public torch hooks: ``opt.inner``'s step post-hook runs before the sync of that step,
    ``opt.outer``'s step pre-hook sees the averaged pseudo-gradient in the anchors' ``.grad``.
    """
    params = [p for g in opt.param_groups for p in g["params"]]
    rec: dict[str, list[Any]] = {"theta": [], "anchor": [], "dbar": []}

    def post(*_: Any) -> None:
        rec["theta"].append([p.detach().clone() for p in params])
        rec["anchor"].append([opt.state[p]["anchor"].clone() for p in params])

    def pre(outer: Any, *_: Any) -> None:
        rec["dbar"].append(
            [
                a.grad.clone() if a.grad is not None else None
                for g in outer.param_groups
                for a in g["params"]
            ]
        )

    opt.inner.register_step_post_hook(post)
    opt.outer.register_step_pre_hook(pre)
    return rec


def anchors(opt: Any, live: bool = False) -> list[torch.Tensor]:
    """θ_g of every param in group order: copies, or the live tensors the outer optimizer steps."""
    out = [opt.state[p]["anchor"] for g in opt.param_groups for p in g["params"]]
    return out if live else [a.clone() for a in out]


def step(opt: Any, model: nn.Module, batch: Any) -> None:
    """One ``zero_grad`` / backward / ``step`` on ``batch``."""
    opt.zero_grad()
    loss_fn(model, batch).backward()
    opt.step()


def flat(ts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate flattened tensors as float64."""
    return torch.cat([t.reshape(-1).to(F64) for t in ts])


# ------------------------------------------------------------------------------ DiLoCo family
def _make(cls: type) -> Callable[..., Optimizer]:
    def make(params: Any, *, inner: Any = DEFAULT_INNER, **kw: Any) -> Optimizer:
        return cls(params, inner, **kw)

    make.__name__ = f"make_{cls.__name__}"
    return make


def _sync_period(kw: Mapping[str, Any]) -> int:
    return int(kw["sync_every"])


_FP32_KEYS = ("anchor", "residual", "inflight")

# Messages come from thinwire._validate: "name must be in RANGE, got VALUE".
_COMMON_INVALID = (
    ErrorCase({"sync_every": 0}, ValueError, r"sync_every must be in \[1, inf\), got 0"),
    ErrorCase({"sync_every": 2.5}, TypeError, r"sync_every must be int in \[1, inf\), got 2\.5"),
    ErrorCase({"ef_decay": 1.5}, ValueError, r"ef_decay must be in \[0\.0, 1\.0\], got 1\.5"),
    ErrorCase({"error_feedback": "yes"}, TypeError, r"error_feedback must be bool, got str"),
    ErrorCase({"compressor": 5}, TypeError, r"compressor must be str or Mapping, got int"),
    ErrorCase(
        {"compressor": DenseCodec("int8")},
        TypeError,
        r"compressor must be None, a pipeline string or a mapping of settings",
    ),
    ErrorCase(
        {"compressor": "quant(int8, block=0)"}, ValueError, r"block must be in \[1, inf\), got 0"
    ),
    ErrorCase(
        {"compressor": "quant(int3)"},
        ValueError,
        r"quant must be in \{1, 2, 4, 8, .*\}, got 'int3'",
    ),
    ErrorCase(
        {"on_nonfinite": "ignore"},
        ValueError,
        r"on_nonfinite must be in \{'raise', 'skip'\}, got 'ignore'",
    ),
    ErrorCase({"inner": 3}, TypeError, r"inner must be a callable param_groups -> Optimizer"),
    ErrorCase(
        {"inner": lambda groups: object()},
        TypeError,
        r"inner must return a torch\.optim\.Optimizer, got object",
    ),
    # The trimmed mean's count of peers dropped at each end.
    ErrorCase(
        {"robust": "trimmed_mean", "trim": 0}, ValueError, r"trim must be in \[1, inf\), got 0"
    ),
    ErrorCase(
        {"robust": "trimmed_mean", "trim": 1.5},
        TypeError,
        r"trim must be int in \[1, inf\), got 1\.5",
    ),
    ErrorCase(
        {"trim": 1},
        ValueError,
        r"trim applies only to robust='trimmed_mean', got trim=1 with robust='mean'",
    ),
    ErrorCase(
        lambda ps: {"robust": "trimmed_mean", "comm": InprocCommunicator.group(3)[0]},
        ValueError,
        r"robust='trimmed_mean' cannot trim at world size 3 with trim=None \(floor\(0\.25 \* 3\)"
        r" = 0\): it needs 1 <= trim < world size / 2",
    ),
    ErrorCase(
        lambda ps: {"robust": "trimmed_mean", "trim": 2, "comm": InprocCommunicator.group(4)[0]},
        ValueError,
        r"robust='trimmed_mean' cannot trim at world size 4 with trim=2: it needs",
    ),
)
_OUTER_INVALID = (
    ErrorCase({"outer_lr": -0.1}, ValueError, r"outer_lr must be in \[0\.0, inf\), got -0\.1"),
    ErrorCase(
        {"outer_lr": float("nan")}, ValueError, r"outer_lr must be in \[0\.0, inf\), got nan"
    ),
    ErrorCase(
        {"outer_momentum": 1.0}, ValueError, r"outer_momentum must be in \[0\.0, 1\.0\), got 1\.0"
    ),
    ErrorCase(
        {"outer_momentum": -0.5}, ValueError, r"outer_momentum must be in \[0\.0, 1\.0\), got -0\.5"
    ),
    ErrorCase({"nesterov": 1}, TypeError, r"nesterov must be bool, got int"),
    ErrorCase(
        {"outer": 3}, TypeError, r"outer must be None or a callable param_groups -> Optimizer"
    ),
)
_GROUP_INVALID = (
    ErrorCase({"outer_lr": -1.0}, ValueError, r"outer_lr must be in \[0\.0, inf\), got -1\.0"),
    ErrorCase(
        {"outer_momentum": 1.5}, ValueError, r"outer_momentum must be in \[0\.0, 1\.0\), got 1\.5"
    ),
    ErrorCase({"outer_nesterov": "no"}, TypeError, r"outer_nesterov must be bool, got str"),
    ErrorCase({"error_feedback": 1}, TypeError, r"error_feedback must be bool, got int"),
    ErrorCase({"ef_decay": -0.1}, ValueError, r"ef_decay must be in \[0\.0, 1\.0\], got -0\.1"),
    ErrorCase({"compressor": 7}, TypeError, r"compressor must be str or Mapping, got int"),
    ErrorCase(
        {"compressor": "quant(int4, block=0)"}, ValueError, r"block must be in \[1, inf\), got 0"
    ),
)
_STREAMING_INVALID = (
    ErrorCase(
        {"sync_every": 5, "fragments": 2},
        ValueError,
        r"sync_every must be a multiple of fragments=2, got 5",
    ),
    ErrorCase(
        {"sync_every": 4, "fragments": 2, "overlap_steps": 2},
        ValueError,
        r"overlap_steps must be in \[0, 1\], got 2",
    ),
    ErrorCase(
        {"sync_every": 4, "fragments": 2, "overlap_steps": -1},
        ValueError,
        r"overlap_steps must be in \[0, 1\], got -1",
    ),
    ErrorCase({"fragments": 0}, ValueError, r"fragments must be in \[1, 4\], got 0"),
    ErrorCase({"fragments": 5}, ValueError, r"fragments must be in \[1, 4\], got 5"),
    ErrorCase({"fragments": True}, TypeError, r"fragments must be list, got bool"),
    ErrorCase(
        {"fragment_pattern": "random"},
        ValueError,
        r"fragment_pattern must be in \{'strided', 'sequential'\}, got 'random'",
    ),
    ErrorCase({"mix_alpha": 1.5}, ValueError, r"mix_alpha must be in \[0\.0, 1\.0\], got 1\.5"),
    ErrorCase({"mix_alpha": -0.1}, ValueError, r"mix_alpha must be in \[0\.0, 1\.0\], got -0\.1"),
    # Explicit fragment lists (the test model has four parameters).
    ErrorCase(
        lambda ps: {"fragments": [[ps[0]], [ps[1], ps[2]]]},
        ValueError,
        r"fragments must cover every parameter exactly once, got 3 of 4",
    ),
    ErrorCase(
        lambda ps: {"fragments": [[ps[0], ps[1]], [ps[1], ps[2], ps[3]]]},
        ValueError,
        r"fragments\[1\] repeats a parameter already in another fragment",
    ),
    ErrorCase(
        lambda ps: {"fragments": [[torch.zeros(2)], list(ps)]},
        ValueError,
        r"fragments\[0\] holds a tensor that is not an optimized parameter",
    ),
    ErrorCase(
        lambda ps: {"fragments": [[], list(ps)]},
        ValueError,
        r"fragments\[0\] must hold at least one parameter",
    ),
)

_SGD_MOMENTUM = partial(torch.optim.SGD, lr=0.05, momentum=0.9)
_OUTER_ADAM = partial(torch.optim.Adam, lr=0.05)


def _diloco_valid() -> list[dict[str, Any]]:
    return [
        {"sync_every": 3},
        {
            "sync_every": 4,
            "inner": _SGD_MOMENTUM,
            "outer_lr": 0.5,
            "outer_momentum": 0.8,
            "nesterov": False,
        },
        {
            "sync_every": 3,
            "compressor": "quant(int4, block=16)",
            "error_feedback": True,
            "ef_decay": 0.9,
        },
        {"sync_every": 2, "compressor": "fp16"},
        {"sync_every": 2, "outer": _OUTER_ADAM},
    ]


def _localsgd_valid() -> list[dict[str, Any]]:
    return [
        {"sync_every": 3},
        {"sync_every": 2, "compressor": "quant(int8, block=32)", "error_feedback": True},
    ]


def _streaming_valid() -> list[dict[str, Any]]:
    return [
        {"sync_every": 4, "fragments": 2, "overlap_steps": 1, "mix_alpha": 0.5},
        {
            "sync_every": 6,
            "fragments": 3,
            "overlap_steps": 1,
            "fragment_pattern": "sequential",
            "compressor": "quant(fp4_e3m0, block=16)",
            "error_feedback": True,
        },
        {
            "sync_every": 4,
            "fragments": 2,
            "overlap_steps": 0,
            "mix_alpha": 0.0,
            "inner": _SGD_MOMENTUM,
        },
    ]


_GROUP_OVERRIDES = (
    {"compressor": None, "outer_lr": 0.5},
    {
        "compressor": "quant(int4, block=8)",
        "outer_lr": 0.9,
        "outer_momentum": 0.5,
        "error_feedback": True,
    },
)
# LocalSGD fixes the outer step (lr 1, momentum 0), so its constructor takes no outer settings.
_LOCALSGD_OVERRIDES = (
    {"compressor": None},
    {"compressor": "quant(int4, block=8)", "error_feedback": True},
)

OPTIM_DB: list[OptimInfo] = [
    OptimInfo(
        name="DiLoCo",
        make=_make(DiLoCo),
        valid_kwargs=_diloco_valid,
        invalid_kwargs=_COMMON_INVALID + _OUTER_INVALID,
        invalid_group=_GROUP_INVALID,
        group_kwargs={"sync_every": 3},
        group_overrides=_GROUP_OVERRIDES,
        period=_sync_period,
        no_sync_kwargs={"sync_every": 1000},
        bare_inner=DEFAULT_INNER,
        fp32_state_keys=_FP32_KEYS,
    ),
    OptimInfo(
        name="LocalSGD",
        make=_make(LocalSGD),
        valid_kwargs=_localsgd_valid,
        invalid_kwargs=_COMMON_INVALID,
        invalid_group=_GROUP_INVALID,
        group_kwargs={"sync_every": 3},
        group_overrides=_LOCALSGD_OVERRIDES,
        period=_sync_period,
        no_sync_kwargs={"sync_every": 1000},
        bare_inner=DEFAULT_INNER,
        fp32_state_keys=_FP32_KEYS,
    ),
    OptimInfo(
        name="StreamingDiLoCo",
        make=_make(StreamingDiLoCo),
        valid_kwargs=_streaming_valid,
        invalid_kwargs=_COMMON_INVALID + _OUTER_INVALID + _STREAMING_INVALID,
        invalid_group=_GROUP_INVALID,
        # One fragment so that a group added later lands where a separate optimizer puts it;
        # overlap and mixing still act (P > 1 is covered by the round trip and the oracles).
        group_kwargs={"sync_every": 4, "fragments": 1, "overlap_steps": 1, "mix_alpha": 0.5},
        group_overrides=_GROUP_OVERRIDES,
        period=_sync_period,
        no_sync_kwargs={"sync_every": 1000, "fragments": 2},
        bare_inner=DEFAULT_INNER,
        fp32_state_keys=_FP32_KEYS,
        saved_inflight=lambda sd: sd["thinwire"]["inflight"] is not None,
        overlaps=lambda kw: kw.get("overlap_steps", 1) > 0,
    ),
]


# ------------------------------------------------------------------------------ DeMo, SparseLoCo
def _demo_make(params: Any, **kw: Any) -> Optimizer:
    return DeMo(params, **kw)


def _demo_valid() -> list[dict[str, Any]]:
    return [
        {"lr": 1e-2, "topk": 4, "chunk": 4},
        {
            "lr": 1e-2,
            "topk": 4,
            "chunk": 4,
            "values": "sign",
            "subtract": "quantized",
            "index_coding": "fixed",
        },
        {
            "lr": 1e-2,
            "topk": 2,
            "chunk": 4,
            "values": "sign",
            "overlap": True,
            "weight_decay": 0.01,
        },
        {"lr": 1e-2, "momentum_decay": 0.9, "aggregate": "global_mean", "on_nonfinite": "skip"},
    ]


_DEMO_LR = {"lr": 1e-2}
_DEMO_INVALID = (
    ErrorCase({"lr": 0.0}, ValueError, r"lr must be in \(0\.0, inf\), got 0\.0"),
    ErrorCase({"lr": float("nan")}, ValueError, r"lr must be in \(0\.0, inf\), got nan"),
    ErrorCase(
        {**_DEMO_LR, "momentum_decay": 1.0},
        ValueError,
        r"momentum_decay must be in \[0\.0, 1\.0\), got 1\.0",
    ),
    ErrorCase({**_DEMO_LR, "topk": 0}, ValueError, r"topk must be in \[1, inf\), got 0"),
    ErrorCase({**_DEMO_LR, "topk": 2.5}, TypeError, r"topk must be int in \[1, inf\), got 2\.5"),
    ErrorCase({**_DEMO_LR, "chunk": 0}, ValueError, r"chunk must be in \[1, 65535\], got 0"),
    ErrorCase(
        {**_DEMO_LR, "values": "bf16"},
        ValueError,
        r"values must be in \{'float', 'sign'\}, got 'bf16'",
    ),
    ErrorCase(
        {**_DEMO_LR, "weight_decay": -1.0},
        ValueError,
        r"weight_decay must be in \[0\.0, inf\), got -1\.0",
    ),
    ErrorCase(
        {**_DEMO_LR, "index_coding": "pack12"},
        ValueError,
        r"index_coding must be in \{'fixed', 'entropy'\}, got 'pack12'",
    ),
    ErrorCase(
        {**_DEMO_LR, "subtract": "both"},
        ValueError,
        r"subtract must be in \{'unquantized', 'quantized'\}, got 'both'",
    ),
    ErrorCase({**_DEMO_LR, "overlap": 1}, TypeError, r"overlap must be bool, got int"),
    ErrorCase(
        {**_DEMO_LR, "aggregate": "sum"},
        ValueError,
        r"aggregate must be in \{'index_mean', 'global_mean'\}, got 'sum'",
    ),
    ErrorCase(
        {**_DEMO_LR, "on_nonfinite": "ignore"},
        ValueError,
        r"on_nonfinite must be in \{'raise', 'skip'\}, got 'ignore'",
    ),
    ErrorCase(
        {**_DEMO_LR, "robust": "median"},
        ValueError,
        r"robust must be in \{'mean', 'clip'\}, got 'median'",
    ),
)
_DEMO_GROUP_INVALID = (
    ErrorCase({"lr": 0.0}, ValueError, r"lr must be in \(0\.0, inf\), got 0\.0"),
    ErrorCase(
        {"momentum_decay": 1.0}, ValueError, r"momentum_decay must be in \[0\.0, 1\.0\), got 1\.0"
    ),
    ErrorCase(
        {"weight_decay": -1.0}, ValueError, r"weight_decay must be in \[0\.0, inf\), got -1\.0"
    ),
    ErrorCase({"topk": 0}, ValueError, r"topk must be in \[1, inf\), got 0"),
    ErrorCase({"chunk": 0}, ValueError, r"chunk must be in \[1, 65535\], got 0"),
    ErrorCase({"values": "int8"}, ValueError, r"values must be in \{'float', 'sign'\}, got 'int8'"),
    ErrorCase(
        {"index_coding": "x"},
        ValueError,
        r"index_coding must be in \{'fixed', 'entropy'\}, got 'x'",
    ),
    ErrorCase({"compress": 1}, TypeError, r"compress must be bool, got int"),
)


def _sparseloco_valid() -> list[dict[str, Any]]:
    return [
        {"sync_every": 3, "topk": 4, "chunk": 4},
        {
            "sync_every": 2,
            "topk": 8,
            "chunk": 4,
            "bits": 32,
            "index_coding": "fixed",
            "aggregate": "global_mean",
        },
        {
            "sync_every": 3,
            "outer_lr": 0.8,
            "error_decay": 0.9,
            "topk": 2,
            "chunk": 4,
            "ef_scale_by_lr": False,
        },
    ]


_SPARSELOCO_INVALID = (
    ErrorCase({"outer_lr": -0.1}, ValueError, r"outer_lr must be in \[0\.0, inf\), got -0\.1"),
    ErrorCase({"sync_every": 0}, ValueError, r"sync_every must be in \[1, inf\), got 0"),
    ErrorCase({"error_decay": 1.5}, ValueError, r"error_decay must be in \[0\.0, 1\.0\], got 1\.5"),
    ErrorCase({"topk": 0}, ValueError, r"topk must be in \[1, 4096\], got 0"),
    ErrorCase({"topk": 4097}, ValueError, r"topk must be in \[1, 4096\], got 4097"),
    ErrorCase({"topk": 2.5}, TypeError, r"topk must be int in \[1, 4096\], got 2\.5"),
    ErrorCase({"chunk": 0}, ValueError, r"chunk must be in \[1, 65535\], got 0"),
    ErrorCase({"bits": 0}, ValueError, r"bits must be in \[1, 8\], got 0"),
    ErrorCase({"bits": 16}, ValueError, r"bits must be in \[1, 8\], got 16"),
    ErrorCase(
        {"index_coding": "pack12"},
        ValueError,
        r"index_coding must be in \{'fixed', 'entropy'\}, got 'pack12'",
    ),
    ErrorCase(
        {"aggregate": "sum"},
        ValueError,
        r"aggregate must be in \{'index_mean', 'global_mean'\}, got 'sum'",
    ),
    ErrorCase({"ef_scale_by_lr": 1}, TypeError, r"ef_scale_by_lr must be bool, got int"),
    ErrorCase(
        {"on_nonfinite": "ignore"},
        ValueError,
        r"on_nonfinite must be in \{'raise', 'skip'\}, got 'ignore'",
    ),
    ErrorCase(
        {"robust": "median"},
        ValueError,
        r"robust must be in \{'mean', 'clip'\} with a sparse compressor, got 'median'",
    ),
)
_SPARSELOCO_GROUP_INVALID = (
    ErrorCase({"outer_lr": -1.0}, ValueError, r"outer_lr must be in \[0\.0, inf\), got -1\.0"),
    ErrorCase({"ef_decay": -0.1}, ValueError, r"ef_decay must be in \[0\.0, 1\.0\], got -0\.1"),
    ErrorCase({"error_feedback": 1}, TypeError, r"error_feedback must be bool, got int"),
    ErrorCase({"compressor": 7}, TypeError, r"compressor must be str or Mapping, got int"),
    ErrorCase(
        {"compressor": {"chunk": 8, "topk": 65, "topk_rule": "density"}},
        ValueError,
        r"topk must be in \[1, 64\], got 65",
    ),
)

OPTIM_DB += [
    OptimInfo(
        name="SparseLoCo",
        make=_make(SparseLoCo),
        valid_kwargs=_sparseloco_valid,
        invalid_kwargs=_SPARSELOCO_INVALID,
        invalid_group=_SPARSELOCO_GROUP_INVALID,
        group_kwargs={"sync_every": 3, "topk": 4, "chunk": 4},
        group_overrides=({"compressor": None}, {"outer_lr": 0.8, "ef_decay": 0.9}),
        period=_sync_period,
        no_sync_kwargs={"sync_every": 1000},
        bare_inner=DEFAULT_INNER,
        fp32_state_keys=_FP32_KEYS,
    ),
    OptimInfo(
        name="DeMo",
        make=_demo_make,
        valid_kwargs=_demo_valid,
        invalid_kwargs=_DEMO_INVALID,
        invalid_group=_DEMO_GROUP_INVALID,
        group_kwargs={"lr": 1e-2, "topk": 4, "chunk": 4},
        group_overrides=(
            {"compress": False, "lr": 5e-3},
            {"topk": 2, "values": "sign", "momentum_decay": 0.9},
        ),
        period=lambda kw: 1,  # DeMo communicates every step
        no_sync_kwargs={"lr": 1e-2, "topk": 4, "chunk": 4},
        bare_inner=None,
        fp32_state_keys=("delta", "pending"),
        saved_inflight=lambda sd: bool(sd["thinwire"]["pending"]),
        overlaps=lambda kw: kw.get("overlap", False),
    ),
]


# ------------------------------------------------------------------------------ DataParallel
_DP_INVALID = (
    ErrorCase(
        {"bucket_cap_mb": 0.0}, ValueError, r"bucket_cap_mb must be in \(0\.0, inf\), got 0\.0"
    ),
    ErrorCase(
        {"init_sync": "rank0"},
        ValueError,
        r"init_sync must be in \{'broadcast', 'check', 'off'\}, got 'rank0'",
    ),
    ErrorCase({"tag": 5}, TypeError, r"tag must be str, got int"),
    ErrorCase({"inner": 3}, TypeError, r"inner must be a callable param_groups -> Optimizer"),
    ErrorCase(
        {"inner": lambda groups: object()},
        TypeError,
        r"inner must return a torch\.optim\.Optimizer, got object",
    ),
)

OPTIM_DB.append(
    OptimInfo(
        name="DataParallel",
        make=_make(DataParallel),
        valid_kwargs=lambda: [
            {},
            {"bucket_cap_mb": 1e-4},  # 26 float32 values: several buckets per step
            {"init_sync": "off", "inner": _SGD_MOMENTUM},
        ],
        invalid_kwargs=_DP_INVALID,
        invalid_group=(),  # no group settings of its own: the inner optimizer's keys only
        group_kwargs={},
        group_overrides=({"lr": 1e-2}, {"lr": 3e-2, "weight_decay": 0.0}),
        period=lambda kw: 1,  # every step averages the gradients
        no_sync_kwargs={},  # one worker: exactly the inner optimizer
        bare_inner=DEFAULT_INNER,
    )
)
