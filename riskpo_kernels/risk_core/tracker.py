"""Quantile tracker of RiskPO (RISKPO_SPEC.md section 6): stochastic approximation
of the bundle-score quantiles across training steps."""

from __future__ import annotations

import math
import os

import torch

from .. import _validation as v


def default_levels() -> torch.Tensor:
    """0.05, 0.10, ..., 0.95."""
    return torch.arange(1, 20, dtype=torch.float64) / 20


class QuantileTracker:
    """Tracks quantiles ``v[k]`` of the bundle scores at the grid ``levels``.

    First update: ``v[k] = quantile(S, L[k])`` (linear interpolation). Later:
    ``v[k] += lr * (L[k] - mean(S < v[k]))``, one SGD step on the quantile loss
    for every level at once (one broadcast pass over the scores). Non-finite
    scores are left out of both (on CPU they raise, as in mvar_advantages).
    Updates allocate new tensors, so values handed out earlier never change.
    """

    def __init__(self, lr: float = 0.1, levels=None):
        self.lr = v.check_float("lr", lr)
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        levels = default_levels() if levels is None else torch.as_tensor(levels, dtype=torch.float64)
        if levels.dim() != 1 or levels.numel() < 2:
            raise ValueError(f"levels must be a 1-D grid of at least 2 values, got {tuple(levels.shape)}")
        if not bool(((levels > 0) & (levels < 1)).all()) or not bool((levels.diff() > 0).all()):
            raise ValueError("levels must increase strictly inside (0, 1)")
        self.levels = levels.cpu()
        self.values: torch.Tensor | None = None  # (K,) once initialized
        self.steps = 0
        self._device_levels: dict = {}

    def _levels_on(self, device, dtype) -> torch.Tensor:
        # Cached: copying the grid to the GPU at every update would be a host sync.
        key = (torch.device(device), dtype)
        if key not in self._device_levels:
            self._device_levels[key] = self.levels.to(device=device, dtype=dtype)
        return self._device_levels[key]

    @property
    def initialized(self) -> bool:
        return self.values is not None

    def update(self, scores: torch.Tensor) -> None:
        """scores: any shape, e.g. ``MVaRResult.bundle_scores`` (num_bundles, n)."""
        v.check_tensor("scores", scores, dtypes="float")
        s = scores.detach().reshape(-1)
        v.check_all_finite("scores", s)
        dtype = self.values.dtype if self.values is not None else (
            torch.float64 if s.dtype == torch.float64 else torch.float32)
        s = s.to(dtype)
        levels = self._levels_on(s.device, dtype)
        finite = torch.isfinite(s)
        if self.values is None:
            masked = torch.where(finite, s, torch.full_like(s, math.nan))
            self.values = torch.nanquantile(masked, levels)
        else:
            values = self.values.to(s.device)
            below = (s[None, :] < values[:, None]) & finite[None, :]            # (K, N)
            count = finite.sum()
            fraction = below.sum(1).to(dtype) / count.clamp(min=1).to(dtype)
            stepped = values + self.lr * (levels - fraction)
            self.values = torch.where(count > 0, stepped, values)
        self.steps += 1

    def _index(self, level: float) -> int:
        level = v.check_float("level", level)
        return int(torch.argmin((self.levels - level).abs()))

    def value(self, level: float) -> torch.Tensor | None:
        """The tracked value at the grid level nearest ``level`` (0-d tensor), or
        None before the first update."""
        if self.values is None:
            return None
        return self.values[self._index(level)]

    def baselines(self, alpha: float, beta: float, natural_baseline: bool = True):
        """Mean baselines (base_mid, base_low) for ``mvar_advantages``, 0-d tensors::

            base_mid = trapz_L((v - q_lo)+ - (v - q_hi)+ + c),  base_low = trapz_L(-(q_lo - v)+)

        with q_lo, q_hi the tracked values at alpha, beta and c = q_lo - q_hi
        under ``natural_baseline``. None before the first update.
        """
        if self.values is None:
            return None
        vals = self.values
        levels = self._levels_on(vals.device, vals.dtype)
        q_lo, q_hi = self.value(alpha), self.value(beta)
        c = (q_lo - q_hi) if natural_baseline else torch.zeros_like(q_lo)
        mid = torch.relu(vals - q_lo) - torch.relu(vals - q_hi) + c
        low = -torch.relu(q_lo - vals)
        return torch.trapezoid(mid, levels), torch.trapezoid(low, levels)

    def to(self, device) -> "QuantileTracker":
        if self.values is not None:
            self.values = self.values.to(device)
        return self

    def state_dict(self) -> dict:
        return {"lr": self.lr, "levels": self.levels.clone(), "steps": self.steps,
                "values": None if self.values is None else self.values.detach().clone()}

    def load_state_dict(self, state: dict) -> None:
        """Restores a :meth:`state_dict`. Every entry is checked before any is
        assigned, so a rejected state leaves the tracker as it was."""
        if not isinstance(state, dict):
            raise ValueError(f"state_dict must be a dict, got {type(state).__name__}")
        missing = {"lr", "levels", "steps", "values"} - set(state)
        if missing:
            raise ValueError(f"state_dict is missing {sorted(missing)}")
        try:
            levels = torch.as_tensor(state["levels"], dtype=torch.float64).cpu()
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(f"state_dict['levels'] must be a 1-D grid of levels: {error}") from None
        restored = QuantileTracker(state["lr"], levels)  # validates lr and levels
        steps = v.check_int("state_dict['steps']", state["steps"], 0)
        values = state["values"]
        if values is not None:
            v.check_tensor("state_dict['values']", values, dtypes="float")
            if values.shape != levels.shape:
                raise ValueError(f"state_dict['values'] must be shaped like its levels "
                                 f"{tuple(levels.shape)}, got {tuple(values.shape)}")
            v.check_all_finite("state_dict['values']", values)
        if (values is None) != (steps == 0):
            raise ValueError(f"state_dict holds steps={steps} but values "
                             f"{'None' if values is None else 'set'}: a tracker has values "
                             "exactly after its first update")
        self.lr, self.levels, self._device_levels = restored.lr, restored.levels, {}
        self.values = None if values is None else values.detach().clone()
        self.steps = steps

    def load_file(self, path) -> None:
        """Restores the :meth:`state_dict` saved at ``path`` (``torch.save``),
        read with ``weights_only=True`` (no code runs). Any failure, an empty,
        truncated or corrupted file, one that holds something other than a
        tracker state, or a state :meth:`load_state_dict` rejects, is a
        ``ValueError`` naming ``path`` and the way out (``FileNotFoundError``
        when there is no file); the tracker is then left as it was."""
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no quantile tracker state file there")
        if not os.path.isfile(path):
            raise ValueError(f"{path}: a directory, not a quantile tracker state file; "
                             f"{_WAY_OUT}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - zip, pickle and EOF errors alike
            raise ValueError(
                f"{path}: not a readable quantile tracker state (empty, truncated or corrupted: "
                f"{_brief(error)}); {_WAY_OUT}") from None
        try:
            self.load_state_dict(state)
        except ValueError as error:
            raise ValueError(f"{path}: not a valid quantile tracker state ({error}); "
                             f"{_WAY_OUT}") from None


# What to do about a tracker file that cannot be read (the adapters restart the
# tracker, with a warning, when the file is absent).
_WAY_OUT = ("delete the file to start the quantile tracker afresh, or replace it with a good "
            "copy saved by QuantileTracker.state_dict()")


def _brief(error: BaseException) -> str:
    """An exception on one line; for a refused weights-only load only what was
    refused, not torch's advice to load with weights_only=False (which would
    run whatever code the file holds)."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    refused = text.find("WeightsUnpickler error:")
    if refused >= 0:
        text = ("it holds objects other than tensors and plain data: "
                + text[refused + len("WeightsUnpickler error:"):].split(". ")[0]
                .split(" Check the documentation")[0].strip())
    text = f"{type(error).__name__}: {text}" if text else f"{type(error).__name__} (no message)"
    return text if len(text) <= 300 else text[:300] + "..."
