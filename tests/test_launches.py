"""Launch accounting (``fastlora.bench.count_launches``): what the counter sees, and the launch budget of a fastlora
training step. On CPU the Triton kernels run in the interpreter and launches are counted at the launchers; on CUDA
they come from ``torch.profiler``.

Budget (PERF.md, "Gates a CPU can hold"): a training forward+backward of one layer with 16-bit activations, ``x``
requiring grad and ``W0`` frozen, launches at most 6 kernels with dropout and 5 without, and never makes the host wait
for the device. fp32 activations take one launch more (``dA`` apart from the ``dx`` GEMM: ``kernels.backward``). A
frozen ``nn.Linear`` launches 2.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastlora
from fastlora import kernels
from fastlora.bench.launches import count_launches
from fastlora.ops import ONEPASS_MAX_TOKENS

M, K, N, R = 256, 64, 64, 8
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Launch budget of a training step with / without dropout, and what fp32 activations add.
BUDGET = {0.1: 6, 0.0: 5}
FP32_EXTRA = 1


class Layer:
    """One layer's tensors: frozen ``W0`` and bias in the activations' dtype, trainable fp32 ``A``/``B`` (as PEFT keeps
    them), ``x`` requiring grad, a fixed upstream gradient."""

    def __init__(self, device: str, dtype: torch.dtype):
        g = torch.Generator(device=device).manual_seed(0)

        def randn(*shape, dt=dtype, scale=1.0):
            return (torch.randn(*shape, generator=g, device=device) * scale).to(dt)

        self.x = randn(M, K).requires_grad_()
        self.weight = randn(N, K, scale=K**-0.5)
        self.bias = randn(N)
        self.lora_A = nn.Parameter(randn(R, K, dt=torch.float32, scale=K**-0.5))
        self.lora_B = nn.Parameter(randn(N, R, dt=torch.float32, scale=R**-0.5))
        self.dy = randn(M, N)

    def step(self, forward):
        """A training step of ``forward()``: the leaves' gradients cleared, forward, backward of ``dy``."""

        def call():
            for t in (self.x, self.lora_A, self.lora_B):
                t.grad = None
            forward().backward(self.dy)

        return call

    def fastlora(self, dropout: float):
        return self.step(
            lambda: fastlora.lora_linear(self.x, self.weight, self.bias, self.lora_A, self.lora_B, 2.0, dropout, True)
        )

    def frozen(self):
        return self.step(lambda: F.linear(self.x, self.weight, self.bias))

    def naive(self, dropout: float):
        """PEFT's formula written out: the LoRA branch in the adapters' dtype, dropout on its input, cast back."""

        def forward():
            xl = F.dropout(self.x.to(self.lora_A.dtype), dropout, training=True)
            lora = F.linear(F.linear(xl, self.lora_A), self.lora_B) * 2.0
            return (F.linear(self.x, self.weight, self.bias) + lora).to(self.x.dtype)

        return self.step(forward)


def counted(fn, device):
    fn()  # warm-up: autotuning and lazy initialisation launch work of their own
    return count_launches(fn, device)


def test_the_step_takes_the_split_forward():
    assert M > ONEPASS_MAX_TOKENS


@pytest.mark.parametrize("dropout", [0.1, 0.0])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_fastlora_training_step_launch_budget(device, dtype, dropout):
    layer = Layer(device, DTYPES[dtype])
    count = counted(layer.fastlora(dropout), device)
    listing = "\n".join(f"  {name}: {n} B" for name, n in count.kernels)
    assert count.host_syncs == 0, f"{count.host_syncs} host syncs; launches:\n{listing}"
    budget = BUDGET[dropout] + (FP32_EXTRA if dtype == "fp32" else 0)
    assert count.launches <= budget, f"{count.launches} launches > {budget}:\n{listing}"


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_frozen_linear_training_step_launches_two(device, dtype):
    count = counted(Layer(device, DTYPES[dtype]).frozen(), device)
    assert (count.launches, count.host_syncs) == (2, 0), count
    if device == "cpu":
        assert count.names() == ["aten::addmm", "aten::mm"]  # y = b + x·W0ᵀ, then dx = dy·W0
        itemsize = DTYPES[dtype].itemsize
        assert count.bytes == itemsize * ((M * K + N * K + N + M * N) + (M * N + N * K + M * K))


def test_naive_lora_launches_more_than_the_budget(device):
    count = counted(Layer(device, torch.bfloat16).naive(0.1), device)
    assert count.launches > BUDGET[0.1] and count.host_syncs == 0, count


def test_item_is_a_host_sync_and_zeros_a_launch(device):
    item = count_launches(lambda: torch.ones(4, device=device).sum().item(), device)
    assert item.host_syncs == 1 and item.launches == 3, item  # fill, sum, the copy .item() reads
    assert count_launches(lambda: torch.zeros(8, device=device), device).launches == 1
    x = torch.zeros(8, 4, device=device)
    nothing = count_launches(lambda: (torch.empty(8, device=device), x.t(), x.view(4, 8), x[1:], x.to(x.dtype)), device)
    assert (nothing.launches, nothing.host_syncs) == (0, 0), nothing


@torch.library.custom_op("fastlora_test::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(x)
    return out.add_(x).add_(x)


@_twice.register_fake
def _(x):
    return torch.empty_like(x)


class _Double(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, dy):
        return dy * 2


def test_ops_inside_custom_ops_and_autograd_functions_are_counted(device):
    x = torch.ones(16, device=device)
    count = count_launches(lambda: _twice(x), device)
    assert count.launches == 3 and count.host_syncs == 0, count  # the fill, then two adds
    x.requires_grad_()
    count = count_launches(lambda: _Double.apply(x).sum().backward(), device)
    # forward: mul, sum; backward: the fill of sum's gradient (its expand is a view), mul
    assert count.launches == 4 and count.host_syncs == 0, count


@pytest.mark.skipif(not torch.cuda.is_available() and not kernels.is_interpreting(), reason="no Triton")
def test_a_triton_launch_is_one_launch_of_its_operands_bytes(device):
    x = torch.randn(M, K, device=device)
    wt = torch.randn(K, R, device=device)
    count = counted(lambda: kernels.lora_shrink(x, wt, 1.0, torch.float32), device)
    assert count.launches == 1 and count.host_syncs == 0, count
    assert count.kernels == (("lora_shrink", 4 * (M * K + K * R + M * R)),)
