"""The benchmark's built-in model and data: a tiny GPT and a synthetic language with a known floor.

* :class:`TinyGPT` — a pre-LayerNorm decoder (2 layers, d_model 64, 4 heads, context 64,
  vocab 64, tied embeddings, ~0.1M parameters).
* :class:`MarkovLanguage` — a seeded sparse Markov chain of order ``order`` over the vocabulary.
  Its entropy rate ``H = sum_s pi(s) H(P(.|s))`` (``pi`` the stationary distribution over
  contexts) is computed exactly and is the lowest cross-entropy any model can reach: the loss
  floor reported next to every result. Each worker streams its own seeded shard (disjoint
  random streams, identical across methods); the evaluation set is fixed and held out.
* :class:`ByteCorpus` — any local text file as byte-level data (vocab 256), for a real corpus.

Everything is generated in-process: no downloads.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from thinwire._validate import check_int

__all__ = ["TinyConfig", "TinyGPT", "MarkovLanguage", "ByteCorpus", "param_hash"]


@dataclass(frozen=True)
class TinyConfig:
    """Shape of :class:`TinyGPT` (defaults: the benchmark's model)."""

    vocab: int = 64
    context: int = 64
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    mlp_mult: int = 4


class _Block(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_mult * cfg.d_model)
        self.out = nn.Linear(cfg.mlp_mult * cfg.d_model, cfg.d_model)
        self.n_heads = cfg.n_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=2)
        # (B, T, D) -> (B, heads, T, D/heads)
        q, k, v = (t.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(B, T, D))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """A small GPT-style decoder with tied input/output embeddings.

    ``forward(idx, targets=None)`` returns logits ``(B, T, vocab)`` or, with targets, the mean
    cross-entropy in nats.
    """

    def __init__(self, cfg: TinyConfig = TinyConfig(), *, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.reset_parameters(seed)

    def reset_parameters(self, seed: int) -> None:
        """Seeded initialisation (GPT-2 style: normal(0, 0.02), zero biases), same on every rank."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                elif "ln" in name:
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        T = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        logits = self.ln_f(x) @ self.tok.weight.T
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def param_hash(model: nn.Module) -> str:
    """SHA-256 of every parameter's bytes, in ``named_parameters`` order (init check)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class MarkovLanguage:
    """A seeded sparse Markov chain of order ``order`` with an exactly known entropy rate.

    Every context (the previous ``order`` tokens) has ``branching`` possible next tokens with
    Dirichlet(1) probabilities. Args are validated; ``vocab ** order`` must stay <= 65,536.
    """

    def __init__(self, vocab: int = 64, order: int = 1, branching: int = 4, seed: int = 0) -> None:
        self.vocab = check_int("vocab", vocab, 2, 4096)
        self.order = check_int("order", order, 1, 4)
        self.branching = check_int("branching", branching, 1, vocab)
        if vocab**order > 65536:
            raise ValueError(f"vocab ** order must be in [1, 65536], got {vocab**order}")
        g = torch.Generator().manual_seed(seed)
        S = vocab**order
        probs = torch.zeros(S, vocab, dtype=torch.float64)
        for s in range(S):
            nxt = torch.randperm(vocab, generator=g)[:branching]
            w = -torch.log(torch.rand(branching, generator=g, dtype=torch.float64))  # Dirichlet(1)
            probs[s, nxt] = w / w.sum()
        self.probs = probs  # (contexts, vocab), float64
        self._probs32 = probs.to(torch.float32)
        self.stationary = self._stationary()
        self.seed = seed

    def _next_state(self, s: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        return (s * self.vocab + tok) % (self.vocab**self.order)

    def _stationary(self) -> torch.Tensor:
        S, V = self.probs.shape
        pi = torch.full((S,), 1.0 / S, dtype=torch.float64)
        states = torch.arange(S)
        for _ in range(2000):
            new = torch.zeros_like(pi)
            for t in range(V):  # mass moving from context s to context next(s, t)
                new.index_add_(
                    0, self._next_state(states, torch.full_like(states, t)), pi * self.probs[:, t]
                )
            if float((new - pi).abs().sum()) < 1e-13:
                return new
            pi = new
        return pi

    def entropy_rate(self) -> float:
        """Exact entropy rate in nats per token: the cross-entropy floor."""
        p = self.probs
        h = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(1)
        return float((self.stationary * h).sum())

    def sample(self, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """``(batch, length)`` int64 tokens, starting from contexts drawn from the stationary law."""
        s = torch.multinomial(
            self.stationary.to(torch.float32), batch, replacement=True, generator=generator
        )
        out = torch.empty(batch, length, dtype=torch.int64)
        for t in range(length):
            tok = torch.multinomial(self._probs32[s], 1, generator=generator).squeeze(1)
            out[:, t] = tok
            s = self._next_state(s, tok)
        return out

    def shard(self, rank: int, seed: int) -> torch.Generator:
        """The token stream of worker ``rank``: a generator no other worker or the eval set uses."""
        return torch.Generator().manual_seed(_mix(seed, 1, rank))

    def eval_set(self, n: int, length: int, seed: int) -> torch.Tensor:
        """A fixed held-out set of ``n`` sequences."""
        return self.sample(n, length, torch.Generator().manual_seed(_mix(seed, 2, 0)))


class ByteCorpus:
    """A local text file as byte-level data: shard ``r`` of ``P`` is the ``r``-th slice of the
    first 95%; the last 5% is held out for evaluation. No entropy floor is known."""

    vocab = 256

    def __init__(self, path: str | Path) -> None:
        data = Path(path).read_bytes()
        if len(data) < 4096:
            raise ValueError(f"data file must hold at least 4096 bytes, got {len(data)}")
        self.tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)
        self.split = int(len(self.tokens) * 0.95)

    def batch(
        self, rank: int, world: int, batch: int, length: int, g: torch.Generator
    ) -> torch.Tensor:
        lo = rank * self.split // world
        hi = (rank + 1) * self.split // world - length
        if hi <= lo:
            raise ValueError(f"data file is too small for world size {world} and context {length}")
        starts = torch.randint(lo, hi, (batch,), generator=g)
        return torch.stack([self.tokens[s : s + length] for s in starts.tolist()])

    def eval_set(self, n: int, length: int) -> torch.Tensor:
        span = len(self.tokens) - self.split - length
        step = max(1, span // n)
        return torch.stack(
            [self.tokens[self.split + i * step : self.split + i * step + length] for i in range(n)]
        )


def _mix(*parts: int) -> int:
    """A 63-bit seed from several integers (stable across runs and platforms)."""
    h = hashlib.sha256(
        b"thinwire" + b"".join(int(p).to_bytes(8, "little", signed=True) for p in parts)
    )
    return int.from_bytes(h.digest()[:8], "little") & ((1 << 63) - 1)


def floor_or_nan(lang: MarkovLanguage | None) -> float:
    """The loss floor of a language, NaN when unknown (byte corpora)."""
    return lang.entropy_rate() if lang is not None else math.nan
