"""CNS through the whole engine on the tiny model: invariants 1 and 8 end to end, and calibration."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from kleinserve.engine import cns
from kleinserve.schema import FluxKleinInput

BASE = {"prompt": "a red cube on a table", "image_size": {"width": 64, "height": 64},
        "num_inference_steps": 5, "seed": 1234, "enable_safety_checker": False, "output_format": "png"}


def request(**overrides) -> FluxKleinInput:
    return FluxKleinInput(**{**BASE, **overrides})


def pixels(result) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(img.data)).convert("RGB")) for img in result.images]


def latents(engine, req: FluxKleinInput) -> torch.Tensor:
    return engine.sample_latents(req).detach().float().clone()


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_s_churn_zero_is_bit_identical_to_cns_off(tiny_engine, guidance):
    off = request(guidance_scale=guidance, enable_cns=False)
    on = request(guidance_scale=guidance, enable_cns=True, cns_s_churn=0.0)
    assert torch.equal(latents(tiny_engine, on), latents(tiny_engine, off))
    res_on, res_off = tiny_engine.generate(on), tiny_engine.generate(off)
    assert all(np.array_equal(a, b) for a, b in zip(pixels(res_on), pixels(res_off), strict=True))
    assert any("CNS on: s_churn=0" in line for line in res_on.logs)


def test_cns_changes_the_image_and_reports_its_matrix(tiny_engine):
    off = latents(tiny_engine, request(guidance_scale=4.0))
    on_req = request(guidance_scale=4.0, enable_cns=True, cns_s_churn=1.0)
    on = latents(tiny_engine, on_req)
    assert torch.isfinite(on).all() and not torch.equal(on, off)
    logs = tiny_engine.generate(on_req).logs
    assert any("gamma_sit_xl2_cfg1.5" in line and "bundled" in line for line in logs)
    logs = tiny_engine.generate(request(guidance_scale=1.0, enable_cns=True)).logs
    assert any("gamma_sit_xl2_unguided" in line for line in logs)


def test_same_seed_reproduces_and_batch_independence(tiny_engine):
    cns_on = {"enable_cns": True, "cns_s_churn": 0.8, "guidance_scale": 4.0}
    a = latents(tiny_engine, request(**cns_on))
    assert torch.equal(a, latents(tiny_engine, request(**cns_on)))
    both = latents(tiny_engine, request(num_images=2, **cns_on))
    first = latents(tiny_engine, request(num_images=1, **cns_on))
    second = latents(tiny_engine, request(num_images=1, seed=BASE["seed"] + 1, **cns_on))
    # Each image gets exactly its own noise (tests/test_cns.py checks the draws bit for bit); the
    # transformer's batched CPU matmuls may still differ in the last bits (~1e-6), as with CNS off.
    # A noise that depended on the batch would move the result by O(0.1).
    torch.testing.assert_close(both[:1], first, rtol=0, atol=1e-4)
    torch.testing.assert_close(both[1:], second, rtol=0, atol=1e-4)
    assert (both[0] - both[1]).abs().max() > 0.1
    assert (first - latents(tiny_engine, request(num_images=1, **{**cns_on, "cns_s_churn": 0.0}))).abs().max() > 0.1


def test_calibrate_on_the_tiny_model(tiny_engine, tmp_path):
    progress = []
    steps = 5
    matrix = cns.calibrate(tiny_engine, ["a red cube on a table", "a forest at dusk"], guidance_scale=3.0,
                           width=64, height=64, num_inference_steps=steps, seeds=[7], num_freq_bins=16,
                           on_sample=lambda done, total: progress.append((done, total)))
    assert progress == [(1, 2), (2, 2)]
    sigmas = tiny_engine.sigmas(request(num_inference_steps=steps))
    assert matrix.values.shape == (steps, 16)
    assert matrix.sigmas.tolist() == sigmas[:-1]
    v = matrix.values
    assert torch.isfinite(v).all() and v.min() >= 0 and v.max() <= 1
    # min-max per bin over time
    torch.testing.assert_close(v.min(dim=0).values, torch.zeros(16, dtype=torch.float64))
    torch.testing.assert_close(v.max(dim=0).values, torch.ones(16, dtype=torch.float64))
    # the last estimate is the final latent: fully resolved
    torch.testing.assert_close(v[-1], torch.ones(16, dtype=torch.float64))

    path = tmp_path / "tiny_gamma.csv"
    matrix.save_csv(path, comment="tiny model, test")
    back = cns.GammaMatrix.load_csv(path)
    assert torch.equal(back.values, matrix.values) and torch.equal(back.sigmas, matrix.sigmas)

    # the calibrated table serves a request (as an installed matrix would)
    req = request(enable_cns=True, guidance_scale=3.0)
    noise = cns.make_step_noise(req, sigmas, latent_hw=(8, 8), channels=tiny_engine.latent_channels,
                                generators=[torch.Generator().manual_seed(1)], device="cpu", guided=True,
                                matrix_override=back)
    assert noise.matrix is back and "calibrated" in cns.describe(noise)
    assert torch.isfinite(noise.draw(0, torch.zeros(1, 16, 4 * tiny_engine.latent_channels))).all()


def test_installed_matrix_serves_the_model(tiny_model_dir, tmp_path):
    import shutil

    from kleinserve.engine import load_engine

    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    values = torch.linspace(0, 1, 6, dtype=torch.float64)[:, None].expand(6, 8)
    cns.GammaMatrix(values=values, sigmas=torch.linspace(1, 0.1, 6), name="x").save_csv(
        folder / cns.CALIBRATED_MATRIX_FILENAME)
    engine = load_engine(str(folder), device="cpu", dtype="float32")
    logs = engine.generate(request(enable_cns=True, guidance_scale=4.0)).logs
    assert any("kleinserve_cns_gamma" in line and "calibrated" in line for line in logs)
    logs = engine.generate(request(enable_cns=True, cns_gamma_source="approximation")).logs
    assert any("approximation" in line for line in logs)
