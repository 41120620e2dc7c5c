"""Whole-model transforms: put ``LoraLinear`` into a model by a filtered module swap, freeze what LoRA training
freezes, and take it out again (merged or not). Training recipes built on them live in ``fastlora.recipes``.

``adapted_modules(model, config)`` is the one answer to "which modules does this config adapt in this model", with
PEFT's semantics; ``apply_lora``, ``load_adapter`` / ``save_adapter`` and ``MultiLoraModel`` all ask it.

The swap keeps every module path, so the base model's ``state_dict`` keys are unchanged and only ``.lora_A`` /
``.lora_B`` entries are added. It is all-or-nothing: targets are resolved and validated before the first module
is replaced.

4-bit models (QLoRA) go through the same transforms: bitsandbytes' ``Linear4bit`` and fastlora's ``Nf4Linear``
(``quantize_nf4`` makes them without bitsandbytes) count as linear layers, get ``LoraLinear4bit``, and come back as
4-bit layers from ``merge_and_unload`` / ``unload``. A target quantized any other way (bitsandbytes 8-bit, GPTQ, AWQ,
HQQ, torchao, ...) raises ``NotImplementedError`` naming it before anything changes.

Where PEFT would train or load a copy, fastlora does too, and where a parameter is shared (an ``lm_head`` tied to the
input embedding) it never writes through the tie: a module of ``modules_to_save`` whose parameters are shared with a
module outside it trains its own copies (as PEFT's ``ModulesToSaveWrapper`` does), and a ``LoraLinear`` whose base
weight is shared merges into its own copy (PEFT merges into the shared tensor and so changes the embedding too).
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from .config import LoraConfig, moe_recipe, names_module
from .layers import (
    AdaptedLinear,
    LoraExperts,
    LoraLinear,
    LoraLinear4bit,
    LoraParameter,
    Nf4Linear,
    SharedBase,
    expert_layout,
    is_4bit_linear,
    is_fused_experts,
    quantization_issue,
)


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
    """The linear layers LoRA goes over: ``nn.Linear`` (bitsandbytes' ``Linear4bit`` is one), transformers ``Conv1D``,
    and fastlora's 4-bit ``Nf4Linear``."""
    conv1d = _conv1d_class()
    return (nn.Linear, Nf4Linear, conv1d) if conv1d is not None else (nn.Linear, Nf4Linear)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear layer: from its weight's shape (``[out, in]``, ``[in, out]`` for a
    ``Conv1D``), or for a 4-bit layer, whose packed weight has a shape of its own, from its attributes."""
    if is_4bit_linear(module):
        return module.in_features, module.out_features
    weight = module.weight
    return tuple(weight.shape) if is_conv1d(module) else tuple(weight.shape[::-1])


def _looks_linear(module: nn.Module) -> bool:
    """A linear layer of some quantization library: an ``nn.Linear`` subclass, or a module with in/out features or
    packed weights."""
    return isinstance(module, nn.Linear) or any(hasattr(module, attr) for attr in ("in_features", "qweight", "W_q"))


def check_quantization(name: str, module: nn.Module) -> None:
    """Raise ``NotImplementedError`` naming ``module`` and its quantization when fastlora cannot put LoRA over it."""
    issue = quantization_issue(module)
    if issue is not None:
        raise NotImplementedError(
            f"target module {name!r} ({type(module).__module__}.{type(module).__qualname__}) is quantized with "
            f"{issue}; fastlora puts LoRA over floating-point linear layers and 4-bit ones (bitsandbytes Linear4bit, "
            "NF4 or FP4, and fastlora's Nf4Linear) only. Nothing was changed"
        )


def _output_head_names(model: nn.Module) -> set[str]:
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return {name for name, m in model.named_modules() if m is head} if head is not None else set()


# The heads PEFT's ``PeftModelForSequenceClassification`` / ``...ForTokenClassification`` /
# ``...ForQuestionAnswering`` add to ``modules_to_save``; a name the model lacks is skipped.
_TASK_MODULES = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


def _task_modules(config: LoraConfig) -> tuple[str, ...]:
    task = config.task_type
    return _TASK_MODULES.get(str(getattr(task, "value", task)), ())


def _with_task_modules(config: LoraConfig) -> LoraConfig:
    """``config`` with its task's head names added to ``modules_to_save``, as PEFT adds (and saves) them."""
    extra = [name for name in _task_modules(config) if name not in (config.modules_to_save or ())]
    if not extra:
        return config
    return dataclasses.replace(config, modules_to_save=[*(config.modules_to_save or ()), *extra])


def within(name: str, ancestor: str) -> bool:
    """Whether the module called ``name`` is ``ancestor`` or lies inside it."""
    return name == ancestor or name.startswith(f"{ancestor}.")


def adapted_modules(model: nn.Module, config: LoraConfig) -> list[str]:
    """Names of the modules ``config`` adapts in ``model``, with PEFT's semantics: the linear layers (``nn.Linear``,
    transformers ``Conv1D``, or a linear layer fastlora has already wrapped) whose names ``config`` matches; with
    ``target_modules="all-linear"``, every linear layer but the output head. A module ``config`` names that is not a
    linear layer raises ``NotImplementedError`` (as PEFT refuses it), unless ``"all-linear"`` matched it.

    Modules of ``modules_to_save`` (with the task's heads: ``classifier`` / ``score`` for ``task_type="SEQ_CLS"``)
    and everything inside them are trained fully, never adapted: PEFT leaves them out as well (and fails on the few
    names its dot-bounded exclusion misses, such as DistilBERT's ``pre_classifier``)."""
    config = _with_task_modules(config)
    linear = (*_linear_types(), AdaptedLinear)
    excluded = _output_head_names(model) if config.all_linear else set()
    saved = [name for name, _ in model.named_modules() if name and config.saves_module(name)]
    # The adapters of a LoraExperts (``<experts>.lora.<parameter>``) are fastlora's own modules, never targets.
    adapters = [f"{name}.lora" for name, m in model.named_modules() if isinstance(m, LoraExperts)]
    targets = []
    for name, module in model.named_modules():
        if not name or name in excluded or not config.matches(name) or any(within(name, s) for s in saved):
            continue
        if any(within(name, a) for a in adapters):
            continue
        if not config.all_linear or _looks_linear(module):
            check_quantization(name, module)
        if isinstance(module, linear):
            targets.append(name)
        elif not config.all_linear:
            raise NotImplementedError(
                f"target module {name!r} is a {type(module).__name__}; fastlora adapts nn.Linear and transformers "
                "Conv1D layers (and 4-bit linear layers) only"
            )
    return targets


def _fuses_experts(model_type: str | None) -> bool:
    """Whether the installed transformers (v5 or newer) converts checkpoints of ``model_type`` to fused experts: PEFT's
    condition for rewriting old mixture-of-experts recipes (``get_checkpoint_conversion_mapping``)."""
    try:
        import transformers
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return False
    if int(transformers.__version__.split(".")[0]) < 5 or model_type is None:
        return False
    return get_checkpoint_conversion_mapping(model_type) is not None


def moe_config(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """``config`` as PEFT rewrites it for ``model`` (``fastlora.config.moe_recipe``): when the installed transformers
    (v5 or newer) converts the model type's checkpoints to fused experts (PEFT's test), the old expert and router names
    of mixture-of-experts recipes (``w1 w2 w3 gate``, ``gate_proj up_proj down_proj gate``) and ``"all-linear"`` become
    ``target_parameters`` on the fused expert weights and the router. Other configs come back equal."""
    linear = (*_linear_types(), AdaptedLinear)
    heads = _output_head_names(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return moe_recipe(
        config,
        model_type,
        module_names=[n for n, _ in model.named_modules()],
        parameter_names=[n for n, _ in model.named_parameters()],
        linear_names=[n for n, m in model.named_modules() if isinstance(m, linear) and n not in heads],
        transformers_v5=_fuses_experts(model_type),
    )


def adapted_parameters(model: nn.Module, config: LoraConfig) -> dict[str, list[str]]:
    """``{module name: [parameter names]}`` of the parameters ``config.target_parameters`` adapts in ``model``, with
    PEFT's rule (``LoraConfig.targets_parameter``), each module's parameters in their registration order (the order in
    which PEFT nests its wrappers, the first innermost). A module fastlora already wraps (for training or serving)
    counts as its base module."""
    if not config.target_parameters:
        return {}
    found: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        base = module.base_module if isinstance(module, SharedBase) else module
        for pname, _ in base.named_parameters(recurse=False):
            if config.targets_parameter(name, pname):
                found.setdefault(name, []).append(pname)
    return found


def parameter_layers(model: nn.Module) -> Iterator[tuple[str, LoraExperts | LoraParameter]]:
    """``(name, layer)`` for every module with LoRA on its parameters (``target_parameters``)."""
    for name, module in model.named_modules():
        if isinstance(module, (LoraExperts, LoraParameter)):
            yield name, module


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear | LoraExperts | LoraParameter]]:
    """``(name, layer)`` for every module fastlora has put LoRA into."""
    for name, module in model.named_modules():
        if isinstance(module, (LoraLinear, LoraExperts, LoraParameter)):
            yield name, module


def _parameter_layer(model: nn.Module, name: str, params: list[str], config: LoraConfig) -> nn.Module:
    """The LoRA module for the targeted ``params`` of module ``name``: ``LoraExperts`` for a fused-experts module's 3-D
    weights, ``LoraParameter`` for one 2-D parameter (a router's weight). Raises for what neither covers."""
    module = model.get_submodule(name)
    shapes = {p: tuple(getattr(module, p).shape) for p in params}
    if any(isinstance(module, t) for t in (*_linear_types(), AdaptedLinear)):
        raise NotImplementedError(
            f"target_parameters selects {listing_of(params)} of the linear layer {name!r}; target the module with "
            "target_modules instead"
        )
    if any(len(shape) not in (2, 3) for shape in shapes.values()):
        raise ValueError(f"target_parameters: {name!r} has {shapes}; only 2-D and 3-D parameters can get LoRA")
    if all(len(shape) == 3 for shape in shapes.values()):
        if getattr(module, "_is_expert_parallel", False):
            raise NotImplementedError(
                f"target_parameters: the experts {name!r} are split across devices (expert parallelism), which "
                "fastlora's grouped LoRA does not support"
            )
        if not is_fused_experts(module):
            raise NotImplementedError(
                f"target_parameters: {name!r} is a {type(module).__name__}, not one of transformers' fused-experts "
                "modules (@use_experts_implementation: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GPT-OSS, ...), so "
                "fastlora cannot compute LoRA on its 3-D parameters"
            )
        targets = {}
        for p in params:
            key = f"{name}.{p}"
            targets[p] = (config.rank_for(key), config.alpha_for(key))
            E, k, n = expert_layout(module, p)
            if targets[p][0] > max(k, n):
                raise ValueError(
                    f"target_parameters: {key} ({k} -> {n} per expert) would get rank "
                    f"r={targets[p][0]}, more than max(in_features, out_features) = {max(k, n)}"
                )
        return LoraExperts(module, targets, config.lora_dropout, config.use_rslora, config.init_lora_weights)
    if len(params) > 1:
        raise NotImplementedError(
            f"target_parameters selects {len(params)} parameters of {name!r} ({shapes}); fastlora adapts one 2-D "
            "parameter per module (a router's weight)"
        )
    key = f"{name}.{params[0]}"
    return LoraParameter(
        module, params[0], config.rank_for(key), config.alpha_for(key), config.lora_dropout, config.use_rslora,
        config.init_lora_weights,
    )  # fmt: skip


def listing_of(items) -> str:
    return ", ".join(repr(i) for i in items)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    """``(name, layer)`` for every ``LoraLinear`` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            yield name, module


def find_targets(model: nn.Module, config: LoraConfig, parameters: dict[str, list[str]] | None = None) -> list[str]:
    """``adapted_modules`` for ``apply_lora``: raises if one of them already has LoRA, or if nothing matches (listing
    the linear modules that exist); ``parameters`` (``adapted_parameters``) count as matches."""
    try:
        targets = adapted_modules(model, config)
    except NotImplementedError as e:
        raise NotImplementedError(f"apply_lora: {e}") from e
    for name in targets:
        if isinstance(model.get_submodule(name), AdaptedLinear):
            raise ValueError(f"apply_lora: module {name!r} already has LoRA; unload it first")
    if config.target_parameters and not parameters:
        raise ValueError(f"apply_lora: target_parameters={config.target_parameters!r} matched no parameter")
    if not targets and not parameters:
        available = sorted(n for n, m in model.named_modules() if isinstance(m, _linear_types()))
        raise ValueError(
            f"apply_lora: target_modules={config.target_modules!r} matched no module. Linear modules in this "
            f"model: {available}"
        )
    clash = sorted(set(targets) & set(parameters or ()))
    if clash:
        raise ValueError(f"apply_lora: {clash} are selected both by target_modules and by target_parameters")
    return targets


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def storage_key(tensor: torch.Tensor) -> tuple | None:
    """What tells tensors sharing memory apart: ``(device, storage pointer)``; None for empty and meta tensors."""
    if tensor.numel() == 0 or tensor.device.type == "meta":
        return None
    return tensor.device, tensor.untyped_storage().data_ptr()


def _parameter_owners(model: nn.Module) -> dict[tuple, list[str]]:
    """Every parameter name of ``model``, duplicates included, grouped by the memory the parameter lives in."""
    owners: dict[tuple, list[str]] = {}
    for full, param in model.named_parameters(remove_duplicate=False):
        if (key := storage_key(param)) is not None:
            owners.setdefault(key, []).append(full)
    return owners


def shared_parameters(model: nn.Module, name: str, owners: dict[tuple, list[str]] | None = None) -> dict[str, list]:
    """``{parameter name: [names elsewhere]}`` for the parameters of module ``name`` whose memory is also a parameter
    of a module outside it (a tied ``lm_head`` and input embedding). Parameter names are relative to ``name``."""
    owners = _parameter_owners(model) if owners is None else owners
    shared = {}
    for pname, param in model.get_submodule(name).named_parameters(remove_duplicate=False):
        outside = [n for n in owners.get(storage_key(param), ()) if not within(n, name)]
        if outside:
            shared[pname] = outside
    return shared


def _fan_in_fan_out(model: nn.Module, config: LoraConfig, targets: list[str]) -> LoraConfig:
    """``config`` with ``fan_in_fan_out`` corrected to the targets' weight layout, with PEFT's warnings: PEFT sets it
    per target as it goes (False for ``nn.Linear``, True for ``Conv1D``) and saves the last value. A copy: the
    caller's config is left alone (PEFT corrects the user's object in place)."""
    value = config.fan_in_fan_out
    for name in targets:
        conv1d = is_conv1d(model.get_submodule(name))
        if value and not conv1d:
            warnings.warn(
                "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting fan_in_fan_out "
                "to False.",
                stacklevel=3,
            )
            value = False
        elif conv1d and not value:
            warnings.warn(
                "fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out to True.",
                stacklevel=3,
            )
            value = True
    return config if value == config.fan_in_fan_out else dataclasses.replace(config, fan_in_fan_out=value)


def apply_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Swap every module ``config`` targets for a ``LoraLinear`` around it, in place, and freeze everything but the
    LoRA weights, the biases ``config.bias`` asks for and ``config.modules_to_save``. Returns ``model``.

    As in PEFT, ``task_type`` ``"SEQ_CLS"`` / ``"TOKEN_CLS"`` adds ``classifier`` and ``score`` to
    ``modules_to_save`` (``"QUESTION_ANS"``: ``qa_outputs``), skipping names the model lacks; an entry the caller
    listed that names no module raises (PEFT ignores it silently). A module to save whose parameters are shared with a
    module outside it (``modules_to_save=["lm_head"]`` with tied embeddings) gets its own trainable copies, as PEFT
    trains a copy: training and loading then leave the embedding untouched.

    The weight layout follows the module type whatever ``config.fan_in_fan_out`` says: ``Conv1D`` weights are
    ``[in, out]``, ``nn.Linear`` weights ``[out, in]``; as PEFT does, a ``fan_in_fan_out`` that contradicts it is
    corrected with a warning. The corrected config (task heads included) is kept as ``model.fastlora_config`` for
    ``save_adapter``; the caller's object is not changed.

    A ``LoraLinear`` whose base weight is shared with another module (``lm_head`` as a target with tied embeddings) is
    marked ``shared_weight``: merging it unties it rather than writing into the embedding (see ``LoraLinear.merge``).
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"apply_lora: config must be a fastlora.LoraConfig, got {type(config).__name__}")
    if getattr(model, "fastlora_config", None) is not None or any(True for _ in adapter_layers(model)):
        raise ValueError("apply_lora: the model already has LoRA layers; unload them first")
    config = _with_task_modules(moe_config(model, config))
    saved_modules = modules_to_save(model, config)
    param_targets = adapted_parameters(model, config)
    targets = find_targets(model, config, param_targets)
    config = _fan_in_fan_out(model, config, targets)
    for name, module in saved_modules.items():
        quantized = [n for n, m in module.named_modules() if is_4bit_linear(m) or quantization_issue(m) is not None]
        if quantized:
            inner = "" if quantized == [""] else f" (at {listing_of(quantized)})"
            raise NotImplementedError(
                f"apply_lora: modules_to_save includes {name!r}, whose weights are quantized{inner} and cannot be "
                "trained fully; leave it out of modules_to_save. Nothing was changed"
            )
    outermost = [n for n in saved_modules if not any(within(n, o) and n != o for o in saved_modules)]
    untied = {}
    replacements = {}
    requires_grad = {param: param.requires_grad for param in model.parameters()}
    owners = _parameter_owners(model)
    try:
        for name in outermost:
            for pname in shared_parameters(model, name, owners):
                original = model.get_parameter(f"{name}.{pname}")
                untied[f"{name}.{pname}"] = (original, nn.Parameter(original.detach().clone()))
        for name in targets:
            module = model.get_submodule(name)
            layer_cls = LoraLinear4bit if is_4bit_linear(module) else LoraLinear
            replacements[name] = layer_cls.from_linear(
                module,
                r=config.rank_for(name),
                lora_alpha=config.alpha_for(name),
                lora_dropout=config.lora_dropout,
                use_rslora=config.use_rslora,
                init_lora_weights=config.init_lora_weights,
                fan_in_fan_out=is_conv1d(module),
            )
        for name, params in param_targets.items():
            replacements[name] = _parameter_layer(model, name, params, config)
    except BaseException:
        # from_linear froze the base weights it wrapped so far: put the model back as it was.
        for param, flag in requires_grad.items():
            param.requires_grad_(flag)
        raise
    for full, (_, copy) in untied.items():
        _set_parameter(model, full, copy)
    for param in model.parameters():
        param.requires_grad_(False)
    for name, layer in replacements.items():
        set_submodule(model, name, layer)
        if isinstance(layer, LoraLinear):
            if config.bias == "lora_only" and layer.bias is not None:
                layer.bias.requires_grad_(True)
            layer.lora_A.requires_grad_(True)
            layer.lora_B.requires_grad_(True)
        else:
            for pname, param in layer.named_parameters():
                if pname.rpartition(".")[2] in ("lora_A", "lora_B"):
                    param.requires_grad_(True)
    owners = _parameter_owners(model)
    for name, layer in replacements.items():
        if isinstance(layer, LoraLinear):
            layer.shared_weight = "weight" in shared_parameters(model, name, owners)
    if config.bias == "all":
        for name, param in model.named_parameters():
            if name == "bias" or name.endswith(".bias"):
                param.requires_grad_(True)
    for module in saved_modules.values():
        for param in module.parameters():
            param.requires_grad_(True)
    if untied:
        # The shared originals, for ``disable_adapters`` (the base model computes with them, as PEFT's
        # ``ModulesToSaveWrapper`` falls back to its original module).
        model._fastlora_untied = {full: original for full, (original, _) in untied.items()}
    model.fastlora_config = config
    return model


def _set_parameter(model: nn.Module, name: str, param: nn.Parameter) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, attr, param)


def modules_to_save(model: nn.Module, config: LoraConfig) -> dict[str, nn.Module]:
    """``{name: module}`` of the modules ``config.modules_to_save`` names (trained fully and saved with the adapter),
    with PEFT's rule (``LoraConfig.saves_module``: the name ends with an entry) and the task's heads added. Raises if
    an entry the config lists names no module, unless the task adds it (PEFT skips those, and ignores the others)."""
    config = _with_task_modules(config)
    found = {n: m for n, m in model.named_modules() if n and config.saves_module(n)}
    task = _task_modules(config)
    missing = [k for k in config.modules_to_save or () if k not in task and not any(names_module(k, n) for n in found)]
    if missing:
        raise ValueError(f"apply_lora: modules_to_save names modules the model lacks: {missing}")
    return found


def _parameter_count(param: torch.Tensor) -> int:
    """PEFT's count of a parameter: a bitsandbytes ``Params4bit`` packs two 4-bit weights per byte of its storage,
    so it counts ``numel · 2 · element_size``."""
    if type(param).__name__ == "Params4bit":
        return param.numel() * 2 * param.element_size()
    return param.numel()


def print_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """Print (and return) the trainable and total parameter counts, in PEFT's format (``PeftModel``'s
    ``get_nb_trainable_parameters``). A 4-bit weight counts its logical ``out · in`` elements, as PEFT counts a
    bitsandbytes one; an ``Nf4Linear``'s weight, a buffer, counts the same (never trainable), so a model counts alike
    whichever quantized it."""
    trainable = sum(_parameter_count(p) for p in model.parameters() if p.requires_grad)
    total = sum(_parameter_count(p) for p in model.parameters())
    for module in model.modules():
        nf4_base = isinstance(module, LoraLinear4bit) and isinstance(module.__dict__["_base_module"], Nf4Linear)
        if isinstance(module, Nf4Linear) or nf4_base:
            total += module.in_features * module.out_features
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
    return trainable, total


def _untied_embeddings(model: nn.Module) -> bool:
    """Whether the model's config ties its embeddings but its output embedding no longer shares the input's weight."""
    config = getattr(model, "config", None)
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if not getattr(config, "tie_word_embeddings", False) or not callable(get_in) or not callable(get_out):
        return False
    try:
        emb_in, emb_out = get_in(), get_out()
    except (NotImplementedError, AttributeError):
        return False
    w_in, w_out = getattr(emb_in, "weight", None), getattr(emb_out, "weight", None)
    return w_in is not None and w_out is not None and storage_key(w_in) != storage_key(w_out)


def _take_out(model: nn.Module, merge: bool, caller: str) -> nn.Module:
    for name, layer in list(adapter_layers(model)):
        set_submodule(model, name, layer.unwrap(merge=merge))
    for attr in ("fastlora_config", "_fastlora_untied"):
        if hasattr(model, attr):
            delattr(model, attr)
    if _untied_embeddings(model):
        # What PEFT's merge_and_unload does when a copy diverged: transformers would otherwise tie the weights again
        # when the model is saved and reloaded, and lose the trained output embedding.
        model.config.tie_word_embeddings = False
        warnings.warn(
            f"{caller}: the output embedding no longer shares the input embedding's weight (it holds a trained or "
            "merged copy); model.config.tie_word_embeddings is set to False so that saving and reloading with "
            "transformers keeps both",
            UserWarning,
            stacklevel=3,
        )
    return model


def check_merges(model: nn.Module, caller: str) -> None:
    """Raise, naming the layer, if merging any unmerged LoRA layer of ``model`` would put non-finite values into its
    weight; changes nothing. One layer's merged weight at a time: a second merge's work, not a copy of the model."""
    for name, layer in lora_layers(model):
        if layer.merged:
            continue
        merged = layer.merged_weight()
        if not torch.isfinite(merged).all():
            raise ValueError(
                f"{caller}: merging layer {name!r} would put non-finite values into its weight (overflow in "
                f"{merged.dtype}, or NaN/Inf in the adapter); no layer was changed"
            )
    for name, layer in parameter_layers(model):
        if layer.merged:
            continue
        try:
            layer.check_merge()
        except ValueError as e:
            raise ValueError(f"{caller}: layer {name!r}: {e}; no layer was changed") from e


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base weight (fp32 accumulation) and put the base modules back. In place.

    Every merge is checked before any is applied: a non-finite result raises and leaves the model unchanged. A layer
    whose weight is tied to another module (``lm_head`` and the input embedding) comes back with its merged weight as
    its own, untied copy; the embedding keeps its values, so the merged model computes what the unmerged one did (PEFT
    merges into the tied tensor and changes the embedding too). Modules of ``modules_to_save`` keep their trained
    values (for a tied one, its trained copy), as in PEFT. When the output embedding ends up untied,
    ``model.config.tie_word_embeddings`` is set to False, with a warning."""
    check_merges(model, "merge_and_unload")
    return _take_out(model, merge=True, caller="merge_and_unload")


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging (unmerging merged ones) and put the base modules back. In place.

    As in PEFT, modules of ``modules_to_save`` keep their trained values; a tied one keeps its trained copy (and
    ``model.config.tie_word_embeddings`` is set to False, with a warning)."""
    return _take_out(model, merge=False, caller="unload")


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Within the block the model computes as its base model; merged adapters are unmerged and merged back. Modules of
    ``modules_to_save`` that were given their own copies of shared parameters compute with the shared originals (as
    PEFT's wrapper falls back to its original module); the others were trained in place and keep their values."""
    layers = [layer for _, layer in adapter_layers(model)]
    merged = [layer for layer in layers if layer.merged]
    untied = dict(getattr(model, "_fastlora_untied", {}))
    copies = {name: model.get_parameter(name) for name in untied}
    for layer in merged:
        layer.unmerge()
    for layer in layers:
        layer.disabled = True
    for name, original in untied.items():
        _set_parameter(model, name, original)
    try:
        yield model
    finally:
        for name, copy in copies.items():
            _set_parameter(model, name, copy)
        for layer in layers:
            layer.disabled = False
        for layer in merged:
            layer.merge()


def quantize_nf4(
    module: nn.Module,
    *,
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    skip_modules: tuple[str, ...] | list[str] = ("lm_head",),
) -> nn.Module:
    """Quantize linear layers to 4 bits, in bitsandbytes' format and bit-exact with its quantizer, without
    bitsandbytes: QLoRA's base model.

    Given an ``nn.Linear``, returns an ``Nf4Linear`` holding its quantized weight (and its bias). Given any other
    module (a whole model), replaces every ``nn.Linear`` inside it (exactly ``nn.Linear``: subclasses, such as
    bitsandbytes' layers, are left alone) by an ``Nf4Linear``, in place, and returns it; a layer whose name is, or
    ends with ``.`` and, an entry of ``skip_modules`` is kept (the output head by default, as transformers keeps it in
    full precision). Every layer is quantized before the first one is replaced.

    ``quant_type`` is ``"nf4"`` or ``"fp4"``; ``double_quant`` quantizes the block scales too (bitsandbytes'
    ``compress_statistics``, ``bnb_4bit_use_double_quant``); ``compute_dtype`` is the dtype the layers compute in (None:
    the input's, as bitsandbytes' layers do with fp32 and bf16 inputs).
    """
    settings = dict(blocksize=blocksize, quant_type=quant_type, double_quant=double_quant, compute_dtype=compute_dtype)
    if type(module) is nn.Linear:
        return Nf4Linear.from_linear(module, **settings)
    if not isinstance(module, nn.Module):
        raise TypeError(f"quantize_nf4: expected an nn.Module, got {type(module).__name__}")
    if isinstance(skip_modules, str):
        skip_modules = (skip_modules,)

    def skipped(name: str) -> bool:
        return any(name == s or name.endswith(f".{s}") for s in skip_modules)

    replacements = {
        name: Nf4Linear.from_linear(child, **settings)
        for name, child in module.named_modules()
        if name and type(child) is nn.Linear and not skipped(name)
    }
    for name, layer in replacements.items():
        set_submodule(module, name, layer)
    return module
