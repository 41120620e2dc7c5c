"""Serve several LoRA adapters at once over one small Llama-style model, a different adapter per row of a batch.

The base model is built from a config with seeded random weights (nothing is downloaded). Adapters of different ranks
and target modules get random weights and are saved as PEFT-format directories (``adapter_config.json`` +
``adapter_model.safetensors``) in a temporary directory; a ``fastlora.MultiLoraModel`` with fewer device slots than
adapters registers them all and generates greedily for mixed batches (rows with no adapter included), so adapters
move between the CPU tier and the slots as batches need them. Each row is checked against generating it alone.

    python examples/serve_many.py --adapters 5 --max-adapters 3 --device auto

On CUDA the LoRA layers run fastlora's Triton kernels; on CPU its PyTorch backend (``FASTLORA_BACKEND=auto`` with
``TRITON_INTERPRET=1`` runs the kernels in Triton's interpreter instead: slow). Exits non-zero when a row of a mixed
batch differs from the same row generated alone.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

import fastlora

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (rank, lora_alpha, target modules) of the adapters, cycled through when more are asked for.
SPECS = [
    (4, 8, TARGETS),
    (8, 16, ["q_proj", "v_proj"]),
    (16, 16, TARGETS),
    (2, 4, ["gate_proj", "up_proj", "down_proj"]),
    (32, 64, ["q_proj", "k_proj", "v_proj", "o_proj"]),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=5, help="adapters to register (default: 5)")
    parser.add_argument("--max-adapters", type=int, default=3, help="device slots (default: 3)")
    parser.add_argument("--batches", type=int, default=3, help="mixed batches to generate (default: 3)")
    parser.add_argument("--rows", type=int, default=4, help="rows per batch (default: 4)")
    parser.add_argument("--prompt-len", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build_base_model(seed: int, device: torch.device) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).to(device).eval()


def save_random_adapter(directory: Path, base_seed: int, seed: int, rank: int, alpha: float, targets: list[str]):
    """An adapter with random, non-zero weights, saved in PEFT's format (as a trained one would be)."""
    model = fastlora.apply_lora(build_base_model(base_seed, torch.device("cpu")),
                                fastlora.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets))  # fmt: skip
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.3)
    fastlora.save_adapter(model, directory)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)  # fmt: skip
    print(f"device {device}, fastlora backend {fastlora.ops.resolve_backend(device)}")

    with tempfile.TemporaryDirectory() as tmp:
        names = []
        for i in range(args.adapters):
            rank, alpha, targets = SPECS[i % len(SPECS)]
            name = f"adapter{i}-r{rank}"
            save_random_adapter(Path(tmp) / name, args.seed, 1000 + i, rank, alpha, targets)
            names.append(name)

        max_rank = max(SPECS[i % len(SPECS)][0] for i in range(args.adapters))
        server = fastlora.MultiLoraModel(
            build_base_model(args.seed, device), TARGETS, max_adapters=args.max_adapters, max_rank=max_rank
        )
        for name in names:
            info = server.load_adapter(name, Path(tmp) / name)
            print(f"registered {name}: rank {info.rank}, {len(info.layer_ranks)} layers, {info.nbytes} bytes")
        print(server)

        generator = torch.Generator().manual_seed(args.seed)
        choices = [*names, None]
        mismatches = 0
        for b in range(args.batches):
            # Never more distinct adapters in a batch than there are slots.
            pick = torch.randperm(len(choices), generator=generator)[: args.max_adapters].tolist()
            rows = [choices[pick[i % len(pick)]] for i in range(args.rows)]
            prompts = torch.randint(1, 128, (args.rows, args.prompt_len), generator=generator).to(device)
            kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=0)
            start = time.perf_counter()
            out = server.generate(prompts, attention_mask=torch.ones_like(prompts), adapter_names=rows, **kwargs)
            elapsed = time.perf_counter() - start
            print(f"batch {b}: {args.rows} rows, {elapsed * 1e3:.0f} ms, resident {server.pool.resident}")
            for i, name in enumerate(rows):
                alone = server.generate(prompts[i : i + 1], adapter_names=[name], **kwargs)
                same = torch.equal(out[i], alone[0])
                mismatches += not same
                new_tokens = out[i, args.prompt_len :].tolist()
                served = name if name is not None else "base model"
                print(f"  row {i}: served by {served:<14} -> {new_tokens}  {'same as alone' if same else 'DIFFERS'}")
        print(f"{'every row matches' if mismatches == 0 else f'{mismatches} rows differ from'} generating alone")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
