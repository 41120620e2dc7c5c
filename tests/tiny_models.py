"""Tiny transformers models built from configs (no downloads), seeded, shared by the integration tests."""

import torch
import transformers

HIDDEN = 64
VOCAB = 128


def tiny_llama(num_hidden_layers: int = 2, **overrides) -> transformers.LlamaForCausalLM:
    """A Llama with q/k/v/o/gate/up/down projections, hidden 64, in eval mode."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=num_hidden_layers,
        num_attention_heads=4, num_key_value_heads=2, **overrides,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2() -> transformers.GPT2LMHeadModel:
    """A GPT-2 whose linear layers are transformers ``Conv1D`` (weight ``[in, out]``), in eval mode."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=HIDDEN, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config).eval()
