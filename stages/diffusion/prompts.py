"""Prompt embeddings, computed once per distinct prompt text and kept in a bounded LRU.

Every frame is conditioned on the embedding of its style prompt, but prompts change
only when a face's emotion, its intensity word or the live style does: running the
text encoder per frame would cost as much as a UNet step for nothing. The texts come
only from ``stages.prompt.style_prompt`` (curated templates, never user text), so the
set is small and known in advance: ``canonical_prompts()`` lists every text it can
produce, and the stage encodes them all while warming up.

Encoding follows the diffusers pipelines exactly, so a model behaves as it does there:

* one text encoder (SD 1.x/2.x, SD-Turbo): its last hidden state;
* two (SDXL, SDXL-Turbo): both encoders' penultimate hidden states side by side, and
  the second encoder's projected pooled output for the UNet's added conditioning.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from core.settings import STYLES
from stages.prompt import EMOTIONS, style_prompt

ENCODE_CHUNK = 16
"""Texts encoded per text-encoder call while warming up (bounds the activations)."""

CONFIDENCE_GRID = tuple(i / 20 for i in range(21))
"""Confidences sampled to find every intensity wording ``style_prompt`` can choose."""


@dataclass(frozen=True, slots=True)
class PromptEmbedding:
    """The conditioning of one prompt text, on the model's device and dtype."""

    hidden: torch.Tensor
    """[tokens, features]: what the UNet's cross-attention reads."""
    pooled: torch.Tensor | None
    """[features]: SDXL's pooled text embedding; None for single-encoder models."""


def canonical_prompts() -> list[str]:
    """Every prompt and negative prompt text ``style_prompt`` produces, in a stable order."""
    texts: dict[str, None] = {}
    for style in STYLES:
        for emotion in EMOTIONS:
            for confidence in CONFIDENCE_GRID:
                prompt = style_prompt(emotion, confidence, style)
                texts.setdefault(prompt.text)
                texts.setdefault(prompt.negative)
    return list(texts)


def stack(embeddings: Sequence[PromptEmbedding]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch's conditioning: hidden states [B, tokens, features] and pooled [B, features] or None."""
    hidden = torch.stack([e.hidden for e in embeddings])
    pooled = None if embeddings[0].pooled is None else torch.stack([e.pooled for e in embeddings])
    return hidden, pooled


class PromptEmbeddings:
    """Text → ``PromptEmbedding``, each distinct text encoded once while it stays among
    the ``capacity`` most recently used."""

    def __init__(self, tokenizers: Sequence[Any], text_encoders: Sequence[Any], device: torch.device,
                 dtype: torch.dtype, capacity: int) -> None:
        if len(tokenizers) != len(text_encoders) or len(text_encoders) not in (1, 2):
            raise ValueError(f"need one or two (tokenizer, text encoder) pairs, got {len(tokenizers)} tokenizers "
                             f"and {len(text_encoders)} encoders")
        self.tokenizers = tuple(tokenizers)
        self.text_encoders = tuple(text_encoders)
        self.device = device
        self.dtype = dtype
        self.capacity = capacity
        self.encoded = 0
        """How many texts have gone through the text encoder(s) so far (misses)."""
        self._cache: OrderedDict[str, PromptEmbedding] = OrderedDict()

    def __len__(self) -> int:
        return len(self._cache)

    def get(self, texts: Sequence[str]) -> list[PromptEmbedding]:
        """The embedding of each text; the texts not cached are encoded together in one call."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        fresh = dict(zip(missing, self._encode(missing))) if missing else {}
        found = []
        for text in texts:
            embedding = self._cache.get(text) or fresh[text]
            self._remember(text, embedding)
            found.append(embedding)
        return found

    def warm(self, texts: Iterable[str]) -> None:
        """Encode ``texts`` ahead of need, a chunk per call (the last ``capacity`` stay cached)."""
        pending = [t for t in dict.fromkeys(texts) if t not in self._cache]
        for start in range(0, len(pending), ENCODE_CHUNK):
            chunk = pending[start:start + ENCODE_CHUNK]
            for text, embedding in zip(chunk, self._encode(chunk)):
                self._remember(text, embedding)

    def _remember(self, text: str, embedding: PromptEmbedding) -> None:
        self._cache[text] = embedding
        self._cache.move_to_end(text)
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)

    def _encode(self, texts: list[str]) -> list[PromptEmbedding]:
        sdxl = len(self.text_encoders) == 2
        hidden_parts, pooled = [], None
        with torch.inference_mode():
            for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
                tokens = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                                   truncation=True, return_tensors="pt")
                ids = tokens.input_ids.to(self.device)
                mask = tokens.attention_mask.to(self.device) if getattr(encoder.config, "use_attention_mask",
                                                                        False) else None
                if sdxl:
                    out = encoder(ids, attention_mask=mask, output_hidden_states=True)
                    hidden_parts.append(out.hidden_states[-2])
                    pooled = out[0]  # the last encoder's projected pooled output is the one SDXL uses
                else:
                    hidden_parts.append(encoder(ids, attention_mask=mask)[0])
        self.encoded += len(texts)
        hidden = torch.cat(hidden_parts, dim=-1).to(self.dtype)
        pooled = None if pooled is None else pooled.to(self.dtype)
        # Copies, not views: a cached view would keep its whole chunk alive after eviction.
        return [PromptEmbedding(hidden=hidden[i].clone(), pooled=None if pooled is None else pooled[i].clone())
                for i in range(len(texts))]
