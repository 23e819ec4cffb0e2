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
