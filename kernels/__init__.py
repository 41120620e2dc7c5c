"""fastlora's Triton kernels and their launchers. No autograd and no ``nn`` here: see ``fastlora.ops``.

``GPU_KERNELS`` lists every kernel with its GPU configs and its launcher's pruning rule, for the tools that compile
them for NVIDIA targets without a GPU (``fastlora.static_check``, ``fastlora.aot``); ``SMEM_LIMIT`` is the shared
memory a block may use per architecture (``smem_limit`` prunes configs against one); ``is_interpreting`` tells whether the kernels run in Triton's interpreter;
``recording_launches`` collects the launches made in a block (kernel name, bytes moved), on every backend.
"""

from . import backward, expand, grouped, multi_lora, onepass, shrink, wgrad
from ._common import (
    SMEM_LIMIT,
    GpuKernel,
    Launch,
    in_launch,
    is_interpreting,
    rank_tile,
    recording_launches,
    smem_limit,
)
from .backward import MAX_FUSED_RANK, lora_backward, lora_dx_da, lora_dy, lora_grad_sum
from .expand import lora_expand
from .grouped import grouped_expand_, grouped_shrink, grouped_wgrad, tile_list, tile_rows
from .multi_lora import MAX_SEGMENT_TOKENS as MULTI_MAX_SEGMENT_TOKENS
from .multi_lora import decode_splits as multi_decode_splits
from .multi_lora import multi_lora_expand, multi_lora_fused, multi_lora_shrink
from .multi_lora import segmented_splits as multi_segmented_splits
from .onepass import MAX_RANK as ONEPASS_MAX_RANK
from .onepass import lora_onepass
from .shrink import lora_shrink
from .wgrad import lora_wgrad

GPU_KERNELS: tuple[GpuKernel, ...] = (
    shrink.GPU_KERNEL,
    expand.GPU_KERNEL,
    onepass.GPU_KERNEL,
    wgrad.GPU_KERNEL,
    backward.DY_GPU_KERNEL,
    backward.DX_GPU_KERNEL,
    multi_lora.SHRINK_GPU_KERNEL,
    multi_lora.EXPAND_GPU_KERNEL,
    multi_lora.FUSED_GPU_KERNEL,
    grouped.SHRINK_GPU_KERNEL,
    grouped.EXPAND_GPU_KERNEL,
    grouped.WGRAD_GPU_KERNEL,
)

__all__ = [
    "GPU_KERNELS",
    "GpuKernel",
    "grouped_expand_",
    "grouped_shrink",
    "grouped_wgrad",
    "Launch",
    "in_launch",
    "is_interpreting",
    "lora_backward",
    "lora_dx_da",
    "lora_dy",
    "lora_grad_sum",
    "MAX_FUSED_RANK",
    "lora_expand",
    "lora_onepass",
    "lora_shrink",
    "lora_wgrad",
    "MULTI_MAX_SEGMENT_TOKENS",
    "multi_lora_expand",
    "multi_lora_fused",
    "multi_decode_splits",
    "multi_lora_shrink",
    "multi_segmented_splits",
    "ONEPASS_MAX_RANK",
    "rank_tile",
    "recording_launches",
    "SMEM_LIMIT",
    "smem_limit",
    "tile_list",
    "tile_rows",
]
