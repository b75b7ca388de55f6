"""riskpo_kernels: fused kernels for RiskPO (Mixed Value-at-Risk policy optimization).

    import riskpo_kernels as rk
    res = rk.mvar_advantages(rewards, group_size=n, bundle_size=5)
    adv = rk.grpo_advantages(rewards, group_size=n)

The ops are also registered as ``torch.ops.riskpo.*`` for any trainer.
"""

from . import _extension, ops, recipes
from .policy import PolicyLossOutput, fused_linear_logprobs, fused_linear_policy_loss, policy_loss
from .risk_core import MVaRResult, QuantileTracker, grpo_advantages, mvar_advantages
from .riskpo_loss import riskpo_policy_loss

__version__ = "0.1.0"

extension_available = _extension.AVAILABLE
extension_with_cuda = _extension.WITH_CUDA

__all__ = ["MVaRResult", "PolicyLossOutput", "QuantileTracker", "grpo_advantages",
           "fused_linear_logprobs", "fused_linear_policy_loss", "mvar_advantages", "ops", "policy_loss", "recipes",
           "riskpo_policy_loss",
           "extension_available", "extension_with_cuda"]
