"""riskpo_train: the RLVR trainer (RiskPO and GRPO). Arrives with a later issue."""
