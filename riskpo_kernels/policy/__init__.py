"""Token-level policy loss of RiskPO and GRPO (RISKPO_SPEC.md section 8)."""

from . import triton_ops  # noqa: F401  (registers the Triton ops; triton loads on first call)

from .api import (
                        PolicyLossOutput,
                        fused_linear_logprobs,
                        fused_linear_policy_loss,
                        policy_loss,
)
from ..common import AGGREGATIONS
from .aggregation import aggregation_weights
from .reference import (
                        logprobs_and_entropy_reference,
                        policy_loss_reference,
                        token_policy_loss,
)

__all__ = [
                        "AGGREGATIONS",
                        "PolicyLossOutput",
                        "aggregation_weights",
                        "fused_linear_logprobs",
                        "fused_linear_policy_loss",
                        "logprobs_and_entropy_reference",
                        "policy_loss",
                        "policy_loss_reference",
                        "token_policy_loss",
]
