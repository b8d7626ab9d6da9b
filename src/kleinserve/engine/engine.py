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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional, Union, cast

import numpy as np
import torch
from PIL import Image

from . import cns, sampling
from .acceleration import Accelerator
from .imageio import encode_image, make_preview, normalize_format
from .loras import LoraAdapters
from .models import Components, load_components
from .safety import SafetyChecker
from .text import OUT_LAYERS, PromptEncoder
from .types import (
    CancelCheck,
    EncodedImage,
    GenerationCancelled,
    GenerationResult,
    GenerationTask,
    LoraFile,
    ModelInfo,
    StepCallback,
    StepEvent,
)

log = logging.getLogger("kleinserve.engine")

PREVIEW_MAX_SIDE = 256
REFERENCE_MAX_AREA = 1024 * 1024  # larger reference images are downscaled to about this (as diffusers)


def preview_pool(h16: int, w16: int, pixels_per_token: int, max_side: int = PREVIEW_MAX_SIDE) -> int:
    """The latent pooling factor of a preview: the largest power of two dividing the token grid whose
    decoded image still has a longer side >= max_side (1: decode at full size)."""
    pool = 1
    while (h16 % (2 * pool) == 0 and w16 % (2 * pool) == 0
           and max(h16, w16) * pixels_per_token // (2 * pool) >= max_side):
        pool *= 2
    return pool
RANDOM_SEED_BOUND = 2**31  # seeds drawn for requests without one: 0 .. 2^31-1 (safe in every client)


def _empirical_mu(image_seq_len: int, num_steps: int) -> float:
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    return compute_empirical_mu(image_seq_len=image_seq_len, num_steps=num_steps)


def random_seed() -> int:
    return secrets.randbelow(RANDOM_SEED_BOUND)


@dataclass(frozen=True)
class _ReferenceImage:
    """A reference image after the pipeline's downscale, and the multiple-of-16 size it is cropped to."""

    image: Image.Image
    width: int
    height: int

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


class _Plan:
    """Everything fixed by one request before the first step: sizes, seeds, schedule; and the notes
    (logs, techniques) its result will carry. The seed is request.seed, or a random one when it is None.
    `rows`: its images' rows in the latent batch (all of it for a request that runs alone)."""

    def __init__(self, engine: Engine, request, first_row: int = 0,
                 reference_images: Sequence[Image.Image] = ()):
        self.request = request
        self.seed = int(request.seed) if request.seed is not None else random_seed()
        # Reference images as the pipeline preprocesses them (<= 1 MP, cropped to multiples of 16).
        self.references = [engine.preprocess_reference(im) for im in reference_images]
        if self.references and getattr(request, "image_size", None) is None:
            self.width, self.height = self.references[0].size  # the pipeline's `height or image_height`
        else:
            self.width, self.height = request.resolved_size()
        self.h8, self.w8 = engine.latent_hw(self.width, self.height)
        self.h16, self.w16 = self.h8 // 2, self.w8 // 2
        self.num_images = int(request.num_images)
        self.rows = range(first_row, first_row + self.num_images)
        self.steps = int(request.num_inference_steps)
        # A distilled checkpoint never runs CFG (as diffusers' pipeline with is_distilled).
        self.guided = request.uses_cfg and not engine.info.distilled
        self.guidance = float(request.guidance_scale)
        self.timesteps, self.sigmas = engine._schedule(self.h16 * self.w16, self.steps)
        self.logs: list[str] = []
        self.techniques: list[str] = []
        # (reference tokens (1, N, 4C), their position ids (1, N, 4)), encoded once per request.
        self.reference_tokens: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.loras = False  # LoRA adapters active in this run
        if engine.info.is_tiny:
            self.logs.append("model: tiny (random weights, NOT FLUX.2 [klein]; for tests only)")


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
        # Hot-swapped per run, on the accelerator's adapter tree (a weight-sharing clone): the model that
        # serves requests without LoRAs never carries an adapter.
        self.loras = LoraAdapters(self.accelerator.adapter_model)
        self.safety_threshold = safety_threshold
        # Whether output images carry their recipe (prompt and parameters) in their metadata;
        # `kleinserve serve --no-image-metadata` turns it off.
        self.image_metadata = True
        self._safety: Optional[SafetyChecker] = None
        # A gamma matrix calibrated for this model, installed beside its weights (CNS, docs/CNS.md).
        self._cns_matrix = cns.find_calibrated_matrix(components.extras.get("folder"))
        self._lock = threading.RLock()
        from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

        # The pipeline's reference-image processor (its `vae_scale_factor` counts the 2x2 patch).
        self._image_processor = Flux2ImageProcessor(vae_scale_factor=self.vae_scale_factor * 2)

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

    # ------------------------------------------------------------------ reference images (editing)

    def preprocess_reference(self, image: Image.Image) -> _ReferenceImage:
        """A reference image as Flux2KleinPipeline prepares it: checked (>= 64 px a side, aspect <= 8),
        downscaled (LANCZOS) to about 1 MP when larger, then its size floored to a multiple of 16; the
        crop to that size happens in `_reference_tensor` (the pipeline's preprocess(resize_mode="crop"))."""
        from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

        image = image.convert("RGB") if image.mode != "RGB" else image
        Flux2ImageProcessor.check_image_input(image)
        if image.width * image.height > REFERENCE_MAX_AREA:
            image = Flux2ImageProcessor._resize_to_target_area(image, REFERENCE_MAX_AREA)
        m = self.vae_scale_factor * 2
        width, height = (image.width // m) * m, (image.height // m) * m
        return _ReferenceImage(image, width, height)

    def _encode_references(self, plan: _Plan) -> None:
        """VAE-encode the plan's reference images (the distribution's mode), patchify, BatchNorm-normalise
        and pack them, with position ids T = 10, 20, ... per image: the pipeline's prepare_image_latents."""
        if not plan.references:
            return
        from diffusers.pipelines.flux2.pipeline_flux2_klein import retrieve_latents

        pipe = cns.flux2_pipeline_cls()
        latents = []
        for ref in plan.references:
            pixels = self._image_processor.preprocess(ref.image, height=ref.height, width=ref.width,
                                                      resize_mode="crop")
            pixels = pixels.to(device=self.device, dtype=self.vae.dtype)
            lat = retrieve_latents(self.vae.encode(pixels), sample_mode="argmax")
            lat = pipe._patchify_latents(lat)
            bn_mean = self.vae.bn.running_mean.view(1, -1, 1, 1).to(lat.device, lat.dtype)
            bn_std = torch.sqrt(self.vae.bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(
                lat.device, lat.dtype)
            latents.append((lat - bn_mean) / bn_std)
        ids = pipe._prepare_image_ids(latents).to(self.device)
        tokens = torch.cat([pipe._pack_latents(lat).squeeze(0) for lat in latents], dim=0).unsqueeze(0)
        plan.reference_tokens = (tokens, ids)
        sizes = ", ".join(f"{r.width}x{r.height}" for r in plan.references)
        plan.logs.append(f"{len(plan.references)} reference image(s) ({sizes}): {tokens.shape[1]} tokens "
                         f"of context per step, encoded once")

    def _activate_loras(self, plans: Sequence[_Plan], loras: Sequence[LoraFile]) -> None:
        """Makes exactly this run's LoRA adapters active (none: the base model); notes in each plan."""
        with torch.inference_mode(False):  # adapters loaded now are ordinary parameters
            notes = self.loras.activate(loras)
        for plan in plans:
            plan.loras = bool(loras)
            plan.logs.extend(notes)
            if loras:
                plan.techniques.append("lora")

    def batch_key(self, request) -> Optional[tuple]:
        """Requests with equal keys can share every transformer forward (`generate_batch`); None: this
        one runs alone. Equal keys mean the same latent shape and schedule (size, steps), the same
        branches (CFG on or off), level and CNS settings; prompts, seeds, guidance scales, image counts,
        formats and the safety checker may differ; LoRA sets (paths and scales) must be equal. Edit requests
        run alone. `high` always runs alone: its block cache decides
        per forward whether to skip, so a neighbour would change its images."""
        return request_batch_key(request)

    def generate(
        self,
        request,
        *,
        on_step: Optional[StepCallback] = None,
        should_cancel: Optional[CancelCheck] = None,
        preview_every: int = 0,
        wants_preview: Optional[Callable[[], bool]] = None,
        reference_images: Sequence[Image.Image] = (),
        loras: Sequence[LoraFile] = (),
    ) -> GenerationResult:
        """Run one request to encoded images. Raises GenerationCancelled when should_cancel() says so.
        reference_images: an edit request's decoded images; loras: its LoRA files (see GenerationTask)."""
        task = GenerationTask(request, on_step=on_step, should_cancel=should_cancel, wants_preview=wants_preview,
                              reference_images=tuple(reference_images), loras=tuple(loras))
        outcome = self.generate_batch([task], preview_every=preview_every)[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def generate_batch(
        self, tasks: Sequence[GenerationTask], *, preview_every: int = 0
    ) -> list[Union[GenerationResult, Exception]]:
        """Run requests through one denoising loop: each step is ONE transformer forward over all their
        images (and negative branches). Their `batch_key`s must be equal (ValueError otherwise). Every
        image is the one its request gives alone, up to the batch-shape noise of GEMMs (docs/ENGINE.md).

        Returns one outcome per task, in order: its GenerationResult; GenerationCancelled when its
        should_cancel() said so (from then on its rows leave the forward and it gets no more callbacks;
        the run stops when every task is cancelled); or the exception that failed its own decoding,
        safety check or encoding. A failure of the shared part (encoding, denoising) raises."""
        if not tasks:
            return []
        if len(tasks) > 1:
            keys = {self.batch_key(t.request) for t in tasks}
            if None in keys or len(keys) > 1:
                raise ValueError("these requests cannot share a batch: their Engine.batch_key differs")
            if len({tuple((str(f.file), f.scale) for f in t.loras) for t in tasks}) > 1:
                raise ValueError("these requests cannot share a batch: their LoRA files differ")
        with self._lock, torch.inference_mode():
            t_start = time.perf_counter()
            plans: list[_Plan] = []
            for task in tasks:
                plans.append(_Plan(self, task.request, first_row=plans[-1].rows.stop if plans else 0,
                                   reference_images=task.reference_images))
            self._activate_loras(plans, tasks[0].loras)
            encode_seconds, embeddings = [], []
            for plan in plans:
                t0 = time.perf_counter()
                embeddings.append(self._encode(plan))
                self._encode_references(plan)
                encode_seconds.append(self._sync_time(t0))
            if len(plans) > 1:
                for plan in plans:
                    plan.techniques.append("request_batching")
                    plan.logs.append(f"batched with {len(plans) - 1} other request(s): "
                                     f"{plans[-1].rows.stop} images share each forward")

            outcomes: list[Union[GenerationResult, Exception, None]] = [None] * len(tasks)
            steps_done = [0]
            steps = plans[0].steps

            def live() -> list[int]:
                return [k for k, o in enumerate(outcomes) if o is None]

            def settle(k: int, outcome: Union[GenerationResult, Exception]) -> None:
                outcomes[k] = outcome
                on_done = tasks[k].on_done
                if on_done is not None:
                    on_done(outcome)

            def step_callback(i: int, x: torch.Tensor, x0_hat: torch.Tensor) -> None:
                steps_done[0] = i + 1
                for k in live():
                    task, plan = tasks[k], plans[k]
                    if task.on_step is None:
                        continue
                    preview = None
                    # A preview is a VAE decode: make it only when someone is there to see it.
                    if preview_every > 0 and (i + 1) % preview_every == 0 and (
                            task.wants_preview is None or task.wants_preview()):
                        first = plan.rows.start
                        preview = self._preview(x0_hat[first: first + 1], plan)
                    task.on_step(StepEvent(step=i + 1, total=steps, sigma=plan.sigmas[i + 1], preview=preview))

            def everyone_cancelled() -> bool:
                for k in live():
                    should_cancel = tasks[k].should_cancel
                    if should_cancel is not None and should_cancel():
                        settle(k, GenerationCancelled(f"cancelled before step {steps_done[0] + 1}/{steps}"))
                return not live()

            def live_rows() -> list[int]:
                return [r for k in live() for r in plans[k].rows]

            t0 = time.perf_counter()
            try:
                latents = self._denoise(plans, embeddings, step_callback, everyone_cancelled, live_rows)
            except GenerationCancelled:
                if any(o is None for o in outcomes):  # not ours: a real failure
                    raise
                return cast(list[Union[GenerationResult, Exception]], outcomes)  # every task settled
            t_denoise = self._sync_time(t0)

            for k in live():
                try:
                    outcome: Union[GenerationResult, Exception] = self._finish(
                        plans[k], latents, t_start, {"encode": encode_seconds[k], "denoise": t_denoise})
                except Exception as exc:  # its own decode / safety check / encoding: the others keep theirs
                    outcome = exc
                settle(k, outcome)
            return cast(list[Union[GenerationResult, Exception]], outcomes)  # every task settled

    def _finish(self, plan: _Plan, latents: torch.Tensor, t_start: float,
                timings: dict[str, float]) -> GenerationResult:
        """Decode, safety-check and encode the images of one request from its rows of the latents."""
        t0 = time.perf_counter()
        images = [self._decode(latents[r: r + 1], plan)[0] for r in plan.rows]
        timings["decode"] = self._sync_time(t0)

        t0 = time.perf_counter()
        flags = [False] * len(images)
        if plan.request.enable_safety_checker:
            images, flags = self._check_safety(images, plan.logs)
        timings["safety"] = time.perf_counter() - t0

        encoded = [self._encode_image(im, plan, k, flag)
                   for k, (im, flag) in enumerate(zip(images, flags, strict=True))]
        timings["total"] = time.perf_counter() - t_start
        plan.logs.append(
            f"{plan.num_images} image(s) {plan.width}x{plan.height}, {plan.steps} steps, seed {plan.seed}; "
            + ", ".join(f"{k} {v:.3f}s" for k, v in timings.items())
        )
        log.info(plan.logs[-1])
        return GenerationResult(images=encoded, seed=plan.seed, timings=timings,
                                techniques=_unique(plan.techniques), logs=plan.logs)

    def sample_latents(self, request, callback: Optional[sampling.SamplerCallback] = None,
                       reference_images: Sequence[Image.Image] = (), loras: Sequence[LoraFile] = ()) -> torch.Tensor:
        """The final packed latents (B, seq, 4C) of a request (no decode); `callback(i, x, x0_hat)`
        after each step. For CNS calibration. Uses request.seed (random when None)."""
        with self._lock, torch.inference_mode():
            plan = _Plan(self, request, reference_images=reference_images)
            self._activate_loras([plan], loras)
            embedding = self._encode(plan)
            self._encode_references(plan)
            return self._denoise([plan], [embedding], callback)

    def output_size(self, request, reference_images: Sequence[Image.Image] = ()) -> tuple[int, int]:
        """(width, height) a request generates: its image_size, or an edit's first reference image's."""
        plan = _Plan(self, request, reference_images=reference_images)
        return plan.width, plan.height

    # ------------------------------------------------------------------ stages

    def _sync_time(self, t0: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def _encode(self, plan: _Plan) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(prompt embedding, negative prompt embedding or None without CFG), each (1, 512, D)."""
        texts = [("prompt", plan.request.prompt)]
        if plan.guided:
            texts.append(("negative prompt", plan.request.negative_prompt))
        out, ran = [], False
        for label, text in texts:
            n_tokens = self.text.token_count(text)
            if n_tokens > self.text.max_sequence_length:
                note = (f"text encoder: the {label} is {n_tokens} tokens; only the first "
                        f"{self.text.max_sequence_length} are used, the rest is ignored")
                plan.logs.append(note)
                log.warning(note)
            emb, hit = self.text.encode(text)
            if hit:
                plan.techniques.append("embedding_cache")
                plan.logs.append(f"text encoder: {label} from the embedding cache")
            ran = ran or not hit
            out.append(emb)
        if ran:
            plan.logs.append(f"text encoder: {self.text.num_layers_run} decoder layers run (hidden states "
                             f"{','.join(map(str, OUT_LAYERS))}; later layers and the LM head skipped)")
        return out[0], (out[1] if plan.guided else None)

    def _initial_latents(self, plans: Sequence[_Plan]) -> tuple[torch.Tensor, list[torch.Generator]]:
        """Image k of a request: N(0, I) of shape (1, 4C, h16, w16) from a CPU generator seeded seed + k,
        drawn first (diffusers' randn_tensor with that generator), then packed to (1, h16*w16, 4C);
        the rows of all requests concatenated in order."""
        from diffusers.utils.torch_utils import randn_tensor

        pipe = cns.flux2_pipeline_cls()
        gens, parts = [], []
        for plan in plans:
            for k in range(plan.num_images):
                g = torch.Generator(device="cpu").manual_seed(plan.seed + k)
                z = randn_tensor((1, 4 * self.latent_channels, plan.h16, plan.w16), generator=g,
                                 device=self.device, dtype=self.dtype)
                gens.append(g)
                parts.append(pipe._pack_latents(z))
        return torch.cat(parts, dim=0), gens

    def _denoise(
        self,
        plans: Sequence[_Plan],
        embeddings: Sequence[tuple[torch.Tensor, Optional[torch.Tensor]]],
        callback: Optional[sampling.SamplerCallback],
        should_cancel: Optional[CancelCheck] = None,
        live_rows: Optional[Callable[[], list[int]]] = None,
    ) -> torch.Tensor:
        """The final packed latents of every plan's images (rows in plan order). The plans share size,
        steps, branches, level and CNS settings (`batch_key`). `live_rows()`: the image rows still
        wanted; the others leave the forward (their latents are then left as they were)."""
        pipe = cns.flux2_pipeline_cls()
        first = plans[0]
        x, generators = self._initial_latents(plans)
        rows = x.shape[0]
        grid = x.new_zeros(1, 1, first.h16, first.w16)
        img_ids = pipe._prepare_latent_ids(grid).to(self.device)
        seq = img_ids.shape[1]
        # An edit's reference tokens follow the image tokens in every forward, with their own ids
        # (edits run alone: one plan); the velocity of the image tokens is the first `seq` rows.
        references = first.reference_tokens
        if references is not None:
            img_ids = torch.cat([img_ids, references[1]], dim=1)
        txt_ids = pipe._prepare_text_ids(embeddings[0][0]).to(self.device)  # (1, 512, 4): every prompt
        # Per image row: its request's prompt (and negative prompt) embedding and guidance scale.
        cond = torch.cat([c.expand(p.num_images, -1, -1) for p, (c, _) in zip(plans, embeddings, strict=True)])
        # guided plans (they share `guided`) all have a negative embedding
        uncond = (torch.cat([cast(torch.Tensor, u).expand(p.num_images, -1, -1)
                             for p, (_, u) in zip(plans, embeddings, strict=True)])
                  if first.guided else None)
        scales = [p.guidance for p in plans for _ in p.rows]
        # One scale: a Python float, as diffusers has it; several: float32 per row (see model below).
        guidance: Union[float, torch.Tensor] = scales[0]
        if len(set(scales)) > 1:
            guidance = torch.tensor(scales, dtype=torch.float32, device=self.device).view(-1, 1, 1)

        # The transformer call at the level of the requests (a fresh block cache per run).
        forward, acc_techniques = self.accelerator.forward(first.request.acceleration, adapters=first.loras)
        branches = 2 if first.guided else 1
        for plan in plans:
            plan.techniques.extend(acc_techniques)
            if plan.guided:
                plan.techniques.append("cfg_batched")
                plan.logs.append(f"CFG {plan.guidance:g}: cond + uncond in one batched forward "
                                 f"(batch {branches * rows}) per step")
            else:
                plan.logs.append(f"guidance {plan.guidance:g} <= 1: single branch (batch {rows})")
        # diffusers: t.expand(B).to(latents.dtype), passed as timestep / 1000 (latents are in self.dtype);
        # elementwise, so cast and scaled once for all steps rather than per step.
        model_timesteps = first.timesteps.to(self.dtype) / 1000
        inputs: dict[tuple, tuple] = {}

        def batch_inputs(live: tuple[int, ...]):
            """(context, txt_ids, img_ids, guidance) for the live rows; built once per set of rows."""
            if live not in inputs:
                index = None if len(live) == rows else torch.tensor(live, device=self.device)
                pick = (lambda t: t) if index is None else (lambda t: t.index_select(0, index))
                context = torch.cat([pick(cond), pick(uncond)]) if first.guided else pick(cond)
                n = context.shape[0]
                g = guidance if isinstance(guidance, float) else pick(guidance)
                inputs.clear()  # rows only ever leave: the previous set is not needed again
                inputs[live] = (index, context, txt_ids.expand(n, -1, -1), img_ids.expand(n, -1, -1), g)
            return inputs[live]

        def model(x: torch.Tensor, i: int) -> torch.Tensor:
            live = tuple(live_rows()) if live_rows is not None else tuple(range(rows))
            index, context, txt, img, g = batch_inputs(live)
            hidden = x if index is None else x.index_select(0, index)
            if references is not None:
                hidden = torch.cat([hidden, references[0].expand(hidden.shape[0], -1, -1).to(hidden.dtype)], dim=1)
            hidden = hidden.to(self.dtype)
            if branches == 2:
                hidden = torch.cat([hidden, hidden], dim=0)
            v = forward(
                hidden_states=hidden,
                timestep=model_timesteps[i].expand(hidden.shape[0]),
                guidance=None,
                encoder_hidden_states=context,
                txt_ids=txt,
                img_ids=img,
                joint_attention_kwargs=None,
                return_dict=False,
            )[0]
            if references is not None:
                v = v[:, :seq]
            if branches == 2:
                v_cond, v_uncond = v.chunk(2, dim=0)
                v = sampling.guided_velocity(v_cond, v_uncond, g)
            if index is not None:  # rows that left: zero velocity, their latents stay put
                v = v.new_zeros(x.shape).index_copy_(0, index, v)
            return v

        noise = cns.make_step_noise(  # None unless the requests enable CNS
            first.request, first.sigmas, latent_hw=(first.h8, first.w8), channels=self.latent_channels,
            generators=generators, device=self.device, guided=first.guided, matrix_override=self._cns_matrix,
        )
        if noise is not None:
            for plan in plans:
                plan.logs.append(cns.describe(noise))
                plan.techniques.append("cns")
        x = sampling.sample(model, x, first.sigmas, noise=noise, callback=callback, should_cancel=should_cancel)
        for plan in plans:
            plan.logs.extend(forward.notes())
        return x

    def _unpack_patched(self, packed: torch.Tensor, h16: int, w16: int) -> torch.Tensor:
        """Packed (B, h16*w16, 4C) -> patchified (B, 4C, h16, w16), scattered by the latent ids."""
        pipe = cns.flux2_pipeline_cls()
        ids = pipe._prepare_latent_ids(packed.new_zeros(1, 1, h16, w16)).to(packed.device)
        return pipe._unpack_latents_with_ids(packed, ids.expand(packed.shape[0], -1, -1), h16, w16)

    def unpack_latents(self, packed: torch.Tensor, h8: int, w8: int) -> torch.Tensor:
        """Packed (B, h16*w16, 4C) -> (B, C, h8, w8) VAE-grid latents (still BatchNorm-normalised)."""
        return cns.unpack_latents(packed, (h8, w8))

    def _decode_float(self, packed: torch.Tensor, h16: int, w16: int, pool: int = 1) -> np.ndarray:
        """Packed latents -> images as float32 numpy (B, H, W, 3) in [0, 1] (diffusers' postprocess).
        pool > 1 averages pool x pool latent patches first: an image 1/pool the size, for previews."""
        latents = self._unpack_patched(packed, h16, w16)
        bn_mean = self.vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        bn_std = torch.sqrt(self.vae.bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(
            latents.device, latents.dtype
        )
        latents = latents * bn_std + bn_mean
        if pool > 1:
            latents = torch.nn.functional.avg_pool2d(latents, pool)
        latents = cns.flux2_pipeline_cls()._unpatchify_latents(latents)
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
        """The current x0 estimate of the first image, VAE-decoded and downscaled to <= 256 px.

        The latent is average-pooled first (by the largest power of two that still decodes to >= 256 px),
        so a 1024x768 preview decodes 1/16 of the pixels: a preview costs a fraction of a step instead
        of a full-size VAE decode (on CPU that was more than the denoising itself)."""
        pool = preview_pool(plan.h16, plan.w16, 2 * self.vae_scale_factor, PREVIEW_MAX_SIDE)
        arr = (self._decode_float(x0_hat.to(self.dtype), plan.h16, plan.w16, pool) * 255).round().astype("uint8")
        return make_preview(Image.fromarray(arr[0]), PREVIEW_MAX_SIDE)

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
        if recipe.get("image_urls"):  # data: URIs would put whole images in the metadata
            recipe["image_urls"] = [u if not u.startswith("data:") else f"data:...({len(u)} characters)"
                                    for u in recipe["image_urls"]]
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
        data, content_type = encode_image(image, fmt, self.recipe(plan, k) if self.image_metadata else None)
        return EncodedImage(
            data=data,
            content_type=content_type,
            extension=normalize_format(content_type),
            width=image.width,
            height=image.height,
            seed=plan.seed + k,
            nsfw=nsfw,
        )


def request_batch_key(request) -> Optional[tuple]:
    """`Engine.batch_key`: it reads only the request (so a pool can key requests without loading)."""
    if request.acceleration == "high" or getattr(request, "image_urls", None):
        return None  # edits run alone: their reference tokens are theirs
    cns_params = cns.CNSParams.from_request(request) if request.enable_cns else None
    loras = tuple((str(lora.path), float(lora.scale)) for lora in (getattr(request, "loras", None) or ()))
    return (request.resolved_size(), int(request.num_inference_steps), request.uses_cfg,
            request.acceleration, cns_params, loras)


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
