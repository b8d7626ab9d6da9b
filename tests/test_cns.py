"""Colored Noise Sampling: the invariants of /work/shared/cns/SPEC.md section 6 and the pure pieces.

Engine-level checks (tiny model: invariants 1 and 8 end to end, calibration) are in test_cns_engine.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from kleinserve.engine import cns, sampling
from kleinserve.schema import FluxKleinInput

SIGMAS = [1.0, 0.9, 0.75, 0.55, 0.3, 0.0]  # N = 5
GRID = (12, 16)  # (h8, w8): non-square on purpose
CH = 8


def make_request(**overrides) -> FluxKleinInput:
    fields = {"prompt": "p", "enable_cns": True}
    fields.update(overrides)
    return FluxKleinInput(**fields)


def gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def make_noise(seeds=(7,), sigmas=SIGMAS, grid=GRID, channels=CH, guided=False, override=None, **overrides):
    return cns.make_step_noise(make_request(**overrides), list(sigmas), latent_hw=grid, channels=channels,
                               generators=gens(*seeds), device="cpu", guided=guided, matrix_override=override)


def packed_zeros(batch: int, grid=GRID, channels=CH) -> torch.Tensor:
    return torch.zeros(batch, (grid[0] // 2) * (grid[1] // 2), 4 * channels)


def toy_model(x0: torch.Tensor, sigmas):
    """Point-mass data at x0: the exact velocity v = (x - x0) / sigma."""

    def model(x: torch.Tensor, i: int) -> torch.Tensor:
        return (x.float() - x0) / sigmas[i]

    return model


def band_power(xi_grid: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Mean |fft2|^2 per radial bin, averaged over batch and channels."""
    h, w = xi_grid.shape[-2:]
    power = (torch.fft.fft2(xi_grid.double()).abs() ** 2).mean(dim=(0, 1)).flatten()
    idx = cns.radial_bin_map(h, w, num_bins).flatten()
    sums = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, idx, power)
    return sums / torch.bincount(idx, minlength=num_bins).clamp(min=1)


# -------------------------------------------------------------------------------------------------
# Section 6 invariants
# -------------------------------------------------------------------------------------------------
def test_inv1_s_churn_zero_is_bit_identical_to_euler_and_draws_nothing():
    torch.manual_seed(0)
    x0 = torch.randn(2, 48, 4 * CH)
    x_init = torch.randn(2, 48, 4 * CH)

    def model(x, i):  # a non-trivial, deterministic velocity
        return torch.tanh(x * (1.3 + i)) - 0.1 * x0

    noise = make_noise(seeds=(3, 4), cns_s_churn=0.0)
    states = [g.get_state() for g in noise.generators]
    with_cns = sampling.sample(model, x_init.clone(), SIGMAS, noise=noise)
    without = sampling.sample(model, x_init.clone(), SIGMAS, noise=None)
    euler = x_init.clone()
    for i in range(len(SIGMAS) - 1):
        euler = sampling.euler_step(euler, model(euler, i), SIGMAS[i], SIGMAS[i + 1])
    assert torch.equal(with_cns, without)
    assert torch.equal(with_cns, euler)
    assert noise.draws == 0
    assert all(torch.equal(g.get_state(), s) for g, s in zip(noise.generators, states, strict=True))


def test_inv2_no_noise_at_last_step_or_when_next_sigma_is_zero():
    noise = make_noise(cns_s_churn=1.0)
    n = len(SIGMAS) - 1
    assert noise.churn(n - 1, SIGMAS[n - 1], SIGMAS[n]) == 0.0
    assert noise.churn(1, 0.5, 0.0) == 0.0  # sigma_{i+1} = 0 anywhere
    assert all(noise.churn(i, SIGMAS[i], SIGMAS[i + 1]) > 0 for i in range(n - 1))

    drawn: list[int] = []
    real_draw = noise.draw

    def draw(i, x):
        drawn.append(i)
        return real_draw(i, x)

    noise.draw = draw
    x0 = torch.randn(1, 48, 4 * CH)
    sampling.sample(toy_model(x0, SIGMAS), torch.randn(1, 48, 4 * CH), SIGMAS, noise=noise)
    assert drawn == list(range(n - 1))
    # the generator moved by exactly one white tensor per stochastic step
    ref = torch.Generator().manual_seed(7)
    for _ in range(n - 1):
        torch.randn((CH, *GRID), generator=ref)
    assert torch.equal(noise.generators[0].get_state(), ref.get_state())


@pytest.mark.parametrize("energy", [1.0, 0.98, 0.3])
def test_inv3_whiteness_when_all_amplitudes_equal(energy):
    w = torch.randn(3, CH, *GRID, generator=torch.Generator().manual_seed(1))
    expected = energy * (w / w.std(dim=(1, 2, 3), keepdim=True))
    bins = cns.radial_bin_map(*GRID, 32)
    # approximation with alpha = 0: every band gets the same amplitude
    noise = make_noise(cns_gamma_source="approximation", cns_alpha_tilt_start=0.0, cns_alpha_tilt_end=0.0,
                       cns_energy_scale=energy)
    for i in range(len(SIGMAS) - 2):
        a = noise.amplitudes(i)
        assert torch.equal(a, torch.full_like(a, a[0].item()))
        assert torch.equal(cns.color_noise(w, a, bins, energy), expected)
    # divider -> infinity (residual 1 everywhere) with the flat tilt
    g = cns.bundled_matrix(False).row(0.4, 32)
    a = cns.band_amplitudes(g, 0.3, divider=1e300, power=0.75, use_fnorm=False)
    assert torch.equal(cns.color_noise(w, a, bins, energy), expected)


def test_inv4_scale_invariance_of_amplitudes():
    w = torch.randn(2, CH, *GRID, generator=torch.Generator().manual_seed(2))
    bins = cns.radial_bin_map(*GRID, 32)
    a = make_noise().amplitudes(1)
    assert not torch.equal(a, torch.full_like(a, a[0].item()))  # a real filter
    base = cns.color_noise(w, a, bins, 0.98)
    for c in (1e-3, 0.37, 3.7, 1e4):
        torch.testing.assert_close(cns.color_noise(w, a * c, bins, 0.98), base, rtol=1e-5, atol=1e-5)
    # and the amplitude computation itself: scaling the residuals (flat tilt) gives the same a_j
    g = cns.bundled_matrix(True).row(0.6, 32)
    a1 = cns.band_amplitudes(g, 0.0, divider=1.73, power=0.75, use_fnorm=False)
    a2 = cns.band_amplitudes(g, 2.5, divider=1.73, power=0.75, use_fnorm=False)  # (1 + alpha) * r
    torch.testing.assert_close(a1, a2, rtol=1e-12, atol=1e-12)


def _mean_band_power(amplitudes: torch.Tensor, num_bins: int = 16, draws: int = 64) -> torch.Tensor:
    grid = (32, 32)
    bins = cns.radial_bin_map(*grid, num_bins)
    w = torch.randn(draws, 4, *grid, generator=torch.Generator().manual_seed(11))
    return band_power(cns.color_noise(w, amplitudes, bins, 1.0), num_bins)


def test_inv5_direction_tilt_raises_high_bands_and_gamma_lowers_a_band():
    k = 16
    flat_g = torch.full((k,), 0.3, dtype=torch.float64)
    white = _mean_band_power(cns.band_amplitudes(flat_g, 0.0, divider=1.73, power=0.75, use_fnorm=True), k)
    tilted = _mean_band_power(cns.band_amplitudes(flat_g, 1.5, divider=1.73, power=0.75, use_fnorm=True), k)
    lo, hi = slice(1, 5), slice(k - 5, k - 1)
    ratio_white = white[hi].mean() / white[lo].mean()
    ratio_tilted = tilted[hi].mean() / tilted[lo].mean()
    assert ratio_tilted > 1.5 * ratio_white
    # negative tilt does the opposite
    down = _mean_band_power(cns.band_amplitudes(flat_g, -1.5, divider=1.73, power=0.75, use_fnorm=True), k)
    assert down[hi].mean() / down[lo].mean() < ratio_white / 1.5

    # a larger gamma in band j (alpha = 0, power > 0) lowers that band's power relative to the others
    j = 8
    bumped_g = flat_g.clone()
    bumped_g[j] = 0.9
    bumped = _mean_band_power(cns.band_amplitudes(bumped_g, 0.0, divider=1.73, power=0.75, use_fnorm=True), k)
    others = [b for b in range(k) if b != j]
    assert bumped[j] / bumped[others].mean() < 0.7 * (white[j] / white[others].mean())


def test_inv6_tilt_interpolation_endpoints_and_sharpness():
    p = cns.CNSParams.from_request(make_request())
    for n in (4, 28, 50):
        assert cns.tilt_alpha(0, n, p) == p.alpha_start
        assert cns.tilt_alpha(n - 1, n, p) == pytest.approx(p.alpha_end, abs=1e-15)
    assert cns.tilt_alpha(0, 1, p) == p.alpha_start  # N = 1: p = 0
    p_prime = cns.tilt_progress(1, 3, exp_interp=True, sharpness=0.75)  # p = 0.5
    assert round(p_prime, 4) == 0.4073
    assert round(cns.tilt_alpha(1, 3, p), 4) == -0.1148
    # k -> 0 is linear, as is exp_interp off
    assert cns.tilt_progress(1, 3, exp_interp=True, sharpness=0.0) == 0.5
    assert cns.tilt_progress(1, 3, exp_interp=True, sharpness=1e-6) == pytest.approx(0.5, abs=1e-6)
    assert cns.tilt_progress(1, 3, exp_interp=False, sharpness=5.0) == 0.5


@pytest.mark.parametrize("hw", [(8, 8), (12, 16), (16, 12), (7, 10), (96, 128), (1, 6)])
@pytest.mark.parametrize("k", [8, 32, 128])
def test_inv7_bin_map_counts_and_non_square(hw, k):
    h, w = hw
    bins = cns.radial_bin_map(h, w, k)
    assert bins.shape == (h, w) and bins.dtype == torch.long
    assert int(cns.bin_counts(bins, k).sum()) == h * w
    assert int(bins.min()) >= 0 and int(bins.max()) <= k - 1
    if h * w > 1:
        assert int(bins[0, 0]) == 0  # DC
    if h > 1 or w > 1:
        assert int(bins.max()) == k - 1  # the corner (largest radius) is the last bin
    # the definition, literally
    fu, fv = torch.fft.fftfreq(h, dtype=torch.float64), torch.fft.fftfreq(w, dtype=torch.float64)
    rho = torch.sqrt(fu[:, None] ** 2 + fv[None, :] ** 2)
    if rho.max() > 0:
        ref = torch.floor(rho / rho.max() * (k - 1)).long().clamp(0, k - 1)
        assert torch.equal(bins, ref)
    assert cns.radial_bin_map(h, w, k) is bins  # cached


def test_inv7_degenerate_settings_give_finite_output():
    x = packed_zeros(2)
    # divider < max gamma: residuals negative in resolved bands, all zero late in sampling
    for divider in (0.05, 0.3, 1.0):
        noise = make_noise(seeds=(1, 2), cns_gamma_divider=divider)
        for i in range(len(SIGMAS) - 1):
            a = noise.amplitudes(i)
            assert torch.isfinite(a).all() and (a >= 0).all() and a.max() == 1.0
            xi = noise.draw(i, x)
            assert torch.isfinite(xi).all()
            torch.testing.assert_close(cns.unpack_latents(xi, GRID).std(dim=(1, 2, 3)),
                                       torch.full((2,), 0.98), rtol=1e-5, atol=1e-5)
    # all amplitudes zero -> white-noise fallback
    ones = torch.ones(32, dtype=torch.float64)
    assert torch.equal(cns.band_amplitudes(ones, 0.0, divider=0.5, power=0.75, use_fnorm=True), ones)
    assert torch.equal(cns.band_amplitudes(ones, 0.0, divider=1.0, power=2.0, use_fnorm=False), ones)
    # flat tilt with alpha = -1: (1 + alpha) = 0 everywhere -> white
    g = torch.full((32,), 0.2, dtype=torch.float64)
    assert torch.equal(cns.band_amplitudes(g, -1.0, divider=1.73, power=0.75, use_fnorm=False), ones)
    # non-finite gamma -> white, never NaN
    bad = g.clone()
    bad[3] = float("nan")
    assert torch.equal(cns.band_amplitudes(bad, 0.1, divider=1.73, power=0.75, use_fnorm=True), ones)
    # zero energy and constant white input (std 0) stay finite
    bins = cns.radial_bin_map(*GRID, 32)
    assert torch.isfinite(cns.color_noise(torch.zeros(1, CH, *GRID), ones, bins, 1.0)).all()
    assert torch.equal(make_noise(cns_energy_scale=0.0).draw(0, packed_zeros(1)), packed_zeros(1))


def test_inv8_same_seed_reproduces_and_batch_independence():
    x = packed_zeros(3)
    a = make_noise(seeds=(10, 11, 12))
    b = make_noise(seeds=(10, 11, 12))
    for i in range(len(SIGMAS) - 2):
        assert torch.equal(a.draw(i, x), b.draw(i, x))
    batch = make_noise(seeds=(20, 21))
    single = make_noise(seeds=(21,))
    for i in range(len(SIGMAS) - 2):
        both = batch.draw(i, packed_zeros(2))
        one = single.draw(i, packed_zeros(1))
        assert torch.equal(both[1:], one)

    # and through the sampler
    x0 = torch.randn(2, 48, 4 * CH, generator=torch.Generator().manual_seed(3))
    init = torch.randn(2, 48, 4 * CH, generator=torch.Generator().manual_seed(4))

    def model(x, i):
        return torch.tanh(x) - x0[: x.shape[0]] * 0.5

    out2 = sampling.sample(model, init.clone(), SIGMAS, noise=make_noise(seeds=(5, 6), cns_s_churn=0.8))
    out2b = sampling.sample(model, init.clone(), SIGMAS, noise=make_noise(seeds=(5, 6), cns_s_churn=0.8))
    out1 = sampling.sample(model, init[:1].clone(), SIGMAS, noise=make_noise(seeds=(5,), cns_s_churn=0.8))
    assert torch.equal(out2, out2b)
    assert torch.equal(out2[:1], out1)
    assert not torch.equal(out2, sampling.sample(model, init.clone(), SIGMAS, noise=None))


@pytest.mark.parametrize("source", ["matrix", "approximation"])
def test_inv9_unit_std_per_image(source):
    noise = make_noise(seeds=(1, 2, 3), cns_energy_scale=1.0, cns_gamma_source=source)
    for i in range(len(SIGMAS) - 2):
        grid = cns.unpack_latents(noise.draw(i, packed_zeros(3)), GRID)
        torch.testing.assert_close(grid.std(dim=(1, 2, 3)), torch.ones(3), rtol=1e-6, atol=1e-6)
        assert grid.dtype == torch.float32


@pytest.mark.parametrize("s_churn", [0.0, 0.5, 1.0, 10.0])
def test_inv9_point_mass_toy_model_ends_at_x0(s_churn):
    x0 = torch.randn(2, 48, 4 * CH, generator=torch.Generator().manual_seed(9))
    init = torch.randn(2, 48, 4 * CH, generator=torch.Generator().manual_seed(10))
    noise = make_noise(seeds=(1, 2), cns_s_churn=s_churn)
    out = sampling.sample(toy_model(x0, SIGMAS), init, SIGMAS, noise=noise)
    torch.testing.assert_close(out, x0, rtol=1e-6, atol=1e-6)
    assert noise.draws == (len(SIGMAS) - 2 if s_churn > 0 else 0)


# -------------------------------------------------------------------------------------------------
# Step rule and draws
# -------------------------------------------------------------------------------------------------
def test_churn_formula_and_ancestral_clamp():
    sig, nxt = 0.8, 0.6
    r = nxt / sig
    for s_churn in (0.1, 0.5, 1.0):
        assert cns.churn_std(s_churn, 0, 5, sig, nxt) == pytest.approx(nxt * min(1, s_churn * math.sqrt(1 - r * r)))
    assert cns.churn_std(10.0, 0, 5, sig, nxt) == nxt  # clamped at the fully ancestral step
    assert cns.churn_std(0.0, 0, 5, sig, nxt) == 0.0
    # s_churn = 1 matches the SDE level 2 sigma dsigma to first order
    s2 = cns.churn_std(1.0, 0, 5, 0.5, 0.5 - 1e-4) ** 2
    assert s2 == pytest.approx(2 * 0.5 * 1e-4, rel=1e-3)


def test_stochastic_step_follows_the_spec_formula():
    x = torch.randn(1, 48, 4 * CH, generator=torch.Generator().manual_seed(1))
    v = torch.randn(1, 48, 4 * CH, generator=torch.Generator().manual_seed(2))
    xi = torch.randn(1, 48, 4 * CH, generator=torch.Generator().manual_seed(3))

    class Fixed:
        def churn(self, i, sigma, sigma_next):
            return 0.25

        def draw(self, i, x):
            return xi

    seen = {}
    sig = [0.8, 0.6, 0.0]
    out = sampling.sample(lambda xx, i: v if i == 0 else torch.zeros_like(xx), x, sig, noise=Fixed(),
                          callback=lambda i, xx, x0: seen.setdefault(i, (xx, x0)))
    x0_hat = x - 0.8 * v
    eps_hat = x + 0.2 * v
    expected = 0.4 * x0_hat + math.sqrt(0.6**2 - 0.25**2) * eps_hat + 0.25 * xi
    torch.testing.assert_close(seen[0][0], expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(seen[0][1], x0_hat)
    torch.testing.assert_close(out, seen[0][0])  # last step: v = 0, Euler


def test_white_noise_stream_per_image_generator():
    noise = make_noise(seeds=(100, 101), cns_energy_scale=1.0)
    x = packed_zeros(2)
    w1 = noise.white(x)
    w2 = noise.white(x)
    for k, seed in enumerate((100, 101)):
        ref = torch.Generator().manual_seed(seed)
        assert torch.equal(w1[k], torch.randn((CH, *GRID), generator=ref))
        assert torch.equal(w2[k], torch.randn((CH, *GRID), generator=ref))
    with pytest.raises(ValueError):
        noise.draw(0, packed_zeros(3))


def test_draw_colors_by_the_bin_filter():
    noise = make_noise(seeds=(5,))
    ref_gen = torch.Generator().manual_seed(5)
    xi = noise.draw(1, packed_zeros(1))
    w = torch.randn((1, CH, *GRID), generator=ref_gen)
    a = noise.amplitudes(1)
    mask = a.float()[cns.radial_bin_map(*GRID, 32)]
    colored = torch.fft.ifft2(torch.fft.fft2(w) * mask).real
    expected = 0.98 * colored / colored.std()
    torch.testing.assert_close(cns.unpack_latents(xi, GRID), expected, rtol=1e-6, atol=1e-6)


# -------------------------------------------------------------------------------------------------
# Packing
# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid,channels", [((12, 16), 8), ((16, 8), 32), ((2, 2), 4)])
def test_pack_unpack_round_trip(grid, channels):
    z = torch.randn(2, channels, *grid)
    packed = cns.pack_latents(z)
    assert packed.shape == (2, (grid[0] // 2) * (grid[1] // 2), 4 * channels)
    assert torch.equal(cns.unpack_latents(packed, grid), z)
    p = torch.randn(2, (grid[0] // 2) * (grid[1] // 2), 4 * channels)
    assert torch.equal(cns.pack_latents(cns.unpack_latents(p, grid)), p)


def test_pack_layout_matches_flux2():
    # packed token (y, x) row-major; channel c * 4 + dy * 2 + dx holds grid[c, 2y + dy, 2x + dx]
    c, h8, w8 = 3, 4, 6
    z = torch.arange(c * h8 * w8, dtype=torch.float32).reshape(1, c, h8, w8)
    packed = cns.pack_latents(z)
    w16 = w8 // 2
    for ch in range(c):
        for yy in range(h8):
            for xx in range(w8):
                tok = (yy // 2) * w16 + xx // 2
                assert packed[0, tok, ch * 4 + (yy % 2) * 2 + xx % 2] == z[0, ch, yy, xx]
    with pytest.raises(ValueError):
        cns.unpack_latents(torch.zeros(1, 5, 12), (4, 6))


# -------------------------------------------------------------------------------------------------
# Gamma matrices
# -------------------------------------------------------------------------------------------------
def test_bundled_matrices_load():
    for guided, name in ((False, "gamma_sit_xl2_unguided"), (True, "gamma_sit_xl2_cfg1.5")):
        m = cns.bundled_matrix(guided)
        assert m.name == name and m.values.shape == (250, 32)
        assert m.values.min() >= 0 and m.values.max() <= 1
        torch.testing.assert_close(m.sigmas, 1 - torch.arange(250, dtype=torch.float64) / 249)
    assert cns.bundled_matrix(True) is cns.bundled_matrix(True)  # cached


def test_matrix_row_lookup_exact_rows_and_midpoints():
    m = cns.bundled_matrix(True)
    r = m.num_rows
    for k in (0, 1, 17, 124, 248, 249):
        sigma = 1 - k / (r - 1)
        assert m.row_position(sigma) == pytest.approx((1 - sigma) * (r - 1), abs=1e-9)
        torch.testing.assert_close(m.row(sigma), m.values[k], rtol=0, atol=1e-12)
    for k in (0, 50, 200, 248):
        sigma = 1 - (k + 0.5) / (r - 1)
        assert m.row_position(sigma) == pytest.approx(k + 0.5, abs=1e-9)
        torch.testing.assert_close(m.row(sigma), 0.5 * (m.values[k] + m.values[k + 1]), rtol=0, atol=1e-12)
    # a quarter of the way, and the clamped ends
    sigma = 1 - 10.25 / (r - 1)
    torch.testing.assert_close(m.row(sigma), 0.75 * m.values[10] + 0.25 * m.values[11], rtol=0, atol=1e-12)
    assert torch.equal(m.row(1.5), m.values[0]) and torch.equal(m.row(-0.1), m.values[-1])


def test_matrix_row_lookup_by_stored_sigmas():
    # a calibrated table on a shifted (non-uniform) schedule: interpolation is linear in sigma
    values = torch.tensor([[0.0, 0.1], [0.4, 0.5], [1.0, 1.0]], dtype=torch.float64)
    m = cns.GammaMatrix(values=values, sigmas=[1.0, 0.9, 0.3], name="t")
    torch.testing.assert_close(m.row(0.9), values[1])
    torch.testing.assert_close(m.row(0.95), 0.5 * (values[0] + values[1]))
    torch.testing.assert_close(m.row(0.45), 0.25 * values[1] + 0.75 * values[2])
    torch.testing.assert_close(m.row(0.1), values[2])
    with pytest.raises(ValueError):
        cns.GammaMatrix(values=values, sigmas=[1.0, 0.3, 0.9], name="bad")
    with pytest.raises(ValueError):
        cns.GammaMatrix(values=values * 2, sigmas=[1.0, 0.9, 0.3], name="bad")


def test_matrix_column_resampling():
    row = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)  # K' = 3 over f = 0, 0.5, 1
    torch.testing.assert_close(cns.resample_columns(row, 5),
                               torch.tensor([0.0, 0.5, 1.0, 0.75, 0.5], dtype=torch.float64))
    torch.testing.assert_close(cns.resample_columns(row, 2), torch.tensor([0.0, 0.5], dtype=torch.float64))
    assert torch.equal(cns.resample_columns(row, 3), row)
    m = cns.bundled_matrix(False)
    for k in (8, 31, 64, 128):
        g = m.row(0.42, k)
        assert g.shape == (k,)
        assert g[0] == pytest.approx(float(m.row(0.42)[0]))
        assert g[-1] == pytest.approx(float(m.row(0.42)[-1]))
    # K = 2K' - 1: every other column is an original one, the rest midpoints
    full = m.row(0.42)
    g = m.row(0.42, 63)
    torch.testing.assert_close(g[::2], full, rtol=0, atol=1e-12)
    torch.testing.assert_close(g[1::2], 0.5 * (full[:-1] + full[1:]), rtol=0, atol=1e-12)


def test_matrix_selection_by_guidance_and_precedence():
    assert make_noise(guided=False).matrix is cns.bundled_matrix(False)
    assert make_noise(guided=True).matrix is cns.bundled_matrix(True)
    assert make_noise(guided=True).matrix_origin == "bundled"
    custom = cns.GammaMatrix(values=torch.rand(4, 6, dtype=torch.float64), sigmas=[1.0, 0.7, 0.4, 0.1], name="mine")
    chosen = make_noise(guided=True, override=custom)
    assert chosen.matrix is custom and chosen.matrix_origin == "calibrated"
    assert "mine" in cns.describe(chosen) and "calibrated" in cns.describe(chosen)
    assert "gamma_sit_xl2_cfg1.5" in cns.describe(make_noise(guided=True))
    assert "gamma_sit_xl2_unguided" in cns.describe(make_noise(guided=False))
    approx = make_noise(guided=True, override=custom, cns_gamma_source="approximation")
    assert approx.matrix is None and "approximation" in cns.describe(approx)
    assert cns.make_step_noise(make_request(enable_cns=False), SIGMAS, latent_hw=GRID, channels=CH,
                               generators=gens(1), device="cpu", guided=True) is None


def test_approximation_gamma():
    noise = make_noise(cns_gamma_source="approximation")
    for i in range(len(SIGMAS) - 1):
        g = noise.gamma(i)
        assert g.shape == (32,) and torch.all(g == 1 - SIGMAS[i] / SIGMAS[0])


def test_csv_round_trip_and_installed_matrix(tmp_path):
    values = torch.rand(5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    m = cns.GammaMatrix(values=values, sigmas=[1.0, 0.83, 0.6, 0.31, 0.05], name="x")
    path = tmp_path / "m.csv"
    m.save_csv(path, comment="test matrix\nsecond line")
    text = path.read_text()
    assert text.startswith("# test matrix\n# second line\n# kleinserve CNS gamma matrix")
    assert "\nsigma,bin_0," in text
    back = cns.GammaMatrix.load_csv(path)
    assert torch.equal(back.values, m.values) and torch.equal(back.sigmas, m.sigmas)
    assert back.name == "m"
    # installed beside a model folder
    assert cns.find_calibrated_matrix(tmp_path) is None
    m.save_csv(tmp_path / cns.CALIBRATED_MATRIX_FILENAME)
    found = cns.find_calibrated_matrix(str(tmp_path))
    assert found is not None and torch.equal(found.values, m.values)
    assert cns.find_calibrated_matrix("org/repo-id") is None
    assert cns.find_calibrated_matrix(None) is None


def test_csv_without_sigma_column_is_uniform(tmp_path):
    path = tmp_path / "plain.csv"
    path.write_text("# comment\n0,0.5\n0.5,0.75\n1,1\n")
    m = cns.GammaMatrix.load_csv(path)
    assert m.sigmas.tolist() == [1.0, 0.5, 0.0]
    assert m.values.tolist() == [[0, 0.5], [0.5, 0.75], [1, 1]]
    path.write_text("0,0.5\n0.5\n")
    with pytest.raises(ValueError):
        cns.GammaMatrix.load_csv(path)


# -------------------------------------------------------------------------------------------------
# Calibration pieces (the whole run on the tiny model is in test_cns_engine.py)
# -------------------------------------------------------------------------------------------------
def test_step_progress_and_normalisation():
    grid = (8, 8)
    k = 8
    bins = cns.radial_bin_map(*grid, k)
    final = torch.randn(1, 4, *grid, generator=torch.Generator().manual_seed(0))
    prog, counts = cns.step_progress(final.clone(), final, bins, k)
    assert torch.equal(counts, cns.bin_counts(bins, k).double())
    filled = counts > 0
    torch.testing.assert_close(prog[0][filled], torch.ones(int(filled.sum()), dtype=torch.float64))
    prog0, _ = cns.step_progress(torch.zeros_like(final), final, bins, k)
    assert float(prog0[0][filled].max()) < 1e-6  # |X_final|^2 / (|X_final|^2 + eps) ~ 1 -> 0
    table = torch.stack([prog0[0], 0.5 * (prog0[0] + prog[0]), prog[0]])
    out = cns.normalise_progress(table, [1.0, 0.6, 0.2], counts)
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    torch.testing.assert_close(out[0], torch.zeros(k, dtype=torch.float64))
    torch.testing.assert_close(out[-1], torch.ones(k, dtype=torch.float64))


def test_normalisation_fills_empty_and_constant_bins():
    # bins 1 and 4 empty (interpolated from neighbours), bin 3 constant (takes 1 - sigma / sigma_0)
    counts = torch.tensor([3, 0, 2, 5, 0], dtype=torch.float64)
    table = torch.tensor([[0.1, 0.0, 0.2, 0.5, 0.0],
                          [0.3, 0.0, 0.6, 0.5, 0.0],
                          [0.9, 0.0, 0.8, 0.5, 0.0]], dtype=torch.float64)
    out = cns.normalise_progress(table, [1.0, 0.5, 0.2], counts)
    torch.testing.assert_close(out[:, 0], torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64))
    torch.testing.assert_close(out[:, 2], torch.tensor([0.0, 2 / 3, 1.0], dtype=torch.float64))
    torch.testing.assert_close(out[:, 3], torch.tensor([0.0, 0.625, 1.0], dtype=torch.float64))
    torch.testing.assert_close(out[:, 4], out[:, 3])  # empty last bin: copies its left neighbour
    mid = 0.5 * (table[:, 0] + table[:, 2])  # empty bin 1: halfway between bins 0 and 2, then min-max
    torch.testing.assert_close(out[:, 1], (mid - mid.min()) / (mid.max() - mid.min()))
