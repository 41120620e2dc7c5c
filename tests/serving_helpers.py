"""Shared pieces of the serving tests: random PEFT-format adapters and single-adapter oracles."""

import torch
from safetensors.torch import load_file
from tiny_models import HIDDEN
from tolerances import assert_close

import fastlora

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.tensor(
    [[1, 5, 9, 33, 2, 64], [3, 3, 80, 12, 127, 0], [7, 100, 7, 44, 18, 2], [60, 61, 62, 1, 2, 3], [1, 5, 9, 33, 2, 64]]
)


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert_close(actual, expected, torch.float32, reduce_len=4 * HIDDEN, name=name)


def random_adapter(directory, build, seed: int, **config) -> str:
    """Save a fastlora adapter with random (non-zero) weights for ``build()``'s model; returns the directory."""
    model = fastlora.apply_lora(build(), fastlora.LoraConfig(init_lora_weights=False, **config))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.2)
    fastlora.save_adapter(model, directory)
    return directory


def adapter_state_dict(directory) -> dict[str, torch.Tensor]:
    return load_file(directory / "adapter_model.safetensors")


@torch.no_grad()
def oracle_logits(build, directory, ids: torch.Tensor, b_scale: float = 1.0) -> torch.Tensor:
    """Logits of ``build()`` with the adapter in ``directory`` (None: the base model), as a single-adapter fastlora
    model computes them; ``b_scale`` multiplies every ``lora_B`` (an adapter at that strength)."""
    model = build()
    if directory is not None:
        fastlora.load_adapter(model, directory)
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.mul_(b_scale)
    return model(ids).logits


def expected_rows(build, dirs: dict, rows: list, ids: torch.Tensor) -> torch.Tensor:
    """Row ``i`` of the oracle for adapter ``rows[i]``."""
    cache = {}
    out = []
    for i, name in enumerate(rows):
        if name not in cache:
            cache[name] = oracle_logits(build, None if name is None else dirs[name], ids)
        out.append(cache[name][i])
    return torch.stack(out)
