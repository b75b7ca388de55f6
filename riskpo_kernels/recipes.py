"""The two published RiskPO recipes, as their runs actually ran (RISKPO_SPEC.md section 9).

``advantage`` holds the keyword arguments of :func:`riskpo_kernels.mvar_advantages`;
``training`` the rest of the recipe, in the units its reference scripts use.
The scripts ask for the quantile tracker (``track``), but their trainer never
handed the tracked values to the advantage function (spec section 6), so
every published number came from per-bundle ``batch`` quantiles: that is what
the recipes here say. Pass ``quantile_mode="track"`` for the authors' intent.

One table serves the trainer's ``--recipe``, the verl adapter's defaults and
the TRL adapter's ``RiskPOConfig``.
"""

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
    """The recipe called ``name`` (``math`` or ``dapo``); a clear error otherwise."""
    if name not in RECIPES:
        raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {name!r}")
    return RECIPES[name]


def advantage_options(name: str = "math", **overrides) -> dict:
    """``mvar_advantages`` keyword arguments of recipe ``name``, with ``overrides`` applied."""
    options = dict(recipe(name)["advantage"])
    unknown = sorted(set(overrides) - set(options))
    if unknown:
        raise ValueError(f"unknown RiskPO advantage option(s) {unknown}; "
                         f"the options are {sorted(options)}")
    options.update(overrides)
    return options
