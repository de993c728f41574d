"""Every preference, RL and advantage formula against values worked out by hand on fixed numbers."""

import math

import pytest
import torch

from ftcluster.objectives.advantages import gae, group_relative, sequence_rewards_to_tokens, whiten
from ftcluster.objectives.losses import (SequenceLogps, bradley_terry, clipped_policy_loss, clipped_value_loss, kl_penalty,
                              preference_terms)


def softplus(x: float) -> float:  # -log sigmoid(-x)
    return math.log1p(math.exp(x))


def logps(chosen, rejected, n_chosen, n_rejected) -> SequenceLogps:
    t = lambda v: torch.tensor([v], dtype=torch.float64)
    return SequenceLogps(t(chosen), t(rejected), t(n_chosen), t(n_rejected))


# Policy: chosen -10 over 5 tokens, rejected -12 over 6; reference: -11 and -11.
POLICY, REFERENCE = logps(-10.0, -12.0, 5, 6), logps(-11.0, -11.0, 5, 6)


def test_bradley_terry_with_margin():
    loss = bradley_terry(torch.tensor([2.0, 0.0]), torch.tensor([0.5, 1.0]), torch.tensor([0.5, 0.0]))
    assert loss.tolist() == pytest.approx([softplus(-1.0), softplus(1.0)])  # r_c - r_r - m = 1 and -1


def test_dpo_sigmoid():
    # h = (-10 + 11) - (-12 + 11) = 2; beta 0.1: -log sigmoid(0.2)
    terms = preference_terms("sigmoid", POLICY, REFERENCE, beta=0.1)
    assert terms.losses.item() == pytest.approx(softplus(-0.2))
    assert (terms.chosen_rewards.item(), terms.rejected_rewards.item()) == pytest.approx((0.1, -0.1))
    assert terms.nll.item() == 0


def test_conservative_dpo_label_smoothing():
    terms = preference_terms("sigmoid", POLICY, REFERENCE, beta=0.1, label_smoothing=0.1)
    assert terms.losses.item() == pytest.approx(0.9 * softplus(-0.2) + 0.1 * softplus(0.2))


def test_ipo_on_length_normalised_logps():
    # policy averages -2 and -2, reference -2.2 and -11/6: h = 0.2 + 1/6; target 1 / (2 beta) = 5
    terms = preference_terms("ipo", POLICY, REFERENCE, beta=0.1)
    h = (-2 + 2.2) - (-2 + 11 / 6)
    assert terms.losses.item() == pytest.approx((h - 5) ** 2)


def test_simpo_is_reference_free():
    policy = logps(-5.0, -12.0, 5, 6)  # averages -1 and -2
    terms = preference_terms("simpo", policy, None, beta=2.0, simpo_gamma=0.5)
    assert terms.losses.item() == pytest.approx(softplus(-(2.0 * 1.0 - 0.5)))
    assert (terms.chosen_rewards.item(), terms.rejected_rewards.item()) == pytest.approx((-2.0, -4.0))


def test_orpo_odds_ratio_and_nll():
    policy = logps(-5.0, -12.0, 5, 6)  # average probabilities e^-1 and e^-2
    p_c, p_r = math.exp(-1), math.exp(-2)
    log_odds = math.log(p_c / (1 - p_c)) - math.log(p_r / (1 - p_r))
    terms = preference_terms("orpo", policy, None, beta=0.1)
    assert terms.losses.item() == pytest.approx(0.1 * softplus(-log_odds))
    assert terms.nll.item() == pytest.approx(5.0)  # the chosen side's summed NLL, normalised by the caller


def test_reference_losses_refuse_a_missing_reference():
    with pytest.raises(ValueError, match="reference"):
        preference_terms("sigmoid", POLICY, None, beta=0.1)


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-1.5])  # log ratio 0.5
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(0.5)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.125)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(math.exp(-0.5) + 0.5 - 1)


def test_clipped_policy_loss():
    # ratio e^0.3 = 1.3499: clipped to 1.2 when the advantage is positive, not when it is negative
    loss, clipped = clipped_policy_loss(torch.tensor([0.3, 0.3]), torch.tensor([0.0, 0.0]), torch.tensor([1.0, -1.0]),
                                        clip_eps=0.2)
    assert loss.tolist() == pytest.approx([-1.2, math.exp(0.3)])
    assert clipped.tolist() == [1.0, 0.0]


def test_clipped_value_loss():
    # v 1.5 clipped to 1.2 (old 1.0, eps 0.2); return 2: max(0.25, 0.64) / 2
    assert clipped_value_loss(torch.tensor([1.5]), torch.tensor([1.0]), torch.tensor([2.0]), 0.2).item() == \
        pytest.approx(0.32)


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [1.0, 1.0, 9.0]])  # 9.0 is padding: must be ignored
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # row 0: deltas 0.1, 0.1, 0.3 -> A2 0.3, A1 0.1 + 0.95 * 0.3, A0 0.1 + 0.95 * A1
    a1 = 0.1 + 0.95 * 0.3
    assert advantages[0].tolist() == pytest.approx([0.1 + 0.95 * a1, a1, 0.3])
    assert returns[0].tolist() == pytest.approx([0.6 + 0.95 * a1, a1 + 0.6, 1.0])
    # row 1: delta1 = 2 - 1 = 1, delta0 = 0 + 1 - 1 = 0 -> A0 = 0.95
    assert advantages[1].tolist() == pytest.approx([0.95, 1.0, 0.0])


def test_whiten_uses_only_masked_entries():
    out = whiten(torch.tensor([[1.0, 3.0, 100.0]]), torch.tensor([[1, 1, 0]]))
    assert out[0].tolist() == pytest.approx([-1.0, 1.0, 0.0], abs=1e-4)


def test_group_relative_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    std = math.sqrt(4 * 0.25 / 3)  # unbiased std of (1, 0, 0, 1)
    expected = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4)]
    out = group_relative(rewards, group_size=4)
    assert out[:4].tolist() == pytest.approx([expected[0], expected[1], expected[1], expected[0]])
    assert out[4:].tolist() == [0.0] * 4  # a group that scored alike teaches nothing
    assert group_relative(rewards, 4, scale=False)[:4].tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5])


def test_sequence_reward_lands_on_the_last_real_token():
    out = sequence_rewards_to_tokens(torch.tensor([1.0, 2.0]), torch.tensor([[1, 1, 0], [1, 1, 1]]))
    assert out.tolist() == [[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]]


def test_rpo_adds_the_weighted_nll_of_the_chosen_side():
    terms = preference_terms("sigmoid", POLICY, REFERENCE, beta=0.1, sft_weight=0.5)
    assert terms.losses.item() == pytest.approx(softplus(-0.2))  # the DPO term is unchanged
    assert terms.nll.item() == pytest.approx(5.0)  # 0.5 x the chosen side's summed NLL of 10
