"""Fine-tune a small Llama-style model with fastlora, save the adapter, and check that PEFT reads it back exactly.

The model is built from a config with seeded random weights (nothing is downloaded). The task is synthetic: every
sequence counts upward modulo the vocabulary from a random start, so the next token is always ``token + 1``, which
the frozen random model cannot predict and the LoRA layers learn within a hundred steps. After training, the
adapter is written with ``fastlora.save_adapter`` (PEFT's format) and loaded by ``peft.PeftModel.from_pretrained``
onto a fresh base model with the same seed; both models must give the same logits.

    python examples/finetune.py --steps 100 --out finetune-adapter --device auto

On CUDA the LoRA layers run fastlora's Triton kernels; on CPU they run its PyTorch backend. Exits non-zero when the
loss did not fall by half or the logits of fastlora and PEFT differ.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time

import peft
import torch
import transformers

import fastlora

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Logits of the same fp32 model computed in a different order agree to a few fp32 rounding steps of their size.
LOGITS_RTOL = 1e-4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps (default: 100)")
    parser.add_argument("--out", default=None, help="adapter directory (default: a temporary directory)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--log-every", type=int, default=10, help="print the loss every this many steps")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_base_model(seed: int, device: torch.device) -> transformers.LlamaForCausalLM:
    """The base model; the same seed always gives the same weights, which is what lets PEFT rebuild it later."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        # The head and the final norm stay frozen; with the usual 0.02 they cap the logits near ±1, too flat for any
        # confident prediction, where a trained model's head is not.
        initializer_range=0.2,
    )
    return transformers.LlamaForCausalLM(config).to(device)


def counting_batch(batch_size: int, seq_len: int, vocab_size: int, generator: torch.Generator) -> torch.Tensor:
    """Sequences ``s, s+1, s+2, ...`` modulo the vocabulary, each from a random start ``s``."""
    starts = torch.randint(0, vocab_size, (batch_size, 1), generator=generator)
    return (starts + torch.arange(seq_len)) % vocab_size


def train(model, steps: int, batch_size: int, seq_len: int, lr: float, log_every: int, seed: int) -> list[float]:
    device = next(model.parameters()).device
    vocab_size = model.config.vocab_size
    generator = torch.Generator().manual_seed(seed + 1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for step in range(1, steps + 1):
        input_ids = counting_batch(batch_size, seq_len, vocab_size, generator).to(device)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step == 1 or step % log_every == 0 or step == steps:
            print(f"step {step:4d}  loss {losses[-1]:.4f}", flush=True)
    return losses


@torch.no_grad()
def compare_with_peft(model, adapter_dir: str, seed: int, input_ids: torch.Tensor) -> tuple[float, float, float]:
    """``(max |fastlora - PEFT|, max |logits|, max |adapter's effect|)`` on ``input_ids``, both models in eval."""
    model.eval()
    ours = model(input_ids=input_ids).logits
    base = build_base_model(seed, input_ids.device)
    peft_model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    theirs = peft_model(input_ids=input_ids).logits
    with peft_model.disable_adapter():
        without_adapter = peft_model(input_ids=input_ids).logits
    return (
        (ours - theirs).abs().max().item(),
        theirs.abs().max().item(),
        (theirs - without_adapter).abs().max().item(),
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    backend = fastlora.ops.resolve_backend(device)
    print(f"device {device}, fastlora backend {backend}")

    model = build_base_model(args.seed, device)
    lora_config = fastlora.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS)
    fastlora.apply_lora(model, lora_config)
    fastlora.print_trainable_parameters(model)

    start = time.perf_counter()
    losses = train(model, args.steps, args.batch_size, args.seq_len, args.lr, args.log_every, args.seed)
    window = max(1, min(10, len(losses) // 4))
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    loss_fell = math.isfinite(last) and last < 0.5 * first
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.1f} s")
    verdict = "fell" if loss_fell else "DID NOT FALL"
    print(f"loss {first:.4f} -> {last:.4f} (mean of the first and last {window} steps): {verdict}")

    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or scratch
        fastlora.save_adapter(model, out)
        print(f"adapter saved to {out}" if args.out else "adapter saved to a temporary directory (--out keeps it)")
        held_out = torch.Generator().manual_seed(args.seed + 2)
        eval_ids = counting_batch(4, args.seq_len, model.config.vocab_size, held_out)
        diff, scale, effect = compare_with_peft(model, out, args.seed, eval_ids.to(device))
    tolerance = LOGITS_RTOL * max(1.0, scale)
    logits_match = diff <= tolerance
    print(
        f"max |logits fastlora - logits PEFT| = {diff:.3e} (tolerance {tolerance:.1e}; the adapter itself moves the "
        f"logits by up to {effect:.3e}): {'match' if logits_match else 'MISMATCH'}"
    )
    if not loss_fell or not logits_match:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
