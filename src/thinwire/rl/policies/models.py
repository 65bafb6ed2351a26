"""Concrete policies and the sampling loop: ``TinyCausalLM``, ``HFCausalLMPolicy``, ``sample``.

Both models follow :class:`thinwire.rl.Policy`. ``sample`` records the behaviour log-probs with
:func:`thinwire.rl.token_logprobs`, the function the learner and the verifier score with, so
on-policy ratios are exactly 1. ``transformers`` is imported only inside ``HFCausalLMPolicy``
when it has to load a model.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from thinwire._validate import check_float, check_int
from thinwire.rl import Policy, token_logprobs

__all__ = ["TinyCausalLM", "HFCausalLMPolicy", "sample", "greedy_decode", "completion_mask"]


def _positions(attention_mask: Tensor | None, batch: int, length: int, device: Any) -> Tensor:
    """Position ids ``[B, T]``: 0.. for real tokens, counting from the first one (left padding)."""
    if attention_mask is None:
        return torch.arange(length, device=device).expand(batch, length)
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


class _Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln1 x), then x + ffn(ln2 x)."""

    def __init__(self, d_model: int, n_heads: int, ffn: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, ffn)
        self.out = nn.Linear(ffn, d_model)

    def forward(self, x: Tensor, attn_mask: Tensor | None) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        # [B, T, D] -> [B, H, T, D/H]
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyCausalLM(nn.Module):
    """A ~69k-parameter causal transformer for CPU GRPO.

    Pre-norm blocks, learned positions, untied output head with bias, GELU FFN, no dropout. With
    the defaults it has exactly 69,390 parameters. Initialisation follows
    PyTorch's defaults but draws from its own ``torch.Generator`` seeded by ``seed`` (see
    ``reset_parameters``), and modules are built on the meta device first, so constructing one
    never touches torch's global RNG (threads of one process can build replicas safely).

    Args:
        vocab_size: V (default: 14, DigitSum's vocabulary).
        d_model: width (default: 64). n_layers: blocks (default: 2). n_heads: heads (default: 4,
            must divide ``d_model``). ffn: hidden width of the FFN (default: 128).
        context: longest input, learned positions (default: 8; DigitSum needs 4 + 3).
        seed: initialisation seed (default: 0).
        eos_id: stop token id or ``None`` (default: 13, DigitSum's ``<eos>``).
        pad_id: padding id (default: 10, DigitSum's ``<pad>``).
    """

    def __init__(
        self,
        vocab_size: int = 14,
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        ffn: int = 128,
        context: int = 8,
        seed: int = 0,
        *,
        eos_id: int | None = 13,
        pad_id: int = 10,
    ) -> None:
        check_int("vocab_size", vocab_size, 2)
        check_int("d_model", d_model, 1)
        check_int("n_layers", n_layers, 1)
        check_int("n_heads", n_heads, 1, d_model)
        if d_model % n_heads:
            raise ValueError(f"n_heads must divide d_model = {d_model}, got {n_heads}")
        check_int("ffn", ffn, 1)
        check_int("context", context, 1)
        check_int("seed", seed, 0)
        if eos_id is not None:
            check_int("eos_id", eos_id, 0, vocab_size - 1)
        check_int("pad_id", pad_id, 0, vocab_size - 1)
        super().__init__()
        self.vocab_size = vocab_size
        self.context = context
        self.eos_id = eos_id
        self.pad_id = pad_id
        with torch.device("meta"):
            self.tok = nn.Embedding(vocab_size, d_model)
            self.pos = nn.Embedding(context, d_model)
            self.blocks = nn.ModuleList(_Block(d_model, n_heads, ffn) for _ in range(n_layers))
            self.ln_f = nn.LayerNorm(d_model)
            self.head = nn.Linear(d_model, vocab_size)
        self.to_empty(device="cpu")
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Re-initialise every parameter from ``torch.Generator().manual_seed(seed)``.

        The distributions are PyTorch's defaults (``nn.Linear``: weight and bias U(−1/√fan_in,
        1/√fan_in), i.e. kaiming-uniform with a = √5; ``nn.Embedding``: N(0, 1); LayerNorm: 1 and
        0), drawn from a private generator. The DigitSum thresholds of the end-to-end tests come
        from runs with this initialisation; GPT-2's N(0, 0.02) learned DigitSum far more slowly here
        (steps 151–200: 0.38–0.63 mean reward against 0.93, seed 0, 1024 completions per step).
        """
        gen = torch.Generator().manual_seed(seed)
        for mod in self.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.weight.fill_(1.0)
                mod.bias.zero_()
            elif isinstance(mod, nn.Embedding):
                mod.weight.normal_(0.0, 1.0, generator=gen)
            elif isinstance(mod, nn.Linear):
                bound = 1.0 / math.sqrt(mod.in_features)
                mod.weight.uniform_(-bound, bound, generator=gen)
                mod.bias.uniform_(-bound, bound, generator=gen)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Next-token logits ``[B, T, V]`` for ``input_ids [B, T]`` (T ≤ ``context``).

        ``attention_mask [B, T]`` (1 = token, 0 = left padding) hides padded keys and restarts
        positions at the first real token; padded query rows attend only to themselves.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape [B, T], got {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        if t > self.context:
            raise ValueError(
                f"sequence length must be in [1, {self.context}] (the model's context), got {t}"
            )
        pos = _positions(attention_mask, b, t, input_ids.device)
        x = self.tok(input_ids) + self.pos(pos)
        attn_mask = None
        if attention_mask is not None:
            causal = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()
            keys = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, T]
            eye = torch.eye(t, dtype=torch.bool, device=input_ids.device)
            attn_mask = (causal & keys) | eye  # [B, 1, T, T]
        for block in self.blocks:
            x = block(x, attn_mask)
        return self.head(self.ln_f(x))


def completion_mask(completion_ids: Tensor, stop_ids: Sequence[int] | None) -> Tensor:
    """Bool ``[B, K]``: tokens up to and including the first stop token of each row.

    With no ``stop_ids`` every token is active. Padding written after a stop is inactive even if
    the pad id is also a token the model can sample.
    """
    if not stop_ids:
        return torch.ones_like(completion_ids, dtype=torch.bool)
    is_stop = torch.isin(completion_ids, torch.tensor(list(stop_ids), device=completion_ids.device))
    stops_before = is_stop.long().cumsum(dim=1) - is_stop.long()  # stops strictly before t
    return stops_before == 0


@torch.no_grad()
def sample(
    policy: Policy,
    prompt_ids: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    *,
    stop_ids: Sequence[int] | None = None,
    prompt_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Sample completions and record their behaviour log-probs.

    Plain ancestral sampling from ``softmax(logits / T)`` (no top-k/top-p, so the recorded
    log-probs are exactly the sampling distribution); one ``torch.multinomial`` draw per step from
    ``generator``, so equal generator states give equal completions.

    Args:
        policy: any ``Policy``.
        prompt_ids: ``[B, Tp]`` prompts (left-padded if ``prompt_mask`` is given).
        max_new_tokens: K ≥ 1 tokens per completion.
        temperature: *T* > 0 (default: 1.0).
        generator: source of randomness (default: torch's global generator; pass one).
        stop_ids: tokens that end a completion (e.g. ``[policy.eos_id]``); later positions get
            ``policy.pad_id`` and log-prob 0. ``None``: always K tokens.
        prompt_mask: ``[B, Tp]`` left-padding mask of the prompts.

    Returns:
        ``(completion_ids [B, K] long, behavior_logp [B, K])``; ``completion_mask(ids,
        stop_ids)`` gives the active tokens and a row with no stop token was truncated.
    """
    check_int("max_new_tokens", max_new_tokens, 1)
    check_float("temperature", temperature, 0.0, lo_open=True)
    b = prompt_ids.shape[0]
    ids = prompt_ids
    attn = None if prompt_mask is None else prompt_mask.long()
    stops = None if not stop_ids else torch.tensor(list(stop_ids), device=prompt_ids.device)
    done = torch.zeros(b, dtype=torch.bool, device=prompt_ids.device)
    tokens: list[Tensor] = []
    logps: list[Tensor] = []
    for _ in range(max_new_tokens):
        logits = policy(ids, attention_mask=attn)[:, -1]
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # as token_logprobs scores them
        probs = torch.softmax(logits / temperature if temperature != 1.0 else logits, dim=-1)
        tok = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        lp = token_logprobs(logits, tok, temperature)
        tok = torch.where(done, torch.full_like(tok, policy.pad_id), tok)
        lp = torch.where(done, torch.zeros_like(lp), lp)
        tokens.append(tok)
        logps.append(lp)
        if stops is not None:
            done = done | torch.isin(tok, stops)
        ids = torch.cat([ids, tok[:, None]], dim=1)
        if attn is not None:
            attn = torch.cat([attn, torch.ones_like(tok)[:, None]], dim=1)
    return torch.stack(tokens, dim=1), torch.stack(logps, dim=1)


@torch.no_grad()
def greedy_decode(
    policy: Policy,
    prompt_ids: Tensor,
    max_new_tokens: int,
    *,
    prompt_mask: Tensor | None = None,
) -> Tensor:
    """Arg-max decoding (ties to the lowest id, ``torch.argmax``): ``[B, K]`` token ids."""
    check_int("max_new_tokens", max_new_tokens, 1)
    ids = prompt_ids
    attn = None if prompt_mask is None else prompt_mask.long()
    out: list[Tensor] = []
    for _ in range(max_new_tokens):
        tok = policy(ids, attention_mask=attn)[:, -1].argmax(dim=-1)
        out.append(tok)
        ids = torch.cat([ids, tok[:, None]], dim=1)
        if attn is not None:
            attn = torch.cat([attn, torch.ones_like(tok)[:, None]], dim=1)
    return torch.stack(out, dim=1)


def _first_id(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, list | tuple):
        return int(value[0]) if value else None
    return int(value)


class HFCausalLMPolicy(nn.Module):
    """Adapter from any Hugging Face ``AutoModelForCausalLM`` to the ``Policy`` protocol.

    Needs the optional extra ``thinwire[hf]`` (``transformers``) only to load a model by path;
    wrapping an already-built model imports nothing. Prompts are left-padded and position ids
    restart at the first real token, so a padded prompt scores its completion exactly like the
    unpadded one. ``eos_token_id`` is the stop token.

    Deviation from TRL: dropout is switched off by default (TRL's ``disable_dropout`` defaults to
    False) because the ratio against the behaviour log-probs must be exactly 1 on-policy.

    Args:
        model_or_path: a causal-LM module (``model(input_ids=, attention_mask=, position_ids=)``
            returning ``.logits``) or a local directory / hub id to load with
            ``AutoModelForCausalLM.from_pretrained``.
        tokenizer: a tokenizer object, a path to load with ``AutoTokenizer``, or ``None`` (text
            helpers then raise).
        local_files_only: never download when loading by path (default: True).
        chat_template: wrap prompts with ``tokenizer.apply_chat_template`` (default: False).
        disable_dropout: set every ``nn.Dropout`` to p = 0 (default: True).

    Raises:
        ImportError: loading by path without ``transformers`` installed.
    """

    def __init__(
        self,
        model_or_path: nn.Module | str | os.PathLike[str],
        tokenizer: Any = None,
        local_files_only: bool = True,
        *,
        chat_template: bool = False,
        disable_dropout: bool = True,
    ) -> None:
        super().__init__()
        needs_hf = isinstance(model_or_path, str | os.PathLike) or isinstance(tokenizer, str)
        if needs_hf:
            try:
                import transformers
            except ImportError as err:  # the optional extra is missing
                raise ImportError(
                    "HFCausalLMPolicy needs transformers to load by path: pip install "
                    "'thinwire[hf]' (or pass an already-built model)"
                ) from err
        model: nn.Module
        if isinstance(model_or_path, str | os.PathLike):
            model = transformers.AutoModelForCausalLM.from_pretrained(
                os.fspath(model_or_path), local_files_only=local_files_only
            )
        elif isinstance(model_or_path, nn.Module):
            model = model_or_path
        else:
            raise TypeError(
                f"model_or_path must be nn.Module or a path, got {type(model_or_path).__name__}"
            )
        if isinstance(tokenizer, str):
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                tokenizer, local_files_only=local_files_only
            )
        self.model = model
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        if disable_dropout:
            for mod in model.modules():
                if isinstance(mod, nn.Dropout):
                    mod.p = 0.0
        config = getattr(model, "config", None)
        get_head: Any = getattr(model, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        vocab = getattr(head, "out_features", None) or getattr(config, "vocab_size", None)
        if vocab is None:
            raise ValueError("cannot tell the vocabulary size: model has no output head or config")
        self.vocab_size = int(vocab)
        eos = _first_id(getattr(config, "eos_token_id", None))
        if eos is None and tokenizer is not None:
            eos = _first_id(getattr(tokenizer, "eos_token_id", None))
        self.eos_id = eos
        pad = _first_id(getattr(config, "pad_token_id", None))
        if pad is None and tokenizer is not None:
            pad = _first_id(getattr(tokenizer, "pad_token_id", None))
        # GPT-2-style models have no pad token; the padded slots are masked, so any id works and
        # eos is the usual choice (transformers' generate() does the same).
        self.pad_id = pad if pad is not None else (eos if eos is not None else 0)

    @property
    def stop_ids(self) -> list[int]:
        """``[eos_id]``, or ``[]`` when the model has none."""
        return [] if self.eos_id is None else [self.eos_id]

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits ``[B, T, V]``; position ids restart at the first unmasked token."""
        b, t = input_ids.shape
        pos = _positions(attention_mask, b, t, input_ids.device)
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=False
        )
        return out.logits

    def encode_prompts(
        self, prompts: Sequence[str | list[dict[str, str]]]
    ) -> tuple[Tensor, Tensor]:
        """Tokenize and left-pad prompts: ``(input_ids [B, Tp], attention_mask [B, Tp])``.

        A prompt is a string, or a list of chat messages when ``chat_template`` is on.
        """
        if self.tokenizer is None:
            raise ValueError("encode_prompts needs a tokenizer: pass tokenizer= to the adapter")
        rows: list[list[int]] = []
        for p in prompts:
            if self.chat_template:
                msgs = [{"role": "user", "content": p}] if isinstance(p, str) else p
                text = self.tokenizer.apply_chat_template(
                    msgs, tokenize=False, add_generation_prompt=True
                )
            else:
                text = p
            rows.append(list(self.tokenizer(text, add_special_tokens=False)["input_ids"]))
        width = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            if r:
                ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
                mask[i, width - len(r) :] = 1
        return ids, mask

    def decode(self, completion_ids: Tensor) -> list[str]:
        """Text of each completion up to its first stop token (special tokens dropped)."""
        if self.tokenizer is None:
            raise ValueError("decode needs a tokenizer: pass tokenizer= to the adapter")
        mask = completion_mask(completion_ids, self.stop_ids)
        return [
            self.tokenizer.decode(row[m].tolist(), skip_special_tokens=True)
            for row, m in zip(completion_ids, mask, strict=True)
        ]
