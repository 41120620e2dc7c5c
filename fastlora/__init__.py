"""fastlora: LoRA layers whose forward and backward are fused Triton kernels."""

from importlib.metadata import PackageNotFoundError, version

from .config import LoraConfig, lora_scaling
from .io import load_adapter, save_adapter
from .layers import LoraExperts, LoraLinear, LoraLinear4bit, LoraParameter, Nf4Linear
from .model import apply_lora, disable_adapters, merge_and_unload, print_trainable_parameters, quantize_nf4, unload
from .nf4 import QuantizedWeight
from .ops import grouped_lora_linear, lora_linear, multi_lora_linear, quant_linear, route
from .peft_compat import patch_peft, unpatch_peft
from .recipes import freeze_bottom_layers, llrd_param_groups, merge_and_reinit
from .reference import lora_linear_reference
from .serving import MultiLoraLinear, MultiLoraModel

try:
    __version__ = version("fastlora")  # pyproject.toml holds the one version
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "LoraConfig",
    "LoraExperts",
    "LoraLinear",
    "LoraLinear4bit",
    "LoraParameter",
    "MultiLoraLinear",
    "MultiLoraModel",
    "Nf4Linear",
    "QuantizedWeight",
    "apply_lora",
    "disable_adapters",
    "freeze_bottom_layers",
    "grouped_lora_linear",
    "llrd_param_groups",
    "load_adapter",
    "lora_linear",
    "lora_linear_reference",
    "lora_scaling",
    "merge_and_reinit",
    "merge_and_unload",
    "multi_lora_linear",
    "patch_peft",
    "print_trainable_parameters",
    "quant_linear",
    "quantize_nf4",
    "route",
    "save_adapter",
    "unload",
    "unpatch_peft",
    "__version__",
]
