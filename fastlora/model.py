"""Whole-model transforms: put ``LoraLinear`` into a model by a filtered module swap, freeze what LoRA training
freezes, and take it out again (merged or not). Training recipes built on them live in ``fastlora.recipes``.

``adapted_modules(model, config)`` is the one answer to "which modules does this config adapt in this model", with
PEFT's semantics; ``apply_lora``, ``load_adapter`` / ``save_adapter`` and ``MultiLoraModel`` all ask it.

The swap keeps every module path, so the base model's ``state_dict`` keys are unchanged and only ``.lora_A`` /
``.lora_B`` entries are added. It is all-or-nothing: targets are resolved and validated before the first module
is replaced.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .config import LoraConfig, names_module
from .layers import AdaptedLinear, LoraLinear


def _conv1d_class() -> type | None:
    """transformers' ``Conv1D`` (GPT-2's linear layer, weight ``[in, out]``), when transformers is installed."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def is_conv1d(module: nn.Module) -> bool:
    conv1d = _conv1d_class()
    return conv1d is not None and isinstance(module, conv1d)


def _linear_types() -> tuple[type, ...]:
    conv1d = _conv1d_class()
    return (nn.Linear, conv1d) if conv1d is not None else (nn.Linear,)


def _output_head_names(model: nn.Module) -> set[str]:
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return {name for name, m in model.named_modules() if m is head} if head is not None else set()


def adapted_modules(model: nn.Module, config: LoraConfig) -> list[str]:
    """Names of the modules ``config`` adapts in ``model``, with PEFT's semantics: the linear layers (``nn.Linear``,
    transformers ``Conv1D``, or a linear layer fastlora has already wrapped) whose names ``config`` matches; with
    ``target_modules="all-linear"``, every linear layer but the output head. A module ``config`` names that is not a
    linear layer raises ``NotImplementedError`` (as PEFT refuses it), unless ``"all-linear"`` matched it."""
    linear = (*_linear_types(), AdaptedLinear)
    excluded = _output_head_names(model) if config.all_linear else set()
    targets = []
    for name, module in model.named_modules():
        if not name or name in excluded or not config.matches(name):
            continue
        if isinstance(module, linear):
            targets.append(name)
        elif not config.all_linear:
            raise NotImplementedError(
                f"target module {name!r} is a {type(module).__name__}; fastlora adapts nn.Linear and transformers "
                "Conv1D layers only"
            )
    return targets


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    """``(name, layer)`` for every ``LoraLinear`` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            yield name, module


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """``adapted_modules`` for ``apply_lora``: raises if one of them already has LoRA, or if nothing matches (listing
    the linear modules that exist)."""
    try:
        targets = adapted_modules(model, config)
    except NotImplementedError as e:
        raise NotImplementedError(f"apply_lora: {e}") from e
    for name in targets:
        if isinstance(model.get_submodule(name), AdaptedLinear):
            raise ValueError(f"apply_lora: module {name!r} already has LoRA; unload it first")
    if not targets:
        available = sorted(n for n, m in model.named_modules() if isinstance(m, _linear_types()))
        raise ValueError(
            f"apply_lora: target_modules={config.target_modules!r} matched no module. Linear modules in this "
            f"model: {available}"
        )
    return targets


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def apply_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Swap every module ``config`` targets for a ``LoraLinear`` around it, in place, and freeze everything but the
    LoRA weights, the biases ``config.bias`` asks for and ``config.modules_to_save``. Returns ``model``.

    The weight layout follows the module type whatever ``config.fan_in_fan_out`` says, as in PEFT (which warns and
    corrects it): ``Conv1D`` weights are ``[in, out]``, ``nn.Linear`` weights ``[out, in]``. The config is kept as ``model.fastlora_config`` for ``save_adapter``.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"apply_lora: config must be a fastlora.LoraConfig, got {type(config).__name__}")
    if getattr(model, "fastlora_config", None) is not None or any(True for _ in lora_layers(model)):
        raise ValueError("apply_lora: the model already has LoRA layers; unload them first")
    saved_modules = modules_to_save(model, config)
    replacements = {}
    requires_grad = {param: param.requires_grad for param in model.parameters()}
    try:
        for name in find_targets(model, config):
            module = model.get_submodule(name)
            replacements[name] = LoraLinear.from_linear(
                module,
                r=config.rank_for(name),
                lora_alpha=config.alpha_for(name),
                lora_dropout=config.lora_dropout,
                use_rslora=config.use_rslora,
                init_lora_weights=config.init_lora_weights,
                fan_in_fan_out=is_conv1d(module),
            )
    except BaseException:
        # from_linear froze the base weights it wrapped so far: put the model back as it was.
        for param, flag in requires_grad.items():
            param.requires_grad_(flag)
        raise
    for param in model.parameters():
        param.requires_grad_(False)
    for name, layer in replacements.items():
        set_submodule(model, name, layer)
        if config.bias == "lora_only" and layer.bias is not None:
            layer.bias.requires_grad_(True)
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    if config.bias == "all":
        for name, param in model.named_parameters():
            if name == "bias" or name.endswith(".bias"):
                param.requires_grad_(True)
    for module in saved_modules.values():
        for param in module.parameters():
            param.requires_grad_(True)
    model.fastlora_config = config
    return model


def modules_to_save(model: nn.Module, config: LoraConfig) -> dict[str, nn.Module]:
    """``{name: module}`` of the modules ``config.modules_to_save`` names (trained fully and saved with the adapter);
    raises if an entry names no module of the model."""
    names = config.modules_to_save or []
    found = {n: m for n, m in model.named_modules() if n and config.saves_module(n)}
    missing = [k for k in names if not any(names_module(k, n) for n in found)]
    if missing:
        raise ValueError(f"apply_lora: modules_to_save names modules the model lacks: {missing}")
    return found


def print_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """Print (and return) the trainable and total parameter counts, in PEFT's format."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
    return trainable, total


def _take_out(model: nn.Module, merge: bool) -> nn.Module:
    for name, layer in list(lora_layers(model)):
        set_submodule(model, name, layer.unwrap(merge=merge))
    if hasattr(model, "fastlora_config"):
        del model.fastlora_config
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base weight (fp32 accumulation) and put the base modules back. In place.

    Every merge is checked before any is applied: a non-finite result raises and leaves the model unchanged."""
    for name, layer in lora_layers(model):
        if layer.merged:
            continue
        if not torch.isfinite(layer.merged_weight()).all():
            raise ValueError(f"merge_and_unload: merging {name!r} would put non-finite values in its weight")
    return _take_out(model, merge=True)


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging (unmerging merged ones) and put the base modules back. In place."""
    return _take_out(model, merge=False)


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Within the block the model computes as its base model; merged adapters are unmerged and merged back."""
    layers = [layer for _, layer in lora_layers(model)]
    merged = [layer for layer in layers if layer.merged]
    for layer in merged:
        layer.unmerge()
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False
        for layer in merged:
            layer.merge()
