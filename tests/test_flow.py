"""The rectified-flow objective: each timestep sampler and loss weighting matches its formula."""

from __future__ import annotations

import math

import pytest
import torch

from sd35hub.train import flow

N = 200_000


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_logit_normal_is_sigmoid_of_a_normal():
    sigmas = flow.sample_sigmas("logit_normal", N, generator=_gen(), logit_mean=0.5, logit_std=0.8)
    logits = torch.logit(sigmas.double())
    assert abs(logits.mean().item() - 0.5) < 0.01
    assert abs(logits.std().item() - 0.8) < 0.01
    # the same generator gives the same draw: exact formula check against torch.normal
    again = flow.sample_sigmas("logit_normal", 5, generator=_gen(3), logit_mean=0.5, logit_std=0.8)
    expected = torch.sigmoid(torch.normal(0.5, 0.8, size=(5,), generator=_gen(3)))
    torch.testing.assert_close(again, expected)


def test_uniform_mode_and_cosmap_follow_their_maps_of_u():
    u = torch.rand(7, generator=_gen(5))
    torch.testing.assert_close(flow.sample_sigmas("uniform", 7, generator=_gen(5)), u.clamp(flow.SIGMA_MIN, 1))
    s = 1.29
    mode = 1 - u - s * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    torch.testing.assert_close(flow.sample_sigmas("mode", 7, generator=_gen(5), mode_scale=s), mode.clamp(flow.SIGMA_MIN, 1))
    cosmap = 1 - 1 / (torch.tan(math.pi * u / 2) + 1)
    torch.testing.assert_close(flow.sample_sigmas("cosmap", 7, generator=_gen(5)), cosmap.clamp(flow.SIGMA_MIN, 1))


def test_distributions_have_the_expected_shape():
    uniform = flow.sample_sigmas("uniform", N, generator=_gen())
    assert abs(uniform.mean().item() - 0.5) < 0.01 and abs(uniform.var().item() - 1 / 12) < 0.003
    # mode with scale > 0 puts more mass in the middle than uniform: lower variance, same mean
    mode = flow.sample_sigmas("mode", N, generator=_gen(), mode_scale=1.29)
    assert abs(mode.mean().item() - 0.5) < 0.01 and mode.var().item() < uniform.var().item() - 0.01
    # cosmap: CDF(t) = (2/pi) * atan(t / (1 - t)) -> median 0.5, P(sigma < 0.25) = (2/pi) atan(1/3)
    cosmap = flow.sample_sigmas("cosmap", N, generator=_gen())
    assert abs((cosmap < 0.25).float().mean().item() - 2 / math.pi * math.atan(1 / 3)) < 0.005
    assert ((cosmap > 0) & (cosmap <= 1)).all()


def test_shift_formula_and_identity():
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(flow.shift_sigmas(sigmas, 3.0), 3 * sigmas / (1 + 2 * sigmas))
    assert flow.shift_sigmas(sigmas, 1.0) is sigmas
    assert flow.shift_sigmas(torch.tensor([0.5]), 3.0).item() == pytest.approx(0.75)


def test_loss_weightings():
    sigmas = torch.tensor([0.2, 0.5, 0.8])
    torch.testing.assert_close(flow.loss_weights("none", sigmas), torch.ones(3))
    torch.testing.assert_close(flow.loss_weights("sigma_sqrt", sigmas), sigmas**-2)
    torch.testing.assert_close(flow.loss_weights("cosmap", sigmas), 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2)))
    with pytest.raises(ValueError):
        flow.loss_weights("bogus", sigmas)


class _Echo(torch.nn.Module):
    """A 'transformer' whose prediction is a fixed tensor: the loss is then known in closed form."""

    def __init__(self, pred: torch.Tensor) -> None:
        super().__init__()
        self.pred = pred
        self.seen: dict = {}

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, return_dict=False):
        self.seen = {"hidden_states": hidden_states, "timestep": timestep}
        return (self.pred,)


def test_flow_loss_targets_noisy_input_weighting_and_preconditioning():
    g = _gen(1)
    x0, noise, pred = (torch.randn(2, 16, 4, 4, generator=g) for _ in range(3))
    sigmas = torch.tensor([0.3, 0.7])
    model = _Echo(pred)
    embeds, pooled = torch.zeros(2, 5, 8), torch.zeros(2, 8)
    loss = flow.flow_loss(model, x0, embeds, pooled, noise, sigmas)
    s = sigmas.view(-1, 1, 1, 1)
    torch.testing.assert_close(model.seen["hidden_states"], (1 - s) * x0 + s * noise)
    torch.testing.assert_close(model.seen["timestep"], sigmas * 1000)
    torch.testing.assert_close(loss, ((pred - (noise - x0)) ** 2).mean())
    weighted = flow.flow_loss(model, x0, embeds, pooled, noise, sigmas, weighting="sigma_sqrt")
    per_sample = ((pred - (noise - x0)) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(weighted, (per_sample * sigmas**-2).mean())
    pre = flow.flow_loss(model, x0, embeds, pooled, noise, sigmas, precondition=True)
    noisy = (1 - s) * x0 + s * noise
    torch.testing.assert_close(pre, ((pred * (-s) + noisy - x0) ** 2).mean())
    # the exact velocity gives zero loss, and its x0 estimate is exact
    model.pred = noise - x0
    assert flow.flow_loss(model, x0, embeds, pooled, noise, sigmas).item() < 1e-10
    assert flow.flow_loss(model, x0, embeds, pooled, noise, sigmas, precondition=True).item() < 1e-10
