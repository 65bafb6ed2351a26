"""The FSDP-inside-DiLoCo example as the README runs it: 2 sites x 2 ranks under torchrun.

Four gloo processes on loopback train the tiny GPT with FSDP2 (``fully_shard``) inside each site
and DiLoCo (int8, error feedback) across sites, saving a ``torch.distributed.checkpoint`` after
step 10; fresh processes then resume from it. From the shards every rank writes after every sync
(``--dump``), this test checks, without trusting the example's own report:

* FSDP sharded the model: each rank holds half of every parameter's rows;
* after every sync the two sites hold bitwise equal parameters, θ_g and outer momentum, shard by
  shard, and the parameters equal θ_g (no mixing); the inner AdamW state differs between sites
  (it is each site's own, which is why each site saves a checkpoint of its own);
* the bytes a rank sends across sites per sync are those of its own shard in int8 (the frame
  size from ``docs/design.md``, "Byte formulas"), not of the whole model;
* the resumed run loads exactly what was saved and then equals the uninterrupted run bit for bit:
  parameters and every optimizer state tensor (θ_g, residuals, inner and outer state).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
ENV = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
LAUNCH = "torchrun --standalone --nnodes=1 --nproc-per-node=4"
ARGS = "examples/fsdp_diloco.py --sites 2 --steps 20 --inner-steps 5"
SAVE = f"{ARGS} --save-at 10 --checkpoint ckpt"
RESUME = f"{ARGS} --resume ckpt"
SYNCS, SAVED_AT = 4, 2  # syncs of the run; the sync after which the checkpoint is saved


def _readme_commands() -> str:
    """The README's commands, joined across their line continuations."""
    return re.sub(r"\\\n\s*", "", (ROOT / "README.md").read_text())


def _run(args: str, tmp: Path, dump: str) -> str:
    cmd = [str(TORCHRUN), *LAUNCH.split()[1:], *args.split(), "--dump", str(tmp / dump)]
    cmd = [str(tmp / "ckpt") if a == "ckpt" else a for a in cmd]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=ENV, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names whose tensors differ in dtype, shape or any bit (or exist on one side only)."""
    bad = sorted(set(a) ^ set(b))
    for k in set(a) & set(b):
        if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k], b[k]):
            bad.append(k)
    return bad


@pytest.mark.timeout(300)
def test_fsdp_inside_sites_diloco_across_them_with_a_bit_exact_resume(tmp_path):
    readme = _readme_commands()
    for args in (SAVE, RESUME):
        assert f"OMP_NUM_THREADS=1 {LAUNCH} {args}" in readme, f"README lacks {args!r}"

    out = _run(SAVE, tmp_path, "ref")
    assert "2 sites x 2 ranks (gloo): FSDP2 over mesh['shard'], DiLoCo over mesh['site']" in out
    assert len(re.findall(r"sites equal: yes", out)) == SYNCS, out
    ref = {
        (n, r): _load(tmp_path / "ref" / f"sync{n}_rank{r}.pt")
        for n in range(1, 5)
        for r in range(4)
    }

    # FSDP sharded every parameter on dim 0 over the site's two ranks.
    from thinwire.bench import TinyGPT

    full = dict(TinyGPT().named_parameters())
    for n in range(1, SYNCS + 1):
        for site in range(2):
            a, b = ref[n, 2 * site], ref[n, 2 * site + 1]
            assert (a["site"], a["shard"], b["site"], b["shard"]) == (site, 0, site, 1)
            for name, p in full.items():
                cat = torch.cat([a["params"][name], b["params"][name]])
                assert cat.shape == p.shape and a["params"][name].shape[0] == p.shape[0] // 2

    # The optimizer's per-parameter state is sharded like the parameters.
    sharded = ("anchor", "residual", "exp_avg", "exp_avg_sq", "momentum_buffer")
    for r in range(4):
        layout = ref[SYNCS, r]["layout"]
        per_param = {k: v for k, v in layout.items() if k.endswith(sharded)}
        assert len(per_param) == len(sharded) * len(full)
        assert set(per_param.values()) == {"DTensor(Shard(dim=0),)"}

    # After every sync: the sites agree shard by shard; the parameters are θ_g.
    for n in range(1, SYNCS + 1):
        for j in range(2):
            s0, s1 = ref[n, j], ref[n, 2 + j]
            assert not _same(s0["params"], s1["params"]), f"sync {n}, shard {j}"
            shared = {
                k: v for k, v in s0["optim"].items() if k.endswith(("anchor", "momentum_buffer"))
            }
            assert len(shared) == 2 * len(full)
            assert not _same(shared, {k: s1["optim"][k] for k in shared}), f"sync {n}, shard {j}"
            anchors = [s0["optim"][f"state.{i}.anchor"] for i in range(len(full))]
            assert all(
                torch.equal(p, a) for p, a in zip(s0["params"].values(), anchors, strict=True)
            )
            # Each site's own state: the inner AdamW moments and the error-feedback residuals.
            for what in (".exp_avg", ".residual"):
                own = {k: v for k, v in s0["optim"].items() if k.endswith(what)}
                assert len(own) == len(full)
                assert _same(own, {k: s1["optim"][k] for k in own}), f"{what} should be per site"

    # Bytes across sites per sync: one int8 frame of the rank's shard (block 256: a float32
    # scale per block, then the 4-byte frame check), sent to the one other site.
    shard = sum(t.numel() for t in ref[1, 0]["params"].values())
    frame = shard + 4 * math.ceil(shard / 256) + 4
    sent = [int(s.replace(",", "")) for s in re.findall(r"cross-site sent ([\d,]+) B", out)]
    assert sent == [frame * n for n in range(1, SYNCS + 1)], (sent, frame)
    assert 2 * shard == sum(p.numel() for p in full.values())
    assert (shard, 2 * shard, frame) == (54_144, 108_288, 54_996)  # the README's figures

    # Fresh processes resume from the checkpoint: what they load is what was saved, and the
    # syncs after it equal the uninterrupted run's, bit for bit.
    out = _run(RESUME, tmp_path, "res")
    assert f"resumed after step {SAVED_AT * 5}" in out
    for r in range(4):
        loaded = _load(tmp_path / "res" / f"loaded{SAVED_AT * 5}_rank{r}.pt")
        for key in ("params", "optim"):
            assert not _same(loaded[key], ref[SAVED_AT, r][key]), f"rank {r} loaded {key}"
        for n in range(SAVED_AT + 1, SYNCS + 1):
            got = _load(tmp_path / "res" / f"sync{n}_rank{r}.pt")
            for key in ("params", "optim"):
                bad = _same(got[key], ref[n, r][key])
                assert not bad, f"rank {r}, sync {n}: resumed run differs in {key}: {bad[:5]}"
