"""Issue 19 part 2: negative/NaN masks and temperatures whose reciprocal overflows float32."""
import pytest
import torch

from riskpo_kernels.policy.api import policy_loss


def _args(B=2, T=3, V=5):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, T, V, generator=g)
    tokens = torch.randint(0, V, (B, T), generator=g)
    return logits, tokens, torch.ones(B, T), torch.randn(B, generator=g)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
@pytest.mark.parametrize("impl", ["reference", "cpp"])
def test_policy_loss_refuses_bad_mask(bad, impl):
    logits, tokens, mask, adv = _args()
    mask[0, 1] = bad
    with pytest.raises(ValueError, match="mask"):
        policy_loss(logits, tokens, mask, adv, impl=impl)


def test_policy_loss_accepts_fractional_mask():
    logits, tokens, mask, adv = _args()
    mask[0, 1] = 0.5
    out = policy_loss(logits, tokens, mask, adv, impl="reference")
    assert torch.isfinite(out.loss)


def test_subnormal_temperature_refused():
    logits, tokens, mask, adv = _args()
    with pytest.raises(ValueError, match="temperature"):
        policy_loss(logits, tokens, mask, adv, temperature=1e-39, impl="reference")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_trl_config_refuses_nonfinite_reward_weights(bad, tmp_path):
    trl_mod = pytest.importorskip("riskpo_kernels.integrations.trl")
    with pytest.raises(ValueError, match="reward_weights"):
        trl_mod.RiskPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False,
                               reward_weights=[bad])
