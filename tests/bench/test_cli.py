"""End-to-end runs of ``thinwire bench`` in a reduced configuration, checked against the ledger
formulas (``docs/design.md``, "Byte formulas") and the output files' contents."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import pytest

from thinwire.bench import TinyGPT

N_PARAMS = sum(p.numel() for p in TinyGPT().parameters())


def _run(
    tmp_path, engine: str, methods: str, steps: int = 16, inner: int = 8, world: int = 2, extra=()
):
    out = tmp_path / engine
    cmd = [
        sys.executable,
        "-m",
        "thinwire.bench",
        "bench",
        "--engine",
        engine,
        "--world-size",
        str(world),
        "--steps",
        str(steps),
        "--inner-steps",
        str(inner),
        "--methods",
        methods,
        "--out",
        str(out),
        *extra,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    return out, res.stdout


def _ring_bytes(numel: int, P: int) -> int:
    return 2 * (P - 1) * math.ceil(numel / P) * 4


@pytest.mark.timeout(600)
@pytest.mark.parametrize("engine", ["inproc", "gloo"])
def test_bench_cli_ledger_matches_formulas(tmp_path, engine):
    steps, H, P = 16, 8, 2
    out, stdout = _run(
        tmp_path, engine, "ddp,diloco-fp32,diloco-int4,sparseloco", steps, H, P, ["--no-plot"]
    )
    res = json.loads((out / "results.json").read_text())
    assert res["schema"] == "thinwire.bench/v1"
    assert res["config"]["engine"] == engine and res["preset"]["basis"]
    m = res["methods"]
    ddp = m["ddp"]["bytes_sent_per_rank"]["mean"]
    # DDP: one fp32 ring all-reduce of every gradient per step.
    assert ddp == steps * _ring_bytes(N_PARAMS, P)
    # DiLoCo fp32: one ring all-reduce of the pseudo-gradient per H steps, exactly H x fewer bytes.
    assert m["diloco-fp32"]["bytes_sent_per_rank"]["mean"] * H == ddp
    assert m["diloco-fp32"]["reduction_vs_ddp"] == pytest.approx(H)
    # Compressed methods send less than fp32 DiLoCo, and tokens seen are equal across methods.
    assert (
        m["diloco-int4"]["bytes_sent_per_rank"]["mean"]
        < m["diloco-fp32"]["bytes_sent_per_rank"]["mean"] / 6
    )
    assert (
        m["sparseloco"]["bytes_sent_per_rank"]["mean"]
        < m["diloco-int4"]["bytes_sent_per_rank"]["mean"]
    )
    assert len({v["tokens"] for v in m.values()}) == 1
    for name, v in m.items():
        run = v["runs"][0]
        assert run["curve"][0]["step"] == 0 and run["curve"][-1]["step"] == steps
        assert math.isfinite(v["final_eval_loss"]["mean"]), name
        assert v["sim_time_s"]["mean"] >= v["exposed_comm_s"]["mean"] >= 0
        assert len(set(run["bytes_sent_by_rank"])) == 1  # symmetric algorithms
    with (out / "curves.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["method"] for r in rows} == set(m)
    last_ddp = [r for r in rows if r["method"] == "ddp"][-1]
    assert int(last_ddp["bytes_sent_cum"]) == ddp
    assert "ddp" in stdout and "vs DDP" in stdout


@pytest.mark.timeout(300)
def test_bench_cli_writes_plot_and_rejects_bad_flags(tmp_path):
    out, stdout = _run(tmp_path, "inproc", "ddp,demo-sign", steps=8, inner=8, extra=["--quiet"])
    png = out / "bench_home_broadband.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --quiet: no table, no progress; only the output paths
    assert stdout.splitlines() == [stdout.strip()] and stdout.startswith(f"wrote {out}")
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "thinwire.bench",
            "bench",
            "--methods",
            "nope",
            "--out",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("thinwire bench: error: argument --methods: must be 'all' or")
