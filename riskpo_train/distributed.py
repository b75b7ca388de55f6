"""Process-group setup and the few collectives the trainer needs.

One process by default. Under ``torchrun`` (any number of processes) the policy is
sharded with FSDP2 (``fully_shard`` on every decoder layer and on the root),
gloo on CPU and NCCL on CUDA. Each rank samples for its own share of the
step's prompts; rewards are then all-gathered so that every rank computes the
advantages of whole bundles and groups, and keeps the same quantile tracker.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # Launched by torchrun: a process group exists and the policy is sharded
    # (also with one process, which is how one GPU gets FSDP's mixed precision).
    distributed: bool = False

    @property
    def enabled(self) -> bool:
        return self.distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenation over ranks, in rank order (every rank's tensor has the same shape)."""
        if not self.enabled:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device_name: str) -> DistContext:
    """The process group when launched by torchrun, else a one-process context."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if not launched_by_torchrun():
        return DistContext(device=device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device,
                       distributed=True)


def shutdown(ctx: DistContext) -> None:
    """Leave the process group. torchrun CPU workers can abort in their exit
    handlers after a successful run; callers exit with os._exit after this."""
    if ctx.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shard_policy(policy: torch.nn.Module, ctx: DistContext,
                 param_dtype: str = "float32") -> torch.nn.Module:
    """FSDP2 on every decoder layer, then on the whole policy (the root holds
    the embeddings, final norm and lm_head). ``generate`` is registered as a
    forward method so that sampling all-gathers the root's parameters too.

    param_dtype other than float32: FSDP's mixed precision. The sharded
    parameters and the optimizer stay float32; forward and backward run on
    parameters cast to param_dtype; gradients are reduced in float32."""
    if not ctx.enabled:
        if param_dtype != "float32":
            raise ValueError(f"--param-dtype {param_dtype} is FSDP's mixed precision: launch "
                             "with torchrun (--nproc_per_node 1 works for one device)")
        return policy
    from torch.distributed.fsdp import (MixedPrecisionPolicy, fully_shard,
                                        register_fsdp_forward_method)

    layers = getattr(policy.lm.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError("FSDP sharding expects the decoder's blocks in `.layers` "
                         "(Llama/Qwen/Mistral layout)")
    mp_policy = MixedPrecisionPolicy(param_dtype=getattr(torch, param_dtype),
                                     reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mp_policy=mp_policy)
    fully_shard(policy, mp_policy=mp_policy)
    register_fsdp_forward_method(policy, "generate")
    return policy
