"""Verifiable rollouts: fingerprint check plus log-prob spot checks at PRF-chosen positions.

A rollout carries the fingerprint of the weights that sampled it (16 bytes of SHA-256 over the
parameters of its ``policy_version``, :func:`thinwire.rl.param_fingerprint`) and the
behaviour log-probs the worker recorded. :class:`RolloutVerifier` checks, for each rollout:

1. the claimed version is still kept by the learner's :class:`~thinwire.rl.PolicyStore`
   (or the remote-view store of a :class:`~thinwire.rl.WeightPublisher`);
2. the fingerprint equals the store's fingerprint of that version (catches honest workers on
   other or stale weights, and copy errors);
3. at ``n_positions`` completion positions chosen by a PRF — HMAC-SHA256 keyed with the
   verifier's secret over the rollout id, so a worker cannot predict them — the log-prob
   recomputed with the claimed weights and temperature equals the recorded one within ``atol``
   (catches forged fingerprints: rollouts made by other weights or a stale version claimed as
   fresh, and edited tokens or log-probs: an edited token changes its own log-prob and, through
   the causal context, those of every later token).

Cost: a causal LM needs the whole prefix for the log-prob at position ``t``, so the verifier runs
one teacher-forced forward (no sampling loop, no backward) over ``prompt + completion[:t_max]``
(the logits at the token before ``t_max`` predict it), where ``t_max`` is the last chosen
position, batched per version. :attr:`RolloutVerifier.cost` counts the token positions fed to the
model against two references: a full teacher-forced recomputation of every log-prob
(``Lp + Lc − 1`` positions per rollout) and regenerating the rollout with the claimed weights
(``Σ_{t<Lc} (Lp + t)`` positions for a model without a KV cache, as ``sample`` runs), plus wall
time. Attacks on whole rollouts or groups (other weights, a stale version) show at any position,
so one position suffices; an edited token shows at its own position and, through the causal
context, at every later one; an edited log-prob only at its own. Catching a single edit in every
rollout therefore needs ``n_positions ≥ Lc``: on short completions (DigitSum, ``Lc = 3``) the
verifier checks them all and costs a prefill, not a fraction of one; on long completions the
per-rollout detection of one edited log-prob is ``n_positions / Lc``.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from thinwire._validate import check_float, check_int, check_type
from thinwire.rl.rollout import Rollout
from thinwire.rl.weights import PolicyStore

__all__ = ["RolloutVerifier", "Verdict", "VerifierCost", "prf_positions"]


def prf_positions(key: bytes, rollout_id: bytes, candidates: Sequence[int], k: int) -> list[int]:
    """``min(k, len(candidates))`` distinct candidates chosen by HMAC-SHA256(key, id ‖ counter).

    A partial Fisher-Yates shuffle driven by 64-bit words of the HMAC stream (modulo bias below
    2^-50 for any realistic completion length). Sorted ascending.
    """
    pool = list(candidates)
    k = min(k, len(pool))
    out, counter = [], 0
    words: list[int] = []
    for i in range(k):
        if not words:
            digest = hmac.new(
                key, rollout_id + counter.to_bytes(4, "little"), hashlib.sha256
            ).digest()
            words = [int.from_bytes(digest[j : j + 8], "little") for j in range(0, 32, 8)]
            counter += 1
        j = i + words.pop() % (len(pool) - i)
        pool[i], pool[j] = pool[j], pool[i]
        out.append(pool[i])
    return sorted(out)


@dataclass(frozen=True)
class Verdict:
    """Outcome of verifying one rollout.

    ``reason`` is ``"ok"``, ``"unknown_version"``, ``"fingerprint_mismatch"`` or
    ``"logprob_mismatch"``; ``max_abs_err`` is the largest |recomputed − recorded| over the
    checked positions (0 when no log-prob was checked).
    """

    ok: bool
    reason: str
    positions: tuple[int, ...] = ()
    max_abs_err: float = 0.0


@dataclass
class VerifierCost:
    """Work done by a verifier, in token positions fed to the model and wall seconds."""

    rollouts: int = 0
    positions_checked: int = 0
    tokens_fed: int = 0
    full_recompute_tokens: int = 0
    regenerate_tokens: int = 0
    wall_s: float = 0.0
    per_version_loads: dict[int, int] = field(default_factory=lambda: defaultdict(int))

    def fraction_of_full(self) -> float:
        """Tokens fed / tokens of a full teacher-forced recomputation of every log-prob."""
        return self.tokens_fed / max(1, self.full_recompute_tokens)

    def fraction_of_regeneration(self) -> float:
        """Tokens fed / tokens of regenerating every rollout with a no-cache sampling loop."""
        return self.tokens_fed / max(1, self.regenerate_tokens)


class RolloutVerifier:
    """Checks rollouts against the weights of the version they claim (see module docstring).

    Args:
        policy: a module of the policy's architecture; its weights are overwritten with each
            claimed version's (keep it private to the verifier).
        store: the store (or stores) that published the versions: a learner's, and/or the
            ``WeightPublisher.view`` of its remote workers. A rollout is checked against the store
            whose fingerprint of the claimed version matches (the first one otherwise).
        key: the verifier's secret PRF key (bytes, ≥ 16); workers must not know it.
        n_positions: completion positions checked per rollout (default: 3), range [1, inf).
        atol: largest accepted |recomputed − recorded| log-prob (default: 1e-4; the float32
            difference between the sampling loop and a teacher-forced pass is ~1e-6 on CPU).
        batch_size: rollouts per forward pass (default: 1024).
    """

    def __init__(
        self,
        policy: nn.Module,
        store: PolicyStore | Sequence[PolicyStore],
        *,
        key: bytes,
        n_positions: int = 3,
        atol: float = 1e-4,
        batch_size: int = 1024,
    ) -> None:
        self.policy = check_type("policy", policy, nn.Module)
        stores = [store] if isinstance(store, PolicyStore) else list(store)
        for st in stores:
            check_type("store", st, PolicyStore)
        if not stores:
            raise ValueError("store must name at least one PolicyStore, got none")
        self.stores = stores
        check_type("key", key, bytes)
        if len(key) < 16:
            raise ValueError(f"key length must be in [16, inf) bytes, got {len(key)}")
        self._key = key
        self.n_positions = check_int("n_positions", n_positions, 1)
        self.atol = check_float("atol", atol, 0.0, lo_open=True)
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.cost = VerifierCost()
        self._loaded: tuple[int, int] | None = None

    def positions(self, rollout: Rollout) -> list[int]:
        """The completion positions checked for ``rollout`` (only loss-bearing tokens)."""
        cand = torch.nonzero(rollout.loss_mask, as_tuple=False).flatten().tolist()
        return prf_positions(self._key, rollout.rollout_id, cand, self.n_positions)

    @torch.no_grad()
    def verify(self, rollouts: Sequence[Rollout]) -> list[Verdict]:
        """Verify every rollout; one verdict each, in order."""
        t0 = time.perf_counter()
        verdicts: list[Verdict | None] = [None] * len(rollouts)
        todo: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, r in enumerate(rollouts):
            lp, lc = r.prompt_ids.shape[0], r.completion_ids.shape[0]
            self.cost.rollouts += 1
            self.cost.full_recompute_tokens += lp + lc - 1
            self.cost.regenerate_tokens += sum(lp + t for t in range(lc))
            snaps = []
            for si, st in enumerate(self.stores):
                try:
                    snaps.append((si, st.get(r.policy_version)))
                except KeyError:
                    pass
            if not snaps:
                verdicts[i] = Verdict(False, "unknown_version")
                continue
            match = [
                si for si, snap in snaps if hmac.compare_digest(snap.fingerprint, r.fingerprint)
            ]
            if not match:
                verdicts[i] = Verdict(False, "fingerprint_mismatch")
                continue
            todo[(match[0], r.policy_version)].append(i)
        for (si, version), idxs in todo.items():
            self._load(si, version)
            for s in range(0, len(idxs), self.batch_size):
                chunk = idxs[s : s + self.batch_size]
                for i, v in zip(chunk, self._check([rollouts[i] for i in chunk]), strict=True):
                    verdicts[i] = v
        self.cost.wall_s += time.perf_counter() - t0
        return verdicts  # type: ignore[return-value]

    def _load(self, store_idx: int, version: int) -> None:
        if self._loaded != (store_idx, version):
            self.policy.load_state_dict(self.stores[store_idx].get(version).state)
            self._loaded = (store_idx, version)
            self.cost.per_version_loads[version] += 1

    def _check(self, batch: list[Rollout]) -> list[Verdict]:
        pos = [self.positions(r) for r in batch]
        out: list[Verdict | None] = [None] * len(batch)
        # one forward per (prompt length, temperature, prefix length): left padding would shift
        # positions, and a rollout is fed only up to its own last checked position
        buckets: dict[tuple[int, float, int], list[int]] = defaultdict(list)
        for j, (r, p) in enumerate(zip(batch, pos, strict=True)):
            if not p:  # nothing the loss sees: nothing to check beyond the fingerprint
                out[j] = Verdict(True, "ok")
            else:
                buckets[(r.prompt_ids.shape[0], float(r.temperature), p[-1] + 1)].append(j)
        for (_lp, temp, t_end), js in buckets.items():
            comp = torch.stack([batch[j].completion_ids[:t_end] for j in js])  # [B, t_end]
            prompts = torch.stack([batch[j].prompt_ids for j in js])
            tp = prompts.shape[1]
            # the last checked token is predicted from the position before it: it is never fed
            ids = torch.cat([prompts, comp[:, : t_end - 1]], dim=1)
            self.cost.tokens_fed += ids.numel()
            logits = self.policy(ids)[:, tp - 1 :].float() / temp  # [B, t_end, V]
            lp = torch.log_softmax(logits, dim=-1).gather(-1, comp[:, :, None]).squeeze(-1)
            rec = torch.stack([batch[j].behavior_logprobs[:t_end] for j in js]).to(lp.dtype)
            chosen = torch.zeros(len(js), t_end, dtype=torch.bool)
            for row, j in enumerate(js):
                chosen[row, pos[j]] = True
            # NaN compares false below, so a NaN log-prob is flagged (|x| <= atol is False)
            err = torch.where(chosen, (lp - rec).abs(), torch.zeros_like(lp))
            err = torch.where(torch.isnan(err), torch.full_like(err, float("inf")), err).amax(dim=1)
            self.cost.positions_checked += int(chosen.sum())
            for row, j in enumerate(js):
                e = float(err[row])
                ok = e <= self.atol
                out[j] = Verdict(ok, "ok" if ok else "logprob_mismatch", tuple(pos[j]), e)
        return out  # type: ignore[return-value]
