"""Adapters that plug riskpo_kernels into other trainers; each is imported only on demand."""
