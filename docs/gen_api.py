"""Render thinwire's public API from its docstrings as Markdown: ``python docs/gen_api.py > docs/api.md``.

Walks ``__all__`` of ``thinwire`` and of each subpackage, in layer order, and writes for every
exported name its kind, signature and docstring; for a class, also its public methods and
properties defined in thinwire (members inherited from torch or the standard library are left
out). The output depends only on the source, so ``tests/test_docs.py`` regenerates it and
compares it with the committed ``docs/api.md``.

Docstrings are Google style with a little reStructuredText; this script turns the Sphinx roles
(``:class:`X``` and the like) into code spans, ``Args:``-style sections into bullet lists, and
literal blocks (``::`` and ``.. code-block::``) into fenced blocks. Everything else is copied.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT / "src"))

# Layer order (tests/test_layering.py): lower layers first.
PACKAGES = [
    "thinwire",
    "thinwire.compression",
    "thinwire.collectives",
    "thinwire.optim",
    "thinwire.rl",
    "thinwire.rl.envs",
    "thinwire.rl.policies",
    "thinwire.rl.runtime",
    "thinwire.bench",
]

_ITEM_SECTIONS = {"Args", "Arguments", "Attributes", "Raises", "Keyword Args", "Parameters"}
_TEXT_SECTIONS = {"Returns", "Yields", "Note", "Notes", "Example", "Examples", "Warning"}
_SECTION = re.compile(r"^([A-Z][A-Za-z ]+):\s*$")
_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|obj|exc|const|ref|term):`~?([^`]+)`")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _roles(text: str) -> str:
    """``:class:`~a.B``` -> ```a.B``` (a code span)."""
    return _ROLE.sub(lambda m: f"``{m.group(1)}``", text)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _literal(lines: list[str], i: int, base: int) -> tuple[list[str], int]:
    """The indented literal block starting at ``lines[i]`` (blank lines allowed inside)."""
    block: list[str] = []
    while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > base):
        block.append(lines[i])
        i += 1
    while block and not block[-1].strip():
        block.pop()
    while block and not block[0].strip():
        block.pop(0)
    cut = min((_indent(x) for x in block if x.strip()), default=0)
    return [x[cut:] for x in block], i


def _items(block: list[str]) -> list[str]:
    """An ``Args:`` body (already dedented) as Markdown bullets: ``name: text`` -> ``- `name`: text``."""
    out: list[str] = []
    for line in block:
        if not line.strip():
            continue
        if _indent(line) == 0:
            name, sep, rest = line.partition(":")
            if sep and " " not in name.strip().split("(")[0].strip():
                out.append(f"- ``{name.strip()}``:{_roles(rest)}")
            else:
                out.append(f"- {_roles(line.strip())}")
        elif out:
            out[-1] += " " + _roles(line.strip())
        else:
            out.append(f"- {_roles(line.strip())}")
    return out


def render_doc(doc: str) -> str:
    """A docstring as Markdown (see the module docstring for what is converted)."""
    lines = doc.expandtabs().splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        sec = _SECTION.match(line)
        if sec and sec.group(1) in _ITEM_SECTIONS | _TEXT_SECTIONS:
            name = sec.group(1)
            body, i = _literal(lines, i + 1, _indent(line))
            out += ["", f"**{name}:**", ""]
            if name in _ITEM_SECTIONS:
                out += _items(body)
            elif name.startswith("Example") and not any(x.startswith(">>>") for x in body):
                out += ["```python", *body, "```"]
            elif any(x.startswith(">>>") for x in body):
                out += ["```pycon", *body, "```"]
            else:
                out += [_roles(x) for x in body]
            out.append("")
            continue
        if stripped.startswith(".. code-block::") or stripped.startswith(".. code::"):
            lang = stripped.split("::", 1)[1].strip() or "text"
            body, i = _literal(lines, i + 1, _indent(line))
            out += ["", f"```{lang}", *body, "```", ""]
            continue
        if stripped.endswith("::") and i + 1 < len(lines):
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            if j < len(lines) and _indent(lines[j]) > _indent(line):
                lead = stripped[:-2].rstrip()
                if lead:
                    out.append(_roles(line[: len(line) - len(line.lstrip())] + lead + ":"))
                body, i = _literal(lines, i + 1, _indent(line))
                lang = "python" if any("(" in x for x in body) else "text"
                out += ["", f"```{lang}", *body, "```", ""]
                continue
        if stripped.startswith(">>>"):
            body = []
            while i < len(lines) and lines[i].strip():
                body.append(lines[i].strip())
                i += 1
            out += ["", "```pycon", *body, "```", ""]
            continue
        out.append(_roles(line.lstrip()) if stripped.startswith(("* ", "- ")) else _roles(line))
        i += 1
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


class _Text:
    """An annotation shown as written (``from __future__ import annotations`` keeps strings)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _plain(annotation: object) -> object:
    return _Text(annotation) if isinstance(annotation, str) else annotation


def _signature(obj: object, *, drop_self: bool = False) -> str:
    """``(a: int, *, b: str = 'x') -> None`` with annotations unquoted and no memory addresses."""
    try:
        sig = inspect.signature(obj)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "(...)"
    params = list(sig.parameters.values())
    if drop_self and params and params[0].name in ("self", "cls"):
        params = params[1:]
    params = [p.replace(annotation=_plain(p.annotation)) for p in params]
    ret = _plain(sig.return_annotation)
    if inspect.isclass(obj):
        ret = inspect.Signature.empty
    text = str(sig.replace(parameters=params, return_annotation=ret))
    return _ADDRESS.sub("", text)


def _defined_here(obj: object) -> bool:
    mod = getattr(obj, "__module__", "") or ""
    return mod == "thinwire" or mod.startswith("thinwire.")


def _members(cls: type) -> list[tuple[str, object, str]]:
    """Public methods and properties of ``cls`` and its thinwire bases, in definition order."""
    seen: set[str] = set()
    out: list[tuple[str, object, str]] = []
    for klass in cls.__mro__:
        if not _defined_here(klass):
            continue
        for name, raw in vars(klass).items():
            if name in seen or (name.startswith("_") and name != "__call__"):
                continue
            seen.add(name)
            if isinstance(raw, property):
                out.append((name, raw, "property"))
            elif isinstance(raw, staticmethod | classmethod):
                out.append((name, raw.__func__, type(raw).__name__))
            elif inspect.isfunction(raw):
                out.append((name, raw, "method"))
    return out


def _value(obj: object) -> str:
    if isinstance(obj, dict):
        keys = ", ".join(repr(k) for k in list(obj)[:12])
        more = ", ..." if len(obj) > 12 else ""
        return f"dict of {len(obj)}: {{{keys}{more}}}"
    text = _ADDRESS.sub("", repr(obj))
    return text if len(text) <= 100 else text[:97] + "..."


def _code(line: str) -> list[str]:
    return ["```python", line, "```", ""]


def _entry(pkg: str, name: str, obj: object) -> list[str]:
    head = f"{pkg}.{name}"
    if inspect.isclass(obj):
        out = [f"### {head}", "", *_code(f"class {name}{_signature(obj)}")]
        doc = inspect.getdoc(obj)
        out += [render_doc(doc) if doc else "*(no docstring)*", ""]
        for mname, member, kind in _members(obj):
            out += [f"#### {name}.{mname}", ""]
            if kind == "property":
                out += _code(f"@property {mname}")
            else:
                deco = "" if kind == "method" else f"@{kind} "
                drop = kind != "staticmethod"
                out += _code(f"{deco}def {mname}{_signature(member, drop_self=drop)}")
            mdoc = inspect.getdoc(member)
            out += [render_doc(mdoc) if mdoc else "*(no docstring)*", ""]
        return out
    if callable(obj):
        doc = inspect.getdoc(obj)
        out = [f"### {head}", "", *_code(f"def {name}{_signature(obj)}")]
        return out + [render_doc(doc) if doc else "*(no docstring)*", ""]
    return [f"### {head}", "", *_code(f"{name} = {_value(obj)}")]


def render() -> str:
    """The whole ``docs/api.md``."""
    out = [
        "# thinwire API reference",
        "",
        "Generated from the docstrings by `python docs/gen_api.py > docs/api.md`; do not edit by",
        "hand (`tests/test_docs.py` fails when this file is stale). Packages appear in layer",
        "order, lower layers first; see [design.md](design.md).",
        "",
        "Contents: " + ", ".join(f"[`{p}`](#{p.replace('.', '')})" for p in PACKAGES),
        "",
    ]
    for pkg in PACKAGES:
        mod = importlib.import_module(pkg)
        out += [f"## {pkg}", ""]
        doc = inspect.getdoc(mod)
        if doc:
            out += [render_doc(doc), ""]
        for name in getattr(mod, "__all__", []):
            out += _entry(pkg, name, getattr(mod, name))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
