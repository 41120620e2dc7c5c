"""fastlora: LoRA layers whose forward and backward are fused Triton kernels."""

from .layers import LoraLinear, lora_scaling
from .ops import lora_linear
from .reference import lora_linear_reference

__version__ = "0.1.0"

__all__ = ["LoraLinear", "lora_linear", "lora_linear_reference", "lora_scaling", "__version__"]
