"""The user surface of ``thinwire bench``, run as a real subprocess: strict ``results.json``, one-line
errors for bad flags, missing optional extras, consistent time columns, progress lines without a
terminal, ``--version``, help text and ``--compare``."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest

from thinwire.bench import METHODS
from thinwire.collectives import PRESETS

CLI = [sys.executable, "-m", "thinwire.bench"]
SMALL = ["--engine", "inproc", "--world-size", "2", "--steps", "4", "--inner-steps", "2"]
SMALL += ["--methods", "ddp,diloco-fp32"]


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def _reject_constant(name: str) -> None:
    raise ValueError(f"results.json holds the non-JSON constant {name}")


@pytest.fixture(scope="module")
def data_run(tmp_path_factory):
    """One small bench on a byte file (no entropy floor), stdout and stderr captured (no TTY)."""
    tmp = tmp_path_factory.mktemp("bench")
    text = tmp / "corpus.txt"
    g = __import__("random").Random(0)
    words = ["wire", "thin", "model", "link", "slow", "far", "bytes", "sync"]
    text.write_text(" ".join(g.choice(words) for _ in range(4000)))
    out = tmp / "out"
    res = _cli("bench", *SMALL, "--data", str(text), "--no-plot", "--out", str(out), timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return out, res


def test_results_json_is_strict_json_with_null_for_missing_numbers(data_run):
    out, _ = data_run
    res = json.loads((out / "results.json").read_text(), parse_constant=_reject_constant)
    for name, m in res["methods"].items():
        assert m["loss_floor"] is None, name  # a byte file has no known entropy floor
        for run in m["runs"]:
            assert run["curve"][0]["train_loss"] is None  # no training loss before step 1
            assert all(isinstance(c["train_loss"], float) for c in run["curve"][1:])
            assert math.isfinite(run["curve"][-1]["eval_loss"])


def test_sim_time_is_one_rank_compute_plus_exposed(data_run):
    out, proc = data_run
    res = json.loads((out / "results.json").read_text())
    for name, m in res["methods"].items():
        for run in m["runs"]:
            # the slowest rank's own triple: its clock is its compute plus its exposed comm
            assert run["sim_time_s"] == pytest.approx(
                run["compute_s"] + run["exposed_comm_s"], rel=1e-9
            ), name
            assert run["time_rank"] in (0, 1)
    assert "slowest rank" in proc.stdout
    cells = re.findall(r"([\d,]+\.\d) s \(([\d,]+\.\d) \+ ([\d,]+\.\d)\)", proc.stdout)
    assert len(cells) == 2, proc.stdout
    for total, compute, exposed in cells:
        assert round(float(compute) + float(exposed), 1) == float(total)


def test_progress_lines_on_stderr_without_a_terminal(data_run):
    _, proc = data_run
    err = proc.stderr
    for m in ("ddp", "diloco-fp32"):
        assert f"{m} (seed 0) started" in err and f"{m} (seed 0) finished in" in err
        # events come at each sync (every 2 of 4 steps): the 50% line, then "finished"
        assert f"{m} (seed 0) step 2/4 (50%)" in err
    assert "nan" not in proc.stdout and "no known loss floor" in proc.stdout
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "args, flag, accepted, given",
    [
        (["--methods", "foo"], "--methods", "diloco-fp32", "'foo'"),
        (["--methods", "ddp,ddp"], "--methods", "ddp", "'ddp,ddp'"),
        (["--preset", "mars"], "--preset", "home_broadband", "'mars'"),
        (["--steps", "-5"], "--steps", "[1, inf)", "'-5'"),
        (["--world-size", "0"], "--world-size", "[1, inf)", "'0'"),
        (["--seeds", "a,b"], "--seeds", "integers", "'a,b'"),
        (["--data", "/nonexistent/corpus.txt"], "--data", "existing", "/nonexistent/corpus.txt"),
        (["--topology", "/nonexistent/topo.json"], "--topology", "existing", "/nonexistent"),
        (["--topology", "BADJSON"], "--topology", "JSON", "not JSON"),
        (["--topology", "SMALLTOPO"], "--topology", "--world-size (4)", "for 2"),
        (["--steps", "4"], "--steps", "multiple of --inner-steps (20)", "got 4"),
        (["--steps", "12", "--inner-steps", "6"], "--inner-steps", "multiple of 4", "got 6"),
        (["--compare", "/nonexistent/a.json", "/nonexistent/b.json"], "--compare", "", "a.json"),
    ],
)
def test_bad_flags_give_one_error_line_and_exit_2(tmp_path, args, flag, accepted, given):
    (tmp_path / "bad.json").write_text('{"preset": "home_broadband",')
    (tmp_path / "small.json").write_text('{"preset": "home_broadband", "world_size": 2}')
    subst = {"BADJSON": str(tmp_path / "bad.json"), "SMALLTOPO": str(tmp_path / "small.json")}
    out = tmp_path / "out"
    argv = [subst.get(a, a) for a in args]
    res = _cli("bench", *argv, *([] if "--compare" in args else ["--out", str(out)]))
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"thinwire bench: error: argument {flag}:"), res.stderr
    assert accepted in last and given in last, last
    assert not out.exists()  # rejected before any work started


def test_missing_matplotlib_and_rich_warn_once_and_the_run_completes(tmp_path):
    out = tmp_path / "out"
    argv = ["thinwire", "bench", *SMALL, "--steps", "2", "--out", str(out)]
    code = (
        "import runpy, sys\n"
        "sys.modules['matplotlib'] = None\n"  # makes `import matplotlib` raise ImportError
        "sys.modules['rich'] = None\n"
        f"sys.argv = {argv!r}\n"
        "runpy.run_module('thinwire.bench', run_name='__main__')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    warnings = [ln for ln in res.stderr.splitlines() if "is not installed" in ln]
    assert len(warnings) == 2, res.stderr
    assert any("matplotlib" in w and "PNG" in w for w in warnings)
    assert all('pip install "thinwire[bench]"' in w for w in warnings)
    assert (out / "results.json").exists() and not list(out.glob("*.png"))
    # the plain-text table, and the output paths without the PNG
    assert re.search(r"^method\s+sent/rank\s+vs DDP", res.stdout, re.M), res.stdout
    assert re.search(r"^ddp\s+", res.stdout, re.M) and "png" not in res.stdout


def test_version_and_help():
    v = _cli("--version")
    assert (
        v.returncode == 0 and v.stdout.strip() == f"thinwire {__import__('thinwire').__version__}"
    )
    top = _cli("--help")
    assert top.returncode == 0 and "``" not in top.stdout and "bench" in top.stdout
    h = _cli("bench", "--help")
    assert h.returncode == 0 and "``" not in h.stdout
    assert "(default: 200)" in h.stdout and "(default: home_broadband)" in h.stdout
    for name in [*METHODS, *PRESETS]:
        assert name in h.stdout, name


def _results(methods: dict[str, dict[str, float]], steps: int) -> dict:
    """A minimal results.json in the bench's schema (only what --compare reads)."""
    return {
        "schema": "thinwire.bench/v1",
        "config": {
            "preset": "home_broadband",
            "world_size": 2,
            "engine": "inproc",
            "steps": steps,
            "inner_steps": 2,
            "seeds": [0],
        },  # fmt: skip
        "methods": {
            m: {
                "bytes_sent_per_rank": {"mean": v["bytes"], "std": 0.0},
                "final_eval_loss": {"mean": v["eval"], "std": 0.0},
                "sim_time_s": {"mean": v["sim"], "std": 0.0},
            }
            | ({"reduction_vs_ddp": v["vs"]} if "vs" in v else {})
            for m, v in methods.items()
        },
    }


def _row(stdout: str, method: str) -> list[str]:
    line = next(ln for ln in stdout.splitlines() if re.search(rf"(^|│)\s*{method}\s", ln))
    cells = line.strip("│ ").split("│") if "│" in line else re.split(r"\s{2,}", line.strip())
    return [c.strip() for c in cells]


def test_compare_prints_two_runs_side_by_side(tmp_path):
    a = _results(
        {"ddp": {"bytes": 8e6, "vs": 1.0, "eval": 2.0, "sim": 10.0},
         "diloco-fp32": {"bytes": 1e6, "vs": 8.0, "eval": math.nan, "sim": 2.0}}, 4
    )  # fmt: skip
    b = _results(
        {"ddp": {"bytes": 4e6, "vs": 1.0, "eval": 1.5, "sim": 5.0},
         "demo": {"bytes": 1e5, "eval": 1.8, "sim": 1.0}}, 8
    )  # fmt: skip
    # A is written the way older versions did (a bare NaN); it is still read.
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b, allow_nan=False))
    res = _cli("bench", "--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"))
    assert res.returncode == 0, res.stdout + res.stderr
    # sent A, B, B/A | vs DDP A, B, B/A | eval A, B, B/A | sim A, B, B/A
    ddp = ["8.0 MB", "4.0 MB", "0.5x", "1x", "1x", "1x", "2.0000", "1.5000", "0.75x"]
    assert _row(res.stdout, "ddp") == ["ddp", *ddp, "10.0 s", "5.0 s", "0.5x"]
    assert _row(res.stdout, "diloco-fp32")[1:4] == ["1.0 MB", "n/a", "n/a"]
    assert _row(res.stdout, "diloco-fp32")[7:10] == ["n/a", "n/a", "n/a"]  # NaN eval in A
    assert _row(res.stdout, "demo")[1:4] == ["n/a", "100.0 KB", "n/a"]
    assert "8 steps" in res.stdout and "4 steps" in res.stdout


@pytest.mark.parametrize("content", [None, "not json", '{"schema": "other/v1", "methods": {}}'])
def test_compare_rejects_missing_or_foreign_files(tmp_path, content):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_results({"ddp": {"bytes": 1, "eval": 1, "sim": 1}}, 4)))
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_text(content)
    res = _cli("bench", "--compare", str(good), str(bad))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("thinwire bench: error: argument --compare:") and "bad.json" in last


def test_compare_refuses_run_flags_it_would_ignore(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_results({"ddp": {"bytes": 1, "eval": 1, "sim": 1}}, 4)))
    res = _cli("bench", "--compare", str(good), str(good), "--steps", "10")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == (
        "thinwire bench: error: argument --compare: takes no other flags, got --steps"
    )
