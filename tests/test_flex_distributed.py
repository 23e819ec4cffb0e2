"""FlexLoRA under torch.distributed: two gloo processes decide identically, no communication."""

from __future__ import annotations

import torch

from dist_utils import run_distributed
from entrolora.flex import FlexLoRA
from test_flex import adapter_tensors, flex_llama, trainable
from tiny import lm_batches

T = 16


def _ddp_run(rank: int, world_size: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = flex_llama(r=2, capacity=4, seed=0)
    ddp = DDP(model)  # broadcasts rank 0's parameters and masks, then all-reduces gradients
    flex = FlexLoRA(ddp, total_steps=T, b0=2, t_warmup=2, t_final=2, interval=3, seed=5)
    opt = torch.optim.AdamW(trainable(model), lr=2e-2)
    batches = lm_batches(T, seed=100 + rank)  # every process sees different data
    moves = []
    for t in range(T):
        loss = ddp(**batches[t]).loss + flex.regularizer()
        loss.backward()
        moves.append(flex.step(t, opt))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {
        "history": [[s, r] for s, r in flex.history],
        "moves": moves,
        "weights": adapter_tensors(model),
        "exp_avg": [opt.state[p]["exp_avg"] for p in trainable(model)],
    }


def test_two_processes_make_identical_decisions():
    a, b = run_distributed(_ddp_run, world_size=2, timeout=240)
    assert a["history"] == b["history"] and a["moves"] == b["moves"]
    assert len(a["history"]) == len(range(2, T - 2, 3))
    assert any(pruned for pruned, _ in a["moves"])  # ranks really moved
    assert a["weights"].keys() == b["weights"].keys()
    for k in a["weights"]:
        assert torch.equal(a["weights"][k], b["weights"][k]), k
    for x, y in zip(a["exp_avg"], b["exp_avg"]):
        assert torch.equal(x, y)
    total = sum(a["history"][0][1].values())
    assert all(sum(r.values()) == total for _, r in a["history"])


# -- FSDP2 (fully_shard): P, λ and Q are DTensors sharded along dim 0 --------------------------
FSDP_OPTS = dict(total_steps=T, b0=2, t_warmup=2, t_final=2, interval=3, seed=5)


def _global_batches() -> list[dict]:
    return lm_batches(T, batch=4, seed=200)


def _full_adapters(model) -> dict:
    from entrolora.adapters.flex import FlexAdapter

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, FlexAdapter):
            for k, v in [*mod.named_parameters(), *mod.named_buffers()]:
                v = v.full_tensor() if hasattr(v, "full_tensor") else v
                out[f"{name}.{k}"] = v.detach().clone()
    return out


def _train_flex(model, flex, batches) -> tuple[list, list]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    moves, losses = [], []
    for t in range(T):
        loss = model(**batches[t]).loss
        (loss + flex.regularizer()).backward()
        moves.append(flex.step(t, opt))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return moves, losses


def _regularizer_grad_paths(flex) -> float:
    """Largest difference between the regulariser's autograd gradient and the analytic one
    (``add_regularizer_grad``, the Trainer path) on sharded parameters."""
    params = [p for a in flex.modules.values() for p in (a.P, a.Q)]

    def grads():
        out = [p.grad.full_tensor().clone() for p in params]
        for p in params:
            p.grad = None
        return out

    for p in params:
        p.grad = None
    flex.regularizer().backward()
    autograd = grads()
    flex.add_regularizer_grad()
    analytic = grads()
    return max((a - b).abs().max().item() for a, b in zip(autograd, analytic))


def _fsdp2_run(rank: int, world_size: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = flex_llama(r=2, capacity=4, seed=0).train()
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert hasattr(model.model.layers[0].self_attn.q_proj.adapter.Q, "full_tensor")
    flex = FlexLoRA(model, **FSDP_OPTS)
    half = [{k: v.chunk(world_size)[rank] for k, v in b.items()} for b in _global_batches()]
    moves, losses = _train_flex(model, flex, half)
    return {
        "grad_paths": _regularizer_grad_paths(flex),
        "history": [[s, r] for s, r in flex.history],
        "moves": moves,
        "names": list(flex.modules),
        "losses": losses,
        "weights": _full_adapters(model),
        "young": flex.fresh.young,
    }


def test_fsdp2_equals_one_process():
    one = flex_llama(r=2, capacity=4, seed=0).train()
    flex = FlexLoRA(one, **FSDP_OPTS)
    moves, losses = _train_flex(one, flex, _global_batches())
    want = _full_adapters(one)
    a, b = run_distributed(_fsdp2_run, world_size=2, timeout=300)
    assert a["names"] == b["names"] == list(flex.modules)  # no FSDP prefix in module names
    assert a["grad_paths"] < 1e-6 and b["grad_paths"] < 1e-6  # Trainer path = autograd path
    assert a["history"] == b["history"] == [[s, r] for s, r in flex.history]
    assert a["moves"] == b["moves"] == moves and any(p for p, _ in moves)
    assert a["young"] == b["young"] == flex.fresh.young != {}
    for k in want:
        assert torch.equal(a["weights"][k], b["weights"][k]), k
        torch.testing.assert_close(a["weights"][k], want[k], rtol=1e-4, atol=1e-5)
    for s in range(T):
        assert abs((a["losses"][s] + b["losses"][s]) / 2 - losses[s]) < 1e-5


def _fsdp1_run(rank: int, world_size: int) -> str:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = FSDP(flex_llama(seed=0), use_orig_params=True, device_id=torch.device("cpu"))
    try:
        FlexLoRA(model, total_steps=T)
    except ValueError as e:
        return str(e)
    return "accepted"


def test_fsdp1_is_refused_with_the_supported_setups():
    msgs = run_distributed(_fsdp1_run, world_size=2, timeout=240)
    for m in msgs:
        assert m.startswith("FlexLoRA runs in one process, under DDP and under FSDP2")
        assert "shard with fully_shard instead" in m
