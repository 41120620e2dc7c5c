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


# Three PEFT adapters of ranks 4, 8 and 16: rsLoRA with rank and alpha patterns, and one that targets a subset of the
# layers (the others run rank 0 for its slot); a mixed batch of them with a base-only row.
PEFT_CONFIGS = {
    "sql": dict(r=4, lora_alpha=8, target_modules=TARGETS),
    "chat": dict(r=8, lora_alpha=16, target_modules=TARGETS, use_rslora=True, rank_pattern={"v_proj": 2},
                 alpha_pattern={"o_proj": 4}),
    "math": dict(r=16, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
}  # fmt: skip
ROWS = ["sql", None, "chat", "math", "sql"]
PEFT_ROWS = ["__base__" if n is None else n for n in ROWS]


def peft_model_with_adapters(base, out):
    """``(peft_model, {name: directory})``: ``base`` as a PEFT model holding the adapters of ``PEFT_CONFIGS`` (random,
    non-zero weights from fixed seeds), in eval mode, each also saved alone under ``out``."""
    import peft

    model = None
    for seed, (name, kwargs) in enumerate(PEFT_CONFIGS.items(), start=1):
        torch.manual_seed(seed)
        config = peft.LoraConfig(lora_dropout=0.0, init_lora_weights=False, **kwargs)
        if model is None:
            model = peft.get_peft_model(base, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    model.eval()
    dirs = {}
    for name in PEFT_CONFIGS:
        model.save_pretrained(out, selected_adapters=[name])
        dirs[name] = out / name
    return model, dirs


def record_multi_launches(monkeypatch, backend: str) -> list:
    """Run the multi-adapter op on ``backend`` (``FASTLORA_BACKEND``) and record the token count of every launch of its
    Triton path; returns the record."""
    from fastlora.ops import multi as multi_op

    monkeypatch.setenv("FASTLORA_BACKEND", backend)
    calls = []
    real = multi_op.multi_lora_triton

    def spy(*args, **kwargs):
        calls.append(args[0].shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(multi_op, "multi_lora_triton", spy)
    return calls


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


def lora_tensors(
    layers: dict[str, tuple[int, int]], ranks: dict[str, int], seed: int, prefix: str = "base_model.model."
) -> dict[str, torch.Tensor]:
    """Random PEFT-keyed LoRA weights of the given ranks for layers ``{name: (in_features, out_features)}``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, r in ranks.items():
        k, n = layers[name]
        out[f"{prefix}{name}.lora_A.weight"] = torch.randn(r, k, generator=g)
        out[f"{prefix}{name}.lora_B.weight"] = torch.randn(n, r, generator=g)
    return out
