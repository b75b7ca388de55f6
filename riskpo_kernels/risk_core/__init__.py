"""RiskPO's risk core: Mixed-VaR bundle advantages, GRPO advantages, quantile tracker."""

from .api import CREDITS, QUANTILE_MODES, MVaRResult, grpo_advantages, mvar_advantages
from .reference import grpo_advantages_reference, mvar_advantages_reference
from .tracker import QuantileTracker

__all__ = ["CREDITS", "QUANTILE_MODES", "MVaRResult", "QuantileTracker", "grpo_advantages",
           "grpo_advantages_reference", "mvar_advantages", "mvar_advantages_reference"]
