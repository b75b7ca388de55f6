"""A recipe's options combined with explicit keywords (the explicit one wins,
unknown keywords refused by name), and a recipe name of the wrong kind refused
with the recipes listed, not an internal ``unhashable type``."""

from __future__ import annotations

import pytest
import torch

import riskpo_kernels as rk
from riskpo_kernels.recipes import RECIPES, advantage_options, recipe

from conftest import make_rewards


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_explicit_keyword_replaces_the_recipes_value(name):
    base = advantage_options(name)
    assert base == dict(RECIPES[name]["advantage"])
    options = advantage_options(name, bundle_size=8, credit="uniform")
    assert options == {**base, "bundle_size": 8, "credit": "uniform"}
    assert base["bundle_size"] != 8  # a real change, not the recipe's own value
    # A new dict each call: changing it leaves the table (and the next call) alone.
    options["alpha"] = 0.01
    assert advantage_options(name)["alpha"] == RECIPES[name]["advantage"]["alpha"]


def test_the_right_call_equals_the_recipe_with_the_option_changed(cpp_available):
    g = torch.Generator().manual_seed(2)
    rewards = make_rewards("ternary", 13, 4, g)
    combined = rk.mvar_advantages(rewards, group_size=4, **advantage_options("math", bundle_size=3))
    spelled_out = rk.mvar_advantages(rewards, group_size=4,
                                     **{**RECIPES["math"]["advantage"], "bundle_size": 3})
    torch.testing.assert_close(combined.advantages, spelled_out.advantages, rtol=0, atol=0)
    assert combined.q_lo.shape == (5,)  # 13 prompts in bundles of 3, not of the recipe's 5
    default = rk.mvar_advantages(rewards, group_size=4, **advantage_options("math"))
    assert default.q_lo.shape == (3,)


def test_the_duplicate_keyword_form_fails_as_documented():
    # Python refuses it before mvar_advantages runs: the docs show the right call.
    with pytest.raises(TypeError, match="multiple values for keyword argument 'bundle_size'"):
        rk.mvar_advantages(torch.rand(10), group_size=5, bundle_size=5,
                           **advantage_options("math"))


def test_any_mvar_keyword_but_rewards_may_be_given():
    options = advantage_options("math", quantile_mode="track", q_lo=0.1, q_hi=0.9, eps=1e-3,
                                impl="reference", group_size=5)
    assert (options["q_lo"], options["q_hi"], options["eps"], options["impl"]) == \
        (0.1, 0.9, 1e-3, "reference")
    rewards = torch.rand(20)
    out = rk.mvar_advantages(rewards, **options)
    assert out.advantages.shape == (20,)


@pytest.mark.parametrize("keyword", ["gamma", "rewards", "bundlesize"])
def test_unknown_keyword_is_named(keyword):
    with pytest.raises(ValueError, match=rf"unknown RiskPO advantage option\(s\) \['{keyword}'\]"):
        advantage_options("math", **{keyword: 1})


@pytest.mark.parametrize("bad", [["math"], ("math",), None, 3, b"math", {"math": 1}])
def test_non_str_recipe_name_is_refused_with_the_recipes(bad):
    for call in (lambda: recipe(bad), lambda: advantage_options(bad)):
        with pytest.raises(ValueError) as info:
            call()
        message = str(info.value)
        assert "recipe must be one of ['dapo', 'math']" in message
        assert type(bad).__name__ in message and "unhashable" not in message


def test_unknown_recipe_name_is_refused():
    with pytest.raises(ValueError, match=r"recipe must be one of \['dapo', 'math'\], got 'gsm8k'$"):
        advantage_options("gsm8k")
