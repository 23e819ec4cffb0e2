"""Plans, adapters and training under torch.distributed: 2 gloo processes on the CPU (issue 8).

Each test spawns two processes (tests/dist_utils.py) on tiny random models (tests/tiny.py).
Spawned runs are module-scoped fixtures so that one pair of processes serves several tests.

The single-process reference trains the same model on the concatenation of both ranks' batches.
DDP averages gradients over ranks; each rank's loss is a mean over the same number of tokens, so
the mean of the two rank losses' gradients is the gradient of the mean loss over the global batch.
"""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import entrolora.distributed as eld
from dist_utils import run_distributed
from entrolora.plans import AdaptationPlan, GroupPlan, ModulePlan
from entrolora.stats import GradientStats
from tiny import lm_batches, tiny_llama

WORLD = 2
LAYERS = 4
HIDDEN = 32
STEPS = 3
LR = 0.5
SEED = 7


# -- plans and data shared by the parent and the spawned ranks -------------------------------------
def _mp(name: str, rank: int, d_in: int, d_out: int, **kw) -> ModulePlan:
    parts = name.split(".")
    layer = int(parts[2])
    module_type = ".".join(parts[:2] + ["*"] + parts[3:])
    return ModulePlan(rank=rank, d_in=d_in, d_out=d_out, module_type=module_type, layer=layer, **kw)


def hand_plan(with_flex: bool = False) -> AdaptationPlan:
    """A plan for tiny_llama(4 layers, hidden 32) with every sharing pattern of METHODS.md §3–4.

    - q_proj: E²ShareLoRA — one A (rank 4) for all layers, B per interval {0,1} rank 4 and
      {2,3} rank 2; layers 2–3 use the slice ``A[:2]``;
    - k_proj: E²LoRA — one (A, B) for the interval {0,1,2} at rank 3, layer 3 alone at rank 2;
    - v_proj: RaLoRA block-diagonal, 2 blocks of rank 2;
    - o_proj (``with_flex``): FlexLoRA SVD-form, capacity 4 with 2 active directions.
    """
    q = "model.layers.{}.self_attn.q_proj"
    k = "model.layers.{}.self_attn.k_proj"
    v = "model.layers.{}.self_attn.v_proj"
    o = "model.layers.{}.self_attn.o_proj"
    q_type, k_type = "model.layers.*.self_attn.q_proj", "model.layers.*.self_attn.k_proj"
    modules: dict[str, ModulePlan] = {}
    groups = {
        "q:A": GroupPlan(tuple(q.format(i) for i in range(4)), ("A",), 4, q_type),
        "q:0": GroupPlan((q.format(0), q.format(1)), ("B",), 4, q_type),
        "q:1": GroupPlan((q.format(2), q.format(3)), ("B",), 2, q_type),
        "k:0": GroupPlan(tuple(k.format(i) for i in range(3)), ("A", "B"), 3, k_type),
    }
    for i in range(LAYERS):
        interval = "q:0" if i < 2 else "q:1"
        modules[q.format(i)] = _mp(
            q.format(i),
            4 if i < 2 else 2,
            32,
            32,
            group=interval,
            shared={"A": "q:A", "B": interval},
        )
        if i < 3:
            modules[k.format(i)] = _mp(
                k.format(i), 3, 32, 16, group="k:0", shared={"A": "k:0", "B": "k:0"}
            )
        else:
            modules[k.format(i)] = _mp(k.format(i), 2, 32, 16)
        modules[v.format(i)] = _mp(v.format(i), 2, 32, 16, blocks=2)
        if with_flex:
            modules[o.format(i)] = _mp(o.format(i), 2, 32, 32, kind="flex", capacity=4)
    return AdaptationPlan(method="hand", modules=modules, groups=groups, lora_alpha=8.0)


def synthetic_stats(seed: int = 0) -> GradientStats:
    """Identical on every process: gradients drawn from a fixed seed, layer-dependent scale."""
    g = torch.Generator().manual_seed(seed)
    grads, weights = {}, {}
    for i in range(LAYERS):
        for leaf, d_out in (("q_proj", 32), ("v_proj", 16)):
            name = f"model.layers.{i}.self_attn.{leaf}"
            # low-rank plus noise, so that effective ranks (RaLoRA) differ between modules
            u = torch.randn(d_out, 2 + i, generator=g)
            w = torch.randn(2 + i, 32, generator=g)
            grads[name] = (u @ w + 0.1 * torch.randn(d_out, 32, generator=g)) * 10.0 ** (-3 - i / 4)
            weights[name] = torch.randn(d_out, 32, generator=g)
    return GradientStats.from_gradients(grads, weights)


def planned(stats: GradientStats) -> dict[str, str]:
    """Plans of every available planner on ``stats``, as JSON text (hand plan if none yet)."""
    try:
        import entrolora as el

        plan = el.plan
    except (ImportError, AttributeError):
        return {"hand": hand_plan().to_json()}
    out = {}
    for method, options in (
        ("e2lora", {"r": 4}),
        ("e2sharelora", {"r": 4}),
        ("ralora", {"r": 2, "n_max": 8}),
        ("ralora_pro", {"r_ref": 4, "n_max": 8}),
    ):
        out[method] = plan(method, stats, **options).to_json()
    return out


def rank_batches(rank: int) -> list[dict]:
    """This rank's causal-LM batches: one per step, 2 sequences of 8 tokens."""
    return lm_batches(STEPS, batch=2, seq=8, seed=100 + rank)


def global_batches() -> list[dict]:
    """What one process sees when it trains on both ranks' batches at once."""
    per_rank = [rank_batches(r) for r in range(WORLD)]
    return [
        {k: torch.cat([per_rank[r][s][k] for r in range(WORLD)]) for k in per_rank[0][s]}
        for s in range(STEPS)
    ]


def adapters_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name (a shared factor appears once), detached copies."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def adapted_model(plan: AdaptationPlan):
    import entrolora as el

    model = tiny_llama(layers=LAYERS, hidden=HIDDEN, seed=0)
    return el.apply(model, plan, dropout=0.0, seed=SEED)


def train_steps(module: torch.nn.Module, params, batches: list[dict]) -> list[float]:
    opt = torch.optim.SGD(params, lr=LR)
    losses = []
    for batch in batches:
        loss = module(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# -- workers (run in spawned processes) ------------------------------------------------------------
def _catch(fn) -> tuple[str, str] | None:
    try:
        fn()
    except Exception as e:  # the message is checked in the parent
        return type(e).__name__, str(e)
    return None


def plans_worker(rank: int, world: int) -> dict:
    stats = synthetic_stats(seed=0)
    plans = planned(stats)
    hand = hand_plan()
    sent = eld.broadcast_plan(hand if rank == 0 else None, src=0)
    digest = eld.check_same_plan(sent)
    # A rank that planned with other options: every rank must see the error.
    other = hand if rank == 0 else AdaptationPlan.from_dict({**hand.to_dict(), "lora_alpha": 32.0})
    errors = {
        "differ": _catch(lambda: eld.check_same_plan(other)),
        "src_range": _catch(lambda: eld.broadcast_plan(hand, src=world)),
        "src_none": _catch(lambda: eld.broadcast_plan(None if rank == 0 else hand, src=0)),
    }
    info = eld.world_info()
    model = torch.nn.Linear(2, 2)
    return {
        "shard": list(eld.shard(iter(range(7)), per_rank=3)),
        "launcher": eld.init_from_launcher(torch.device("cpu")),  # a group exists: not ours
        "ddp": type(eld.wrap_ddp(model, torch.device("cpu"))).__name__,
        "plans": plans,
        "broadcast": sent.to_json(),
        "digest": digest,
        "errors": errors,
        "info": (info.rank, info.world_size, info.initialized, info.backend, eld.is_main_process()),
    }


def ddp_worker(rank: int, world: int, with_flex: bool) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(1000 + rank)  # apply must not depend on the global RNG state
    model = adapted_model(hand_plan(with_flex)).train()
    init = adapters_of(model)
    digest = eld.check_same_parameters(model)
    ddp = DDP(model, find_unused_parameters=False)
    unique = {id(p) for p in model.parameters() if p.requires_grad}
    losses = train_steps(ddp, [p for p in ddp.parameters() if p.requires_grad], rank_batches(rank))
    return {
        "init": init,
        "final": adapters_of(model),
        "losses": losses,
        "digest": digest,
        "n_ddp_params": len([p for p in ddp.parameters() if p.requires_grad]),
        "n_unique": len(unique),
    }


def _full_adapters(state: dict[str, torch.Tensor], names) -> dict[str, torch.Tensor]:
    out = {}
    for n in names:
        t = state[n]
        t = t.full_tensor() if hasattr(t, "full_tensor") else t  # FSDP2: DTensor shards
        out[n] = t.detach().clone()
    return out


def fsdp_worker(rank: int, world: int, version: int) -> dict:
    """FSDP1 (use_orig_params=True) or FSDP2 on the CPU; decoder layers sharded as their own
    units where they hold no shared factor, else their parts free of shared factors."""
    model = adapted_model(hand_plan(with_flex=True)).train()
    names = list(adapters_of(model))
    layer_cls = type(model.model.layers[0])
    units = eld.fsdp_units(model, lambda m: isinstance(m, layer_cls))
    if version == 1:
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import CustomPolicy

        ids = {id(u) for u in units}
        wrapped = FSDP(
            model,
            use_orig_params=True,
            device_id=torch.device("cpu"),
            auto_wrap_policy=CustomPolicy(lambda m: id(m) in ids),
        )
        params = [p for p in wrapped.parameters() if p.requires_grad]
        losses = train_steps(wrapped, params, rank_batches(rank))
        # offload_to_cpu=True crashes (SIGSEGV) when the model already lives on the CPU
        cfg = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
        with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, cfg):
            state = wrapped.state_dict()
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        # one FSDP2 unit per decoder layer: its parts free of shared factors, as a list
        for group in eld.fsdp_groups(model, lambda m: isinstance(m, layer_cls)):
            fully_shard(group, mesh=mesh)
        fully_shard(model, mesh=mesh)
        params = [p for p in model.parameters() if p.requires_grad]
        losses = train_steps(model, params, rank_batches(rank))
        state = model.state_dict()
    return {
        "final": _full_adapters(state, names),
        "losses": losses,
        "units": sorted(n for n, m in model.named_modules() if any(m is u for u in units)),
    }


# -- tests -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plans_run() -> list[dict]:
    return run_distributed(plans_worker, WORLD)


def test_plans_identical_on_every_rank_and_equal_to_single_process(plans_run):
    expected = planned(synthetic_stats(seed=0))
    assert plans_run[0]["plans"] == plans_run[1]["plans"] == expected


def test_broadcast_plan_delivers_rank0_plan(plans_run):
    plan = hand_plan()
    for r in range(WORLD):
        assert AdaptationPlan.from_dict(__import__("json").loads(plans_run[r]["broadcast"])) == plan
        assert plans_run[r]["digest"] == eld.plan_digest(plan)


def test_world_info_inside_a_process_group(plans_run):
    assert [r["info"] for r in plans_run] == [
        (0, 2, True, "gloo", True),
        (1, 2, True, "gloo", False),
    ]


@pytest.mark.parametrize(
    "path, kind, pattern",
    [
        ("differ", "ValueError", r"ranks \[\d\] hold a different adaptation plan.*broadcast_plan"),
        ("src_range", "ValueError", r"src=2 is not a rank of this job \(world size 2\)"),
    ],
)
def test_distributed_bad_input_fails_on_every_rank(plans_run, path, kind, pattern):
    for r in range(WORLD):
        got = plans_run[r]["errors"][path]
        assert got is not None and got[0] == kind and re.search(pattern, got[1]), (r, got)


def test_broadcast_plan_without_plan_on_source_fails_on_every_rank(plans_run):
    src_kind, src_msg = plans_run[0]["errors"]["src_none"]
    peer_kind, peer_msg = plans_run[1]["errors"]["src_none"]
    assert src_kind == "TypeError" and "needs an AdaptationPlan, got None" in src_msg
    assert peer_kind == "ValueError" and "rank 0 had no plan to broadcast" in peer_msg


def test_launcher_helpers_inside_a_process_group(plans_run):
    # equal step counts on every rank (DDP needs them), disjoint shares of one order
    assert [r["shard"] for r in plans_run] == [[0, 2, 4], [1, 3, 5]]
    assert [r["launcher"] for r in plans_run] == [False, False]
    assert [r["ddp"] for r in plans_run] == ["DistributedDataParallel"] * 2


def test_launcher_helpers_in_a_single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert list(eld.shard(range(5), per_rank=3)) == [0, 1, 2]
    assert not eld.init_from_launcher(torch.device("cpu"))
    model = torch.nn.Linear(2, 2)
    assert eld.wrap_ddp(model, torch.device("cpu")) is model
    assert eld.local_device(torch.device("cpu")) == torch.device("cpu")
    eld.barrier()  # nothing to wait for


def test_broadcast_plan_single_process_returns_plan_unchanged():
    plan = hand_plan()
    assert eld.broadcast_plan(plan) is plan
    assert eld.check_same_plan(plan) == eld.plan_digest(plan)


def test_broadcast_plan_single_process_needs_a_plan():
    with pytest.raises(ValueError, match="broadcast_plan got plan=None outside a distributed run"):
        eld.broadcast_plan(None)


def test_world_info_rejects_a_malformed_environment(monkeypatch):
    monkeypatch.setenv("RANK", "zero")
    with pytest.raises(ValueError, match=r"RANK='zero' is not an integer"):
        eld.world_info()


def test_world_info_reads_the_launcher_environment(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    info = eld.world_info()
    assert (info.rank, info.world_size, info.local_rank, info.initialized) == (3, 4, 1, False)
    assert not info.distributed and not eld.is_main_process()


def test_parameters_digest_sees_one_changed_element():
    model = torch.nn.Linear(3, 2)
    before = eld.parameters_digest(model)
    with torch.no_grad():
        model.weight[1, 2] += 1e-6
    assert eld.parameters_digest(model) != before
    model.weight.requires_grad_(False)
    assert eld.parameters_digest(model, trainable_only=False) != eld.parameters_digest(model)


def _needs_apply() -> None:
    pytest.importorskip("entrolora.adapters.inject", reason="entrolora.apply has not landed yet")


@pytest.fixture(scope="module")
def reference() -> dict:
    """One process, same plan and seed, trained on the concatenation of both ranks' batches."""
    _needs_apply()
    model = adapted_model(hand_plan(with_flex=True)).train()
    init = adapters_of(model)
    losses = train_steps(
        model, [p for p in model.parameters() if p.requires_grad], global_batches()
    )
    return {"init": init, "final": adapters_of(model), "losses": losses}


@pytest.fixture(scope="module")
def ddp_run(reference) -> list[dict]:
    return run_distributed(ddp_worker, WORLD, args=(True,))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_apply_same_seed_gives_bit_identical_adapters_on_every_rank(ddp_run, reference):
    for r in range(WORLD):
        assert ddp_run[r]["init"].keys() == reference["init"].keys()
        for name, t in reference["init"].items():
            assert torch.equal(ddp_run[r]["init"][name], t), (r, name)
    assert ddp_run[0]["digest"] == ddp_run[1]["digest"]


def test_ddp_reduces_each_shared_factor_once(ddp_run):
    # one DDP parameter per distinct tensor: a shared factor is not replicated per layer
    for r in range(WORLD):
        assert ddp_run[r]["n_ddp_params"] == ddp_run[r]["n_unique"] == len(ddp_run[r]["final"])


def test_ddp_steps_leave_identical_adapters_on_every_rank(ddp_run):
    for name, t in ddp_run[0]["final"].items():
        assert torch.equal(t, ddp_run[1]["final"][name]), name


def test_ddp_equals_one_process_on_the_global_batch(ddp_run, reference):
    moved = _max_diff(reference["final"], reference["init"])
    assert moved > 1e-3, "training did not move the adapters; the comparison would be empty"
    assert _max_diff(ddp_run[0]["final"], reference["final"]) < 1e-5
    # the global loss is the mean of the two ranks' losses (same token count on each rank)
    for s in range(STEPS):
        mean = (ddp_run[0]["losses"][s] + ddp_run[1]["losses"][s]) / 2
        assert abs(mean - reference["losses"][s]) < 1e-5


@pytest.mark.parametrize("version", [1, 2])
def test_fsdp_on_cpu_equals_one_process(version, reference):
    runs = run_distributed(fsdp_worker, WORLD, args=(version,))
    for name, t in runs[0]["final"].items():
        assert torch.equal(t, runs[1]["final"][name]), name
    assert _max_diff(reference["final"], reference["init"]) > 1e-3
    assert _max_diff(runs[0]["final"], reference["final"]) < 1e-5
    for s in range(STEPS):
        mean = (runs[0]["losses"][s] + runs[1]["losses"][s]) / 2
        assert abs(mean - reference["losses"][s]) < 1e-5
    # layers with a shared factor are split; the frozen base of each is still its own unit
    assert runs[0]["units"], "no FSDP unit besides the root: nothing was sharded per layer"


class _Block(torch.nn.Module):
    """A layer with a frozen base, an MLP and an adapter factor ``A`` it may share."""

    def __init__(self, A: torch.nn.Parameter) -> None:
        super().__init__()
        self.base = torch.nn.Linear(4, 4)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
        self.adapter = torch.nn.Module()
        self.adapter.A = A


def _blocks(shared: bool) -> torch.nn.Module:
    net = torch.nn.Module()
    own = [torch.nn.Parameter(torch.zeros(2, 4)) for _ in range(3)]
    net.layers = torch.nn.ModuleList(_Block(own[0] if shared else own[i]) for i in range(3))
    return net


def test_fsdp_units_keep_shared_factors_out_of_per_layer_units():
    net = _blocks(shared=True)
    units = eld.fsdp_units(net, lambda m: isinstance(m, _Block))
    names = {n for n, m in net.named_modules() if any(m is u for u in units)}
    expected = {f"layers.{i}.{part}" for i in range(3) for part in ("base", "mlp")}
    assert names == expected
    assert eld.shared_parameter_names(net) == {
        "layers.0.adapter.A": [f"layers.{i}.adapter.A" for i in range(3)]
    }


def test_fsdp_units_take_whole_layers_when_nothing_is_shared():
    net = _blocks(shared=False)
    units = eld.fsdp_units(net, lambda m: isinstance(m, _Block))
    assert [u for u in units] == list(net.layers)
    assert eld.shared_parameter_names(net) == {}


@settings(max_examples=40, deadline=None)
@given(owner=st.lists(st.integers(0, 5), min_size=1, max_size=6))
def test_fsdp_units_split_exactly_the_layers_that_share(owner):
    """Layer i uses factor ``owner[i]``: a layer is a unit iff no other layer uses its factor;
    otherwise its base and MLP are, and the factor stays with the root."""
    factors = {k: torch.nn.Parameter(torch.zeros(2, 4)) for k in set(owner)}
    net = torch.nn.Module()
    net.layers = torch.nn.ModuleList(_Block(factors[k]) for k in owner)
    groups = eld.fsdp_groups(net, lambda m: isinstance(m, _Block))
    expected = []
    for i, k in enumerate(owner):
        if owner.count(k) == 1:
            expected.append([net.layers[i]])
        else:
            expected.append([net.layers[i].base, net.layers[i].mlp])
    assert [[id(m) for m in g] for g in groups] == [[id(m) for m in g] for g in expected]
    units = eld.fsdp_units(net, lambda m: isinstance(m, _Block))
    assert [id(u) for u in units] == [id(m) for g in expected for m in g]


@pytest.mark.slow
def test_entrolora_train_under_torchrun_writes_once(tmp_path):
    """``torchrun --nproc_per_node 2 -m entrolora.cli train`` on the CPU (gloo): one run folder,
    one metrics table, no staging folder left behind (about a minute on 2 cores)."""
    import subprocess
    import sys

    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "-m", "entrolora.cli", "train", "--method", "e2sharelora", "--limit", "128",
        "--max-steps", "3", "--probe-steps", "4", "--batch-size", "8", "--max-length", "32",
        "--epochs", "1", "--output", str(out), "-q",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("entrolora train: e2sharelora") == 1
    assert (out / "plan.json").is_file() and (out / "metrics.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_example_launcher_configs_parse():
    """The configs docs/distributed.md points to load with accelerate's own reader."""
    import json
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    examples = Path(__file__).resolve().parents[1] / "examples"
    ddp = load_config_from_file(str(examples / "accelerate_config_ddp.yaml"))
    fsdp = load_config_from_file(str(examples / "accelerate_config_fsdp.yaml"))
    assert (ddp.distributed_type.value, ddp.num_processes) == ("MULTI_GPU", 2)
    assert fsdp.distributed_type.value == "FSDP"
    assert fsdp.fsdp_config["fsdp_version"] == 2
    assert fsdp.fsdp_config["fsdp_auto_wrap_policy"] == "NO_WRAP"  # shared factors: see docs
    ds = json.loads((examples / "deepspeed_zero2.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2
