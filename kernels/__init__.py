"""fastlora's Triton kernels and their launchers. No autograd and no ``nn`` here: see ``fastlora.ops``."""

from .expand import lora_expand
from .multi_lora import MAX_SEGMENT_TOKENS as MULTI_MAX_SEGMENT_TOKENS
from .multi_lora import multi_lora_expand, multi_lora_fused, multi_lora_linear_triton, multi_lora_shrink
from .onepass import MAX_RANK as ONEPASS_MAX_RANK
from .onepass import lora_onepass
from .shrink import lora_shrink
from .wgrad import lora_wgrad

__all__ = [
    "lora_expand",
    "lora_onepass",
    "lora_shrink",
    "lora_wgrad",
    "MULTI_MAX_SEGMENT_TOKENS",
    "multi_lora_expand",
    "multi_lora_fused",
    "multi_lora_linear_triton",
    "multi_lora_shrink",
    "ONEPASS_MAX_RANK",
]
