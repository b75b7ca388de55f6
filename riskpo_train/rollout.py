"""Sampling answers and scoring them: prompts in, a padded batch of responses
with their rewards out, in the prompt-major order the advantage ops expect
(row ``p * n + j`` is sample j of prompt p)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    """One batch of sampled responses.

    input_ids:      (B, Lp + Tr) left-padded prompt, then the response.
    attention_mask: (B, Lp + Tr) 1 on real prompt tokens and response tokens up to EOS.
    response:       (B, Tr) sampled tokens, pad after the first EOS.
    response_mask:  (B, Tr) float32, 1 on response tokens up to and including EOS.
    rewards:        (B,) float32.
    completions:    the decoded responses (without special tokens).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response: torch.Tensor
    response_mask: torch.Tensor
    rewards: torch.Tensor
    completions: list[str]
    reward_errors: int = 0

    def select(self, rows: torch.Tensor | slice) -> Rollout:
        """The rows ``rows`` of every tensor (a minibatch)."""
        if isinstance(rows, slice):
            completions = self.completions[rows]
        else:
            completions = [self.completions[i] for i in rows.tolist()]
        return Rollout(self.input_ids[rows], self.attention_mask[rows], self.response[rows],
                       self.response_mask[rows], self.rewards[rows], completions)


def position_ids_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as ``generate`` computes them: the
    training forward must use the same ones or its log-probs differ from the
    sampling policy's."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


def prompt_token_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    """The token ids of each prompt as the policy sees it: the tokenizer's
    special tokens, and its BOS first when it has one."""
    encoded = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    rows = []
    for ids in encoded:
        ids = list(ids)
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        rows.append(ids)
    return rows


def prompt_too_long(prompt: str, tokens: int, max_prompt_tokens: int) -> str:
    return (f"({prompt[:60]!r}...) has {tokens} tokens, more than the "
            f"{max_prompt_tokens} the context leaves for it (the model's "
            "max_position_embeddings minus max_new_tokens)")


def check_prompt_lengths(tokenizer, prompts: list[str], max_prompt_tokens: int, where: str,
                         *, first_index: int = 0, chunk: int = 1024) -> None:
    """ValueError naming the first prompt longer than ``max_prompt_tokens``
    tokens: ``{where} {index} ('...'...) has N tokens, more than ...``, where
    ``prompts[i]`` is number ``first_index + i``."""
    for start in range(0, len(prompts), chunk):
        part = prompts[start:start + chunk]
        for i, ids in enumerate(prompt_token_ids(tokenizer, part)):
            if len(ids) > max_prompt_tokens:
                raise ValueError(f"{where} {first_index + start + i} "
                                 + prompt_too_long(part[i], len(ids), max_prompt_tokens))


def encode_prompts(tokenizer, prompts: list[str], max_prompt_tokens: int, device) -> tuple:
    """Left-padded (input_ids, attention_mask), both (P, Lp), with the tokenizer's
    BOS first when it has one. A prompt longer than ``max_prompt_tokens`` is an
    error (the trainer checks every prompt before it starts, so this is a backstop)."""
    rows = prompt_token_ids(tokenizer, prompts)
    for i, ids in enumerate(rows):
        if len(ids) > max_prompt_tokens:
            raise ValueError(f"prompt {i} " + prompt_too_long(prompts[i], len(ids),
                                                               max_prompt_tokens))
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, width - len(ids):] = 1
    return input_ids.to(device), attention_mask.to(device)


def cut_at_eos(response: torch.Tensor, eos_ids, pad_id: int) -> tuple:
    """(response with pad after the first end-of-sequence token (any of
    ``eos_ids``), float mask up to and including it)."""
    is_eos = torch.isin(response, torch.as_tensor(eos_ids, device=response.device).reshape(-1))
    # Tokens strictly after the first EOS: an EOS occurred at an earlier position.
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    mask = (~after_eos).to(torch.float32)
    return response.masked_fill(after_eos, pad_id), mask


def score(completions: list[str], answers: list[str], reward_fn: Callable[[str, str], float],
          on_error: str = "raise") -> tuple[torch.Tensor, int]:
    """Rewards (B,) float32 and the number of reward-function failures.

    on_error: ``raise`` (a clear error naming the response) or ``zero`` (score
    0, counted). A non-finite reward is a failure too.
    """
    rewards, errors = [], 0
    for i, (completion, answer) in enumerate(zip(completions, answers)):
        try:
            value = float(reward_fn(completion, answer))
            if not math.isfinite(value):
                raise ValueError(f"reward is {value}")
        except Exception as exc:
            if on_error == "raise":
                raise RuntimeError(f"the reward function failed on response {i} "
                                   f"({completion[:60]!r}, answer {answer!r}): {exc!r}; "
                                   "pass --reward-errors zero to score such responses 0") from exc
            value, errors = 0.0, errors + 1
        rewards.append(value)
    return torch.tensor(rewards, dtype=torch.float32), errors


@torch.no_grad()
def sample(generate: Callable, tokenizer, prompts: list[str], answers: list[str], *,
           eos_ids: list[int], num_samples: int, max_new_tokens: int, max_prompt_tokens: int, temperature: float,
           top_p: float, reward_fn, device, synced: bool = False, reward_errors: str = "raise",
           response_len: int | None = None) -> Rollout:
    """``num_samples`` answers for every prompt, sampled from softmax(logits / T)
    (top-k off so that the loss sees the distribution that sampled), scored.

    eos_ids: every token that ends a response (models may have several).
    generate: the policy's ``generate`` (an FSDP-registered method under FSDP);
    synced: keep stepping until every rank is done (FSDP needs every rank in
    every forward). response_len: pad responses to this length (default: what
    generate returned).
    """
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, max_prompt_tokens, device)
    prompt_ids = prompt_ids.repeat_interleave(num_samples, dim=0)
    prompt_mask = prompt_mask.repeat_interleave(num_samples, dim=0)
    out = generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True,
                   temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_new_tokens,
                   pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_ids,
                   synced_gpus=synced)
    response = out[:, prompt_ids.shape[1]:]
    width = response_len if response_len is not None else response.shape[1]
    if response.shape[1] < width:
        pad = response.new_full((response.shape[0], width - response.shape[1]),
                                tokenizer.pad_token_id)
        response = torch.cat([response, pad], dim=1)
    response, response_mask = cut_at_eos(response, eos_ids, tokenizer.pad_token_id)
    completions = tokenizer.batch_decode(response, skip_special_tokens=True)
    repeated_answers = [a for a in answers for _ in range(num_samples)]
    rewards, errors = score(completions, repeated_answers, reward_fn, reward_errors)
    input_ids = torch.cat([prompt_ids, response], dim=1)
    attention_mask = torch.cat([prompt_mask, response_mask.long()], dim=1)
    return Rollout(input_ids, attention_mask, response, response_mask, rewards.to(device),
                   completions, errors)


# The k of Pass@k that evaluations report (those <= the samples per question,
# and the number of samples itself).
REPORTED_KS = (1, 4, 16, 32)


def reported_ks(num_samples: int) -> list[int]:
    """The k an evaluation with ``num_samples`` samples per question reports."""
    return sorted({k for k in REPORTED_KS if k <= num_samples} | {num_samples})


def pass_at_k(num_samples: int, num_correct: torch.Tensor, k: int) -> torch.Tensor:
    """Unbiased Pass@k per question (Chen et al. 2021): 1 - C(n-c, k) / C(n, k).

    num_correct: (Q,) successes among ``num_samples`` samples each -> (Q,) float64.
    """
    if not 1 <= k <= num_samples:
        raise ValueError(f"k must be in [1, {num_samples}], got {k}")
    n = num_samples
    c = num_correct.to(torch.float64).reshape(-1, 1)
    i = torch.arange(1, n + 1, dtype=torch.float64, device=c.device)
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i), the stable form; it
    # is 0 when n - c < k (the factor i = k is then in the product).
    factors = torch.where(i > n - c, 1.0 - k / i, torch.ones_like(i))
    fail = torch.where(n - c.squeeze(1) < k, torch.zeros_like(c.squeeze(1)), factors.prod(-1))
    return 1.0 - fail
