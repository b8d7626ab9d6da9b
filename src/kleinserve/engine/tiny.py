"""The `tiny` model: FLUX.2 [klein]'s real component classes with tiny random weights.

Built in-process (no download), seeded, so the weights are identical on every machine with the same
torch version. It exercises every code path of the real model -- the 36-layer Qwen3 text encoder read
at layers 9/18/27 (so the truncation after layer 27 is real), the chat template, 512-token padding,
the 32-channel VAE latent patchified to 128 channels with BatchNorm statistics, the Flux2 transformer
with 4-axis RoPE, and the dynamically shifted flow-matching schedule -- but its images are noise-like
patterns, NOT FLUX.2 images. Serving it is always announced (`ModelInfo.is_tiny`, a log banner).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from .text import OUT_LAYERS

TINY_SEED = 20260115

# Text encoder: the real depth (36 layers, read at text.OUT_LAYERS = 9/18/27), tiny width.
TEXT_LAYERS = 36
TEXT_HIDDEN = 32
# Transformer: real in/out channels (128 = 32 VAE channels x 2x2 patch), tiny width, and one block of
# each kind (a double-stream block, then a single-stream one: the real model's 8 + 24 in miniature).
# At the default 1024x768 the sequence is 3,072 image + 512 text tokens and attention is ~80% of a
# step, so each block costs ~30 ms a forward on a 2-core CPU: one of each keeps the default request
# (28 steps, CFG, previews) to a few seconds there (docs/ENGINE.md, "The tiny model").
TRANSFORMER_DOUBLE_BLOCKS = 1
TRANSFORMER_SINGLE_BLOCKS = 1
TRANSFORMER_HEADS = 2
TRANSFORMER_HEAD_DIM = 16
LATENT_CHANNELS = 32

# The real klein scheduler config (diffusers layout, scheduler/scheduler_config.json): Flux's flow
# matching schedule with dynamic (resolution-dependent) exponential shifting; the pipeline passes
# `mu = compute_empirical_mu(...)` so base/max shift only matter to callers that do not.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
    invert_sigmas=False,
    shift_terminal=None,
    use_karras_sigmas=False,
    use_exponential_sigmas=False,
    use_beta_sigmas=False,
    time_shift_type="exponential",
    stochastic_sampling=False,
)

# Qwen3's chat template, reduced to what text-to-image prompting uses (user/assistant turns and the
# `enable_thinking=False` empty think block). Same whitespace as the real template.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EXTRA_TOKENS = ("<think>", "</think>")
NUM_MERGES = 320
TINY_MARKER = "KLEINSERVE_TINY"  # file written beside a saved tiny model, so loading it stays loud

# A fixed corpus for the tokenizer's merges: prompt-like English.
_CORPUS = """
a photo of a cat sitting on a windowsill in the morning light, soft focus, warm colors
a red fox resting in fresh snow under soft winter light, detailed fur, gentle bokeh
portrait of an old fisherman with a weathered face, dramatic lighting, high detail
a futuristic city skyline at night with neon lights reflecting on wet streets
an astronaut riding a horse on the surface of the moon, cinematic, wide angle
a bowl of fresh fruit on a wooden table, still life painting in the style of the dutch masters
a small cactus with a happy face in the sahara desert, sunny day, blue sky
a mountain landscape with a lake and pine trees, golden hour, photorealistic
watercolor illustration of a lighthouse on a rocky coast with crashing waves
a cozy living room with a fireplace, plants, books and a sleeping dog
close-up of a hummingbird hovering near red flowers, frozen wings, detailed feathers
a steaming cup of coffee next to an open notebook, minimalist, top view
the quick brown fox jumps over the lazy dog; a cat holding a sign that says hello world
blurry, low quality, distorted, ugly, watermark, text, oversaturated, deformed hands
"""


def _train_merges(alphabet_words: Counter, num_merges: int) -> list[tuple[str, str]]:
    """Plain BPE on a word-frequency table; ties broken lexicographically, so fully deterministic."""
    words = {tuple(w): c for w, c in alphabet_words.items()}
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:], strict=False):
                pairs[(a, b)] += c
        if not pairs:
            break
        best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        merges.append(best)
        merged = best[0] + best[1]
        new_words: dict[tuple[str, ...], int] = {}
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + c
        words = new_words
    return merges


def build_tokenizer():
    """A real byte-level BPE fast tokenizer (the Qwen2 class the pipeline expects), built in-process."""
    from tokenizers import AddedToken, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    # Pre-tokenize the corpus exactly as the tokenizer will (Qwen regex split + byte-level mapping).
    probe = Qwen2TokenizerFast(vocab={"<|endoftext|>": 0}, merges=[])
    pre = probe.backend_tokenizer.pre_tokenizer
    words: Counter = Counter()
    for line in _CORPUS.strip().splitlines():
        for piece, _ in pre.pre_tokenize_str(line):
            words[piece] += 1
    merges = _train_merges(words, NUM_MERGES)

    vocab: dict[str, int] = {}
    for tok in (*SPECIAL_TOKENS[:1], *alphabet, *(a + b for a, b in merges)):
        vocab.setdefault(tok, len(vocab))
    tokenizer = Qwen2TokenizerFast(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=131072,
    )
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS[1:]])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in EXTRA_TOKENS])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _vocab_size(tokenizer) -> int:
    return ((len(tokenizer) + 63) // 64) * 64


def build_text_encoder(vocab_size: int):
    """Qwen3ForCausalLM with the real depth (36) and a tiny width. Caller seeds."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():  # unit-scale token embeddings, so the prompt visibly steers the tiny model
        model.model.embed_tokens.weight.normal_(0.0, 1.0)
    return model.eval()


def build_transformer():
    from diffusers import Flux2Transformer2DModel

    model = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,
        num_layers=TRANSFORMER_DOUBLE_BLOCKS,
        num_single_layers=TRANSFORMER_SINGLE_BLOCKS,
        attention_head_dim=TRANSFORMER_HEAD_DIM,
        num_attention_heads=TRANSFORMER_HEADS,
        joint_attention_dim=len(OUT_LAYERS) * TEXT_HIDDEN,
        timestep_guidance_channels=256,
        mlp_ratio=3.0,
        axes_dims_rope=(4, 4, 4, 4),
        rope_theta=2000,
        eps=1e-6,
        guidance_embeds=False,
    )
    # Default init gives near-uniform attention over 512 text + image tokens and tiny modulation
    # gates, so the prompt would barely matter (and a swapped cond/uncond would go unnoticed). Sharper
    # attention (QK-norm gains) and larger modulation make the velocity clearly prompt-dependent.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight")):
                param.mul_(6.0)
            elif "modulation" in name:
                param.mul_(6.0)
    return model.eval()


def build_vae():
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,  # 4 blocks: the real /8 scale factor
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=64,
        use_quant_conv=True,
        use_post_quant_conv=True,
        mid_block_add_attention=True,
        batch_norm_eps=1e-4,
        patch_size=(2, 2),
    )
    # Non-trivial BatchNorm statistics, so the latent (de)normalisation is exercised.
    with torch.no_grad():
        vae.bn.running_mean.copy_(0.1 * torch.randn_like(vae.bn.running_mean))
        vae.bn.running_var.copy_(0.5 + torch.rand_like(vae.bn.running_var))
    return vae.eval()


def build_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)


TINY_DISTILLED_SEED_OFFSET = 101  # the distilled twin: same classes and text encoder, its own transformer


def build_tiny_components(distilled: bool = False) -> dict:
    """All five pipeline components (keys as in Flux2KleinPipeline's constructor), float32, CPU.

    Seeded without touching the caller's global RNG state.
    """
    with torch.random.fork_rng(devices=[]):
        tokenizer = build_tokenizer()
        torch.manual_seed(TINY_SEED)
        text_encoder = build_text_encoder(_vocab_size(tokenizer))
        torch.manual_seed(TINY_SEED + 1 + (TINY_DISTILLED_SEED_OFFSET if distilled else 0))
        transformer = build_transformer()
        torch.manual_seed(TINY_SEED + 2)
        vae = build_vae()
    return {
        "scheduler": build_scheduler(),
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "transformer": transformer,
    }


def save_tiny_model(path: str | Path, distilled: bool = False) -> Path:
    """Write the tiny model as a diffusers-layout folder (loadable by Flux2KleinPipeline and by us).
    distilled: the distilled twin (`tiny-distilled`: its own transformer weights, is_distilled=True)."""
    from diffusers import Flux2KleinPipeline

    path = Path(path)
    Flux2KleinPipeline(**build_tiny_components(distilled), is_distilled=distilled).save_pretrained(path)
    (path / TINY_MARKER).write_text("random tiny test weights built by kleinserve.engine.tiny; NOT FLUX.2\n")
    return path


# LoRA files for the tiny transformer (tests: formats, hot-swap, parity with diffusers' load_lora_weights).
TINY_LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "ff.linear_in")


def save_tiny_lora(path: str | Path, *, layout: str = "diffusers", seed: int = 1, rank: int = 4,
                   alpha: float = 8.0, strength: float = 0.5) -> Path:
    """A random LoRA for the tiny transformer, written as one .safetensors file in `layout`:

    - "diffusers": PEFT keys `transformer.<module>.lora_A/B.weight` with PEFT metadata (rank, alpha),
      as `Flux2KleinPipeline.save_lora_weights` writes them;
    - "kohya": `lora_unet_{double,single}_blocks_N_<name>.lora_down/lora_up.weight` + `.alpha`, with the
      fused img/txt qkv of the original BFL layout (what kohya/ComfyUI trainers write);
    - "bfl": `diffusion_model.{double,single}_blocks.N.*.lora_A/B.weight` (BFL / ai-toolkit / fal's trainer);
    - "lokr": LyCORIS LoKr `lycoris_transformer_blocks_N_<module>.lokr_w1/lokr_w2` (W += kron(w1, w2)).
    `strength` sizes the weights so the LoRA changes the image clearly (but not to noise)."""
    from diffusers import Flux2KleinPipeline
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    transformer = build_transformer()
    g = torch.Generator("cpu").manual_seed(seed)
    modules = dict(transformer.named_modules())

    def pair(in_f: int, out_f: int) -> tuple[torch.Tensor, torch.Tensor]:
        down = torch.randn(rank, in_f, generator=g) * (strength / in_f ** 0.5)
        up = torch.randn(out_f, rank, generator=g) * (strength / rank ** 0.5)
        return down, up

    if layout == "diffusers":
        layers = {}
        targets = [name for name in modules for t in TINY_LORA_TARGETS
                   if name.endswith(t) and name.startswith(("transformer_blocks.", "single_transformer_blocks."))]
        targets += [n for n in modules if n.startswith("single_transformer_blocks.") and n.endswith("attn.to_out")]
        for name in targets:
            lin = modules[name]
            down, up = pair(lin.in_features, lin.out_features)
            layers[f"{name}.lora_A.weight"] = down
            layers[f"{name}.lora_B.weight"] = up
        metadata = {"r": rank, "lora_alpha": alpha, "target_modules": sorted({n for n in targets})}
        Flux2KleinPipeline.save_lora_weights(path.parent, transformer_lora_layers=layers, weight_name=path.name,
                                             transformer_lora_adapter_metadata=metadata)
        return path
    if layout == "kohya":
        sd: dict[str, torch.Tensor] = {}
        blocks = transformer.transformer_blocks
        for i, block in enumerate(blocks):
            dim = block.attn.to_q.in_features
            for key, (in_f, out_f) in {
                f"lora_unet_double_blocks_{i}_img_attn_qkv": (dim, 3 * block.attn.to_q.out_features),
                f"lora_unet_double_blocks_{i}_img_attn_proj": (block.attn.to_out[0].in_features,
                                                               block.attn.to_out[0].out_features),
                f"lora_unet_double_blocks_{i}_txt_mlp_0": (block.ff_context.linear_in.in_features,
                                                           block.ff_context.linear_in.out_features),
            }.items():
                down, up = pair(in_f, out_f)
                sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
                sd[f"{key}.alpha"] = torch.tensor(float(alpha))
        for i, block in enumerate(transformer.single_transformer_blocks):
            lin = block.attn.to_qkv_mlp_proj
            down, up = pair(lin.in_features, lin.out_features)
            sd[f"lora_unet_single_blocks_{i}_linear1.lora_down.weight"] = down
            sd[f"lora_unet_single_blocks_{i}_linear1.lora_up.weight"] = up
            sd[f"lora_unet_single_blocks_{i}_linear1.alpha"] = torch.tensor(float(alpha))
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        return path
    if layout == "bfl":  # BFL / ai-toolkit names (what fal's trainer writes): diffusion_model.*, fused qkv
        sd = {}
        for i, block in enumerate(transformer.transformer_blocks):
            dim = block.attn.to_q.in_features
            for key, (in_f, out_f) in {
                f"double_blocks.{i}.img_attn.qkv": (dim, 3 * block.attn.to_q.out_features),
                f"double_blocks.{i}.txt_attn.qkv": (dim, 3 * block.attn.add_q_proj.out_features),
            }.items():
                down, up = pair(in_f, out_f)
                sd[f"diffusion_model.{key}.lora_A.weight"], sd[f"diffusion_model.{key}.lora_B.weight"] = down, up
        for i, block in enumerate(transformer.single_transformer_blocks):
            lin = block.attn.to_qkv_mlp_proj
            down, up = pair(lin.in_features, lin.out_features)
            sd[f"diffusion_model.single_blocks.{i}.linear1.lora_A.weight"] = down
            sd[f"diffusion_model.single_blocks.{i}.linear1.lora_B.weight"] = up
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        return path
    if layout == "lokr":  # LyCORIS LoKr (W += kron(w1, w2)) on the diffusers module names, as LyCORIS writes them
        sd = {}
        for name, lin in modules.items():
            if not (name.startswith("transformer_blocks.") and name.endswith(TINY_LORA_TARGETS)
                    and isinstance(lin, torch.nn.Linear)):
                continue
            _, idx, sub = name.split(".", 2)
            key = f"lycoris_transformer_blocks_{idx}_{sub.replace('.', '_')}"
            sd[f"{key}.lokr_w1"] = torch.randn(2, 2, generator=g) * strength
            sd[f"{key}.lokr_w2"] = torch.randn(lin.out_features // 2, lin.in_features // 2, generator=g) * (
                strength / lin.in_features ** 0.5)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        return path
    raise ValueError(f"unknown LoRA layout {layout!r}: diffusers | kohya | bfl | lokr")
