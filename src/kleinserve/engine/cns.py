"""Colored Noise Sampling (CNS): colored step noise, gamma sources, calibration.

Implements /work/shared/cns/SPEC.md (docs/CNS.md for users). Tensors only, pure functions where
possible; `sampling.sample` owns the step rule and asks the object built by `make_step_noise` for the
churn `s` of a step and for the colored noise `xi_c` of a stochastic step.

Layout: the engine's latent is packed, (B, seq, 4 * C) at (h8 / 2) x (w8 / 2) with seq row-major.
The noise is colored on the VAE-resolution grid (B, C, h8, w8): undo packing and the 2x2 patchify,
color there in float32, patchify and pack again.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import torch

if TYPE_CHECKING:
    from ..schema import FluxKleinInput

logger = logging.getLogger(__name__)

BUNDLED_UNGUIDED = "gamma_sit_xl2_unguided.csv"
BUNDLED_CFG = "gamma_sit_xl2_cfg1.5.csv"
# A matrix calibrated for a model, installed beside its weights (`kleinserve calibrate --out`).
CALIBRATED_MATRIX_FILENAME = "kleinserve_cns_gamma.csv"

_STD_EPS = 1e-9  # section 2.7: skip the normalisation below this std
_PROGRESS_EPS = 1e-8  # section 4.2


# --------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CNSParams:
    """The `cns_*` fields of a request (defaults live in schema.FluxKleinInput only)."""

    s_churn: float
    gamma_source: str  # "matrix" | "approximation"
    power_gamma: float
    gamma_divider: float
    alpha_start: float
    alpha_end: float
    alpha_use_fnorm: bool
    alpha_exp_interp: bool
    alpha_exp_sharpness: float
    num_freq_bins: int
    energy_scale: float

    @classmethod
    def from_request(cls, request: FluxKleinInput) -> CNSParams:
        return cls(
            s_churn=float(request.cns_s_churn),
            gamma_source=request.cns_gamma_source,
            power_gamma=float(request.cns_power_gamma),
            gamma_divider=float(request.cns_gamma_divider),
            alpha_start=float(request.cns_alpha_tilt_start),
            alpha_end=float(request.cns_alpha_tilt_end),
            alpha_use_fnorm=bool(request.cns_alpha_use_fnorm),
            alpha_exp_interp=bool(request.cns_alpha_exp_interp),
            alpha_exp_sharpness=float(request.cns_alpha_exp_sharpness),
            num_freq_bins=int(request.cns_num_freq_bins),
            energy_scale=float(request.cns_energy_scale),
        )


# --------------------------------------------------------------------------------------------------
# Section 1: the churn s of a step
# --------------------------------------------------------------------------------------------------
def churn_std(s_churn: float, i: int, num_steps: int, sigma: float, sigma_next: float) -> float:
    """`s = sigma_next * min(1, s_churn * sqrt(1 - r^2))`, r = sigma_next / sigma; 0 on Euler steps."""
    if s_churn <= 0.0 or i >= num_steps - 1 or sigma_next <= 0.0 or sigma <= 0.0:
        return 0.0
    r = sigma_next / sigma
    return sigma_next * min(1.0, s_churn * math.sqrt(max(0.0, 1.0 - r * r)))


# --------------------------------------------------------------------------------------------------
# Packing: (B, seq, 4C) <-> (B, C, h8, w8), with diffusers' own patchify helpers
# --------------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def flux2_pipeline_cls():
    """diffusers' Flux2KleinPipeline class (its static latent helpers); the engine uses it too."""
    # Imported on first use: the pipeline module pulls transformers in (seconds); the engine has it anyway.
    from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline

    return Flux2KleinPipeline


def unpack_latents(x: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Packed (B, seq, 4C) -> VAE-resolution (B, C, h8, w8)."""
    h8, w8 = grid_hw
    if h8 % 2 or w8 % 2:
        raise ValueError(f"latent grid {h8}x{w8} must have even sides (2x2 patches)")
    b, seq, c4 = x.shape
    h16, w16 = h8 // 2, w8 // 2
    if seq != h16 * w16 or c4 % 4:
        raise ValueError(f"packed latent {tuple(x.shape)} does not match grid {h8}x{w8}")
    patched = x.permute(0, 2, 1).reshape(b, c4, h16, w16)
    return flux2_pipeline_cls()._unpatchify_latents(patched)


def pack_latents(z: torch.Tensor) -> torch.Tensor:
    """VAE-resolution (B, C, h8, w8) -> packed (B, seq, 4C), inverse of `unpack_latents`."""
    pipe = flux2_pipeline_cls()
    return pipe._pack_latents(pipe._patchify_latents(z.contiguous()))


# --------------------------------------------------------------------------------------------------
# Section 2: radial bins, tilt, amplitudes, filter, normalisation
# --------------------------------------------------------------------------------------------------
@lru_cache(maxsize=64)
def _radial_bin_map(h: int, w: int, num_bins: int, device: str) -> torch.Tensor:
    fu = torch.fft.fftfreq(h, dtype=torch.float64)
    fv = torch.fft.fftfreq(w, dtype=torch.float64)
    rho = torch.sqrt(fu[:, None] ** 2 + fv[None, :] ** 2)
    rho_max = rho.max()
    rho_n = rho / rho_max if rho_max > 0 else torch.zeros_like(rho)  # 1x1 grid: everything in bin 0
    return torch.floor(rho_n * (num_bins - 1)).long().clamp_(0, num_bins - 1).to(device)


def radial_bin_map(h: int, w: int, num_bins: int, device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """(h, w) long tensor: the radial frequency bin of each fft2 coefficient (cached; do not modify)."""
    if num_bins < 1:
        raise ValueError("num_bins must be >= 1")
    return _radial_bin_map(h, w, num_bins, str(torch.device(device)) if device is not None else "cpu")


def bin_counts(bin_map: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Number of coefficients in each bin (sums to h * w)."""
    return torch.bincount(bin_map.flatten().cpu(), minlength=num_bins)


def tilt_progress(i: int, num_steps: int, *, exp_interp: bool, sharpness: float) -> float:
    """p' of section 2.3: p = i / (N - 1) (0 when N = 1), exponentially warped when asked."""
    p = i / (num_steps - 1) if num_steps > 1 else 0.0
    if not exp_interp or abs(sharpness) < 1e-8:  # k -> 0: the limit is p itself
        return p
    return math.expm1(sharpness * p) / math.expm1(sharpness)


def tilt_alpha(i: int, num_steps: int, params: CNSParams) -> float:
    """alpha at step i: alpha_start + p' * (alpha_end - alpha_start)."""
    p = tilt_progress(i, num_steps, exp_interp=params.alpha_exp_interp, sharpness=params.alpha_exp_sharpness)
    return params.alpha_start + p * (params.alpha_end - params.alpha_start)


def band_amplitudes(
    gamma: torch.Tensor, alpha: float, *, divider: float, power: float, use_fnorm: bool
) -> torch.Tensor:
    """Per-bin Fourier amplitudes a_j (section 2.5), float64, scaled so the largest is 1.

    The final scaling is free (step 7 normalises the std) and keeps tiny amplitudes well away from the
    std threshold. All-zero or non-finite amplitudes fall back to white noise (all ones).
    """
    g = gamma.to(torch.float64)
    k = g.numel()
    residual = 1.0 - g / divider
    if use_fnorm:
        f = torch.arange(k, dtype=torch.float64) / (k - 1) if k > 1 else torch.zeros(1, dtype=torch.float64)
        e = torch.exp(alpha * f) * residual
    else:
        e = (1.0 + alpha) * residual  # flat: shape-neutral once step 7 normalises
    a = torch.clamp(e, min=0.0) ** power
    if not bool(torch.isfinite(a).all()) or not bool(a.max() > 0):
        return torch.ones_like(a)
    return a / a.max()


def color_noise(
    white: torch.Tensor, amplitudes: torch.Tensor, bin_map: torch.Tensor, energy_scale: float
) -> torch.Tensor:
    """Sections 2.6-2.7: filter white (B, C, h, w) noise by a[bin] in fft2 space, normalise per image.

    Equal amplitudes are the identity filter, so the FFT pair is skipped there (the result is then
    exactly `energy_scale * w / std(w)`).
    """
    w = white.to(torch.float32)
    if bool((amplitudes == amplitudes[0]).all()):
        colored = w
    else:
        bins = bin_map.to(w.device)
        mask = amplitudes.to(device=w.device, dtype=torch.float32)[bins]
        colored = torch.fft.ifft2(torch.fft.fft2(w) * mask).real
    std = colored.std(dim=(1, 2, 3), keepdim=True)
    std = torch.where(std < _STD_EPS, torch.ones_like(std), std)
    return energy_scale * (colored / std)


# --------------------------------------------------------------------------------------------------
# Section 3: gamma sources
# --------------------------------------------------------------------------------------------------
def gamma_approximation(sigma: float, sigma0: float, num_bins: int) -> torch.Tensor:
    """`approximation`: g_j = clamp(1 - sigma / sigma_0, 0, 1) for every band."""
    g = min(1.0, max(0.0, 1.0 - sigma / sigma0)) if sigma0 > 0 else 1.0
    return torch.full((num_bins,), g, dtype=torch.float64)


def resample_columns(row: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Linear resampling of K' band values over [0, 1] onto K bands."""
    kp = row.numel()
    if kp == num_bins:
        return row
    if kp == 1:
        return row.expand(num_bins).clone()
    if num_bins == 1:
        return row[:1].clone()
    pos = torch.arange(num_bins, dtype=torch.float64) * ((kp - 1) / (num_bins - 1))
    lo = pos.floor().long().clamp_(0, kp - 1)
    hi = (lo + 1).clamp_(max=kp - 1)
    t = pos - lo.to(torch.float64)
    return (1.0 - t) * row[lo] + t * row[hi]


def uniform_row_sigmas(rows: int) -> torch.Tensor:
    """sigma of row k of an R-row table uniform in time from noise to data: 1 - k / (R - 1)."""
    if rows == 1:
        return torch.ones(1, dtype=torch.float64)
    return 1.0 - torch.arange(rows, dtype=torch.float64) / (rows - 1)


@dataclass(eq=False)
class GammaMatrix:
    """Per-band progress gamma in [0, 1]: R rows (from noise to data) x K' radial bands (low to high).

    `sigmas[k]` is the sigma of row k, strictly decreasing. The bundled tables are uniform in time
    (sigma_k = 1 - k / (R - 1)), where the row lookup below is the spec's position (1 - sigma)(R - 1).
    """

    values: torch.Tensor  # (R, K') float64
    sigmas: torch.Tensor  # (R,) float64
    name: str

    def __post_init__(self) -> None:
        self.values = torch.as_tensor(self.values, dtype=torch.float64).detach().cpu()
        self.sigmas = torch.as_tensor(self.sigmas, dtype=torch.float64).detach().cpu().flatten()
        if self.values.ndim != 2 or self.values.shape[0] < 1 or self.values.shape[1] < 1:
            raise ValueError(f"gamma matrix {self.name!r}: need a non-empty R x K table")
        if self.sigmas.numel() != self.values.shape[0]:
            raise ValueError(f"gamma matrix {self.name!r}: {self.sigmas.numel()} sigmas for "
                             f"{self.values.shape[0]} rows")
        if not bool(torch.isfinite(self.values).all()) or not bool(torch.isfinite(self.sigmas).all()):
            raise ValueError(f"gamma matrix {self.name!r}: non-finite entries")
        if bool((self.values < 0).any()) or bool((self.values > 1).any()):
            raise ValueError(f"gamma matrix {self.name!r}: values must lie in [0, 1]")
        if self.sigmas.numel() > 1 and not bool((self.sigmas[1:] < self.sigmas[:-1]).all()):
            raise ValueError(f"gamma matrix {self.name!r}: row sigmas must decrease strictly")
        self._sigma_list = self.sigmas.tolist()
        self._neg_sigmas = [-v for v in self._sigma_list]  # increasing, for bisect

    @property
    def num_rows(self) -> int:
        return self.values.shape[0]

    @property
    def num_bins(self) -> int:
        return self.values.shape[1]

    def row_position(self, sigma: float) -> float:
        """Fractional row index of `sigma` (clamped to the table): linear in sigma between rows."""
        s = self._sigma_list
        if sigma >= s[0]:
            return 0.0
        if sigma <= s[-1]:
            return float(len(s) - 1)
        # s decreases: k = the last row with s[k] >= sigma (so s[k + 1] < sigma).
        k = bisect.bisect_right(self._neg_sigmas, -sigma) - 1
        return k + (s[k] - sigma) / (s[k] - s[k + 1])

    def row(self, sigma: float, num_bins: Optional[int] = None) -> torch.Tensor:
        """gamma(., sigma): linear interpolation between neighbouring rows, then column resampling."""
        pos = self.row_position(sigma)
        lo = int(math.floor(pos))
        hi = min(lo + 1, self.num_rows - 1)
        t = pos - lo
        g = self.values[lo] if t == 0.0 else (1.0 - t) * self.values[lo] + t * self.values[hi]
        return resample_columns(g, num_bins if num_bins is not None else self.num_bins)

    @classmethod
    def load_csv(cls, path: Union[str, Path], name: Optional[str] = None) -> GammaMatrix:
        """Read a table: '#' comment lines, an optional header row; a first column named `sigma` holds
        each row's sigma (else the rows are uniform in time, sigma_k = 1 - k / (R - 1))."""
        path = Path(path)
        return cls.from_csv_text(path.read_text(encoding="utf-8"), name=name or path.stem)

    @classmethod
    def from_csv_text(cls, text: str, name: str) -> GammaMatrix:
        has_sigma = False
        rows: list[list[float]] = []
        for lineno, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            fields = [f.strip() for f in line.split(",")]
            if not rows and not has_sigma and not _is_number(fields[0]):
                has_sigma = fields[0].lower() == "sigma"  # a header row
                continue
            try:
                rows.append([float(f) for f in fields])
            except ValueError as exc:
                raise ValueError(f"gamma matrix {name!r} line {lineno}: {exc}") from None
        if not rows or len({len(r) for r in rows}) != 1:
            raise ValueError(f"gamma matrix {name!r}: rows missing or of unequal length")
        table = torch.tensor(rows, dtype=torch.float64)
        if has_sigma:
            return cls(values=table[:, 1:], sigmas=table[:, 0], name=name)
        return cls(values=table, sigmas=uniform_row_sigmas(table.shape[0]), name=name)

    def save_csv(self, path: Union[str, Path], comment: Optional[str] = None) -> None:
        """Write the table with a `sigma` column and a header comment (exact float round-trip)."""
        lines = [f"# {ln}" for ln in (comment or "").splitlines()]
        lines.append(f"# kleinserve CNS gamma matrix {self.name!r}: {self.num_rows} rows (decreasing sigma, "
                     f"noise to data) x {self.num_bins} radial frequency bins (low to high), values in [0, 1]")
        lines.append(",".join(["sigma"] + [f"bin_{j}" for j in range(self.num_bins)]))
        for sigma, row in zip(self.sigmas.tolist(), self.values.tolist(), strict=True):
            lines.append(",".join(repr(float(v)) for v in [sigma] + row))
        Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@cache
def load_bundled_matrix(filename: str) -> GammaMatrix:
    """One of the bundled SiT-XL/2 tables (src/kleinserve/data, MIT, see GAMMA_MATRICES_LICENSE.md)."""
    ref = resources.files("kleinserve").joinpath("data").joinpath(filename)
    return GammaMatrix.from_csv_text(ref.read_text(encoding="utf-8"), name=Path(filename).stem)


def bundled_matrix(guided: bool) -> GammaMatrix:
    """The cfg1.5 table for guided sampling (guidance_scale > 1), else the unguided one."""
    return load_bundled_matrix(BUNDLED_CFG if guided else BUNDLED_UNGUIDED)


def find_calibrated_matrix(model_source: Union[str, Path, None]) -> Optional[GammaMatrix]:
    """The matrix installed beside a model (`<model folder>/kleinserve_cns_gamma.csv`), if any."""
    if not model_source:
        return None
    path = Path(model_source)
    candidate = path / CALIBRATED_MATRIX_FILENAME if path.is_dir() else None
    if candidate is None or not candidate.is_file():
        return None
    return GammaMatrix.load_csv(candidate)


# --------------------------------------------------------------------------------------------------
# The step noise object (sampling.StepNoise)
# --------------------------------------------------------------------------------------------------
class ColoredStepNoise:
    """sampling.StepNoise for CNS: `churn` per section 1, `draw` returns `xi_c` (section 2) packed.

    White noise is drawn per image from that image's own generator, and only in `draw`, which the
    sampler calls on stochastic steps only (section 5).
    """

    def __init__(
        self,
        params: CNSParams,
        sigmas: Sequence[float],
        *,
        grid_hw: tuple[int, int],
        channels: int,
        generators: Sequence[torch.Generator],
        device: Union[str, torch.device, None] = None,
        matrix: Optional[GammaMatrix] = None,
        matrix_origin: str = "",
    ) -> None:
        if params.gamma_source == "matrix" and matrix is None:
            raise ValueError("cns_gamma_source 'matrix' needs a gamma matrix")
        self.params = params
        self.sigmas = [float(s) for s in sigmas]
        self.num_steps = len(self.sigmas) - 1
        self.grid_hw = (int(grid_hw[0]), int(grid_hw[1]))
        self.channels = int(channels)
        self.generators = list(generators)
        # Noise is colored on x's device; the bin map is placed on `device` (the engine's) up front.
        self.bins = radial_bin_map(*self.grid_hw, params.num_freq_bins, device=device)
        self.matrix = matrix if params.gamma_source == "matrix" else None
        self.matrix_origin = matrix_origin if self.matrix is not None else ""
        self.draws = 0  # stochastic steps drawn so far (for logs and tests)

    # -- section 1 --
    def churn(self, i: int, sigma: float, sigma_next: float) -> float:
        return churn_std(self.params.s_churn, i, self.num_steps, sigma, sigma_next)

    # -- sections 2.3-2.5 --
    def gamma(self, i: int) -> torch.Tensor:
        k = self.params.num_freq_bins
        sigma = self.sigmas[i]
        if self.matrix is None:
            return gamma_approximation(sigma, self.sigmas[0], k)
        return self.matrix.row(sigma, k)

    def amplitudes(self, i: int) -> torch.Tensor:
        p = self.params
        return band_amplitudes(self.gamma(i), tilt_alpha(i, self.num_steps, p), divider=p.gamma_divider,
                               power=p.power_gamma, use_fnorm=p.alpha_use_fnorm)

    # -- sections 2.1, 2.6, 2.7 --
    def white(self, x: torch.Tensor) -> torch.Tensor:
        """One (C, h8, w8) float32 N(0, I) draw per image, on its generator's device, moved to x's."""
        if x.shape[0] != len(self.generators):
            raise ValueError(f"batch of {x.shape[0]} latents but {len(self.generators)} generators")
        shape = (self.channels, *self.grid_hw)
        return torch.stack([
            torch.randn(shape, generator=g, device=g.device, dtype=torch.float32).to(x.device)
            for g in self.generators
        ])

    def draw(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != 4 * self.channels:
            raise ValueError(f"packed latent has {x.shape[-1]} channels, expected 4 x {self.channels}")
        xi = color_noise(self.white(x), self.amplitudes(i), self.bins, self.params.energy_scale)
        self.draws += 1
        return pack_latents(xi)


def make_step_noise(
    request: FluxKleinInput,
    sigmas: list[float],
    *,
    latent_hw: tuple[int, int],
    channels: int,
    generators: list[torch.Generator],
    device,
    guided: bool,
    matrix_override: Optional[GammaMatrix] = None,
) -> Optional[ColoredStepNoise]:
    """The CNS step noise for a request, or None when `enable_cns` is false.

    latent_hw: the VAE-resolution grid (h8, w8) = (H / 8, W / 8); channels: VAE latent channels (32
    for FLUX.2; the packed latent has 4 * channels). generators: one per image, seeded seed + k.
    guided: guidance_scale > 1 (picks the bundled cfg1.5 table). matrix_override: a matrix calibrated
    for the served model, which takes precedence over the bundled ones.
    """
    if not request.enable_cns:
        return None
    params = CNSParams.from_request(request)
    matrix, origin = None, ""
    if params.gamma_source == "matrix":
        if matrix_override is not None:
            matrix, origin = matrix_override, "calibrated"
        else:
            matrix, origin = bundled_matrix(guided), "bundled"
    noise = ColoredStepNoise(params, sigmas, grid_hw=latent_hw, channels=channels, generators=generators,
                             device=device, matrix=matrix, matrix_origin=origin)
    logger.debug(describe(noise))
    return noise


def describe(step_noise: Optional[ColoredStepNoise]) -> str:
    """One log line: which gamma served the request and the CNS settings."""
    if step_noise is None:
        return "CNS off (deterministic Euler)"
    p = step_noise.params
    if step_noise.matrix is not None:
        m = step_noise.matrix
        gamma = f"matrix {m.name} ({step_noise.matrix_origin}, {m.num_rows}x{m.num_bins})"
    else:
        gamma = "approximation (1 - sigma)"
    interp = f"exp k={p.alpha_exp_sharpness:g}" if p.alpha_exp_interp else "linear"
    tilt = "fnorm" if p.alpha_use_fnorm else "flat"
    return (f"CNS on: s_churn={p.s_churn:g}, gamma={gamma}, bins={p.num_freq_bins}, "
            f"alpha {p.alpha_start:g}->{p.alpha_end:g} ({interp}, {tilt}), power={p.power_gamma:g}, "
            f"divider={p.gamma_divider:g}, energy_scale={p.energy_scale:g}")


# --------------------------------------------------------------------------------------------------
# Section 4: calibration
# --------------------------------------------------------------------------------------------------
def step_progress(x0_hat: torch.Tensor, x_final: torch.Tensor, bin_map: torch.Tensor,
                  num_bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-bin progress of one estimate (sections 4.2-4.3), for grid tensors (B, C, h, w).

    Returns (progress (B, K) float64 with empty bins as 0, counts (K,)): per coefficient
    clamp(1 - |X0_hat - X_final|^2 / (|X_final|^2 + 1e-8), 0, 1), averaged over channels, then
    within each radial bin.
    """
    xf = torch.fft.fft2(x_final.to(torch.float32))
    xh = torch.fft.fft2(x0_hat.to(torch.float32))
    prog = (1.0 - (xh - xf).abs() ** 2 / (xf.abs() ** 2 + _PROGRESS_EPS)).clamp(0.0, 1.0)
    per_coeff = prog.mean(dim=1).to(torch.float64).flatten(1)  # (B, h * w)
    idx = bin_map.to(per_coeff.device).flatten()
    sums = torch.zeros(per_coeff.shape[0], num_bins, dtype=torch.float64, device=per_coeff.device)
    sums.index_add_(1, idx, per_coeff)
    counts = torch.bincount(idx, minlength=num_bins).to(torch.float64)
    return (sums / counts.clamp(min=1)).cpu(), counts.cpu()


def normalise_progress(progress: torch.Tensor, sigmas: Sequence[float], counts: torch.Tensor) -> torch.Tensor:
    """Section 4.4 on a (T, K) mean progress table: min-max each bin over time to [0, 1].

    Bins with no coefficient on the grid take values interpolated linearly from their nearest filled
    neighbours (over the bin index); a bin that never changes takes the approximation 1 - sigma / sigma_0
    (min-max scaled the same way), so every entry is finite.
    """
    table = progress.to(torch.float64).clone()
    num_bins = table.shape[1]
    filled = [j for j in range(num_bins) if counts[j] > 0]
    if not filled:
        raise ValueError("no frequency bin has a coefficient")
    for j in range(num_bins):
        if counts[j] > 0:
            continue
        left = max((f for f in filled if f < j), default=None)
        right = min((f for f in filled if f > j), default=None)
        if left is None or right is None:
            table[:, j] = table[:, right if left is None else left]
        else:
            t = (j - left) / (right - left)
            table[:, j] = (1.0 - t) * table[:, left] + t * table[:, right]
    lo = table.min(dim=0).values
    hi = table.max(dim=0).values
    span = hi - lo
    out = (table - lo) / torch.where(span > 1e-12, span, torch.ones_like(span))
    sig = torch.tensor([float(s) for s in sigmas], dtype=torch.float64)
    approx = (1.0 - sig / sig[0]).clamp(0.0, 1.0)
    a_span = approx.max() - approx.min()
    approx = (approx - approx.min()) / a_span if a_span > 0 else torch.zeros_like(approx)
    flat = span <= 1e-12
    out[:, flat] = approx[:, None].expand(-1, int(flat.sum()))
    return out.clamp(0.0, 1.0)


def calibrate(
    engine,
    prompts: Sequence[str],
    *,
    guidance_scale: float,
    width: int,
    height: int,
    num_inference_steps: int,
    seeds: Union[int, Sequence[int]],
    num_freq_bins: int = 32,
    name: str = "calibrated",
    on_sample: Optional[Callable[[int, int], None]] = None,
) -> GammaMatrix:
    """Calibrate a gamma matrix for the engine's model (section 4).

    Runs one deterministic Euler trajectory (CNS off) per (prompt, seed) pair, every prompt with every
    seed, at the given guidance and size, through `engine.sample_latents(request, callback)`. Rows are
    the steps' sigmas sigma_0 .. sigma_{N-1} (from `engine.sigmas(request)`). `on_sample(done, total)`
    reports progress.
    """
    from ..schema import FluxKleinInput

    seed_list = [int(seeds)] if isinstance(seeds, int) else [int(s) for s in seeds]
    if not prompts or not seed_list:
        raise ValueError("calibrate needs at least one prompt and one seed")

    def make_request(prompt: str, seed: int) -> FluxKleinInput:
        return FluxKleinInput(
            prompt=prompt, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
            seed=seed, image_size={"width": width, "height": height}, num_images=1,
            enable_cns=False, enable_safety_checker=False,
        )

    # Grid and schedule depend on size and steps only: the same for every trajectory.
    first = make_request(prompts[0], seed_list[0])
    h8, w8, _channels = engine.latent_grid(first)
    sigmas = [float(s) for s in engine.sigmas(first)]
    total = len(prompts) * len(seed_list)
    acc: Optional[torch.Tensor] = None
    counts: Optional[torch.Tensor] = None
    done = 0
    for prompt in prompts:
        for seed in seed_list:
            request = make_request(prompt, seed)
            estimates: dict[int, torch.Tensor] = {}
            final: dict[str, torch.Tensor] = {}

            # called synchronously within this iteration, so the loop's current dicts are the right ones
            def callback(i: int, x: torch.Tensor, x0_hat: torch.Tensor) -> None:
                estimates[i] = x0_hat.detach().to(torch.float32).clone()  # noqa: B023
                final["x"] = x.detach()  # noqa: B023

            engine.sample_latents(request, callback)
            x_final = final["x"]  # x after the last step
            steps = sorted(estimates)
            if steps != list(range(len(sigmas) - 1)):
                raise RuntimeError(f"sample_latents reported steps {steps} for {len(sigmas) - 1} sigmas")
            bins = radial_bin_map(h8, w8, num_freq_bins, device=x_final.device)
            xf_grid = unpack_latents(x_final.to(torch.float32), (h8, w8))
            est_grid = unpack_latents(torch.cat([estimates[i] for i in steps]).to(x_final.device), (h8, w8))
            prog, cnt = step_progress(est_grid, xf_grid.expand_as(est_grid), bins, num_freq_bins)
            if acc is None:
                acc, counts = prog, cnt
            else:
                acc += prog
            done += 1
            if on_sample is not None:
                on_sample(done, total)
            logger.info("CNS calibration: sample %d/%d done", done, total)
    assert acc is not None and counts is not None
    row_sigmas = sigmas[:-1]
    values = normalise_progress(acc / total, row_sigmas, counts)
    return GammaMatrix(values=values, sigmas=torch.tensor(row_sigmas, dtype=torch.float64), name=name)
