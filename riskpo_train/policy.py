"""The policy as one module: a causal LM whose forward is the fused RiskPO/GRPO
loss on the response positions (or, without advantages, their log-probs).

Keeping the loss inside ``forward`` matters under FSDP: the lm_head weight the
fused loss reads is unsharded exactly while ``forward`` runs."""

from __future__ import annotations

import torch

import riskpo_kernels as rk

from .rollout import position_ids_of


class Policy(torch.nn.Module):
    def __init__(self, lm, *, temperature: float = 1.0, chunk_size: int | None = None):
        super().__init__()
        self.lm = lm
        self.temperature = temperature
        self.chunk_size = chunk_size

    def generate(self, **kwargs):
        return self.lm.generate(**kwargs)

    def response_hidden(self, input_ids, attention_mask, response_len: int) -> torch.Tensor:
        """(B, Tr, H): the final hidden state at each position that predicts a response token."""
        decoder = self.lm.get_decoder()
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids_of(attention_mask),
                         use_cache=False).last_hidden_state
        start = input_ids.shape[1] - response_len
        return hidden[:, start - 1:-1]

    def forward(self, input_ids, attention_mask, response, response_mask=None, advantages=None,
                old_logprobs=None, ref_logprobs=None, loss_options: dict | None = None):
        """input_ids, attention_mask: (B, Lp + Tr); response, response_mask: (B, Tr);
        advantages: (B,) or (B, Tr). With advantages: (loss, logprobs, entropy,
        metrics) of ``rk.fused_linear_policy_loss``; without: (logprobs, entropy)."""
        hidden = self.response_hidden(input_ids, attention_mask, response.shape[1])
        head = self.lm.get_output_embeddings()
        if advantages is None:
            # Padding rows are skipped (their log-probs and entropies are 0).
            return rk.fused_linear_logprobs(hidden, head.weight, response, bias=head.bias,
                                            mask=response_mask, temperature=self.temperature,
                                            chunk_size=self.chunk_size)
        out = rk.fused_linear_policy_loss(
            hidden, head.weight, response, response_mask, advantages, bias=head.bias,
            old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, temperature=self.temperature,
            chunk_size=self.chunk_size, **(loss_options or {}))
        return out.loss, out.logprobs, out.entropy, out.metrics
