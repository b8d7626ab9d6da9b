"""The engine: FLUX.2 [klein] text-to-image on diffusers components, with our own denoising loop.

    engine = load_engine("auto" | "tiny" | "/path/to/folder" | "org/repo", device=None, dtype=None,
                         cpu_offload=False)
    result = engine.generate(request, on_step=..., should_cancel=..., preview_every=0)

What `generate` does (docs/ENGINE.md has the long form):
1. encode the prompt and, when guidance_scale > 1, the negative prompt (truncated Qwen3, LRU cache);
2. draw image k's initial latent from its own CPU `torch.Generator` seeded `seed + k`, exactly as
   diffusers' `prepare_latents` would for one image (so any image is reproducible alone and batching
   never changes it); the shifted sigma schedule comes from the scheduler with `compute_empirical_mu`;
3. per step ONE transformer forward; with CFG, cond and uncond are concatenated on the batch axis
   and combined as `v = v_uncond + g * (v_cond - v_uncond)`; the sampler (`sampling.sample`) takes
   Euler steps, or CNS steps when asked;
4. unpack, BatchNorm-denormalise, unpatchify, VAE-decode one image at a time, safety-check, encode.

With negative_prompt="" and CNS off this reproduces diffusers' `Flux2KleinPipeline` (tests/test_parity.py).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from typing import Callable, Optional, Union

import numpy as np
import torch
from PIL import Image

from . import cns, sampling
from .acceleration import Accelerator
from .imageio import encode_image, make_preview, normalize_format
from .models import Components, load_components
from .safety import SafetyChecker
from .text import OUT_LAYERS, PromptEncoder
from .types import (
    CancelCheck,
    EncodedImage,
    GenerationResult,
    ModelInfo,
    StepCallback,
    StepEvent,
)

log = logging.getLogger("kleinserve.engine")

PREVIEW_MAX_SIDE = 256
RANDOM_SEED_BOUND = 2**31  # seeds drawn for requests without one: 0 .. 2^31-1 (safe in every client)


def _empirical_mu(image_seq_len: int, num_steps: int) -> float:
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    return compute_empirical_mu(image_seq_len=image_seq_len, num_steps=num_steps)


def random_seed() -> int:
    return secrets.randbelow(RANDOM_SEED_BOUND)


class _Plan:
    """Everything fixed by a request before the first step: sizes, seeds, schedule.
    The seed is request.seed, or a random one when it is None."""

    def __init__(self, engine: "Engine", request):
        self.request = request
        self.seed = int(request.seed) if request.seed is not None else random_seed()
        self.width, self.height = request.resolved_size()
        self.h8, self.w8 = engine.latent_hw(self.width, self.height)
        self.h16, self.w16 = self.h8 // 2, self.w8 // 2
        self.num_images = int(request.num_images)
        self.steps = int(request.num_inference_steps)
        self.guided = request.uses_cfg
        self.timesteps, self.sigmas = engine._schedule(self.h16 * self.w16, self.steps)


class Engine:
    """A loaded model and the generation loop. `generate` is serialised by a lock."""

    def __init__(
        self,
        components: Components,
        *,
        cpu_offload: bool = False,
        safety_threshold: Optional[float] = None,
        embedding_cache_size: int = 16,
    ):
        self.components = components
        self.info: ModelInfo = components.info
        self.device = torch.device(self.info.device)
        self.transformer = components.transformer
        self.vae = components.vae
        self.scheduler = components.scheduler
        self.dtype = next(self.transformer.parameters()).dtype
        self.text = PromptEncoder(
            components.text_encoder,
            components.tokenizer,
            model_id=components.model_id,
            device=self.device,
            dtype=self.dtype,
            cache_size=embedding_cache_size,
            offload=cpu_offload,
        )
        components.text_encoder = self.text.model  # the truncated encoder; the rest is freed
        self.latent_channels = int(self.transformer.config.in_channels) // 4
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.accelerator = Accelerator(self.transformer, self.device, self.dtype)
        self.safety_threshold = safety_threshold
        self._safety = None
        # A gamma matrix calibrated for this model, installed beside its weights (CNS, docs/CNS.md).
        self._cns_matrix = cns.find_calibrated_matrix(components.extras.get("folder"))
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ geometry and schedule

    def latent_hw(self, width: int, height: int) -> tuple[int, int]:
        """(h8, w8): the VAE latent grid of an image, exactly as diffusers' prepare_latents rounds it."""
        f = self.vae_scale_factor
        return 2 * (int(height) // (f * 2)), 2 * (int(width) // (f * 2))

    def latent_grid(self, request) -> tuple[int, int, int]:
        """(h8, w8, channels) of the VAE-resolution latent of a request (channels = 32 for FLUX.2)."""
        width, height = request.resolved_size()
        return (*self.latent_hw(width, height), self.latent_channels)

    def _schedule(self, image_seq_len: int, steps: int) -> tuple[torch.Tensor, list[float]]:
        """(timesteps, sigmas) as diffusers computes them: linspace(1, 1/N, N) shifted with the
        empirical mu; sigmas has N + 1 entries ending at 0."""
        with self._lock:
            sigmas = np.linspace(1.0, 1 / steps, steps)
            mu = _empirical_mu(image_seq_len, steps)
            self.scheduler.set_timesteps(sigmas=sigmas, device=self.device, mu=mu)
            timesteps = self.scheduler.timesteps.clone()
            sig = [float(s) for s in self.scheduler.sigmas.cpu()]
        return timesteps, sig

    def sigmas(self, request) -> list[float]:
        """The N + 1 sigmas a request is sampled on (1 ... 0)."""
        return _Plan(self, request).sigmas

    # ------------------------------------------------------------------ public API

    @property
    def cns_matrix(self):
        """The gamma matrix calibrated for this model (CNS `matrix` source), or None: bundled tables."""
        return self._cns_matrix

    def set_cns_matrix(self, matrix) -> None:
        """Serve CNS requests with this calibrated `cns.GammaMatrix` (None: back to the bundled ones)."""
        with self._lock:
            self._cns_matrix = matrix

    def warmup(self) -> dict[str, float]:
        """Compile the accelerated levels for every preset size now, so no user request pays for it.
        A no-op where nothing compiles (CPU by default). Returns seconds per warmed shape."""
        with self._lock, torch.inference_mode():
            report = self.accelerator.warmup_presets()
        if report:
            log.info("warm-up: %d shapes in %.1fs", len(report), sum(report.values()))
        return report

    def generate(
        self,
        request,
        *,
        on_step: Optional[StepCallback] = None,
        should_cancel: Optional[CancelCheck] = None,
        preview_every: int = 0,
        wants_preview: Optional[Callable[[], bool]] = None,
    ) -> GenerationResult:
        """Run one request to encoded images. Raises GenerationCancelled when should_cancel() says so."""
        with self._lock, torch.inference_mode():
            t_start = time.perf_counter()
            plan = _Plan(self, request)
            logs: list[str] = []
            techniques: list[str] = []
            if self.info.is_tiny:
                logs.append("model: tiny (random weights, NOT FLUX.2 [klein]; for tests only)")

            t0 = time.perf_counter()
            cond, uncond = self._encode(plan, logs, techniques)
            t_encode = self._sync_time(t0)

            t0 = time.perf_counter()

            def step_callback(i: int, x: torch.Tensor, x0_hat: torch.Tensor) -> None:
                if on_step is None:
                    return
                preview = None
                # A preview is a VAE decode: make it only when someone is there to see it.
                if preview_every > 0 and (i + 1) % preview_every == 0 and (
                        wants_preview is None or wants_preview()):
                    preview = self._preview(x0_hat[:1], plan)
                on_step(StepEvent(step=i + 1, total=plan.steps, sigma=plan.sigmas[i + 1], preview=preview))

            latents = self._denoise(plan, cond, uncond, step_callback, should_cancel, logs, techniques)
            t_denoise = self._sync_time(t0)

            t0 = time.perf_counter()
            images = [self._decode(latents[k : k + 1], plan)[0] for k in range(plan.num_images)]
            t_decode = self._sync_time(t0)

            t0 = time.perf_counter()
            flags = [False] * len(images)
            if request.enable_safety_checker:
                images, flags = self._check_safety(images, logs)
            t_safety = time.perf_counter() - t0

            encoded = [self._encode_image(im, plan, k, flag) for k, (im, flag) in enumerate(zip(images, flags))]
            timings = {
                "encode": t_encode,
                "denoise": t_denoise,
                "decode": t_decode,
                "safety": t_safety,
                "total": time.perf_counter() - t_start,
            }
            logs.append(
                f"{plan.num_images} image(s) {plan.width}x{plan.height}, {plan.steps} steps, seed {plan.seed}; "
                + ", ".join(f"{k} {v:.3f}s" for k, v in timings.items())
            )
            log.info(logs[-1])
            return GenerationResult(images=encoded, seed=plan.seed, timings=timings,
                                    techniques=_unique(techniques), logs=logs)

    def sample_latents(self, request, callback: Optional[sampling.SamplerCallback] = None) -> torch.Tensor:
        """The final packed latents (B, seq, 4C) of a request (no decode); `callback(i, x, x0_hat)`
        after each step. For CNS calibration. Uses request.seed (random when None)."""
        with self._lock, torch.inference_mode():
            plan = _Plan(self, request)
            cond, uncond = self._encode(plan, [], [])
            return self._denoise(plan, cond, uncond, callback, None, [], [])

    # ------------------------------------------------------------------ stages

    def _sync_time(self, t0: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def _encode(self, plan: _Plan, logs: list[str], techniques: list[str]):
        texts = [("prompt", plan.request.prompt)]
        if plan.guided:
            texts.append(("negative prompt", plan.request.negative_prompt))
        out, ran = [], False
        for label, text in texts:
            emb, hit = self.text.encode(text)
            if hit:
                techniques.append("embedding_cache")
                logs.append(f"text encoder: {label} from the embedding cache")
            ran = ran or not hit
            out.append(emb)
        if ran:
            logs.append(f"text encoder: {self.text.num_layers_run} decoder layers run (hidden states "
                        f"{','.join(map(str, OUT_LAYERS))}; later layers and the LM head skipped)")
        return out[0], (out[1] if plan.guided else None)

    def _initial_latents(self, plan: _Plan) -> tuple[torch.Tensor, list[torch.Generator]]:
        """Image k: N(0, I) of shape (1, 4C, h16, w16) from a CPU generator seeded seed + k, drawn
        first (diffusers' randn_tensor with that generator), then packed to (1, h16*w16, 4C)."""
        from diffusers.utils.torch_utils import randn_tensor

        pipe = cns.flux2_pipeline_cls()
        gens, parts = [], []
        for k in range(plan.num_images):
            g = torch.Generator(device="cpu").manual_seed(plan.seed + k)
            z = randn_tensor((1, 4 * self.latent_channels, plan.h16, plan.w16), generator=g,
                             device=self.device, dtype=self.dtype)
            gens.append(g)
            parts.append(pipe._pack_latents(z))
        return torch.cat(parts, dim=0), gens

    def _denoise(self, plan: _Plan, cond, uncond, callback, should_cancel, logs, techniques) -> torch.Tensor:
        pipe = cns.flux2_pipeline_cls()
        x, generators = self._initial_latents(plan)
        b = plan.num_images
        grid = x.new_zeros(1, 1, plan.h16, plan.w16)
        img_ids = pipe._prepare_latent_ids(grid).to(self.device)
        txt_ids = pipe._prepare_text_ids(cond).to(self.device)  # (1, 512, 4), same for cond and uncond
        if plan.guided:
            branches = 2
            context = torch.cat([cond.expand(b, -1, -1), uncond.expand(b, -1, -1)], dim=0)
        else:
            branches = 1
            context = cond.expand(b, -1, -1)
        n = branches * b
        img_ids = img_ids.expand(n, -1, -1)
        txt_ids = txt_ids.expand(n, -1, -1)

        # The transformer call at the request's acceleration level (a fresh block cache per run).
        forward, acc_techniques = self.accelerator.forward(plan.request.acceleration)
        techniques.extend(acc_techniques)
        if plan.guided:
            techniques.append("cfg_batched")
            logs.append(f"CFG {plan.request.guidance_scale:g}: cond + uncond in one batched forward "
                        f"(batch {n}) per step")
        else:
            logs.append(f"guidance {plan.request.guidance_scale:g} <= 1: single branch (batch {n})")
        g = float(plan.request.guidance_scale)
        # diffusers: t.expand(B).to(latents.dtype), passed as timestep / 1000 (latents are in self.dtype);
        # elementwise, so cast and scaled once for all steps rather than per step.
        model_timesteps = plan.timesteps.to(self.dtype) / 1000

        def model(x: torch.Tensor, i: int) -> torch.Tensor:
            hidden = x.to(self.dtype)
            if branches == 2:
                hidden = torch.cat([hidden, hidden], dim=0)
            v = forward(
                hidden_states=hidden,
                timestep=model_timesteps[i].expand(n),
                guidance=None,
                encoder_hidden_states=context,
                txt_ids=txt_ids,
                img_ids=img_ids,
                joint_attention_kwargs=None,
                return_dict=False,
            )[0]
            if branches == 2:
                v_cond, v_uncond = v.chunk(2, dim=0)
                v = v_uncond + g * (v_cond - v_uncond)
            return v

        noise = cns.make_step_noise(  # None unless request.enable_cns
            plan.request, plan.sigmas, latent_hw=(plan.h8, plan.w8), channels=self.latent_channels,
            generators=generators, device=self.device, guided=plan.guided, matrix_override=self._cns_matrix,
        )
        if noise is not None:
            logs.append(cns.describe(noise))
            techniques.append("cns")
        x = sampling.sample(model, x, plan.sigmas, noise=noise, callback=callback, should_cancel=should_cancel)
        logs.extend(forward.notes())
        return x

    def _unpack_patched(self, packed: torch.Tensor, h16: int, w16: int) -> torch.Tensor:
        """Packed (B, h16*w16, 4C) -> patchified (B, 4C, h16, w16), scattered by the latent ids."""
        pipe = cns.flux2_pipeline_cls()
        ids = pipe._prepare_latent_ids(packed.new_zeros(1, 1, h16, w16)).to(packed.device)
        return pipe._unpack_latents_with_ids(packed, ids.expand(packed.shape[0], -1, -1), h16, w16)

    def unpack_latents(self, packed: torch.Tensor, h8: int, w8: int) -> torch.Tensor:
        """Packed (B, h16*w16, 4C) -> (B, C, h8, w8) VAE-grid latents (still BatchNorm-normalised)."""
        return cns.unpack_latents(packed, (h8, w8))

    def _decode_float(self, packed: torch.Tensor, h16: int, w16: int) -> np.ndarray:
        """Packed latents -> images as float32 numpy (B, H, W, 3) in [0, 1] (diffusers' postprocess)."""
        latents = self._unpack_patched(packed, h16, w16)
        bn_mean = self.vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        bn_std = torch.sqrt(self.vae.bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(
            latents.device, latents.dtype
        )
        latents = cns.flux2_pipeline_cls()._unpatchify_latents(latents * bn_std + bn_mean)
        image = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0].float()
        return (image / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy()

    def decode_float(self, packed: torch.Tensor, request) -> np.ndarray:
        """Decoded images as float32 numpy (B, H, W, 3) in [0, 1], before 8-bit quantisation
        (what diffusers returns with output_type="np")."""
        h8, w8, _ = self.latent_grid(request)
        with self._lock, torch.inference_mode():
            return self._decode_float(packed, h8 // 2, w8 // 2)

    def _decode(self, packed: torch.Tensor, plan: _Plan) -> list[Image.Image]:
        arr = (self._decode_float(packed, plan.h16, plan.w16) * 255).round().astype("uint8")
        return [Image.fromarray(a) for a in arr]

    def _preview(self, x0_hat: torch.Tensor, plan: _Plan) -> Image.Image:
        """The current x0 estimate of the first image, VAE-decoded and downscaled to <= 256 px."""
        return make_preview(self._decode(x0_hat.to(self.dtype), plan)[0], PREVIEW_MAX_SIDE)

    def _check_safety(self, images: list[Image.Image], logs: list[str]) -> tuple[list[Image.Image], list[bool]]:
        """(images with the flagged ones blackened, flags)."""
        if self._safety is None:
            self._safety = SafetyChecker(threshold=self.safety_threshold)
        images, flags = self._safety.apply(images)
        if any(flags):
            logs.append(f"safety checker: {sum(flags)} image(s) flagged and replaced by black images")
        return images, flags

    def recipe(self, plan: _Plan, k: int) -> dict:
        """The generation parameters stored in image k's metadata: re-running them (num_images=1,
        seed = seed + k) reproduces exactly this image."""
        recipe = plan.request.model_dump(mode="json")
        recipe.update(
            seed=plan.seed + k,
            num_images=1,
            image_size={"width": plan.width, "height": plan.height},
            base_seed=plan.seed,
            image_index=k,
            model=self.info.source,
        )
        if self.info.is_tiny:
            recipe["model_is_tiny"] = True
        return recipe

    def _encode_image(self, image: Image.Image, plan: _Plan, k: int, nsfw: bool) -> EncodedImage:
        fmt = plan.request.output_format
        data, content_type = encode_image(image, fmt, self.recipe(plan, k))
        return EncodedImage(
            data=data,
            content_type=content_type,
            extension=normalize_format(content_type),
            width=image.width,
            height=image.height,
            seed=plan.seed + k,
            nsfw=nsfw,
        )


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def load_engine(
    spec: Optional[str] = "auto",
    *,
    device: Union[str, torch.device, None] = None,
    dtype: Union[str, torch.dtype, None] = None,
    cpu_offload: bool = False,
    safety_threshold: Optional[float] = None,
) -> Engine:
    """Load a model spec ("auto", "tiny", a diffusers folder, a HF repo id) into an Engine.

    Raises ModelUnavailable (with what to do) when the spec cannot be loaded."""
    components = load_components(spec, device=device, dtype=dtype, cpu_offload=cpu_offload)
    return Engine(components, cpu_offload=cpu_offload, safety_threshold=safety_threshold)
