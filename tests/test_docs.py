"""The documentation is true to the repository: links and paths exist, ``docs/api.md`` matches the
docstrings, the figures in ``docs/design.md`` match the code, the README's runnable blocks run,
and no text points readers at documents outside the repository.

Runnable blocks: a fenced block opened with ```` ```bash runnable ```` or ```` ```python runnable ````
in ``README.md`` or ``docs/*.md`` is extracted and run from the repository root (bash with
``-euo pipefail`` and this interpreter's ``bin/`` first on ``PATH``, so ``thinwire`` and
``python`` are the installed ones). Mark only cheap, offline blocks (``thinwire --version``, a
short ``python -c``): installs, ``make`` and ``torchrun`` are refused.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BIN = Path(sys.executable).parent


def _doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


_FENCE = re.compile(r"^(```|~~~)")
# A code span: a run of backticks, anything (line breaks too), the same run again.
_INLINE_CODE = re.compile(r"(`+)[\s\S]*?(?<!`)\1(?!`)")


def _strip_code(text: str) -> str:
    """``text`` without fenced blocks and inline code spans (links there are not links)."""
    out, inside = [], False
    for line in text.splitlines():
        if _FENCE.match(line.strip()):
            inside = not inside
            continue
        if not inside:
            out.append(line)
    # Paragraph by paragraph, so that one stray backtick cannot pair with one pages away.
    paragraphs = re.split(r"\n\s*\n", "\n".join(out))
    return "\n\n".join(_INLINE_CODE.sub("", p) for p in paragraphs)


# --- anchors and links -------------------------------------------------------------------------


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: rendered text, lower case, punctuation dropped, spaces -> -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    inside = False
    for line in path.read_text().splitlines():
        if _FENCE.match(line.strip()):
            inside = not inside
            continue
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if inside or not m:
            continue
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


@pytest.mark.parametrize("doc", _doc_files(), ids=_rel)
def test_relative_links_resolve(doc: Path) -> None:
    broken = []
    for target in _LINK.findall(_strip_code(doc.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, frag = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            broken.append(f"{target} (no {dest})")
        elif frag and dest.suffix == ".md" and frag not in _anchors(dest):
            broken.append(f"{target} (no heading with anchor #{frag} in {_rel(dest)})")
    assert not broken, f"{_rel(doc)} links to what does not exist: {broken}"


# --- paths mentioned in the text ----------------------------------------------------------------

_PATH = re.compile(r"(?<![\w./-])((?:src|tests|benchmarks|examples|docs|\.ci)/[\w./-]*[\w/])")


def mentioned_paths(text: str) -> set[str]:
    """Repository paths a text mentions: words starting with a top-level folder of the repo."""
    return {m for m in _PATH.findall(text) if "*" not in m}


def test_mentioned_paths_finds_paths() -> None:
    text = "see `src/thinwire/optim/_reduce.py`, [x](../benchmarks/RESULTS.md) and tests/bench/."
    assert mentioned_paths(text) == {
        "src/thinwire/optim/_reduce.py",
        "tests/bench/",
    }  # a relative link is the link test's business


@pytest.mark.parametrize("doc", _doc_files(), ids=_rel)
def test_mentioned_file_paths_exist(doc: Path) -> None:
    missing = sorted(p for p in mentioned_paths(doc.read_text()) if not (ROOT / p).exists())
    assert not missing, f"{_rel(doc)} mentions paths that do not exist: {missing}"


# --- no pointers to documents outside the repository --------------------------------------------

# The project's planning notes, style guide and issue tracker do not ship with it, so no text may
# send a reader there: cite the paper (arXiv id with version, section or algorithm), a file of
# this repository, or nothing. The patterns are assembled from pieces so that this file does not
# match itself.
_S = "spec"
_PRIVATE = re.compile(
    "|".join(
        [
            rf"{_S}s/",  # a path into the notes
            rf"\b{_S}s?\s*\u00a7",  # "<notes> <section sign>2.4"
            rf"\b{_S}s?\s+`*[\w-]+\.md",  # "<notes> grpo.md", "<notes> ``diloco.md``"
            rf"(?<![\w.])\(\s*{_S}\s*[:)]",  # "(<notes>)" in prose, not a call like f(x)
            rf"\bthe {_S}\b",  # "the <notes>", "the <notes>'s"
            rf"(?-i:^\W*S{_S[1:]}:)",  # a "<Notes>:" line
            r"STYLE\.md",
            r"\bSTYLE\s*\u00a7",
            r"\bissue\s+\d+\b",  # the internal tracker's numbers ("PR #12" of a public repo is fine)
            r'\bissue\s+"',
            r"\bissue's\b",
        ]
    ),
    re.IGNORECASE,
)
# A section sign must follow a citation that names the document: an arXiv id, an RFC, a venue.
_SECTION = re.compile("\u00a7")
_CITATION = re.compile(r"arXiv:\d{4}\.\d{4,5}|\bRFC \d+|\bWSDM\b")
_CITATION_REACH = 200  # characters before the section sign where the citation must be
_TEXT_SUFFIXES = {".py", ".md", ".txt", ".json", ".toml", ".cfg", ".yaml", ".yml", ".sh", ""}
# Every top-level place that holds text a user reads.
_PUBLIC_TEXT = ["src", "tests", "examples", "benchmarks", "docs", "README.md"]


def _text_files(paths: list[Path]) -> list[Path]:
    out = []
    for top in paths:
        for f in [top] if top.is_file() else sorted(top.rglob("*")):
            if (
                f.is_file()
                and f.suffix in _TEXT_SUFFIXES
                and not any(part == "__pycache__" or part.endswith(".egg-info") for part in f.parts)
            ):
                out.append(f)
    return out


def _mentions_in(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every pointer to a document outside the repository in ``text``."""
    lines = text.splitlines()
    hits = {n for n, line in enumerate(lines, 1) if _PRIVATE.search(line)}
    for m in _SECTION.finditer(text):
        if not _CITATION.search(text, max(0, m.start() - _CITATION_REACH), m.start()):
            hits.add(text.count("\n", 0, m.start()) + 1)
    return [(n, lines[n - 1]) for n in sorted(hits)]


def _private_mentions(paths: list[Path]) -> list[str]:
    return [
        f"{_rel(f)}:{n}: {line.strip()[:100]}"
        for f in _text_files(paths)
        for n, line in _mentions_in(f.read_text(errors="replace"))
    ]


def test_private_mention_patterns() -> None:
    sec = "\u00a7"
    flagged = [
        f"see {_S}s/diloco.md",
        f"bytes follow {_S} {sec}2.4",
        f"{_S} grpo.md {sec}4.1",
        f"(``{_S}s/demo_sparseloco.md`` {sec}4.1)",
        f"| 1 s ({_S}) |",
        f"tbf latency ({_S}: 1 s)",
        f"the {_S}'s 1 s queue",
        f"S{_S[1:]}: ``collectives_wan_bench.md``",
        "STYLE" + ".md " + sec + "4",
        f"round trip ({sec}6.8)",
        "(issue" + " 9 acceptance)",
        "## Codecs (issue" + ' "Foundation")',
    ]
    allowed = [
        "the OCP 8-bit floating point specification",
        "assert inspect.signature(ref) == inspect.signature(kernel)",
        f"codec = build_codec({_S})",
        f"for {_S}, ef in COMPRESSORS:",
        f"def _wire_bytes({_S}: str, n: int) -> int:",
        f"floor_{_S} = 8.32",
        f"DeMo, Peng et al., arXiv:2411.19870v1, {sec}3",
        f"Vigna, WSDM 2013, {sec}3",
        "torchft PR #233 and hivemind issue #624",
        "every rank must issue collectives in the same order",
    ]
    assert [t for t in flagged if not _mentions_in(t)] == []
    assert [t for t in allowed if _mentions_in(t)] == []


def test_no_text_cites_documents_outside_the_repository() -> None:
    """src/, tests/, examples/, benchmarks/, docs/ (the generated api.md too) and the README."""
    hits = _private_mentions([ROOT / n for n in _PUBLIC_TEXT])
    assert not hits, f"{len(hits)} mentions, first ones:\n" + "\n".join(hits[:20])


def test_hand_written_docs_cite_nothing_outside_the_repository() -> None:
    """docs/ minus the generated api.md: held to the rule already."""
    files = [p for p in sorted(DOCS.iterdir()) if p.is_file() and p.name != "api.md"]
    hits = _private_mentions(files)
    assert not hits, "\n".join(hits)


# --- docs/api.md is the docstrings of today ----------------------------------------------------


def test_api_md_is_up_to_date() -> None:
    res = subprocess.run(
        [sys.executable, str(DOCS / "gen_api.py")],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr
    committed = (DOCS / "api.md").read_text()
    assert res.stdout == committed, (
        "docs/api.md is stale: run `python docs/gen_api.py > docs/api.md` and commit the result"
    )


def test_api_md_covers_every_exported_name() -> None:
    import importlib

    text = (DOCS / "api.md").read_text()
    for pkg in ("thinwire.compression", "thinwire.collectives", "thinwire.optim", "thinwire.rl"):
        for name in importlib.import_module(pkg).__all__:
            assert f"### {pkg}.{name}\n" in text, f"docs/api.md lacks {pkg}.{name}"


# --- figures in docs/design.md against the code ------------------------------------------------


def _design() -> str:
    return re.sub(r"\s+", " ", (DOCS / "design.md").read_text())


def test_design_envelope_and_frame_size_match_the_code() -> None:
    from thinwire.compression import ENVELOPE_BYTES, WIRE_VERSION

    text = _design()
    stated = re.search(r"`ENVELOPE_BYTES = (\d+)`", text)
    assert stated and int(stated.group(1)) == ENVELOPE_BYTES, (
        f"docs/design.md states the envelope as {stated and stated.group(1)} bytes; the code has "
        f"{ENVELOPE_BYTES}: update the frame table, the byte formulas and the worked examples"
    )
    assert f"`W = {ENVELOPE_BYTES} + body`" in text
    assert f"version {WIRE_VERSION}" in text


def test_design_worked_examples_match_the_code() -> None:
    from thinwire.bench import TinyConfig, TinyGPT
    from thinwire.collectives.accounting import ring_allreduce_bytes
    from thinwire.compression import EliasFanoIndexCoder, build_codec, make_bucket

    text = _design()
    sparse = build_codec("topk(64, rule=density) > quant(2) > index(entropy)")
    demo = build_codec("dct > topk(32) > quant(32) > index(entropy)")
    w_sparse = make_bucket(sparse, [(4096, 4096)]).nbytes
    w_demo = make_bucket(demo, [(4096, 4096)]).nbytes
    assert f"W = {w_sparse:,} bytes" in text
    assert f"W = {w_demo:,} bytes" in text
    ef = EliasFanoIndexCoder()
    assert ef.chunk_bits(64, 4096) == 512 and ef.chunk_bits(32, 4096) == 288
    for k, C in ((64, 4096), (32, 4096), (7, 100), (1, 1)):
        L = math.floor(math.log2(C / k))
        assert ef.chunk_bits(k, C) == k * L + k + ((C - 1) >> L) + 1  # the formula in the table
    n = sum(p.numel() for p in TinyGPT(TinyConfig()).parameters())
    assert f"N = {n:,} parameters" in text
    sent, _ = ring_allreduce_bytes(n, 4, 4)
    assert f"= {sent:,}` bytes per step" in text


# --- runnable blocks ---------------------------------------------------------------------------

_OPEN = re.compile(r"^```(bash|sh|python)\s+runnable\s*$")
_REFUSED = re.compile(r"\b(pip install|make|torchrun|apt-get)\b")


def runnable_blocks(text: str) -> list[tuple[str, str, int]]:
    """``(language, code, line)`` of every fenced block opened with ```` ```LANG runnable ````."""
    out: list[tuple[str, str, int]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _OPEN.match(lines[i].strip())
        if not m:
            i += 1
            continue
        start, body = i + 1, []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"runnable block opened at line {start} is never closed")
        out.append((m.group(1), "\n".join(body) + "\n", start))
        i += 1
    return out


def test_runnable_blocks_are_extracted() -> None:
    text = "\n".join(
        [
            "intro",
            "```bash runnable",
            "thinwire --version",
            "```",
            "```bash",
            "make bench",
            "```",
            "```python runnable",
            "print(1)",
            "```",
        ]
    )
    assert runnable_blocks(text) == [
        ("bash", "thinwire --version\n", 2),
        ("python", "print(1)\n", 8),
    ]
    with pytest.raises(ValueError, match="never closed"):
        runnable_blocks("```bash runnable\nthinwire --version\n")


def _all_blocks() -> list:
    params = []
    for doc in _doc_files():
        for lang, code, line in runnable_blocks(doc.read_text()):
            params.append(pytest.param(lang, code, id=f"{_rel(doc)}:{line}"))
    return params or [pytest.param("", "", marks=pytest.mark.skip(reason="no runnable block"))]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("lang, code", _all_blocks())
def test_runnable_block_runs(lang: str, code: str) -> None:
    refused = _REFUSED.search(code)
    assert not refused, (
        f"a runnable block must be cheap and offline; {refused.group(0)!r} is not: drop "
        "'runnable' from its fence"
    )
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.setdefault("OMP_NUM_THREADS", "1")
    if lang == "python":
        cmd = [sys.executable, "-c", code]
    else:
        cmd = ["bash", "-euo", "pipefail", "-c", code]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout[-2000:]}{res.stderr[-2000:]}"


# --- the first example of the README -----------------------------------------------------------

EXAMPLE = """\
from functools import partial

import torch
from thinwire.optim import DiLoCo

torch.manual_seed(0)
model = torch.nn.Linear(16, 1)
x, y = torch.randn(256, 16), torch.randn(256, 1)
inner, codec = partial(torch.optim.AdamW, lr=1e-2), "quant(int4, block=128)"
opt = DiLoCo(model.parameters(), inner, sync_every=10, compressor=codec, error_feedback=True)
for step in range(100):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()  # every 10th step: outer step on the int4-compressed pseudo-gradient
    if step in (0, 99):
        print(f"step {step + 1}: loss {loss.item():.3f}")
"""


def test_first_example_is_in_the_readme_and_learns(capsys) -> None:
    blocks = [code for _, code, _ in runnable_blocks((ROOT / "README.md").read_text())]
    assert EXAMPLE in blocks, "the one-CPU DiLoCo example is not a runnable block of the README"
    exec(compile(EXAMPLE, "readme-example", "exec"), {"__name__": "readme_example"})
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["step 1", "step 100"]
    first, last = (float(ln.rsplit(" ", 1)[1]) for ln in lines)
    assert last < 0.85 * first, lines
