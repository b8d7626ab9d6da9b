"""Prompt encoding: the Qwen3 text encoder read at layers 9, 18 and 27, truncated, with an LRU cache.

Same result as diffusers' `Flux2KleinPipeline._get_qwen3_prompt_embeds` (chat template, right-padded
to 512 tokens, `hidden_states[k]` for k in (9, 18, 27) stacked into (B, 512, 3 * hidden)), but:

- only the decoder layers up to the deepest one read are kept and run (27 of 36 on the real model);
  the LM head and the final norm are never run. `hidden_states[k]` of transformers is the output of
  decoder layer k-1 (index 0 is the embedding output; the *last* entry is after the final norm), so
  we capture the outputs of layers k-1 with forward hooks rather than trusting the last entry;
- each text is encoded alone (its embedding never depends on what else is in a batch) and kept in
  an LRU cache keyed by (model id, text), so repeated prompts and the empty negative prompt skip the
  encoder entirely.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

OUT_LAYERS = (9, 18, 27)
MAX_SEQUENCE_LENGTH = 512


def base_model(text_encoder: nn.Module) -> nn.Module:
    """The decoder stack (`Qwen3Model`) of a `Qwen3ForCausalLM`, or the model itself."""
    inner = getattr(text_encoder, "model", None)
    return inner if isinstance(inner, nn.Module) and hasattr(inner, "layers") else text_encoder


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a base model (`base_model`'s result)."""
    return cast(nn.ModuleList, model.layers)


def truncate_text_encoder(text_encoder: nn.Module, deepest: int = max(OUT_LAYERS)) -> nn.Module:
    """Return the base model keeping only decoder layers 0..deepest-1 (the LM head is dropped).

    Modifies the base model in place (its unused layers are freed); pass a copy to keep the full model.
    """
    model = base_model(text_encoder)
    if len(decoder_layers(model)) > deepest:
        model.layers = nn.ModuleList(list(decoder_layers(model))[:deepest])
    model.norm = nn.Identity()  # never needed: we read intermediate layers only
    return model


class PromptEncoder:
    """Encodes prompts to FLUX.2 klein conditioning, with an LRU embedding cache.

    `text_encoder` is a `Qwen3ForCausalLM` or a `Qwen3Model`; it is truncated to the deepest layer
    read. `offload=True` keeps it on the CPU and moves it to `device` only while encoding.
    """

    def __init__(
        self,
        text_encoder: nn.Module,
        tokenizer,
        *,
        model_id: str,
        device: torch.device | str,
        dtype: torch.dtype,
        layers: Sequence[int] = OUT_LAYERS,
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
        cache_size: int = 16,
        offload: bool = False,
    ):
        if min(layers) < 1:
            raise ValueError("hidden-state layers are 1-based decoder outputs")
        self.layers = tuple(layers)
        self.model = truncate_text_encoder(text_encoder, max(self.layers))
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_sequence_length = max_sequence_length
        self.cache_size = cache_size
        self.offload = offload
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.encoder_calls = 0  # forwards actually run (for tests and logs)
        self.model.to(device="cpu" if offload else self.device)

    @property
    def num_layers_run(self) -> int:
        return len(decoder_layers(self.model))

    def tokenize(self, text: str) -> dict:
        messages = [{"role": "user", "content": text}]
        templated = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        return self.tokenizer(
            templated,
            return_tensors="pt",
            padding="max_length",
            truncation=True,
            max_length=self.max_sequence_length,
        )

    def token_count(self, text: str) -> int:
        """Tokens of `text` in its chat template, before truncation (> max_sequence_length: the rest
        is cut off)."""
        messages = [{"role": "user", "content": text}]
        templated = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        return len(self.tokenizer(templated, truncation=False)["input_ids"])

    def _forward(self, text: str) -> torch.Tensor:
        inputs = self.tokenize(text)
        if self.offload:
            self.model.to(self.device)
        try:
            captured: dict[int, torch.Tensor] = {}
            hooks = []
            for k in self.layers:
                def hook(_module, _args, output, k=k):
                    captured[k] = output[0] if isinstance(output, tuple) else output

                hooks.append(decoder_layers(self.model)[k - 1].register_forward_hook(hook))
            try:
                self.model(
                    input_ids=inputs["input_ids"].to(self.device),
                    attention_mask=inputs["attention_mask"].to(self.device),
                    use_cache=False,
                )
            finally:
                for h in hooks:
                    h.remove()
            self.encoder_calls += 1
            out = torch.stack([captured[k] for k in self.layers], dim=1)  # (B, n_layers, L, D)
            out = out.to(dtype=self.dtype, device=self.device)
            b, n, seq, dim = out.shape
            return out.permute(0, 2, 1, 3).reshape(b, seq, n * dim)
        finally:
            if self.offload:
                self.model.to("cpu")

    def encode(self, text: str) -> tuple[torch.Tensor, bool]:
        """(embeddings (1, 512, len(layers) * hidden), cache_hit)."""
        key = (self.model_id, self.max_sequence_length, self.layers, text)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit, True
        with torch.inference_mode():
            emb = self._forward(text)
        with self._lock:
            if self.cache_size > 0:
                self._cache[key] = emb
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return emb, False

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

