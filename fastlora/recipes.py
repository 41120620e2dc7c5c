"""Training recipes on a model with LoRA layers: freeze the bottom blocks, layer-wise learning-rate decay, and
Chain-of-LoRA's merge-and-reinitialise step.

Each finds the model's stack of transformer blocks itself (``transformer_layers``), so it works on any
transformers model without a per-architecture table.
"""

from __future__ import annotations

import torch
from torch import nn

from .model import adapter_layers, check_merges


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer blocks: the longest ``nn.ModuleList`` of identical module types."""
    best = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best)):
                best = module
    if best is None:
        raise ValueError("transformer_layers: found no nn.ModuleList of repeated blocks in this model")
    return best


def freeze_bottom_layers(model: nn.Module, n: int) -> list[str]:
    """Freeze every parameter (LoRA included) of the first ``n`` transformer blocks; returns their names."""
    blocks = transformer_layers(model)
    if not 0 <= n <= len(blocks):
        raise ValueError(f"freeze_bottom_layers: n must be in [0, {len(blocks)}], got {n}")
    frozen = []
    block_ids = {id(b): i for i, b in enumerate(blocks)}
    for name, module in model.named_modules():
        if block_ids.get(id(module), n) < n:
            for pname, param in module.named_parameters():
                param.requires_grad_(False)
                frozen.append(f"{name}.{pname}")
    return frozen


def llrd_param_groups(model: nn.Module, base_lr: float, decay: float) -> list[dict]:
    """Optimizer parameter groups with layer-wise learning-rate decay: block ``l`` of ``L`` gets
    ``base_lr · decay^(L-1-l)``; trainable parameters before the blocks (embeddings) get ``base_lr · decay^L``, and
    those after them (final norm, head) ``base_lr``. Only trainable parameters are included."""
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"llrd_param_groups: decay must be in (0, 1], got {decay}")
    blocks = transformer_layers(model)
    L = len(blocks)
    owner = {}
    for index, block in enumerate(blocks):
        for param in block.parameters():
            owner[id(param)] = index
    first_block_param = next(iter(blocks[0].parameters()), None)
    groups: dict[str, dict] = {}
    seen_blocks = False
    for param in model.parameters():
        if param is first_block_param:
            seen_blocks = True
        if not param.requires_grad:
            continue
        if id(param) in owner:
            index = owner[id(param)]
            key, lr = f"layer.{index}", base_lr * decay ** (L - 1 - index)
        elif seen_blocks:
            key, lr = "head", base_lr
        else:
            key, lr = "embeddings", base_lr * decay**L
        groups.setdefault(key, {"name": key, "lr": lr, "params": []})["params"].append(param)
    return list(groups.values())


@torch.no_grad()
def merge_and_reinit(model: nn.Module) -> int:
    """A Chain-of-LoRA step: merge each adapter (expert and router adapters included) into its base weight, then re-initialise A and B (as at creation)
    to keep training a fresh adapter on the updated base. With the default init (B = 0) the model's function is
    unchanged. Reset the optimizer state of the LoRA parameters afterwards. Returns the number of layers.

    All or nothing: every layer's merged weight is computed and checked (finite in the weight's dtype) before any
    layer changes; if one is not, ``ValueError`` names it and every weight and LoRA parameter is left as it was. A
    layer whose weight is tied to another module (see ``LoraLinear.merge``) keeps its merged weight as its own copy."""
    check_merges(model, "merge_and_reinit")
    layers = [layer for _, layer in adapter_layers(model)]
    for layer in layers:
        layer.commit_merge()
    return len(layers)
