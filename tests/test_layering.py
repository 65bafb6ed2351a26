"""Layering and public-API checks (``docs/design.md``, "Layers"): imports point downwards only,
``import thinwire`` works without the optional engines, and every exported name resolves and is
documented.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "thinwire"

# Package -> layer (the table in docs/design.md, "Layers"). Top-level private helpers are layer 0.
LAYERS = {"_validate": 0, "compression": 1, "collectives": 1, "optim": 2, "rl": 3, "bench": 4}


def _package_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "thinwire" or len(parts) < 2:
        return None
    return parts[1]


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
    return out


def _modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py"))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_downwards(path: Path) -> None:
    rel = path.relative_to(SRC)
    own = rel.parts[0].removesuffix(".py") if rel.parts else ""
    if own not in LAYERS:
        # thinwire/__init__.py, __main__ and other top-level files: only layer-0 helpers.
        own_layer = 0
    else:
        own_layer = LAYERS[own]
    for mod in _imports(path):
        pkg = _package_of(mod)
        if pkg is None or pkg == own:
            continue
        assert pkg in LAYERS, f"{rel} imports unknown thinwire package {mod}"
        layer = LAYERS[pkg]
        assert layer < own_layer or (layer == 0 and own_layer == 0 and pkg != own), (
            f"{rel} (layer {own_layer}) imports {mod} (layer {layer}): imports must point downwards"
        )
        if layer > 0 and layer < own_layer:
            # Upper layers use lower ones through their public __init__ only.
            assert mod == f"thinwire.{pkg}", f"{rel} imports private {mod}; use thinwire.{pkg}"


def test_import_without_triton_and_hivemind() -> None:
    code = (
        "import sys\n"
        "sys.modules['triton'] = None\n"
        "sys.modules['hivemind'] = None\n"
        "import thinwire, thinwire.compression, thinwire.collectives, thinwire.optim, thinwire.rl\n"
        "assert 'triton' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


@pytest.mark.parametrize(
    "pkg",
    [
        "thinwire",
        "thinwire.compression",
        "thinwire.collectives",
        "thinwire.optim",
        "thinwire.bench",
        "thinwire.rl",
        "thinwire.rl.envs",
        "thinwire.rl.policies",
        "thinwire.rl.runtime",
    ],
)
def test_exported_names_resolve_and_have_docstrings(pkg: str) -> None:
    mod = importlib.import_module(pkg)
    assert mod.__doc__ and mod.__doc__.strip()
    for name in mod.__all__:
        obj = getattr(mod, name)
        if name.startswith("__") or isinstance(obj, str | int | float | tuple | dict):
            continue
        assert getattr(obj, "__doc__", None), f"{pkg}.{name} has no docstring"


RL = SRC / "rl"
RL_PERIPHERY = {"policies": set(), "envs": {"policies"}, "runtime": {"envs", "policies"}}
RL_CORE_MAX_LINES = 2500


def _rl_modules() -> list[Path]:
    return sorted(RL.rglob("*.py"))


@pytest.mark.parametrize("path", _rl_modules(), ids=lambda p: str(p.relative_to(RL)))
def test_rl_core_never_reaches_the_periphery_and_the_periphery_uses_the_public_core(
    path: Path,
) -> None:
    rel = path.relative_to(RL)
    part = rel.parts[0] if len(rel.parts) > 1 else None  # None: a core module
    assert part is None or part in RL_PERIPHERY, f"unknown rl package {part}"
    for mod in _imports(path):
        if mod != "thinwire.rl" and not mod.startswith("thinwire.rl."):
            continue
        sub = mod.split(".")[2] if mod.count(".") >= 2 else None
        if part is None:
            assert sub not in RL_PERIPHERY, f"core module {rel} imports the periphery: {mod}"
        elif sub == part:
            continue  # a module of its own package
        elif sub in RL_PERIPHERY:
            assert sub in RL_PERIPHERY[part], f"{rel} may not import {mod} (no cycles)"
            assert mod == f"thinwire.rl.{sub}", (
                f"{rel} imports private {mod}; use thinwire.rl.{sub}"
            )
        else:
            assert mod == "thinwire.rl", f"{rel} reaches the core through {mod}; use thinwire.rl"


def test_rl_core_is_small() -> None:
    core = [p for p in RL.glob("*.py")]
    lines = sum(len(p.read_text().splitlines()) for p in core)
    assert {p.stem for p in core} == {"__init__", "config", "learner", "objective", "policy",
                                      "rollout", "staleness", "verify", "weights"}  # fmt: skip
    assert lines <= RL_CORE_MAX_LINES, f"thinwire.rl core has {lines} lines"
