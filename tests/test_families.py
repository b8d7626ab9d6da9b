"""The klein families: the distilled tiny twin against diffusers (is_distilled: no CFG), the distilled
input schema, `--model FAMILY=SPEC` parsing, the registry of served and unserved families, and the 503
that says how to enable an endpoint without a checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from kleinserve.api.families import build_unserved_router
from kleinserve.endpoints import default_registry
from kleinserve.schema import (
    FAMILIES,
    INPUT_MODELS,
    FluxKleinDistilledEditLoraInput,
    FluxKleinDistilledInput,
    FluxKleinInput,
    family_of,
    parse_model_specs,
)

TOLERANCE = 2 / 255


def pixels(encoded) -> np.ndarray:
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(encoded.data)).convert("RGB"))


@pytest.fixture(scope="module")
def distilled_dir(tmp_path_factory):
    from kleinserve.engine.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-distilled") / "klein-distilled", distilled=True)


def test_distilled_twin_matches_the_distilled_pipeline(distilled_dir, tiny_engine):
    from diffusers import Flux2KleinPipeline

    from kleinserve.engine import load_engine

    pipe = Flux2KleinPipeline.from_pretrained(distilled_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.is_distilled
    request = FluxKleinDistilledInput(prompt="a lighthouse at dusk", seed=3, image_size={"width": 64, "height": 80},
                                      enable_safety_checker=False)
    assert request.num_inference_steps == 4 and not request.uses_cfg
    reference = pipe(prompt="a lighthouse at dusk", height=80, width=64, num_inference_steps=4,
                     generator=torch.Generator("cpu").manual_seed(3), output_type="np").images
    for spec in (str(distilled_dir), "tiny-distilled"):
        engine = load_engine(spec, device="cpu", dtype="float32")
        assert engine.info.distilled and engine.info.is_tiny
        ours = engine.decode_float(engine.sample_latents(request), request)
        assert np.abs(ours - reference).max() <= TOLERANCE, spec
    # a twin, not a copy: the base tiny model gives another image
    base = tiny_engine.decode_float(tiny_engine.sample_latents(request), request)
    assert np.abs(base - reference).max() > 10 * TOLERANCE


def test_a_distilled_checkpoint_never_runs_cfg(distilled_dir):
    from kleinserve.engine import load_engine

    engine = load_engine(str(distilled_dir), device="cpu", dtype="float32")
    kw = dict(prompt="a fox", seed=1, image_size={"width": 64, "height": 64}, num_inference_steps=4,
              enable_safety_checker=False)
    guided = engine.generate(FluxKleinInput(**kw, guidance_scale=5.0))
    plain = engine.generate(FluxKleinDistilledInput(**kw))
    assert np.array_equal(pixels(guided.images[0]), pixels(plain.images[0]))
    assert "cfg_batched" not in guided.techniques


def test_distilled_inputs_have_no_cfg_fields():
    props = FluxKleinDistilledEditLoraInput.model_json_schema()["properties"]
    assert {"guidance_scale", "negative_prompt", "acceleration"}.isdisjoint(props)
    assert {"image_urls", "loras", "prompt", "enable_cns"} <= set(props)
    assert props["num_inference_steps"]["default"] == 4 and props["num_inference_steps"]["maximum"] == 8
    with pytest.raises(ValueError, match="less than or equal to 8"):
        FluxKleinDistilledInput(prompt="x", num_inference_steps=28)
    # fal's clients may still send them: ignored, like any unknown field
    r = FluxKleinDistilledInput(prompt="x", guidance_scale=7, negative_prompt="blurry")
    assert (r.guidance_scale, r.negative_prompt, r.uses_cfg) == (1.0, "", False)


def test_every_family_endpoint_has_its_input_model():
    assert len(INPUT_MODELS) == 16
    assert INPUT_MODELS["fal-ai/flux-2/klein/9b/base/edit"].__name__ == "FluxKleinEditInput"
    assert INPUT_MODELS["fal-ai/flux-2/klein/4b/edit/lora"].__name__ == "FluxKleinDistilledEditLoraInput"
    assert INPUT_MODELS["fal-ai/flux-2/klein/4b/base/lora"].__name__ == "FluxKleinLoraInput"
    assert family_of("fal-ai/flux-2/klein/4b/base/edit").name == "4b-base"
    assert FAMILIES["4b"].licence == "Apache-2.0" and "Non-Commercial" in FAMILIES["9b"].licence


def test_model_specs():
    assert parse_model_specs("auto") == {"9b-base": "auto"}
    assert parse_model_specs("/models/klein") == {"9b-base": "/models/klein"}
    assert parse_model_specs("9b-base=tiny, 9b=tiny-distilled") == {"9b-base": "tiny", "9b": "tiny-distilled"}
    for bad, needle in (("9b-base=tiny,5b=x", "'5b' is not a klein family"), ("9b=", "expected FAMILY=SPEC"),
                        ("9b=a,9b=b", "given twice")):
        with pytest.raises(ValueError, match=needle):
            parse_model_specs(bad)


def test_registry_serves_the_given_families_and_lists_the_others():
    registry = default_registry()
    assert registry.ids() == FAMILIES["9b-base"].endpoint_ids()
    assert set(registry.unserved) == {eid for name in ("9b", "4b-base", "4b") for eid in FAMILIES[name].endpoint_ids()}
    both = default_registry(["9b-base", "4b"])
    assert "fal-ai/flux-2/klein/4b/edit" in both and both.get("fal-ai/flux-2/klein/4b/edit").engine == "4b"
    with pytest.raises(ValueError, match="unknown klein family"):
        default_registry(["9b-base", "12b"])


def test_unserved_endpoints_answer_503_saying_how_to_enable_them():
    app = FastAPI()
    app.include_router(build_unserved_router(default_registry()))
    client = TestClient(app)
    for path in ("/fal-ai/flux-2/klein/9b", "/queue/fal-ai/flux-2/klein/4b/edit",
                 "/fal-ai/flux-2/klein/4b/base/stream"):
        r = client.post(path, json={"prompt": "x"})
        assert r.status_code == 503, path
        assert "--model" in r.json()["detail"] and "not served here" in r.json()["detail"]
    r = client.post("/fal-ai/flux-2/klein/9b/lora", json={})
    assert "--model 9b=<folder or Hugging Face repo id>" in r.json()["detail"]
    assert "black-forest-labs/FLUX.2-klein-9B" in r.json()["detail"]
    # the served family's endpoints are not shadowed
    assert client.post("/fal-ai/flux-2/klein/9b/base", json={}).status_code == 404
