"""DHN-NCE against values worked out with plain Python math, and its limits."""

from __future__ import annotations

import math

import pytest
import torch

from medprompt.clip.dhn_nce import dhn_nce_from_similarity, dhn_nce_loss, same_text_mask


def by_hand(s: list[list[float]], tau: float, beta1: float, beta2: float,
            excluded: set[tuple[int, int]] = frozenset()) -> float:
    """The paper's formula with explicit weights and sums (no log-sum-exp tricks, no torch)."""
    n = len(s)

    def direction(sim, beta, skip):
        total, rows = 0.0, 0
        for i in range(n):
            negs = [j for j in range(n) if j != i and (i, j) not in skip]
            if not negs:
                continue
            z = sum(math.exp(beta * sim[i][k] / tau) for k in negs)
            denom = sum(len(negs) * math.exp(beta * sim[i][j] / tau) / z * math.exp(sim[i][j] / tau) for j in negs)
            total += -math.log(math.exp(sim[i][i] / tau) / denom)
            rows += 1
        return total / rows

    transposed = [[s[j][i] for j in range(n)] for i in range(n)]
    return direction(s, beta1, excluded) + direction(transposed, beta2, {(j, i) for i, j in excluded})


S3 = [[0.9, 0.3, -0.2], [0.5, 0.7, 0.1], [0.0, 0.6, 0.4]]


def test_two_pairs_worked_out():
    # With two pairs each row has one negative, whose weight is exactly 1 whatever beta:
    # v->t rows: (0.2 - 0.9)/0.6, (0.1 - 0.8)/0.6; t->v rows: (0.1 - 0.9)/0.6, (0.2 - 0.8)/0.6.
    # mean(-7/6, -7/6) + mean(-4/3, -1) = -7/3.
    s = torch.tensor([[0.9, 0.2], [0.1, 0.8]], dtype=torch.float64)
    for beta in (0.0, 0.15, 3.0):
        assert float(dhn_nce_from_similarity(s, 0.6, beta, beta)) == pytest.approx(-7 / 3, abs=1e-12)


@pytest.mark.parametrize("tau,beta1,beta2", [(0.6, 0.15, 0.15), (0.07, 0.5, 0.0), (1.0, 2.0, 0.3)])
def test_three_pairs_match_hand_computation(tau, beta1, beta2):
    got = float(dhn_nce_from_similarity(torch.tensor(S3, dtype=torch.float64), tau, beta1, beta2))
    assert got == pytest.approx(by_hand(S3, tau, beta1, beta2), rel=1e-10)


def test_default_settings_are_medclip_samv2s():
    # tau 0.6, beta1 = beta2 = 0.15 unless told otherwise
    got = float(dhn_nce_from_similarity(torch.tensor(S3, dtype=torch.float64)))
    assert got == pytest.approx(by_hand(S3, 0.6, 0.15, 0.15), rel=1e-10)
    assert got != pytest.approx(by_hand(S3, 0.6, 0.0, 0.0), rel=1e-6)


def test_beta_zero_is_decoupled_infonce():
    s = torch.tensor(S3, dtype=torch.float64)
    tau = 0.6
    expected = 0.0
    for sim in (S3, [list(r) for r in zip(*S3)]):
        expected += sum(-sim[i][i] / tau + math.log(sum(math.exp(sim[i][j] / tau) for j in range(3) if j != i))
                        for i in range(3)) / 3
    assert float(dhn_nce_from_similarity(s, tau, 0.0, 0.0)) == pytest.approx(expected, rel=1e-12)


def test_hard_negatives_weigh_more_as_beta_grows():
    # Large beta: the sum is dominated by the hardest negative, weighted by the number of negatives.
    s = torch.tensor(S3, dtype=torch.float64)
    tau, beta = 0.6, 200.0
    hardest = 0.0
    for sim in (S3, [list(r) for r in zip(*S3)]):
        hardest += sum(-sim[i][i] / tau + max(sim[i][j] for j in range(3) if j != i) / tau + math.log(2)
                       for i in range(3)) / 3
    assert float(dhn_nce_from_similarity(s, tau, beta, beta)) == pytest.approx(hardest, abs=1e-3)
    values = [float(dhn_nce_from_similarity(s, tau, b, b)) for b in (0.0, 0.15, 1.0, 5.0)]
    assert values == sorted(values)  # a harder weighting never lowers the loss here


def test_excluded_pairs_are_not_negatives():
    got = float(dhn_nce_from_similarity(torch.tensor(S3, dtype=torch.float64), 0.6, 0.15, 0.15,
                                        exclude=same_text_mask(["a", "a", "b"])))
    assert got == pytest.approx(by_hand(S3, 0.6, 0.15, 0.15, {(0, 1), (1, 0)}), rel=1e-10)
    with pytest.raises(ValueError, match="no pair"):
        dhn_nce_from_similarity(torch.tensor(S3), exclude=same_text_mask(["a", "a", "a"]))


def test_features_are_normalised_and_gradients_finite():
    torch.manual_seed(0)
    img = torch.randn(6, 8, requires_grad=True)
    txt = torch.randn(6, 8, requires_grad=True)
    loss = dhn_nce_loss(img * 50, txt)
    sim = torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).t()
    assert float(loss.detach()) == pytest.approx(float(dhn_nce_from_similarity(sim.detach())), rel=1e-5)
    loss.backward()
    assert torch.isfinite(img.grad).all() and torch.isfinite(txt.grad).all() and img.grad.abs().sum() > 0
    # extreme similarities and a tiny temperature stay finite
    s = torch.tensor([[1.0, 1.0, -1.0], [-1.0, 1.0, 1.0], [1.0, -1.0, -1.0]], requires_grad=True)
    extreme = dhn_nce_from_similarity(s, tau=0.01, beta1=5.0, beta2=5.0)
    extreme.backward()
    assert torch.isfinite(extreme) and torch.isfinite(s.grad).all()


def test_bad_shapes_are_errors():
    with pytest.raises(ValueError, match="square"):
        dhn_nce_from_similarity(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="at least 2"):
        dhn_nce_from_similarity(torch.zeros(1, 1))
    with pytest.raises(ValueError, match="differ"):
        dhn_nce_loss(torch.zeros(2, 4), torch.zeros(3, 4))
