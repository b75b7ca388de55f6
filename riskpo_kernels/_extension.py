"""Loads the compiled extension once. Without it the package still imports,
warns once, and every ``impl="auto"`` call runs the reference implementation."""

from __future__ import annotations

import warnings

from . import ops  # noqa: F401  (schemas must exist before the kernels register)

try:
    from . import _C
except ImportError as error:  # not built, or built against another torch
    AVAILABLE = False
    WITH_CUDA = False
    LOAD_ERROR: ImportError | None = error
    warnings.warn(
        f"riskpo_kernels: compiled extension unavailable ({error}); falling back to the "
        "reference implementation. Build it with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )
else:
    AVAILABLE = True
    WITH_CUDA = bool(_C.with_cuda)
    LOAD_ERROR = None
