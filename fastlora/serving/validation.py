"""Reading and validating an adapter for an ``AdapterPool``, before the pool changes.

Everything is checked before anything is kept, so a bad adapter raises and leaves the pool, its slots and every
registered adapter exactly as they were: the file (``fastlora.peft_format``'s errors for missing, corrupt or pickled
files and bad configs), unsupported config fields (``bias`` other than ``"none"``, ``modules_to_save``: per-adapter
base-layer changes a shared base model cannot serve), every key (a LoRA ``A`` / ``B`` pair per module; a module the
pool does not adapt is named in the error), every shape against the layer's ``K`` and ``N``, each layer's rank
against the config's ``rank_for`` and against ``max_rank``, floating dtypes, finite values (after the cast to the
pool's dtype, so an fp32 value that overflows fp16 is caught), and each layer's scaling, finite in float32 (the dtype
the kernels read it in; checked here, not only when the config is built, as a config can be changed afterwards). The
config must select exactly the modules the weights cover, as PEFT would adapt them.

A copy of an adapted layer's base weight (``<module>.base_layer.weight`` / ``.bias``: PEFT saves the output head's
with an adapter that targets it) is accepted when it equals the model's own, exactly, after the cast to the model's
dtype; one that differs would change the base model for every row, which a shared base model cannot serve.

The weights kept are always the pool's own copies: a caller changing its tensors later changes nothing served.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..config import LoraConfig
from ..peft_format import LORA_KEY, listing, lora_key, read_adapter_file

AdapterSource = str | os.PathLike | Mapping[str, torch.Tensor]
# Config fields that change the base model per adapter: a shared base model cannot serve them.
UNSERVABLE_FIELDS = {"bias": "none", "modules_to_save": None}
# The keys an adapter may hold per module of the pool: its LoRA pair, and copies of the base layer PEFT saves for
# embedding-like targets (accepted only when they equal the model's, see ``validate_adapter``).
_MODULE_KEYS = ("lora_A.weight", "lora_B.weight", "base_layer.weight", "base_layer.bias")
# A copy of a LoRA layer's base weight, as PEFT saves it for the embedding layers it targets (``save_embedding_layers``).
BASE_LAYER_KEY = re.compile(r"^(?P<module>.+)\.base_layer\.(?P<which>weight|bias)$")
# ``base_weight(module, "weight" | "bias")``: the base model's tensor of an adapted layer, or None if it has none.
BaseWeight = Callable[[str, str], "torch.Tensor | None"]
SHARED_BASE = "a shared base model cannot serve an adapter that changes base weights"


@dataclasses.dataclass(frozen=True)
class LayerWeights:
    """One layer of a validated adapter, on the host in the pool's dtype."""

    lora_A: torch.Tensor  # [r, K]; [E, r, K] for a fused-experts parameter
    lora_B: torch.Tensor  # [N, r]; [E, N, r] for a fused-experts parameter
    scaling: float

    @property
    def rank(self) -> int:
        return self.lora_A.shape[-2]


def read_adapter_source(
    adapter: AdapterSource,
    config: LoraConfig | Mapping[str, Any] | None,
    allow_pickle: bool,
    modules: Collection[str] | None = None,
) -> tuple[LoraConfig, dict[str, torch.Tensor], str]:
    """``(config, tensors, origin)`` of an adapter given as a PEFT-format path or as a state dict (see
    ``AdapterPool.register``): tensor keys module-relative, LoRA keys in PEFT's saved form; ``origin`` names the
    source in error messages. With ``modules`` (the pool's layers), a file's tensors of other modules are never read:
    their keys are refused from the file's header alone."""
    if config is not None and not isinstance(config, (LoraConfig, Mapping)):
        raise TypeError(
            f"AdapterPool.register: config must be a fastlora.LoraConfig or a dict of PEFT config fields, got "
            f"{type(config).__name__}"
        )
    if isinstance(adapter, Mapping):
        tensors = {}
        for key, tensor in adapter.items():
            if not isinstance(key, str):
                raise TypeError(f"AdapterPool.register: state dict key {key!r} is a {type(key).__name__}, not a str")
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"AdapterPool.register: state dict entry {key!r} is not a tensor")
            module_key = lora_key(key)
            if module_key in tensors:
                raise ValueError(f"AdapterPool.register: state dict has two entries for {module_key!r}")
            tensors[module_key] = tensor
        if config is None:
            raise ValueError(
                "AdapterPool.register: a state dict needs config= (a fastlora.LoraConfig, or PEFT config fields "
                "such as {'r': 8, 'lora_alpha': 16}) for its scaling"
            )
        if not isinstance(config, LoraConfig):
            fields = dict(config)
            if fields.get("target_modules") is None:
                fields["target_modules"] = sorted({k.rsplit(".", 2)[0] for k in tensors if LORA_KEY.match(k)})
            config = LoraConfig.from_peft_dict(fields)
        return config, tensors, "the state dict"
    if isinstance(adapter, (str, os.PathLike)):
        if config is not None and not isinstance(config, LoraConfig):
            config = LoraConfig.from_peft_dict(dict(config))
        usable = None if modules is None else (lambda _: _usable_keys(modules))
        read = read_adapter_file(adapter, config=config, allow_pickle=allow_pickle, keys=usable)
        if read.skipped:
            _refuse_skipped(read.skipped, modules, f"AdapterPool.register: {Path(adapter)}")
        return read.config, {key: tensor for key, (_, tensor) in read.tensors.items()}, str(Path(adapter))
    raise TypeError(f"AdapterPool.register: expected a path or a state dict, got {type(adapter).__name__}")


def _refuse_skipped(skipped: list[str], modules: Collection[str], where: str) -> None:
    """The error for file keys left unread because no module of the pool can use them (as ``validate_adapter`` words
    it for a state dict)."""
    match = LORA_KEY.match(lora_key(skipped[0]))
    if match is None:
        raise ValueError(
            f"{where}: {skipped[0]!r} is not a LoRA weight (lora_A / lora_B); only LoRA weights are served"
        )
    raise ValueError(
        f"{where}: module {match['module']!r} is not adapted by this pool (unknown module; unread keys: "
        f"{listing(skipped)}); the pool adapts: {listing(modules)}"
    )


def _usable_keys(modules: Collection[str]) -> set[str]:
    """The keys an adapter for a pool over ``modules`` (layer names, and the other key prefixes of ``aliases``) may
    hold: LoRA pairs and copies of the base layers."""
    return {f"{m}.{part}" for m in modules for part in _MODULE_KEYS}


# ``aliases(selected)``: for the pool layers an adapter's config selects, ``{key prefix: layer}`` of the layers whose
# saved keys are not ``<layer>.lora_A.weight``: PEFT saves the LoRA of a parameter (``target_parameters``) under its
# module's name, nested ``.base_layer`` prefixes telling several parameters of one module apart.
Aliases = Callable[[Collection[str]], Mapping[str, str]]


def validate_adapter(
    name: str,
    config: LoraConfig,
    tensors: dict[str, torch.Tensor],
    origin: str,
    *,
    shapes: Mapping[str, tuple[int, int]],
    select: Callable[[LoraConfig], Iterable[str]],
    max_rank: int,
    dtype: torch.dtype,
    pin: bool,
    base_weight: BaseWeight | None = None,
    aliases: Aliases | None = None,
) -> dict[str, LayerWeights]:
    """Per-layer weights of adapter ``name`` for a pool over ``shapes`` (``{layer: (in_features, out_features)}``, or
    ``(in_features, out_features, experts)`` for a fused-experts parameter, whose saved ``lora_A [r·E, K]`` and
    interleaved ``lora_B [N, r·E]`` become ``[E, r, K]`` and ``[E, N, r]``), in ``dtype`` (pinned host memory with
    ``pin``; always copies, never the caller's tensors), after every check of the module docstring. ``select`` maps
    the config to the layers it adapts in the model; ``aliases`` gives the saved key prefixes of parameter layers;
    ``base_weight`` gives the base model's tensors that base-layer copies are compared with (None: such copies are
    refused)."""
    where = f"AdapterPool.register: {origin}"
    for field, default in UNSERVABLE_FIELDS.items():
        if getattr(config, field) not in (default, None, []):
            raise NotImplementedError(
                f"{where}: {field}={getattr(config, field)!r} changes the base model per adapter, which a shared "
                f"base model cannot serve (only {field}={default!r} is supported)"
            )
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = LORA_KEY.match(key)
        if match is None and (base := BASE_LAYER_KEY.match(key)) is not None:
            _check_base_copy(where, key, base["module"], base["which"], tensor, shapes, base_weight)
            continue
        if match is None:
            raise ValueError(f"{where}: {key!r} is not a LoRA weight (lora_A / lora_B); only LoRA weights are served")
        pairs.setdefault(match["module"], {})[match["which"]] = tensor
    selected = set(select(config))
    renamed = dict(aliases(selected & set(shapes))) if aliases is not None else {}
    pairs = {renamed.get(module, module): pair for module, pair in pairs.items()}
    for module in pairs:
        if module not in shapes:
            raise ValueError(
                f"{where}: module {module!r} is not adapted by this pool (unknown module); the pool adapts: "
                f"{listing(shapes)}"
            )
    if not selected:
        raise ValueError(
            f"{where}: adapter {name!r}: the config's target_modules={config.target_modules!r} select no module of "
            f"this pool (nothing to adapt); the pool adapts: {listing(shapes)}"
        )
    unknown = selected - set(shapes)
    if unknown:
        raise ValueError(
            f"{where}: the config's target_modules={config.target_modules!r} select modules this pool does not "
            f"adapt (unknown modules): {listing(unknown)}; the pool adapts: {listing(shapes)}"
        )
    if set(pairs) != selected:
        raise ValueError(
            f"{where}: the weights do not match the config's target_modules={config.target_modules!r}: modules "
            f"selected without weights: {listing(selected - set(pairs)) or 'none'}; weights of modules it does "
            f"not select: {listing(set(pairs) - selected) or 'none'}"
        )
    layers = {}
    for module in sorted(pairs):
        pair = pairs[module]
        for which in ("lora_A", "lora_B"):
            if which not in pair:
                raise ValueError(f"{where}: {module}.{which}.weight is missing")
        in_features, out_features, *experts = shapes[module]
        E = experts[0] if experts else 1
        a, b = pair["lora_A"], pair["lora_B"]
        for which, t in (("lora_A", a), ("lora_B", b)):
            if not t.is_floating_point():
                raise ValueError(f"{where}: {module}.{which}.weight is {t.dtype}, not floating point")
            if t.dim() != 2:
                raise ValueError(f"{where}: {module}.{which}.weight must be 2-D, got shape {tuple(t.shape)}")
        r = a.shape[0] // E
        if a.shape[0] % E or a.shape[1] != in_features or b.shape != (out_features, r * E):
            rows = "r" if not experts else f"r·{E}"
            raise ValueError(
                f"{where}: {module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the layer "
                f"(expected [{rows}, {in_features}] and [{out_features}, {rows}])"
            )
        if experts:  # PEFT's layout: expert e has rows e·r .. e·r + r - 1 of A and columns k·E + e of B
            a, b = a.reshape(E, r, in_features), b.reshape(out_features, r, E).permute(2, 0, 1)
        if r < 1 or r > max_rank:
            raise ValueError(f"{where}: {module} has rank {r}, over the pool's max_rank={max_rank}")
        if r != config.rank_for(module):
            raise ValueError(
                f"{where}: {module} has rank {r} but the config gives it r={config.rank_for(module)} (its scaling "
                "depends on it; fix r / rank_pattern)"
            )
        scaling = _finite_scaling(where, config, module)
        a, b = _owned(a, dtype, pin), _owned(b, dtype, pin)
        for which, t in (("lora_A", a), ("lora_B", b)):
            if not torch.isfinite(t).all():
                raise ValueError(f"{where}: {module}.{which}.weight has non-finite values (in {dtype})")
        layers[module] = LayerWeights(a, b, scaling)
    _finite_scaling(where, config, None)  # the slots' default scaling
    return layers


def _finite_scaling(where: str, config: LoraConfig, module: str | None) -> float:
    """The scaling of ``module`` (None: the config's default), refused unless finite in float32: a NaN or an infinite
    scaling makes every row served with it NaN."""
    if module is None:
        alpha, field = config.lora_alpha, "lora_alpha"
    else:
        alpha = config.alpha_for(module)
        field = "lora_alpha" if alpha is config.lora_alpha else "alpha_pattern"
    layer = "the default scaling" if module is None else f"module {module!r}"
    try:  # lora_scaling refuses a scaling that is not finite in float32
        return config.scaling if module is None else config.scaling_for(module)
    except (ValueError, TypeError, ArithmeticError) as error:
        raise ValueError(
            f"{where}: {layer}: the scaling from {field}={alpha!r} is not finite in float32 ({error}): every row "
            f"served with it would be NaN or infinite; fix {field}"
        ) from error


def _owned(tensor: torch.Tensor, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """``tensor`` as a contiguous host tensor of ``dtype`` in memory of its own (``Tensor.to`` and ``contiguous``
    return the tensor itself when there is nothing to do: the caller could then change the served adapter, unchecked)."""
    out = tensor.detach().to("cpu", dtype).contiguous()
    if out.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr():
        out = out.clone()
    return out.pin_memory() if pin else out


def _check_base_copy(
    where: str,
    key: str,
    module: str,
    which: str,
    tensor: torch.Tensor,
    shapes: Mapping[str, tuple[int, int]],
    base_weight: BaseWeight | None,
) -> None:
    """Accept ``key``, a copy of ``module``'s base ``which`` (``weight`` / ``bias``), only if it is the model's own."""
    prefix = f"{where}: {key!r} is not a LoRA weight but a copy of the base model's {module}.{which}"
    if module not in shapes:
        raise ValueError(
            f"{prefix}, a module not adapted by this pool (unknown module; the pool adapts: {listing(shapes)}); "
            f"{SHARED_BASE}"
        )
    if base_weight is None:
        raise ValueError(
            f"{prefix}, and this pool has no base model to compare it with: {SHARED_BASE} (an AdapterPool built "
            "with base_weight=, as MultiLoraModel builds it, accepts copies equal to the model's)"
        )
    base = base_weight(module, which)
    if base is None:
        raise ValueError(f"{prefix}, which the model does not have; {SHARED_BASE}")
    if tuple(tensor.shape) != tuple(base.shape):
        raise ValueError(
            f"{prefix}, of shape {tuple(tensor.shape)} where the model's is {tuple(base.shape)}; {SHARED_BASE}"
        )
    with torch.no_grad():
        same = torch.equal(tensor.detach().to(base.device, base.dtype), base.detach())
    if not same:
        raise ValueError(
            f"{prefix}, and it differs from the model's (compared in {base.dtype}): the adapter changes a base weight, "
            f"and {SHARED_BASE} (every row's base layer is the model's)"
        )
