"""fastlora's Triton kernels and their launchers. No autograd and no ``nn`` here: see ``fastlora.ops``."""

from .expand import lora_expand
from .onepass import MAX_RANK as ONEPASS_MAX_RANK
from .onepass import lora_onepass
from .shrink import lora_shrink
from .wgrad import lora_wgrad

__all__ = ["lora_expand", "lora_onepass", "lora_shrink", "lora_wgrad", "ONEPASS_MAX_RANK"]
