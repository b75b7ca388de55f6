"""The two published RiskPO recipes, as their runs actually ran (RISKPO_SPEC.md section 9).

``advantage`` holds the keyword arguments of :func:`riskpo_kernels.mvar_advantages`;
``training`` the rest of the recipe, in the units its reference scripts use.
The scripts ask for the quantile tracker (``track``), but their trainer never
handed the tracked values to the advantage function (spec section 6), so
every published number came from per-bundle ``batch`` quantiles: that is what
the recipes here say. Pass ``quantile_mode="track"`` for the authors' intent.

One table serves the trainer's ``--recipe``, the verl adapter's defaults and
the TRL adapter's ``RiskPOConfig``.

To change an option of a recipe, give it to :func:`advantage_options`, which
returns the recipe with the explicit value in its place::

    rk.mvar_advantages(rewards, group_size=n, **advantage_options("math", bundle_size=8))

not next to the unpacked recipe: ``mvar_advantages(..., bundle_size=8,
**advantage_options("math"))`` names ``bundle_size`` twice, which Python
refuses (``TypeError: got multiple values for keyword argument``) before any
function of ours runs.
"""

import inspect

from types import MappingProxyType

_MATH_ADVANTAGE = dict(bundle_size=5, alpha=0.2, beta=0.9, w_low=1.5, w_high=0.0,
                       quantile_mode="batch", credit="std", normalize_std=True,
                       natural_baseline=True)
_MATH_TRAINING = dict(samples_per_prompt=5, prompts_per_step=1024, minibatches=2, epochs=1,
                      lr=1e-6, weight_decay=0.01, clip_low=0.2, clip_high=0.2, clip_ratio_c=3.0,
                      grad_clip=1.0, kl_coef=0.0, entropy_coef=0.0, agg="token-mean",
                      temperature=1.0, tracker_lr=0.1)

RECIPES = MappingProxyType({
    # Qwen2.5-1.5B-Instruct on GSM8K + MATH.
    "math": MappingProxyType({
        "advantage": MappingProxyType(_MATH_ADVANTAGE),
        "training": MappingProxyType(_MATH_TRAINING),
    }),
    # DeepSeek-R1-Distill-Qwen-1.5B on DAPO-Math-17K.
    "dapo": MappingProxyType({
        "advantage": MappingProxyType(dict(_MATH_ADVANTAGE, beta=0.8, credit="sum-mean",
                                           natural_baseline=False)),
        "training": MappingProxyType(dict(_MATH_TRAINING, samples_per_prompt=10,
                                          prompts_per_step=512, minibatches=4)),
    }),
})


def recipe(name: str):
    """The recipe called ``name`` (``math`` or ``dapo``): a read-only mapping
    ``{"advantage": {...}, "training": {...}}``. Any other name, or a name that
    is not a ``str`` (a list from a config file), raises ``ValueError``."""
    # Checked before the lookup: a list is unhashable, and `in` would raise a
    # TypeError that names neither the argument nor the recipes.
    if not isinstance(name, str) or name not in RECIPES:
        got = repr(name) if isinstance(name, str) else f"{name!r} ({type(name).__name__})"
        raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {got}")
    return RECIPES[name]


def _mvar_keywords() -> tuple[str, ...]:
    # Imported here: the recipes table is read by modules that mvar_advantages'
    # package imports (the adapters, the trainer's config).
    from .risk_core.api import mvar_advantages
    return tuple(p for p in inspect.signature(mvar_advantages).parameters if p != "rewards")


def advantage_options(name: str = "math", **overrides) -> dict:
    """``mvar_advantages`` keyword arguments of recipe ``name``, each of
    ``overrides`` replacing the recipe's value (the explicit one wins)::

        advantage_options("math", bundle_size=8)   # the math recipe, bundles of 8
        advantage_options("math", quantile_mode="track", q_lo=q_lo, q_hi=q_hi)

    ``overrides`` may name any keyword of :func:`~riskpo_kernels.mvar_advantages`
    but ``rewards``; any other name raises ``ValueError`` naming it. Their values
    are checked where they are used, by ``mvar_advantages``. Returns a new dict.
    """
    options = dict(recipe(name)["advantage"])
    allowed = _mvar_keywords()
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"unknown RiskPO advantage option(s) {unknown} for recipe {name!r}; "
                         f"the options are mvar_advantages' keywords {list(allowed)}")
    options.update(overrides)
    return options
