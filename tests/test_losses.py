"""Loss registry: hand-computed values and the method's invariants."""

import math

import pytest
import torch

from diffusion_dpo.errors import UserError
from diffusion_dpo.training.losses import (LOSSES, dpo_loss, get_loss, hinge_loss, implicit_accuracy, ipo_loss, sft_loss,
                                  smooth_labels)

# One pair, numbers chosen so the hand computation is easy:
# model_w - model_l = 0.10 - 0.30 = -0.20; ref_w - ref_l = 0.20 - 0.20 = 0
# h = -0.5 * (-0.20 - 0) = 0.10
MW, ML, RW, RL = (torch.tensor([v]) for v in (0.10, 0.30, 0.20, 0.20))


def test_dpo_hand_computed():
    out = dpo_loss(MW, ML, RW, RL, beta=20.0)  # inside = 20 * 0.1 = 2
    assert out.inside.item() == pytest.approx(2.0)
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-2.0)), rel=1e-6)  # -log σ(2)


def test_dpo_matches_diffusers_convention_with_half_beta():
    # diffusers example: -logsigmoid(beta' * (ref_diff - model_diff)) with beta' = beta / 2
    beta = 5000.0
    mw, ml, rw, rl = (torch.rand(8) for _ in range(4))
    ours = dpo_loss(mw, ml, rw, rl, beta=beta).loss
    theirs = -torch.nn.functional.logsigmoid((beta / 2) * ((rw - rl) - (mw - ml)))
    torch.testing.assert_close(ours, theirs)


def test_dpo_is_log2_when_policy_equals_reference():
    mw, ml = torch.rand(16), torch.rand(16)
    ran = []
    for name, spec in LOSSES.items():
        if name in ("dpo",):
            out = spec.fn(mw, ml, mw.clone(), ml.clone(), beta=5000.0)
            torch.testing.assert_close(out.loss, torch.full((16,), math.log(2.0)))
            assert torch.all(out.inside == 0)
            ran.append(name)
    assert ran == ["dpo"]


def test_swap_negates_inside_for_every_margin_loss():
    mw, ml, rw, rl = (torch.rand(8) for _ in range(4))
    ran = []
    for name, spec in LOSSES.items():
        if not (spec.needs_reference and spec.pairwise):
            continue
        a = spec.fn(mw, ml, rw, rl, beta=100.0).inside
        b = spec.fn(ml, mw, rl, rw, beta=100.0).inside
        torch.testing.assert_close(a, -b, msg=name)
        ran.append(name)
    assert sorted(ran) == ["dpo", "hinge", "ipo"]  # every pairwise loss on the reference margin (not mapo, sft, kto)
    assert sorted(LOSSES) == ["dpo", "hinge", "ipo", "kto", "mapo", "sft"]  # a new loss: decide whether it belongs


def test_tie_label_is_symmetric_and_log2_at_init():
    mw, ml, rw, rl = (torch.rand(8) for _ in range(4))
    half = torch.full((8,), 0.5)
    a = dpo_loss(mw, ml, rw, rl, beta=50.0, label=half).loss
    b = dpo_loss(ml, mw, rl, rw, beta=50.0, label=half).loss
    torch.testing.assert_close(a, b)
    same = dpo_loss(mw, ml, mw, ml, beta=50.0, label=half).loss
    torch.testing.assert_close(same, torch.full((8,), math.log(2.0)))


def test_hinge_hand_computed():
    assert hinge_loss(MW, ML, RW, RL, beta=5.0).loss.item() == pytest.approx(0.5)  # relu(1 - 0.5)
    assert hinge_loss(MW, ML, RW, RL, beta=20.0).loss.item() == pytest.approx(0.0)  # relu(1 - 2)
    # tie: 0.5 * relu(1 - 0.5) + 0.5 * relu(1 + 0.5) = 0.25 + 0.75
    assert hinge_loss(MW, ML, RW, RL, beta=5.0, label=torch.tensor([0.5])).loss.item() == pytest.approx(1.0)


def test_ipo_hand_computed():
    # h = 0.1, beta = 10: (0.1 - 1/20)^2 = 0.0025
    out = ipo_loss(MW, ML, RW, RL, beta=10.0)
    assert out.loss.item() == pytest.approx(0.0025)
    assert out.inside.item() == pytest.approx(1.0)
    # a tie regresses h to 0: 0.1^2
    assert ipo_loss(MW, ML, RW, RL, beta=10.0, label=torch.tensor([0.5])).loss.item() == pytest.approx(0.01)


def test_sft_is_winner_mse_and_needs_no_reference():
    out = sft_loss(MW, ML, None, None, beta=5000.0)
    assert out.loss.item() == pytest.approx(0.10)
    assert out.inside.item() == 0.0
    assert not LOSSES["sft"].needs_reference
    assert sft_loss(MW, ML, None, None, beta=1.0, label=torch.tensor([0.5])).loss.item() == pytest.approx(0.20)


def test_gradient_pushes_winner_error_down_and_loser_error_up():
    mw = torch.tensor([0.2], requires_grad=True)
    ml = torch.tensor([0.2], requires_grad=True)
    dpo_loss(mw, ml, torch.tensor([0.2]), torch.tensor([0.2]), beta=10.0).loss.sum().backward()
    # d/d mw of -log σ(-5 (mw - ml)) at equality = 0.5 * 5 = 2.5 > 0: descent lowers the winner's error
    assert mw.grad.item() == pytest.approx(2.5)
    assert ml.grad.item() == pytest.approx(-2.5)


def test_implicit_accuracy_counts_ties_half():
    acc = implicit_accuracy(torch.tensor([1.0, -1.0, 0.0, 3.0]))
    assert acc.tolist() == [1.0, 0.0, 0.5, 1.0]


def test_unknown_loss_is_a_user_error():
    with pytest.raises(UserError, match="unknown loss 'dpoo'"):
        get_loss("dpoo")
    assert get_loss("dpo").fn is dpo_loss


def test_label_smoothing_is_conservative_dpo():
    """cDPO: with eps, a decided pair's loss is (1-eps)·-logσ(x) + eps·-logσ(-x), least at x = log((1-eps)/eps)."""
    eps = 0.2
    labels = smooth_labels(torch.tensor([1.0, 0.0, 0.5]), eps)
    assert torch.allclose(labels, torch.tensor([0.8, 0.2, 0.5]))
    assert smooth_labels(labels, 0.0) is labels  # eps 0 is the paper's loss, untouched
    x = torch.linspace(-6, 6, 2401, dtype=torch.float64)
    zero = torch.zeros_like(x)
    # model_w = -2x/beta moves inside to exactly x (beta 1, the rest at 0)
    out = dpo_loss(-2 * x, zero, zero, zero, beta=1.0, label=torch.full_like(x, 0.8))
    by_hand = -(0.8 * torch.log(torch.sigmoid(x)) + 0.2 * torch.log(torch.sigmoid(-x)))
    assert torch.allclose(out.loss, by_hand)
    assert abs(x[out.loss.argmin()].item() - math.log(0.8 / 0.2)) < 0.01  # a finite optimum, not +inf
    # by hand: -logσ(-x) = x - logσ(x), so the loss is -logσ(x) + 0.2x = log(1 + e^-x) + 0.2x
    #   x = 0:      log 2                                                          = 0.6931471806
    #   x = log 4:  σ = 4/5, so -(0.8 log 0.8 + 0.2 log 0.2) = 0.8·0.2231435513 + 0.2·1.6094379124
    #                                                        = 0.1785148411 + 0.3218875825 = 0.5004024235
    #   x = 2:      log(1 + e^-2) + 0.4 = 0.1269280110 + 0.4                   = 0.5269280110
    #   x = -2:     log(1 + e^2) - 0.4 = 2.1269280110 - 0.4                    = 1.7269280110
    pts = torch.tensor([0.0, math.log(4.0), 2.0, -2.0], dtype=torch.float64)
    zero = torch.zeros_like(pts)
    got = dpo_loss(-2 * pts, zero, zero, zero, beta=1.0, label=smooth_labels(torch.ones_like(pts), eps)).loss
    assert got.tolist() == pytest.approx([0.6931471806, 0.5004024235, 0.5269280110, 1.7269280110], rel=1e-9)
    assert out.loss.min().item() == pytest.approx(0.5004024235, abs=1e-5)  # the grid's least loss: the optimum's


# ---------------------------------------------------------------- MaPO

def _mapo_by_hand(e_w: float, e_l: float, beta: float, T: float = 1000.0) -> float:
    f = lambda e: (e / 2) / (math.exp(e / 2) - 1)  # noqa: E731 - the authors' log-likelihood proxy, snr = 0.5
    m = T * (f(e_w) - f(e_l))
    return e_w - beta * -math.log1p(math.exp(-m))  # e_w - beta * log sigmoid(T m)


def test_mapo_hand_computed():
    from diffusion_dpo.training.losses import mapo_loss

    # by hand, with f(e) = x/(e^x - 1) at x = e/2 = 1 - e/4 + e²/48 - e⁴/11520 + ...:
    #   T·m = 1000·(f(e_w) - f(e_l)) = 1000·[(e_l - e_w)/4 - (e_l² - e_w²)/48 + (e_l⁴ - e_w⁴)/11520]
    #   (0.2, 0.2002):  1000·[5e-5 - 0.00008004/48 + 5.6e-10]   = 1000·[5e-5 - 1.6675e-6]     = 0.0483331
    #                   loss = 0.2 + 0.1·log(1 + e^-0.0483331) = 0.2 + 0.1·log 1.952817 = 0.2 + 0.0669273
    #   (0.5, 0.499):   1000·[-2.5e-4 + 0.000999/48 - 4.33e-8] = 1000·[-2.5e-4 + 2.08125e-5 - 4.33e-8] = -0.2292307
    #                   loss = 0.5 + 0.1·log(1 + e^0.2292307) = 0.5 + 0.1·log 2.257623 = 0.5 + 0.0814317
    #   (0.05, 0.0501): 1000·[2.5e-5 - 0.00001001/48]             = 1000·[2.5e-5 - 2.0854e-7]   = 0.0247915
    #                   loss = 0.05 + 0.1·log(1 + e^-0.0247915) = 0.05 + 0.1·log 1.975513 = 0.05 + 0.0680828
    # (the digits past the 7th from a calculator, the same arithmetic)
    literal = {(0.2, 0.2002): (0.04833305620, 0.2669272635), (0.5, 0.499): (-0.2292306765, 0.5814316526),
               (0.05, 0.0501): (0.02479146270, 0.1180828274)}
    for e_w, e_l in ((0.2, 0.2002), (0.5, 0.499), (0.05, 0.0501)):
        out = mapo_loss(torch.tensor([e_w], dtype=torch.float64), torch.tensor([e_l], dtype=torch.float64),
                        None, None, beta=0.1)
        assert out.loss.item() == pytest.approx(_mapo_by_hand(e_w, e_l, 0.1), rel=1e-9)
        assert (out.inside.item() > 0) == (e_w < e_l)  # the proxy is decreasing: a smaller winner error is a win
        inside, loss = literal[(e_w, e_l)]
        assert out.inside.item() == pytest.approx(inside, rel=1e-8)
        assert out.loss.item() == pytest.approx(loss, rel=1e-9)


def test_mapo_invariants():
    from diffusion_dpo.training.losses import mapo_loss

    e = torch.rand(8, dtype=torch.float64) + 0.01
    out = mapo_loss(e, e.clone(), None, None, beta=0.3)  # equal errors: margin 0, log σ(0) = -log 2
    torch.testing.assert_close(out.loss, e + 0.3 * math.log(2.0))
    assert torch.all(out.inside == 0)
    w, l = torch.rand(8, dtype=torch.float64), torch.rand(8, dtype=torch.float64)
    tie = torch.full((8,), 0.5, dtype=torch.float64)  # a tie is symmetric in its two images
    torch.testing.assert_close(mapo_loss(w, l, None, None, 0.1, tie).loss, mapo_loss(l, w, None, None, 0.1, tie).loss)
    tiny = mapo_loss(torch.tensor([0.0]), torch.tensor([1e-9]), None, None, beta=0.1)  # f(0) = 1: finite at 0
    assert torch.isfinite(tiny.loss).all()
    assert not get_loss("mapo").needs_reference and get_loss("mapo").pairwise


# ---------------------------------------------------------------- the winner safeguard (Diffusion-SDPO)

def test_safeguard_scale_hand_computed_and_keeps_the_winner_from_growing():
    from diffusion_dpo.training.losses import scale_gradient, winner_safeguard_scale

    r_w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # residuals of two pairs' winners, flattened
    r_l = torch.tensor([[2.0, 1.0], [0.0, 3.0]])  # <r_l, r_w> = 2 + 3 = 5, |r_w|² = 2
    assert winner_safeguard_scale(r_w, r_l, None, mu=0.0).item() == pytest.approx(2 / 5)
    assert winner_safeguard_scale(r_w, r_l, None, mu=0.5).item() == pytest.approx(0.5 * 2 / 5)
    assert winner_safeguard_scale(r_w, -r_l, None, mu=0.0).item() == 1.0  # opposed gradients: nothing to guard
    assert winner_safeguard_scale(r_w, 0.1 * r_l, None, mu=0.0).item() == 1.0  # 2 / 0.5 = 4, capped at 1
    weight = torch.tensor([1.0, 2.0])  # w² = 1, 4: (2·1 + 0·... ) own = 1 + 4 = 5, cross = 2 + 4·3 = 14
    assert winner_safeguard_scale(r_w, r_l, weight, mu=0.0).item() == pytest.approx(5 / 14)
    # the guarantee: in output space, the update -g_w + λ g_l does not increase the winners' error to first order
    torch.manual_seed(0)
    for mu in (0.0, 0.6):
        r_w, r_l = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
        r_l = r_l + 2 * r_w  # strongly aligned, so the cap binds
        lam = winner_safeguard_scale(r_w, r_l, None, mu)
        g_w, g_l = 2 * r_w / r_w[0].numel(), 2 * r_l / r_l[0].numel()  # gradients of the per-sample means
        step = -g_w + lam * g_l
        assert (step * g_w).sum() <= -mu * g_w.pow(2).sum() + 1e-6
        assert 0 < lam < 1
    x = torch.tensor([3.0], requires_grad=True)
    y = scale_gradient(x * 2, torch.tensor(0.25))
    y.backward()
    assert y.item() == 6.0 and x.grad.item() == 0.5  # the value as is, the gradient a quarter
