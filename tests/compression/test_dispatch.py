"""The backend rule and the (reference, kernel) registry of thinwire.compression._dispatch.

Oracles: the rule as the module docstring of ``_dispatch`` writes it (auto / torch / triton, CPU
only under ``TRITON_INTERPRET=1``), ``inspect.signature`` equality for every registered pair, and
fresh subprocesses for the import-time behaviour (triton blocked; kernels decorated without the
interpreter).
"""

from __future__ import annotations

import inspect
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from thinwire.compression import _dispatch as D
from thinwire.compression import fused

CPU = torch.zeros(3)


def test_resolve_backend_rule_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert D.resolve_backend("torch", CPU) == "torch"
    assert D.resolve_backend("auto", CPU) == "torch"  # auto picks Triton only on CUDA
    assert D.resolve_backend("auto") == "torch"  # no tensor to judge
    assert D.resolve_backend("triton", CPU, CPU) == "triton"  # interpreter allowed
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    msg = (
        r"backend='triton' needs CUDA tensors or TRITON_INTERPRET=1 set before import, "
        r"got device cpu"
    )
    with pytest.raises(ValueError, match=msg):
        D.resolve_backend("triton", CPU)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match=msg):
        D.resolve_backend("triton", CPU)


def test_resolve_backend_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"backend must be in \{'auto', 'torch', 'triton'\}"):
        D.resolve_backend("cuda", CPU)
    with pytest.raises(TypeError, match=r"tensors\[1\] must be Tensor"):
        D.resolve_backend("auto", CPU, 3)
    monkeypatch.setattr(D, "triton_available", lambda: False)
    assert D.resolve_backend("auto", CPU) == "torch"
    with pytest.raises(ImportError, match=r"backend='triton' needs the triton package"):
        D.resolve_backend("triton", CPU)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_resolve_backend_auto_on_cuda() -> None:
    x = torch.zeros(3, device="cuda")
    assert D.resolve_backend("auto", x) == "triton"
    assert D.resolve_backend("auto", x, CPU) == "torch"  # every tensor must be on CUDA
    assert D.resolve_backend("torch", x) == "torch"


def test_registered_pairs_have_identical_signatures() -> None:
    pairs = D.registered()
    assert {"ef_quantize_pack", "dct_topk", "decode_accumulate"} <= set(pairs)
    for name, pair in pairs.items():
        kernel = pair.load_kernel()
        assert inspect.signature(pair.reference) == inspect.signature(kernel), name
        assert pair.reference.__name__ == f"{name}_torch"
        assert kernel.__name__ == f"{name}_triton"
        # The public op is the same signature plus a keyword-only backend="auto".
        public = inspect.signature(getattr(fused, name))
        params = list(public.parameters.values())
        assert params[-1].name == "backend" and params[-1].default == "auto"
        assert params[-1].kind is inspect.Parameter.KEYWORD_ONLY
        assert public.replace(parameters=params[:-1]) == inspect.signature(pair.reference)


def test_register_rejects_duplicates_and_bad_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(D, "_REGISTRY", dict(D._REGISTRY))
    with pytest.raises(ValueError, match=r"name must not be registered yet, got 'dct_topk'"):
        D.register("dct_topk", fused.dct_topk_torch, fused.dct_topk_torch)
    with pytest.raises(ValueError, match=r"kernel must be callable or 'module:attribute'"):
        D.register("x_op", fused.dct_topk_torch, "no_colon")
    with pytest.raises(TypeError, match=r"reference must be callable"):
        D.register("x_op", 3, fused.dct_topk_torch)
    with pytest.raises(ValueError, match=r"name must be in"):
        D.dispatch("not_an_op", "auto", CPU)


def _scratch_registry(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    monkeypatch.setattr(D, "_REGISTRY", {})
    monkeypatch.setattr(D, "_LOGGED", set())
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls: list[str] = []

    def ref(x: torch.Tensor, *, k: int = 1) -> str:
        calls.append("ref")
        return "ref"

    def kernel(x: torch.Tensor, *, k: int = 1) -> str:
        calls.append("kernel")
        if k < 0:
            raise RuntimeError("kernel failure")
        return "kernel"

    D.register("op", ref, kernel)
    return calls


def test_dispatch_routes_and_logs_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls = _scratch_registry(monkeypatch)
    with caplog.at_level(logging.DEBUG, logger=D.__name__):
        assert D.dispatch("op", "auto", CPU) == "ref"
        assert D.dispatch("op", "auto", CPU, k=2) == "ref"
        assert D.dispatch("op", "triton", [CPU, CPU]) == "kernel"  # tensors inside a list count
        assert D.dispatch("op", "torch", x=CPU) == "ref"
    assert calls == ["ref", "ref", "kernel", "ref"]
    logged = [r.getMessage() for r in caplog.records if r.name == D.__name__]
    assert logged == [
        "op: backend='auto' resolved to 'torch'",
        "op: backend='triton' resolved to 'triton'",
    ]


def test_dispatch_never_catches_kernel_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _scratch_registry(monkeypatch)
    with pytest.raises(RuntimeError, match="kernel failure"):
        D.dispatch("op", "triton", CPU, k=-1)
    assert calls == ["kernel"]  # no retry on the reference


def test_public_ops_default_to_reference_on_cpu() -> None:
    # auto on CPU is the reference, bit for bit (the kernels need CUDA or backend="triton").
    r, x = torch.randn(50), torch.randn(50)
    a = fused.ef_quantize_pack(r, x, decay=0.5, fmt="int8")
    b = fused.ef_quantize_pack_torch(r, x, decay=0.5, fmt="int8")
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def _run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_fused_ops_work_without_triton() -> None:
    code = """
        import sys
        sys.modules["triton"] = None
        import torch
        from thinwire.compression import fused
        r = torch.randn(10)
        fused.ef_quantize_pack(r, r, decay=1.0, fmt="sign")  # auto -> reference
        try:
            fused.ef_quantize_pack(r, r, decay=1.0, fmt="sign", backend="triton")
        except ImportError as e:
            print("ImportError:", e)
        assert "triton" not in [m for m in sys.modules if sys.modules[m] is not None]
    """
    res = _run(code, {**os.environ, "TRITON_INTERPRET": "1"})
    assert res.returncode == 0, res.stderr
    assert "ImportError: backend='triton' needs the triton package" in res.stdout


def test_triton_on_cpu_refused_when_kernels_were_decorated_for_gpu() -> None:
    code = """
        import os
        import torch
        import thinwire.compression._triton.dct_topk  # decorated without the interpreter
        from thinwire.compression import fused
        os.environ["TRITON_INTERPRET"] = "1"  # too late for @triton.jit
        try:
            fused.dct_topk(torch.zeros(1, 2, 2), torch.eye(2), torch.eye(2), 1, backend="triton")
        except ValueError as e:
            print("ValueError:", e)
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = _run(code, env)
    assert res.returncode == 0, res.stderr
    assert "needs TRITON_INTERPRET=1 set before the kernel modules are first imported" in res.stdout
