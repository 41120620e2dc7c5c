"""``apply_lora`` models under data parallelism: DistributedDataParallel and FSDP2 (``fully_shard``).

Two CPU processes on the gloo backend each run half of a fixed batch; their LoRA gradients (averaged by DDP,
reduce-scattered by FSDP2 and gathered here with ``full_tensor()``) and their LoRA weights after one SGD step must
equal those of one process running the whole batch. Workers are spawned (never forked: the parent has threads) and
report through files; a failing worker fails the test with its traceback, and a stuck one is killed at a deadline.
"""

import datetime
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers
from tolerances import assert_close
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import fastlora

WORLD_SIZE = 2
BATCH, SEQ_LEN = 4, 16
LR = 0.1
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Collectives give up after this long, and the test kills workers that are still running after the deadline.
COLLECTIVE_TIMEOUT_S = 120
STRATEGIES = ("ddp", "fsdp2")
DEADLINE_S = 240


def _tiny_lora_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    # B is random (not PEFT's zero), so the gradient of A is not zero either.
    lora = fastlora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=False)
    return fastlora.apply_lora(model, lora)


def _batch() -> torch.Tensor:
    return torch.randint(0, 128, (BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(1))


def _shard(batch: torch.Tensor, rank: int) -> torch.Tensor:
    # Equal shards with no padding: the mean of the per-rank mean losses is the whole batch's mean loss, so the
    # averaged gradient is the whole batch's gradient.
    return batch.chunk(WORLD_SIZE)[rank]


def _lora_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _train_step(model: torch.nn.Module, wrapped: torch.nn.Module, input_ids: torch.Tensor, full) -> dict:
    """One forward, backward and SGD step; the LoRA gradients and weights, materialised by ``full``."""
    params = _lora_params(model)
    optimizer = torch.optim.SGD(params.values(), lr=LR)
    loss = wrapped(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    grads = {n: full(p.grad).detach().clone() for n, p in params.items()}
    frozen_with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    optimizer.step()
    weights = {n: full(p).detach().clone() for n, p in params.items()}
    return {"loss": loss.item(), "grads": grads, "weights": weights, "frozen_with_grad": frozen_with_grad}


def _loopback_interface() -> str | None:
    return next((name for _, name in socket.if_nameindex() if name.startswith("lo")), None)


def _worker(rank: int, port: int, init_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # two processes share the machine's cores
    interface = _loopback_interface()
    if interface is not None:
        # gloo otherwise listens on whatever address the hostname resolves to; keep everything on 127.0.0.1.
        os.environ["GLOO_SOCKET_IFNAME"] = interface
    timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD_SIZE, timeout=timeout)
    try:
        input_ids = _shard(_batch(), rank)
        for strategy in STRATEGIES:
            model = _tiny_lora_llama()
            model.load_state_dict(torch.load(init_path, weights_only=True))
            if strategy == "ddp":
                wrapped = torch.nn.parallel.DistributedDataParallel(model)
                result = _train_step(model, wrapped, input_ids, full=lambda t: t)
            else:
                mesh = init_device_mesh("cpu", (WORLD_SIZE,))
                # FSDP2's documented layout: each decoder layer is its own unit, then the root takes the rest.
                for layer in model.model.layers:
                    fully_shard(layer, mesh=mesh)
                fully_shard(model, mesh=mesh)
                assert all(isinstance(p, DTensor) for p in model.parameters()), "fully_shard left a parameter whole"
                result = _train_step(model, model, input_ids, full=lambda t: t.full_tensor())
            torch.save(result, Path(out_dir) / f"{strategy}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """One process's step on the whole batch (``"single"``), and each rank's step under each strategy."""
    out_dir = tmp_path_factory.mktemp("distributed")
    model = _tiny_lora_llama()
    init_path = out_dir / "init.pt"
    torch.save(model.state_dict(), init_path)
    # The parent holds the rendezvous store on a port the OS picked, so no other process can take it in between.
    # TCPStore would listen on every interface; handed a socket bound to 127.0.0.1 (it then owns and closes the fd),
    # it listens there only.
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, master_listen_fd=listener.detach())
    context = mp.start_processes(
        _worker, args=(port, str(init_path), str(out_dir)), nprocs=WORLD_SIZE, join=False, start_method="spawn"
    )
    try:
        single = _train_step(model, model, _batch(), full=lambda t: t)
        deadline = time.monotonic() + DEADLINE_S
        # join raises (with the worker's traceback) as soon as one worker fails, after ending the others.
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers still running after {DEADLINE_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
        del store  # held until here: the workers rendezvous through it
    results = {
        s: [torch.load(out_dir / f"{s}-rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)] for s in STRATEGIES
    }
    return {"single": single, **results}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_data_parallel_step_equals_one_process(strategy, runs):
    expected, ranks = runs["single"], runs[strategy]
    tokens = BATCH * SEQ_LEN
    assert sum(r["loss"] for r in ranks) / WORLD_SIZE == pytest.approx(expected["loss"], rel=1e-6)
    assert len(expected["grads"]) == 2 * len(TARGETS) * 2  # A and B of every target in both layers
    for rank, result in enumerate(ranks):
        assert result["frozen_with_grad"] == [], f"rank {rank}: frozen parameters got gradients"
        assert result["grads"].keys() == expected["grads"].keys()
        for name, grad in expected["grads"].items():
            assert grad.abs().max() > 0, f"{name}: zero gradient in the reference, the test would prove nothing"
            assert_close(result["grads"][name], grad.double(), torch.float32, tokens, f"rank {rank} grad {name}")
            weight = expected["weights"][name]
            assert_close(result["weights"][name], weight.double(), torch.float32, tokens, f"rank {rank} {name}")
    for name in expected["grads"]:
        # Replicas must stay in sync, bit for bit, or they drift apart over many steps.
        assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name]), f"ranks disagree on grad {name}"
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name]), f"ranks disagree on {name}"
