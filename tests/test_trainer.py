"""An ``apply_lora`` model trains under ``transformers.Trainer``: the loss is finite and logged, the LoRA weights
move, and every base weight stays bit-for-bit what it was."""

import math

import torch
import transformers

import fastlora

VOCAB, SEQ_LEN = 128, 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tiny_lora_llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    return fastlora.apply_lora(model, fastlora.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))


def _dataset(n: int = 8) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(n):
        input_ids = torch.randint(0, VOCAB, (SEQ_LEN,), generator=generator)
        rows.append({"input_ids": input_ids, "labels": input_ids.clone()})
    return rows


def test_trainer_updates_only_lora_weights(tmp_path):
    model = _tiny_lora_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2, logging_steps=1,
        report_to=[], use_cpu=True, save_strategy="no", dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_dataset())
    result = trainer.train()

    assert trainer.state.global_step == 4
    assert math.isfinite(result.training_loss)
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 4 and all(math.isfinite(loss) for loss in logged), trainer.state.log_history
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for name, param in after.items():
        if name in trainable:
            assert not torch.equal(param, before[name]), f"{name}: the trainer did not update a LoRA weight"
        else:
            assert torch.equal(param, before[name]), f"{name}: a frozen base weight changed"
            assert param.grad is None, f"{name}: a frozen base weight got a gradient"
