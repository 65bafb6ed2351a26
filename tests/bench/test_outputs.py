"""What the benchmark shows a person: the PNG's three panels, progress at every tenth of a run,
no progress event lost when the ranks exit, and spawned ranks' warnings in the CLI's format."""

from __future__ import annotations

import json
import math
import queue
import struct
from pathlib import Path

import pytest

from thinwire.bench import BenchConfig, run_bench
from thinwire.bench.harness import _drain, _nan_for_null
from thinwire.bench.report import json_safe, make_figure, summarize, write_outputs

pytest.importorskip("matplotlib")

METHODS = ["ddp", "diloco-fp32", "sparseloco"]


@pytest.fixture(scope="module")
def run():
    """A tiny in-process run: 20 steps, one sync, 2 ranks; the events rank 0 reported."""
    events: list[tuple] = []
    cfg = BenchConfig(engine="inproc", world_size=2, steps=20, inner_steps=20, methods=METHODS)
    per_rank = run_bench(cfg, events.append)
    return cfg, summarize(per_rank), events


def test_figure_has_loss_panels_and_a_log_scale_bar_chart_of_bytes(run):
    import matplotlib.pyplot as plt

    _, summary, _ = run
    fig = make_figure(summary, "home_broadband")
    try:
        assert len(fig.axes) == 3
        by_bytes, by_time, bars = fig.axes
        assert by_bytes.get_xscale() == "log" and "bytes" in by_bytes.get_xlabel()
        assert "simulated time" in by_time.get_xlabel()
        for ax in (by_bytes, by_time):  # one curve per method, plus the entropy floor
            labels = [ln.get_label() for ln in ax.get_lines()]
            assert labels[: len(METHODS)] == METHODS and "entropy floor" in labels[len(METHODS) :]
        assert bars.get_xscale() == "log"
        assert [t.get_text() for t in bars.get_yticklabels()] == METHODS
        widths = [p.get_width() for p in bars.patches]
        want = [summary[m]["bytes_sent_per_rank"]["mean"] for m in METHODS]
        assert widths == pytest.approx(want)
        assert widths[0] > widths[1] > widths[2]  # ddp > diloco (1 sync) > sparseloco
        # each bar is labelled with its total and its reduction against DDP
        texts = [t.get_text() for t in bars.texts]
        assert len(texts) == len(METHODS) and "less than DDP" in texts[2]
    finally:
        plt.close(fig)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_png_is_three_panels_wide(run, tmp_path):
    cfg, summary, _ = run
    paths = write_outputs(summary, cfg.__dict__, tmp_path)
    w, h = _png_size(paths["png"])
    assert w > 3 * h, (w, h)  # three panels side by side (two panels were about 2.7 h wide)


def test_progress_events_at_every_tenth_and_none_lost(run):
    _, _, events = run
    for m in METHODS:
        steps = [e[4] for e in events if e[0] == "step" and e[1] == m]
        assert steps == list(range(2, 21, 2)), (m, steps)  # 20 steps: one event per 2 steps
        assert ("done", m, 0, 0, 20) in events
    assert events[-1] == ("done", METHODS[-1], 0, 0, 20)


def test_drain_delivers_events_left_after_the_ranks_exit():
    q: queue.Queue = queue.Queue()
    for i in range(5):
        q.put(("step", "m", 0, 0, i))
    got: list[tuple] = []
    _drain(q, got.append, lambda: False)  # the ranks are already gone
    assert [e[4] for e in got] == list(range(5)) and q.empty()


@pytest.mark.timeout(180)
def test_spawned_gloo_rank_logs_in_the_cli_format(capfd):
    # A 1-second communicator timeout is below what the WAN model asks for (3 x op + 30 s), so
    # the spawned rank warns; its stderr is this process's, so capfd sees the line.
    cfg = BenchConfig(
        engine="gloo",
        world_size=1,
        steps=2,
        inner_steps=2,
        methods=["diloco-fp32"],
        timeout_s=1.0,
    )
    run_bench(cfg)
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if "needs timeout_s" in ln]
    assert lines and all(ln.startswith("thinwire: WARNING: op ") for ln in lines), err[-2000:]


def test_rank_file_is_strict_json_and_reads_nan_back():
    # The per-rank hand-off file: NaN (no train loss at step 0, no floor with --data) is written
    # as null, so the file parses with NaN refused, and summarize() gets NaN back.
    res = [{"loss_floor": math.nan, "curve": [{"step": 0, "train_loss": math.nan, "x": 1.5}]}]
    text = json.dumps(json_safe(res), allow_nan=False)

    def refuse(name: str) -> float:
        raise ValueError(f"non-strict JSON constant {name}")

    json.loads(text, parse_constant=refuse)
    back = json.loads(text, object_hook=_nan_for_null)
    assert math.isnan(back[0]["loss_floor"]) and math.isnan(back[0]["curve"][0]["train_loss"])
    assert back[0]["curve"][0]["x"] == 1.5 and back[0]["curve"][0]["step"] == 0
