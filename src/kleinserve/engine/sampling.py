"""Samplers, k-diffusion style: small functions of (model, x, sigmas).

`model(x, i)` returns the (guided) velocity `v` at step i for the packed latent `x` (B, seq, C);
`sigmas` has N + 1 entries ending in 0. The flow-matching convention of FLUX:
`x_sigma = (1 - sigma) * x0 + sigma * eps`, so `x0_hat = x - sigma * v`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional, Protocol, Union

import torch

from .types import GenerationCancelled

# callback(i, x, x0_hat) after step i (0-based) has produced the new x.
SamplerCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


class StepNoise(Protocol):
    """Supplies the stochastic part of a step; `None` means the deterministic Euler sampler."""

    def churn(self, i: int, sigma: float, sigma_next: float) -> float:
        """The noise std `s` to inject at step i (0 for a plain Euler step; draws nothing)."""

    def draw(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """The noise `xi_c` shaped like x (float32), one draw per image from that image's generator.

        Called only on steps where `churn` returned s > 0, so no random numbers are drawn otherwise.
        Its scale is part of the noise (CNS: unit std per image times `cns_energy_scale`).
        """


def guided_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: Union[float, torch.Tensor]) -> torch.Tensor:
    """Classifier-free guidance: `v_uncond + scale * (v_cond - v_uncond)`, in v's dtype.

    `scale` is a float (diffusers' form), or one float32 scale per row (B, 1, 1) when requests with
    different guidance share a batch; the product is rounded to v's dtype before the add in both cases,
    so a row gets exactly what its own float scale would give it."""
    return v_uncond + (scale * (v_cond - v_uncond)).to(v_cond.dtype)


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    # FlowMatchEulerDiscreteScheduler.step's update (float32 sample, cast back), except that the scheduler
    # multiplies dt * v in v's dtype: identical in float32, within a bf16 rounding of dt * v otherwise.
    return (x.float() + (sigma_next - sigma) * v.float()).to(v.dtype)


def sample(
    model: Callable[[torch.Tensor, int], torch.Tensor],
    x: torch.Tensor,
    sigmas: list[float],
    *,
    noise: Optional[StepNoise] = None,
    callback: Optional[SamplerCallback] = None,
    should_cancel: Optional[Callable[[], bool]] = None,
) -> torch.Tensor:
    """Euler, or the marginal-preserving stochastic step when `noise` asks for churn.

    Stochastic step (docs/CNS.md): x <- (1 - sigma') x0_hat + sqrt(sigma'^2 - s^2) eps_hat + s xi.
    The last step and any step to sigma' = 0 are always Euler and draw nothing.
    """
    n = len(sigmas) - 1
    for i in range(n):
        if should_cancel is not None and should_cancel():
            raise GenerationCancelled(f"cancelled before step {i + 1}/{n}")
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        v = model(x, i)
        s = 0.0
        if noise is not None and i < n - 1 and sigma_next > 0:
            s = noise.churn(i, sigma, sigma_next)
        xf, vf = x.float(), v.float()
        x0_hat = xf - sigma * vf
        if s > 0:
            assert noise is not None  # s > 0 only with noise
            eps_hat = xf + (1.0 - sigma) * vf
            det = max(sigma_next**2 - s**2, 0.0) ** 0.5
            x_new = (1.0 - sigma_next) * x0_hat + det * eps_hat + s * noise.draw(i, xf)
        else:
            x_new = euler_step(xf, vf, sigma, sigma_next)  # float32 in, float32 out
        x = x_new.to(v.dtype)
        if callback is not None:
            callback(i, x, x0_hat)
    return x
