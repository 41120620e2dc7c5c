"""fastlora's Triton kernels and their launchers. No autograd and no ``nn`` here: see ``fastlora.ops``."""

from .lora_expand import lora_expand
from .lora_onepass import MAX_RANK as ONEPASS_MAX_RANK
from .lora_onepass import lora_onepass
from .lora_shrink import lora_shrink
from .lora_wgrad import lora_wgrad

__all__ = ["lora_expand", "lora_onepass", "lora_shrink", "lora_wgrad", "ONEPASS_MAX_RANK"]
