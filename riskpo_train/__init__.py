"""riskpo_train: a small, readable RLVR trainer (RiskPO and GRPO) on top of
riskpo_kernels. ``python -m riskpo_train --help`` lists every option."""

from .config import TrainConfig, parse_config

__all__ = ["TrainConfig", "parse_config"]
