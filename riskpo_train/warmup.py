"""Supervised warm-up of the embedded model: a random model solves nothing, so
RL would see only zero rewards. A short run of next-token training on the
task's train split gives a model that solves some test questions, not all;
it is cached, so every RL run of a comparison starts from the same weights."""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

from .data import Example


def _batch(tokenizer, examples: list[Example], device):
    """Right-padded [bos] prompt answer [eos], with labels only on answer and eos."""
    rows, labels = [], []
    for ex in examples:
        prompt = [tokenizer.bos_token_id] + tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
        answer = tokenizer(ex.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    target = torch.full_like(ids, -100)
    for i, (r, lab) in enumerate(zip(rows, labels)):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
        target[i, :len(r)] = torch.tensor(lab)
    return ids.to(device), mask.to(device), target.to(device)


# Without a progress bar a warm-up still says how far it is, this often: under
# a loaded CPU it takes many times its quiet 2 minutes, and a log that shows
# nothing for half an hour cannot be told from a hung one.
REPORT_EVERY_S = 30.0


def supervised_warmup(model, tokenizer, examples: list[Example], *, steps: int, lr: float,
                      batch_size: int, seed: int, progress: bool = False,
                      report_every_s: float | None = REPORT_EVERY_S, report=None) -> list[float]:
    """``steps`` AdamW steps of cross-entropy on the answers; returns the losses.

    Without ``progress`` (the tqdm bar), a line ``warm-up step s/steps loss L
    elapsed E s ETA R s`` goes to ``report`` (default: stderr) at the first
    step, every ``report_every_s`` seconds and at the last step (None: never).
    The lines read the clock only: the weights do not depend on them."""
    if not examples:
        raise ValueError("supervised warm-up needs at least one training example")
    rng = random.Random(f"warmup-{seed}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, steps // 10)))
    device = next(model.parameters()).device
    model.train()
    losses = []
    iterator = range(steps)
    if progress:
        from tqdm import tqdm
        iterator = tqdm(iterator, desc="warm-up", dynamic_ncols=True)
    if report is None:
        def report(line):
            print(line, file=sys.stderr, flush=True)
    began = last_report = time.perf_counter()
    for step in iterator:
        ids, mask, target = _batch(tokenizer, rng.sample(examples, min(batch_size, len(examples))),
                                   device)
        loss = model(input_ids=ids, attention_mask=mask, labels=target).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if progress:
            iterator.set_postfix(loss=f"{losses[-1]:.3f}")
        elif report_every_s is not None:
            now = time.perf_counter()
            if step == 0 or step == steps - 1 or now - last_report >= report_every_s:
                last_report, elapsed = now, now - began
                eta = elapsed / (step + 1) * (steps - step - 1)
                report(f"warm-up step {step + 1}/{steps} loss {losses[-1]:.4f} "
                       f"elapsed {elapsed:.0f} s ETA {eta:.0f} s")
    model.eval()
    return losses


def cache_key(settings: dict) -> str:
    """A short digest of everything the warmed-up weights depend on."""
    blob = json.dumps(settings, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def arithmetic_fingerprint() -> dict:
    """What the warmed-up weights depend on besides the settings: torch's
    version, the CPU kernels ATen dispatches to (AVX-512 and AVX2 ones round
    differently) and MKL's pinned branch. (Not the thread count: it changed
    no bit, docs/demo/determinism.md.) A cache built with other kernels is
    another cache, not a hit that would give another table."""
    return {"torch": torch.__version__, "aten_cpu": torch.backends.cpu.get_cpu_capability(),
            "mkl_cbwr": os.environ.get("MKL_CBWR", "")}


def cached_model_dir(cache_root, settings: dict) -> Path:
    """The cache directory of the warm-up with ``settings`` under this
    process's :func:`arithmetic_fingerprint`."""
    key = cache_key({**settings, "arithmetic": arithmetic_fingerprint()})
    return Path(cache_root) / f"warmup-{key}"
