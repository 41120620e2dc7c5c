"""Hostile arguments: every op refuses them the same way on both backends, before anything is computed.

The triton backend runs on CPU through the interpreter (conftest); the refusals never reach a kernel, so these tests
stay fast. Tiny shapes throughout: ``x [M, K]``, ``W0 [N, K]``, rank ``R``.
"""

import re

import numpy as np
import pytest
import torch
from tolerances import assert_close

import fastlora
from fastlora import reference
from fastlora.ops import BatchMeta, StaticBatch

M, K, N, R = 3, 8, 5, 2
BACKENDS = ("torch", "triton")


def _inputs(dtype=torch.float32, lora_dtype=None, bias_dtype=None, grad=False, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, dtype=dtype, scale=1.0):
        t = (torch.randn(*shape, generator=g) * scale).to(dtype)
        return t.requires_grad_(grad)

    lora_dtype = lora_dtype or dtype
    return dict(
        x=rand(M, K),
        weight=rand(N, K, scale=K**-0.5).detach(),
        bias=rand(N, dtype=bias_dtype or dtype),
        lora_A=rand(R, K, dtype=lora_dtype, scale=K**-0.5),
        lora_B=rand(N, R, dtype=lora_dtype),
        scaling=2.0,
    )


def _scaling_with_grad():
    return torch.tensor(2.0, requires_grad=True)


# (id, change to the valid call, error type, fragment of the message). Values are built lazily so that every test
# gets fresh tensors.
BAD_LORA_LINEAR = [
    ("seed-empty", lambda: {"seed": torch.empty(0, dtype=torch.int64)}, ValueError, "seed must hold exactly one element, got an empty tensor"),
    ("seed-two", lambda: {"seed": torch.tensor([1, 2])}, ValueError, "seed must hold exactly one element, got 2 elements"),
    ("seed-float", lambda: {"seed": torch.tensor([1.0])}, TypeError, "seed must be an int64 tensor .* torch.float32"),
    ("seed-int32", lambda: {"seed": torch.tensor([1], dtype=torch.int32)}, TypeError, "seed must be an int64 tensor .* torch.int32"),
    ("seed-device", lambda: {"seed": torch.zeros(1, dtype=torch.int64, device="meta")}, ValueError, "seed must be on x's device \\(cpu\\), got a tensor on meta"),
    ("seed-negative", lambda: {"seed": -1}, ValueError, "seed must be in \\[0, 2\\*\\*63\\)"),
    ("seed-too-big", lambda: {"seed": 2**63}, ValueError, "seed must be in \\[0, 2\\*\\*63\\)"),
    ("seed-bool", lambda: {"seed": True}, TypeError, "seed must be None, a Python int .*got bool"),
    ("seed-float-number", lambda: {"seed": 1.5}, TypeError, "seed must be None, a Python int .*got float"),
    ("seed-ndarray", lambda: {"seed": np.array([1])}, TypeError, "seed must be None, a Python int .*got ndarray"),
    ("seed-empty-dropout", lambda: {"seed": torch.empty(0, dtype=torch.int64), "dropout_p": 0.5, "training": True}, ValueError, "seed must hold exactly one element"),
    ("x-ndarray", lambda: {"x": np.zeros((M, K), dtype=np.float32)}, TypeError, "x must be a torch.Tensor, got ndarray"),
    ("x-list", lambda: {"x": [[0.0] * K] * M}, TypeError, "x must be a torch.Tensor, got list"),
    ("x-none", lambda: {"x": None}, TypeError, "x must be a torch.Tensor, got NoneType"),
    ("weight-ndarray", lambda: {"weight": np.zeros((N, K), dtype=np.float32)}, TypeError, "weight must be a torch.Tensor, got ndarray"),
    ("bias-list", lambda: {"bias": [0.0] * N}, TypeError, "bias must be a torch.Tensor or None, got list"),
    ("lora_A-list", lambda: {"lora_A": [[0.0] * K] * R}, TypeError, "lora_A must be a torch.Tensor, got list"),
    ("lora_B-ndarray", lambda: {"lora_B": np.zeros((N, R), dtype=np.float32)}, TypeError, "lora_B must be a torch.Tensor, got ndarray"),
    ("scaling-requires-grad", lambda: {"scaling": _scaling_with_grad()}, ValueError, "gradients with respect to scaling are not supported"),
    ("scaling-nan", lambda: {"scaling": float("nan")}, ValueError, "scaling must be finite, got nan"),
    ("scaling-inf", lambda: {"scaling": float("-inf")}, ValueError, "scaling must be finite, got -inf"),
    ("scaling-huge-int", lambda: {"scaling": 10**400}, ValueError, "scaling must be finite"),
    ("scaling-nan-tensor", lambda: {"scaling": torch.tensor(float("nan"))}, ValueError, "scaling must be finite, got nan"),
    ("scaling-bool", lambda: {"scaling": True}, TypeError, "scaling must be a real number .*got bool"),
    ("scaling-str", lambda: {"scaling": "2"}, TypeError, "scaling must be a real number .*got str"),
    ("scaling-two", lambda: {"scaling": torch.tensor([1.0, 2.0])}, ValueError, "scaling must hold one element, got a tensor of shape \\(2,\\)"),
    ("scaling-device", lambda: {"scaling": torch.tensor(2.0, device="meta")}, ValueError, "scaling must be a Python number or a CPU tensor, got a tensor on meta"),
    ("scaling-bool-tensor", lambda: {"scaling": torch.tensor(True)}, TypeError, "scaling must be a real number, got a torch.bool tensor"),
    ("dropout-bool", lambda: {"dropout_p": True}, TypeError, "dropout_p must be a float in \\[0, 1\\), got bool"),
    ("dropout-nan", lambda: {"dropout_p": float("nan"), "training": True}, ValueError, "dropout_p must be in \\[0, 1\\), got nan"),
    ("dropout-nan-eval", lambda: {"dropout_p": float("nan")}, ValueError, "dropout_p must be in \\[0, 1\\), got nan"),
    ("dropout-str", lambda: {"dropout_p": "0.1"}, TypeError, "dropout_p must be a float"),
    ("training-str", lambda: {"training": "yes"}, TypeError, "training must be a bool, got str"),
    ("training-two", lambda: {"training": 2}, TypeError, "training must be a bool, got int 2"),
    ("training-none", lambda: {"training": None}, TypeError, "training must be a bool, got NoneType"),
]  # fmt: skip


def _raised(change, backend) -> BaseException:
    with pytest.raises(Exception) as info:
        fastlora.lora_linear(**{**_inputs(), **change()}, backend=backend)
    return info.value


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("change, error, match", [c[1:] for c in BAD_LORA_LINEAR], ids=[c[0] for c in BAD_LORA_LINEAR])
def test_lora_linear_refuses(change, error, match, backend):
    err = _raised(change, backend)
    assert type(err) is error, f"{type(err).__name__}: {err}"
    assert str(err).startswith("fastlora.lora_linear: ")
    assert re.search(match, str(err)), str(err)


@pytest.mark.parametrize("change", [c[1] for c in BAD_LORA_LINEAR], ids=[c[0] for c in BAD_LORA_LINEAR])
def test_both_backends_raise_the_same_error(change):
    errors = [_raised(change, backend) for backend in BACKENDS]
    assert type(errors[0]) is type(errors[1])
    assert str(errors[0]) == str(errors[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "bad",
    [{"seed": torch.tensor([1, 2])}, {"scaling": float("nan")}, {"dropout_p": True}, {"training": "yes"}],
    ids=["seed", "scaling", "dropout_p", "training"],
)
def test_refused_call_modifies_nothing(bad, backend):
    kwargs = {**_inputs(), "dropout_p": 0.5, "training": True}
    seed = torch.tensor([7], dtype=torch.int64)
    kwargs["seed"] = seed
    kwargs.update(bad)
    tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    before = {k: (v.clone(), v._version) for k, v in tensors.items()}
    with pytest.raises((TypeError, ValueError)):
        fastlora.lora_linear(**kwargs, backend=backend)
    for k, (copy, version) in before.items():
        assert torch.equal(tensors[k], copy), k
        assert tensors[k]._version == version, k


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "change",
    [
        {"seed": 5},
        {"seed": torch.tensor(5)},
        {"seed": torch.tensor([5])},
        {"seed": torch.tensor([[5]])},
        {"seed": 2**63 - 1},
        {"seed": torch.tensor([-(2**40)])},  # a tensor's 64 bits are the key, whatever their sign
        {"scaling": 2},
        {"scaling": np.float32(2.0)},
        {"scaling": torch.tensor(2.0)},
        {"scaling": torch.tensor([2], dtype=torch.int64)},
        {"training": 0},
        {"dropout_p": 0},
    ],
    ids=["seed-int", "seed-0d", "seed-1", "seed-1x1", "seed-max", "seed-negative-tensor", "scaling-int",
         "scaling-numpy", "scaling-tensor", "scaling-int-tensor", "training-int", "dropout-int"],
)  # fmt: skip
def test_accepted_forms_give_the_plain_result(change, backend):
    kwargs = _inputs()
    expected = fastlora.lora_linear(**kwargs, backend=backend)
    assert torch.equal(fastlora.lora_linear(**{**kwargs, **change}, backend=backend), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int_and_tensor_seeds_draw_the_same_mask(backend):
    kwargs = {**_inputs(), "dropout_p": 0.5, "training": True}
    from_int = fastlora.lora_linear(**kwargs, seed=1234, backend=backend)
    from_tensor = fastlora.lora_linear(**kwargs, seed=torch.tensor([1234]), backend=backend)
    assert torch.equal(from_int, from_tensor)
    assert not torch.equal(from_int, fastlora.lora_linear(**kwargs, backend=backend, seed=1235))


# ------------------------------------------------------------------------------------- mixed dtypes, both backends


@pytest.mark.parametrize("bias_grad", [False, True], ids=["frozen-bias", "bias-grad"])
@pytest.mark.parametrize("wide_lora", [False, True], ids=["lora-x-dtype", "lora-fp32"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp32_bias_with_16bit_x_matches_the_reference(dtype, wide_lora, bias_grad):
    """16-bit x with an fp32 bias (and fp32 LoRA weights): both backends against the fp64 reference, y and every
    gradient in the dtype the backends return it in."""
    lora_dtype = torch.float32 if wide_lora else dtype
    ref_in = {k: v.detach().double().requires_grad_(k != "weight") if isinstance(v, torch.Tensor) else v
              for k, v in _inputs(dtype, lora_dtype, torch.float32).items()}  # fmt: skip
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(3)).to(dtype)
    y_ref = reference.lora_linear_reference(**ref_in)
    y_ref.backward(dy.double())
    for backend in BACKENDS:
        kw = _inputs(dtype, lora_dtype, torch.float32, grad=True)
        kw["weight"].requires_grad_(False)
        kw["bias"].requires_grad_(bias_grad)
        y = fastlora.lora_linear(**kw, backend=backend)
        assert y.dtype == dtype
        y.backward(dy)
        assert_close(y, y_ref, dtype, K, f"{backend} y")
        assert_close(kw["x"].grad, ref_in["x"].grad, dtype, N, f"{backend} dx")
        assert kw["lora_A"].grad.dtype == lora_dtype and kw["lora_B"].grad.dtype == lora_dtype
        assert_close(kw["lora_A"].grad, ref_in["lora_A"].grad, dtype, M, f"{backend} dA")
        assert_close(kw["lora_B"].grad, ref_in["lora_B"].grad, dtype, M, f"{backend} dB")
        if bias_grad:
            assert kw["bias"].grad.dtype == torch.float32
            assert_close(kw["bias"].grad, ref_in["bias"].grad, dtype, M, f"{backend} db")
        else:
            assert kw["bias"].grad is None


def test_autocast_with_fp32_lora_weights_runs_on_both_backends():
    """Under autocast the base GEMM runs in the autocast dtype and fp32 LoRA weights and bias stay fp32: the torch
    backend computes it as the kernels do instead of letting autocast recast its GEMMs."""
    ref_in = {k: v.detach().double() if isinstance(v, torch.Tensor) else v for k, v in _inputs().items()}
    ref_in["x"] = ref_in["x"].to(torch.bfloat16).double()
    ref_in["weight"] = ref_in["weight"].to(torch.bfloat16).double()
    y_ref = reference.lora_linear_reference(**ref_in)
    for backend in BACKENDS:
        kw = _inputs(grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fastlora.lora_linear(**kw, backend=backend)
        assert y.dtype == torch.bfloat16
        assert_close(y, y_ref, torch.bfloat16, K, backend)
        y.float().sum().backward()
        assert kw["lora_A"].grad.dtype == torch.float32 and torch.isfinite(kw["lora_A"].grad).all()


# ------------------------------------------------------------------------------------------------- double backward


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("wrt", ["lora_A", "x"])
def test_double_backward_is_refused(wrt, backend):
    kw = _inputs()
    kw[wrt].requires_grad_(True)
    y = fastlora.lora_linear(**kw, backend=backend)
    with pytest.raises(RuntimeError, match=r"fastlora.lora_linear: second-order gradients \(double backward"):
        torch.autograd.grad(y.sum(), kw[wrt], create_graph=True)
    # A first-order gradient of the same call still works.
    (g,) = torch.autograd.grad(fastlora.lora_linear(**kw, backend=backend).sum(), kw[wrt])
    assert g.shape == kw[wrt].shape and not g.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_through_the_compiled_op_is_refused(backend):
    kw = _inputs()
    kw["lora_A"].requires_grad_(True)
    torch._dynamo.reset()
    fn = torch.compile(fastlora.lora_linear, backend="aot_eager", fullgraph=True)
    y = fn(**kw, backend=backend)
    with pytest.raises(RuntimeError, match="double backward"):
        (g,) = torch.autograd.grad(y.sum(), kw["lora_A"], create_graph=True)
        g.sum().backward()


# ------------------------------------------------------------------------------------------------ multi_lora_linear

SLOTS = 2


def _multi_inputs():
    g = torch.Generator().manual_seed(0)
    meta = BatchMeta.build([0, -1, 1], [R, R], [2.0, 0.5])
    return dict(
        x=torch.randn(M, K, generator=g),
        weight=torch.randn(N, K, generator=g),
        bias=torch.randn(N, generator=g),
        a_pool=torch.randn(SLOTS, R, K, generator=g),
        b_pool=torch.randn(SLOTS, N, R, generator=g),
        meta=meta,
    )


BAD_MULTI = [
    ("x-ndarray", lambda: {"x": np.zeros((M, K), dtype=np.float32)}, TypeError, "x must be a torch.Tensor, got ndarray"),
    ("x-none", lambda: {"x": None}, TypeError, "x must be a torch.Tensor, got NoneType"),
    ("a_pool-list", lambda: {"a_pool": [0.0]}, TypeError, "a_pool must be a torch.Tensor, got list"),
    ("bias-ndarray", lambda: {"bias": np.zeros(N)}, TypeError, "bias must be a torch.Tensor or None, got ndarray"),
    ("slot_scalings-list", lambda: {"slot_scalings": [1.0, 2.0]}, TypeError, "slot_scalings must be a torch.Tensor or None, got list"),
    ("meta-dict", lambda: {"meta": {}}, TypeError, "meta must be a fastlora.ops.BatchMeta, got dict"),
    ("pool-dtype", lambda: {"a_pool": torch.randn(SLOTS, R, K, dtype=torch.float16)}, TypeError, "a_pool.dtype"),
    ("slot_scalings-dtype", lambda: {"slot_scalings": torch.ones(SLOTS, dtype=torch.float64)}, ValueError, "slot_scalings must be a float32 tensor"),
]  # fmt: skip


@pytest.mark.parametrize("change, error, match", [c[1:] for c in BAD_MULTI], ids=[c[0] for c in BAD_MULTI])
def test_multi_lora_linear_refuses(change, error, match):
    errors = []
    for backend in BACKENDS:
        with torch.no_grad(), pytest.raises(error, match=match) as info:
            fastlora.multi_lora_linear(**{**_multi_inputs(), **change()}, backend=backend)
        errors.append(info.value)
    assert str(errors[0]) == str(errors[1]) and str(errors[0]).startswith("fastlora.multi_lora_linear: ")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"slot_scalings": [1.0, float("nan")]}, r"slot_scalings\[1\] \(the slot 1\) is nan"),
        ({"slot_scalings": [float("inf"), 1.0]}, r"slot_scalings\[0\] \(the slot 0\) is inf"),
        ({"token_scales": [1.0, 1.0, float("-inf")]}, r"token_scales\[2\] \(the token 2\) is -inf"),
    ],
    ids=["slot-nan", "slot-inf", "token-inf"],
)
def test_batch_meta_refuses_non_finite_scales(kwargs, match):
    args = {"token_slots": [0, -1, 1], "slot_ranks": [R, R], "slot_scalings": [2.0, 0.5], **kwargs}
    with pytest.raises(ValueError, match=match):
        BatchMeta.build(**args)
    static = StaticBatch(M, SLOTS, R, "cpu", token_scales="token_scales" in kwargs)
    before = static.meta.slot_scalings.clone()
    with pytest.raises(ValueError, match=match):
        static.update(**args)
    assert torch.equal(static.meta.slot_scalings, before)
