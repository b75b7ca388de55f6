"""The Triton vocabulary ops' implementations (kernels: triton_kernels.py;
schemas, fakes and autograd: ops.py).

Registered when riskpo_kernels is imported, while triton itself is imported
on the first call only: importing riskpo_kernels neither imports triton nor
queries a device. One implementation serves every device: CUDA tensors, or
CPU tensors under TRITON_INTERPRET=1.
"""

from __future__ import annotations

from .. import ops


def _kernels():
    from . import triton_kernels

    return triton_kernels


def _forward(logits, tokens, temperature=1.0):  # the schema's default (ops.py)
    return _kernels().logprob_entropy_triton(logits, tokens, temperature)


def _backward(grad_logprobs, grad_entropy, logits, tokens, lse, entropy, temperature):
    return _kernels().logprob_entropy_backward_triton(grad_logprobs, grad_entropy, logits, tokens,
                                                      lse, entropy, temperature)


def _backward_in_place(grad_logprobs, grad_entropy, logits, tokens, lse, entropy, temperature):
    _kernels().logprob_entropy_backward_triton(grad_logprobs, grad_entropy, logits, tokens, lse,
                                               entropy, temperature, in_place=True)


for _name, _implementation in (("token_logprob_entropy_triton", _forward),
                               ("token_logprob_entropy_triton_backward", _backward),
                               ("token_logprob_entropy_triton_backward_", _backward_in_place)):
    ops.LIBRARY.impl(_name, _implementation, "CompositeExplicitAutograd")
