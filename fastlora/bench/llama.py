"""Llama-style causal LMs built from a config (no downloads), for the suites that measure whole models: ``train`` (a
training step) and the model level of ``multi`` (serving many adapters).

A ``LlamaCase`` names a shape (``size``) and holds the fields of the config that matter here; the shapes of both
suites are the constants below, so that "160M" means the same model in every table. Every contender of a case starts
from the same base weights (``build_llama``: seed 0, built directly in the case's dtype on the device).
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from .common import Case, default_dtype

# (size, hidden, layers, heads, kv_heads, intermediate, vocab)
TINY = ("tiny", 64, 2, 4, 2, 176, 256)
SMALL = ("small", 256, 4, 8, 4, 688, 1024)
LLAMA_160M = ("160M", 768, 12, 12, 12, 2048, 32000)
TINYLLAMA_1B = ("1.1B", 2048, 22, 32, 4, 5632, 32000)  # TinyLlama's shape
LLAMA_3B = ("3B", 3072, 28, 24, 8, 8192, 128256)  # Llama 3.2 3B's shape
LLAMA_8B = ("8B", 4096, 32, 32, 8, 14336, 128256)  # Llama 3 8B's shape


@dataclasses.dataclass(frozen=True)
class LlamaCase(Case):
    """The model fields a whole-model case starts with; a suite's case adds its batch and the rest, and says how many
    positions its calls need (``positions``)."""

    size: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int

    @property
    def positions(self) -> int:
        raise NotImplementedError

    @property
    def reduce_len(self) -> int:
        """The reduction length the agreement checks allow for the model's logits and loss: the sums along the
        residual stream, one over ``hidden`` (the projections that read it) and one over ``intermediate`` (the down
        projection) in every decoder layer."""
        return self.layers * (self.hidden + self.intermediate)

    def config(self):
        import transformers

        return transformers.LlamaConfig(
            vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            max_position_embeddings=max(self.positions, 128), tie_word_embeddings=False,
        )  # fmt: skip


def build_llama(case: LlamaCase, device: torch.device) -> nn.Module:
    """The base model of ``case``, weights from seed 0, built in the case's dtype on ``device``."""
    import transformers

    torch.manual_seed(0)
    with torch.device(device), default_dtype(case.torch_dtype):
        return transformers.LlamaForCausalLM(case.config())


def random_ids(case: LlamaCase, batch: int, seq: int, device: torch.device, low: int = 0) -> torch.Tensor:
    """``[batch, seq]`` token ids in ``[low, vocab)``, drawn on CPU from a fixed seed: the same ids on every device."""
    g = torch.Generator().manual_seed(2)
    return torch.randint(low, case.vocab, (batch, seq), generator=g).to(device)


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """Building a PEFT model raises transformers' deprecation warnings from inside PEFT: nothing a benchmark user can
    act on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield
