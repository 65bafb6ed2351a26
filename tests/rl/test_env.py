"""Environments, rubrics, the gym adapter and DigitSum.

Oracles: brute-force counts of digit triples and the closed-form uniform baseline, a Monte-Carlo
estimate from a zero-logit policy, scripted policies with known answers, hand-summed episode
returns, and log-probs recomputed on the full token sequence.
"""

from __future__ import annotations

import itertools
import math
import sys

import pytest
import torch
from torch import Tensor, nn

from thinwire.rl import GRPOLoss, completion_logprobs, compute_advantages, sequence_logprobs
from thinwire.rl.config import GRPOConfig
from thinwire.rl.envs import (
    BOS,
    EOS,
    EQ,
    PAD,
    DigitSumEnv,
    GymAdapter,
    MultiTurnEnv,
    Prompt,
    Rubric,
    SingleTurnEnv,
    Task,
    Trajectory,
    count_solutions,
)
from thinwire.rl.policies import LocalSampler, SamplingArgs, SamplingClient, TinyCausalLM, sample


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """Tiny tensors: one intra-op thread. On a shared 2-core machine two OpenMP threads made a
    TinyCausalLM forward+backward ~10x slower (measured 0.49 s vs 0.045 s CPU per 512 rows)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _ConstPolicy(nn.Module):
    """Logits from a fixed vector at every position (zeros: the uniform policy)."""

    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.vocab_size, self.eos_id, self.pad_id = logits.numel(), EOS, PAD

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.logits.expand(*input_ids.shape, -1)


class _Solver(nn.Module):
    """Scripted DigitSum policy: greedy digits min(9, remaining) (always correct if wrong_by=0)."""

    vocab_size, eos_id, pad_id = 14, EOS, PAD

    def __init__(self, wrong_by: int = 0) -> None:
        super().__init__()
        self.wrong_by = wrong_by

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        out = torch.zeros(*input_ids.shape, 14)
        for b, row in enumerate(input_ids.tolist()):
            left = 10 * row[1] + row[2] + self.wrong_by - sum(row[4:])
            out[b, -1, max(0, min(9, left))] = 10.0
        return out


# ---------------------------------------------------------------- DigitSum


def test_digit_sum_reward_cases() -> None:
    env = DigitSumEnv()
    p = Prompt(env.prompt_ids(23), 23)
    assert p.ids.tolist() == [BOS, 2, 3, EQ]
    assert env.reward(p, [9, 9, 5]) == 1.0
    assert env.reward(p, torch.tensor([5, 9, 9])) == 1.0
    assert env.reward(p, [9, 9, 4]) == 0.0  # wrong sum
    assert env.reward(p, [9, 9, 5, 0]) == 0.0  # length != K
    assert env.reward(p, [9, 9]) == 0.0
    assert env.reward(7, [PAD, 7, 0]) == 0.0  # a non-digit even though 10 + 7 + 0 != 7 anyway
    assert env.reward(13, [EOS, 0, 0]) == 0.0  # EOS (id 13) never counts as a digit
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 14, (500, 3), generator=gen)
    ids[:250] = torch.randint(0, 10, (250, 3), generator=gen)
    targets = ids[:, :].clamp(max=9).sum(dim=1)  # many exact hits among the all-digit rows
    loop = [env.reward(int(t), row) for t, row in zip(targets, ids, strict=True)]
    assert env.rewards(targets, ids).tolist() == loop
    assert 0 < sum(loop) < 500


def test_digit_sum_exact_uniform_baseline() -> None:
    env = DigitSumEnv()
    counts = {t: 0 for t in range(28)}
    for a, b, c in itertools.product(range(10), repeat=3):
        counts[a + b + c] += 1
    assert [count_solutions(t) for t in range(28)] == [counts[t] for t in range(28)]
    assert (counts[4], counts[13], counts[23]) == (15, 75, 15)
    assert sum(counts[t] for t in range(4, 24)) == 960  # 0.048 = 960 / 20 / 1000
    assert env.uniform_baseline() == pytest.approx((10 / 14) ** 3 * 0.048, abs=1e-15)
    assert round(env.uniform_baseline(), 6) == 0.017493


def test_zero_logit_policy_monte_carlo_matches_baseline() -> None:
    # Oracle 6.12: 200k samples of the uniform policy score 0.0175 ± 0.001.
    env = DigitSumEnv()
    gen = torch.Generator().manual_seed(12)
    prompts = env.sample_prompts(200_000, gen)
    ids = torch.stack([p.ids for p in prompts])
    targets = torch.tensor([p.target for p in prompts])
    out, lp = sample(_ConstPolicy(torch.zeros(14)), ids, 3, 1.0, gen)
    assert torch.allclose(lp, torch.full_like(lp, -math.log(14)))
    assert abs(env.rewards(targets, out).mean().item() - 0.0175) < 0.001
    hist = torch.bincount(targets, minlength=24)[4:]
    assert hist.min() > 0.9 * 10_000 and hist.max() < 1.1 * 10_000  # uniform over 20 targets


def test_digit_sum_prompts_targets_and_validation() -> None:
    env = DigitSumEnv(seed=3)
    a = env.sample_prompts(50, torch.Generator().manual_seed(1))
    b = env.sample_prompts(50, torch.Generator().manual_seed(1))
    assert [p.target for p in a] == [p.target for p in b]
    assert all(
        4 <= p.target <= 23 and p.ids.tolist() == [BOS, p.target // 10, p.target % 10, EQ]
        for p in a
    )
    assert [t.answer for t in env.dataset()] == list(range(4, 24))
    wide = DigitSumEnv(t_min=0, t_max=27)
    assert round(wide.uniform_baseline(), 6) == round((10 / 14) ** 3 * 1000 / 28 / 1000, 6)
    with pytest.raises(ValueError, match=r"t_max must be in \[4, 27\], got 28"):
        DigitSumEnv(t_max=28)
    with pytest.raises(ValueError, match=r"t_max must be in \[9, 27\], got 8"):
        DigitSumEnv(t_min=9, t_max=8)


def test_greedy_accuracy_with_scripted_policies() -> None:
    env = DigitSumEnv()
    assert env.greedy_accuracy(_Solver()) == 20
    assert env.greedy_accuracy(_Solver(wrong_by=1)) == 0
    assert env.greedy_accuracy(_ConstPolicy(torch.zeros(14))) == 0  # argmax ties -> 0, 0, 0


def test_digit_sum_as_single_turn_env() -> None:
    env = DigitSumEnv()
    policy = TinyCausalLM(seed=0).double()
    client = LocalSampler(policy, torch.Generator().manual_seed(0))
    assert isinstance(client, SamplingClient)
    task = env.dataset()[5]
    group = env.run_group(client, task, 16, env.sampling_args)
    assert len(group) == 16
    ids = torch.stack([t.completion_ids for t in group])
    lp = torch.stack([t.behavior_logprobs for t in group])
    assert [t.reward for t in group] == [env.reward(task.answer, row) for row in ids]
    assert all(t.reward_components == {"digit_sum": t.reward} for t in group)
    prompts = task.prompt.expand(16, 4)
    torch.testing.assert_close(completion_logprobs(policy, prompts, ids), lp, rtol=0, atol=1e-12)
    assert not any(t.truncated for t in group)  # no stop tokens: K tokens is the intended length


# ---------------------------------------------------------------- Rubric


def _traj(prompt: str, completion: str, answer: str, state: dict | None = None) -> Trajectory:
    return Trajectory(
        task=Task(prompt, answer=answer, info={"lang": "en"}),
        prompt_ids=torch.zeros(1, dtype=torch.long),
        completion_ids=torch.tensor([1, 2]),
        behavior_logprobs=torch.zeros(2),
        loss_mask=torch.ones(2, dtype=torch.bool),
        completion=completion,
        state=state or {},
    )


def test_rubric_weights_none_and_metrics_only() -> None:
    def exact(completion, answer):
        return float(completion == answer)

    def only_long(completion):
        return None if len(completion) < 3 else 0.5

    def length(completion, **kwargs):
        assert set(kwargs) >= {"prompt", "answer", "info", "state", "task"}
        return float(len(completion))

    rubric = Rubric([exact, only_long, length], weights=[1.0, 2.0, 0.0])
    group = [_traj("q", "abc", "abc"), _traj("q", "ab", "abc"), _traj("q", "xyz", "abc")]
    rewards = rubric.score_group(group)
    assert rewards == [1.0 + 2 * 0.5, 0.0, 0.0 + 2 * 0.5]
    assert group[1].reward_components["only_long"] != group[1].reward_components["only_long"]  # NaN
    assert group[0].reward_components["length"] == 3.0  # weight 0: logged, not summed
    # Every weighted function says "not applicable": the completion is unscorable (NaN).
    unscorable = Rubric([only_long]).score_group([_traj("q", "ab", "a"), _traj("q", "abcd", "a")])
    assert math.isnan(unscorable[0]) and unscorable[1] == 0.5
    adv = compute_advantages(torch.tensor([unscorable + [0.0]], dtype=torch.float64), "none")
    assert adv.tolist() == [[0.0, 0.25, -0.25]]


def test_rubric_group_functions_and_from_trl() -> None:
    def rank(completions):  # a group function: plural argument name
        order = sorted(completions)
        return [float(order.index(c)) for c in completions]

    def trl_style(prompts, completions, completion_ids, **columns):
        return [
            float(c == a) + 0.1 * len(ids) if lang == "en" else None
            for c, ids, a, lang in zip(
                completions, completion_ids, columns["answer"], columns["lang"], strict=True
            )
        ]

    group = [_traj("q", "b", "b"), _traj("q", "a", "b")]
    assert Rubric([rank]).score_group(group) == [1.0, 0.0]
    trl = Rubric.from_trl([trl_style], weights=[2.0])
    assert trl.names == ["trl_style"]
    assert trl.score_group(group) == pytest.approx([2 * 1.2, 2 * 0.2])


def test_rubric_rejects_bad_functions() -> None:
    def wants_unknown(completion, secret):
        return 1.0

    async def judge(completion):
        return 1.0

    def short(completions):
        return [1.0]

    with pytest.raises(ValueError, match="asks for 'secret'"):
        Rubric([wants_unknown])
    with pytest.raises(TypeError, match="async"):
        Rubric([judge])
    with pytest.raises(ValueError, match="non-zero weight"):
        Rubric([short], weights=[0.0])
    with pytest.raises(ValueError, match="must return 2 scores"):
        Rubric([short]).score_group([_traj("q", "a", "a"), _traj("q", "b", "a")])


# ---------------------------------------------------------------- multi-turn and gym


class _EchoEnv(MultiTurnEnv):
    """After each model turn the environment answers with the tokens [PAD, EQ]."""

    async def env_response(self, messages, state):
        return [{"role": "user", "content": [PAD, EQ]}], state


def test_multi_turn_masks_env_tokens_and_records_logprobs() -> None:
    policy = TinyCausalLM(seed=1).double()
    rubric = Rubric([lambda completion_ids: float(len(completion_ids))])
    env = _EchoEnv([Task(prompt=[BOS, 3])], rubric, max_turns=2, max_context=8)
    sampling = SamplingArgs(max_new_tokens=2)
    group = env.run_group(LocalSampler(policy, seed=4), env.dataset()[0], 3, sampling)
    for traj in group:
        assert traj.loss_mask.tolist() == [True, True, False, False, True, True]
        assert traj.completion_ids[2:4].tolist() == [PAD, EQ]
        assert traj.behavior_logprobs[2:4].tolist() == [0.0, 0.0]
        assert [m["role"] for m in traj.completion] == ["assistant", "user", "assistant"]
        full = torch.cat([traj.prompt_ids, traj.completion_ids])[None]
        mask = torch.cat([torch.zeros(2, dtype=torch.bool), traj.loss_mask])[None]
        recomputed = sequence_logprobs(policy, full, mask)[0, 2:]
        torch.testing.assert_close(recomputed, traj.behavior_logprobs, rtol=0, atol=1e-12)
        assert traj.reward == 6.0 and traj.state["turn"] == 2
    # A context limit ends the rollout early and marks it truncated.
    short = _EchoEnv([Task(prompt=[BOS, 3])], rubric, max_turns=3, max_context=7)
    traj = short.run_group(LocalSampler(policy), short.dataset()[0], 1, sampling)[0]
    assert traj.truncated and traj.loss_mask.tolist() == [True, True, False, False]


class _ParityGame:
    """Duck-typed gymnasium env: observe a digit, earn 1 for answering its parity; 3 steps."""

    def reset(self, seed=None):
        self.obs, self.steps = seed % 10, 0
        return self.obs, {}

    def step(self, action):
        reward = 1.0 if action == self.obs % 2 else 0.0
        self.obs, self.steps = (self.obs + 1) % 10, self.steps + 1
        return self.obs, reward, self.steps >= 3, False, {}


def _parse(ids: list[int]) -> int:
    if ids[0] > 9:
        raise ValueError(f"not a digit: {ids[0]}")
    return ids[0] % 2


def test_gym_adapter_episode_reward_and_masks() -> None:
    policy = _ConstPolicy(torch.tensor([0.0] * 10 + [-1e9] * 4))  # digits only
    env = GymAdapter(
        _ParityGame(), str, _parse, encode=lambda s: [int(c) for c in s], decode=list, seeds=[4, 7]
    )
    trajs = env.run_group(
        LocalSampler(policy, seed=1), env.dataset()[1], 4, SamplingArgs(max_new_tokens=1)
    )
    assert "gymnasium" not in sys.modules
    for traj in trajs:
        acts = traj.completion_ids[traj.loss_mask].tolist()
        obs = traj.completion_ids[~traj.loss_mask].tolist()
        assert len(acts) == 3 and obs == [8, 9]  # 3 env steps, then terminated
        assert traj.prompt_ids.tolist() == [7]
        expected = sum(float(a % 2 == o % 2) for a, o in zip(acts, [7, 8, 9], strict=True))
        assert traj.reward == expected == traj.state["episode_reward"]
        assert traj.state["terminated"]


def test_gym_adapter_invalid_action_ends_episode() -> None:
    policy = _ConstPolicy(torch.tensor([-1e9] * 10 + [0.0] * 4))  # never a digit
    env = GymAdapter(_ParityGame(), str, _parse, encode=lambda s: [int(c) for c in s], decode=list)
    traj = env.run_group(LocalSampler(policy), env.dataset()[0], 1, SamplingArgs(max_new_tokens=1))[
        0
    ]
    assert "not a digit" in traj.state["error"] and traj.reward == 0.0
    assert traj.loss_mask.tolist() == [True]
    with pytest.raises(TypeError, match="reset"):
        GymAdapter(object(), str, _parse, encode=list, decode=list)


def test_single_turn_env_with_text_codec_and_stop() -> None:
    policy = TinyCausalLM(seed=2)
    with torch.no_grad():
        policy.head.bias[EOS] = 2.0
    letters = "abcdefghij"
    encode = lambda s: [letters.index(c) for c in s]  # noqa: E731
    decode = lambda ids: "".join(letters[i] if i < 10 else "#" for i in ids)  # noqa: E731
    rubric = Rubric([lambda completion, answer: float(answer in completion)])
    env = SingleTurnEnv(
        {"train": [Task("abc", answer="a")], "test": []}, rubric, encode=encode, decode=decode
    )
    trajs = env.run_group(
        LocalSampler(policy, seed=0), env.dataset()[0], 32, SamplingArgs(4, stop_ids=(EOS,))
    )
    for t in trajs:
        ids = t.completion_ids.tolist()
        assert (EOS in ids) == (ids[-1] == EOS) and ids.count(EOS) <= 1  # trimmed after the stop
        assert t.truncated == (EOS not in ids) and t.completion == decode(ids)
        assert t.reward == float("a" in t.completion)
    assert any(t.truncated for t in trajs) and not all(t.truncated for t in trajs)
    with pytest.raises(ValueError, match="split must be in"):
        env.dataset("dev")


# ---------------------------------------------------------------- learning sanity (short)


def test_digit_sum_learns_quickly() -> None:
    """A plain single-process GRPO loop with this objective beats the uniform baseline ~10×."""
    env = DigitSumEnv()
    policy = TinyCausalLM(seed=0)
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    cfg = GRPOConfig(
        group_size=16, prompts_per_step=32, epsilon_high=0.28, max_completion_length=3, beta=0.0
    )
    loss_fn = GRPOLoss(cfg)
    gen = torch.Generator().manual_seed(0)
    means = []
    for _ in range(60):
        prompts = env.sample_prompts(cfg.prompts_per_step, gen)
        ids = torch.stack([p.ids for p in prompts]).repeat_interleave(cfg.group_size, dim=0)
        targets = torch.tensor([p.target for p in prompts]).repeat_interleave(cfg.group_size)
        out, behavior = sample(policy, ids, 3, cfg.temperature, gen)
        rewards = env.rewards(targets, out)
        adv = compute_advantages(rewards.view(-1, cfg.group_size), cfg.scale_rewards).view(-1)
        loss, _ = loss_fn(
            completion_logprobs(policy, ids, out), behavior, adv, torch.ones_like(out)
        )
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
        opt.step()
        means.append(rewards.mean().item())
    assert sum(means[:5]) / 5 <= 0.06  # near the uniform policy's 0.0175 at the start
    assert sum(means[-10:]) / 10 > 0.2
