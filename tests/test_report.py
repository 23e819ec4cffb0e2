"""entrolora.report: every figure is a non-empty PNG; report.html links them and the tables."""

from __future__ import annotations

import json

import pytest
import torch

from entrolora import report as R
from entrolora.plans import AdaptationPlan, GroupPlan, ModulePlan
from entrolora.stats import GradientStats

PNG = b"\x89PNG\r\n\x1a\n"
TYPES = ("self_attn.q_proj", "self_attn.v_proj")


def _stats(layers: int = 4, zero_layer: int | None = None) -> GradientStats:
    g = torch.Generator().manual_seed(0)
    grads = {}
    for t in TYPES:
        for layer in range(layers):
            x = torch.randn(16, 12, generator=g) * (1e-3 * (layer + 1))
            if layer == zero_layer:
                x = torch.zeros_like(x)
            grads[f"model.layers.{layer}.{t}"] = x
    return GradientStats.from_gradients(grads)


def _plan() -> AdaptationPlan:
    mods, groups = {}, {}
    for t in TYPES:
        for layer in range(4):
            gid = f"model.layers.*.{t}:{layer // 2}"
            mods[f"model.layers.{layer}.{t}"] = ModulePlan(
                rank=4 + layer, d_in=12, d_out=16, module_type=f"model.layers.*.{t}", layer=layer,
                group=gid, blocks=2 if layer == 3 else 1,
            )  # fmt: skip
    for t in TYPES:
        for k in range(2):
            gid = f"model.layers.*.{t}:{k}"
            groups[gid] = GroupPlan(
                members=tuple(f"model.layers.{layer}.{t}" for layer in (2 * k, 2 * k + 1)),
                factors=(), rank=7, module_type=f"model.layers.*.{t}",
            )  # fmt: skip
    return AdaptationPlan(method="e2lora", modules=mods, groups=groups)


def _png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 5000, path


def test_short_type():
    assert R.short_type("model.layers.*.self_attn.q_proj") == "q_proj"
    assert R.short_type("bert.encoder.layer.*.attention.self.query") == "query"
    assert R.short_type("bert.encoder.layer.*.attention.output.dense") == "attention.output.dense"
    assert R.short_type("transformer.h.*.mlp.c_proj") == "mlp.c_proj"


def test_similarity_entropy_png(tmp_path):
    _png(R.plot_similarity_entropy(_stats(zero_layer=2), tmp_path / "sim.png"))


def test_erank_png(tmp_path):
    _png(R.plot_erank(_stats(), tmp_path / "erank.png"))


def test_plan_png(tmp_path):
    _png(R.plot_plan(_plan(), tmp_path / "plan.png"))


def test_accuracy_vs_params_png(tmp_path):
    runs = [
        {"method": "lora", "accuracy": 0.8, "trainable_params": 10000},
        {"method": "e2lora", "accuracy": 0.82, "trainable_params": 4000},
        {"method": "ralora", "accuracy": 0.79, "trainable_params": 10000},
    ]
    _png(R.plot_accuracy_vs_params(runs, tmp_path / "acc.png"))


def test_accuracy_vs_params_needs_accuracy(tmp_path):
    with pytest.raises(ValueError, match="no run has both accuracy and trainable_params"):
        R.plot_accuracy_vs_params([{"method": "lm", "accuracy": None}], tmp_path / "a.png")


def test_rank_evolution_png(tmp_path):
    history = [(s, {f"model.layers.{i}.q_proj": 4 + (s // 10) * (1 if i % 2 else -1)
                    for i in range(4)}) for s in range(0, 40, 10)]  # fmt: skip
    _png(R.plot_rank_evolution(history, tmp_path / "flex.png"))


def test_write_report_run_folder_and_gather(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    stats, plan = _stats(), _plan()
    stats.save(run / "stats.safetensors")
    plan.save(run / "plan.json")
    metrics = {"method": "e2lora", "accuracy": 0.75, "eval_loss": 0.5, "trainable_params": 999,
               "train_s": 1.0, "total_s": 2.0, "config": {"r": 8}}  # fmt: skip
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / R.HISTORY_FILE).write_text(
        json.dumps([[0, {"model.layers.0.q_proj": 4}], [5, {"model.layers.0.q_proj": 5}]])
    )
    inputs = R.gather([run])
    assert inputs.plan is not None and inputs.stats is not None and inputs.history
    html = R.write_report(tmp_path / "out", inputs).read_text()
    for name in ("similarity_entropy.png", "erank.png", "plan.png", "rank_evolution.png"):
        _png(tmp_path / "out" / name)
        assert f"src='{name}'" in html
    assert "trainable params" in html  # plan summary
    assert "0.75" in html  # metrics table

    run2 = tmp_path / "run2"
    run2.mkdir()
    (run2 / "metrics.json").write_text(
        json.dumps({**metrics, "method": "lora", "accuracy": 0.7, "trainable_params": 4000})
    )
    R.write_report(tmp_path / "cmp", R.gather([run, run2]))
    _png(tmp_path / "cmp" / "accuracy_vs_params.png")
    assert ">lora<" in (tmp_path / "cmp" / "report.html").read_text()


def test_gather_stats_and_plan_files(tmp_path):
    _stats().save(tmp_path / "s.safetensors")
    _plan().save(tmp_path / "p.json")
    inputs = R.gather([tmp_path / "s.safetensors", tmp_path / "p.json"])
    assert inputs.stats is not None and inputs.plan is not None and not inputs.runs


def test_gather_rejects_non_run_folder(tmp_path):
    with pytest.raises(ValueError, match="is not a run folder"):
        R.gather([tmp_path])


def test_gather_rejects_unknown_file(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="cannot report on 'x.txt'"):
        R.gather([tmp_path / "x.txt"])


def test_gather_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        R.gather([tmp_path / "missing.json"])


def test_budget_png_and_auto_report(tmp_path):
    import entrolora as el

    stats = _stats()
    plan = el.plan_auto(stats, budget=3 * 28, statistics="raw")
    assert 0 < len(plan.modules) < len(stats)  # some modules left at rank 0
    _png(R.plot_budget(plan, tmp_path / "b.png", stats))
    _png(R.plot_budget(plan, tmp_path / "b2.png"))  # adapted modules only
    html = R.write_report(tmp_path / "out", R.ReportInputs(stats=stats, plan=plan)).read_text()
    _png(tmp_path / "out" / "budget.png")
    assert "src='budget.png'" in html and "marginal value of the last unit" in html
    R.write_report(tmp_path / "e2", R.ReportInputs(plan=_plan()))
    assert not (tmp_path / "e2" / "budget.png").exists()  # only auto plans spend a budget


# -- the HTML a newcomer opens ------------------------------------------------------------------
class _Page:
    """The images, links and text of a report.html, read with the standard HTML parser."""

    def __init__(self, path):
        from html.parser import HTMLParser

        page = self
        self.images, self.links, self.text, self.captions = [], [], [], []

        class P(HTMLParser):
            in_caption = False

            def handle_starttag(self, tag, attrs):
                a = dict(attrs)
                if tag == "img":
                    page.images.append(a["src"])
                elif tag == "a":
                    page.links.append(a["href"])
                elif tag == "figcaption":
                    P.in_caption = True
                    page.captions.append("")

            def handle_endtag(self, tag):
                if tag == "figcaption":
                    P.in_caption = False

            def handle_data(self, data):
                page.text.append(data)
                if P.in_caption:
                    page.captions[-1] += data

        P().feed(path.read_text(encoding="utf-8"))
        self.text = " ".join(self.text)


def _check_page(html_path, runs):
    """Every image the page shows exists (a PNG), every link reaches a file, every run is named
    in the table and titles one plan figure; returns the page."""
    page = _Page(html_path)
    assert page.images, "the report shows no figure"
    for src in page.images:
        _png(html_path.parent / src)
    for href in page.links:
        assert (html_path.parent / href).is_file(), href
    for run in runs:
        assert run in page.text, run
        assert any(c.startswith(run) for c in page.captions), (run, page.captions)
    return page


def _synthetic_runs(root):
    """Three run folders as `entrolora train` writes them (their own report.html included):
    plain LoRA, block-diagonal RaLoRA and FlexLoRA with a history."""
    from entrolora.report.plan_figure import plan_bars

    t = "model.layers.*.self_attn.q_proj"
    plans = {
        "lora": AdaptationPlan("lora", {f"model.layers.{i}.self_attn.q_proj":
                                        ModulePlan(4, 16, 16, t, i) for i in range(3)}),
        "ralora": AdaptationPlan("ralora", {f"model.layers.{i}.self_attn.q_proj":
                                            ModulePlan(4, 16, 16, t, i, blocks=2 ** i)
                                            for i in range(3)}),
        "flexlora": AdaptationPlan("flexlora", {f"model.layers.{i}.self_attn.q_proj":
                                                ModulePlan(4, 16, 16, t, i, kind="flex",
                                                           capacity=8) for i in range(3)}),
    }  # fmt: skip
    history = [
        [4, {f"model.layers.{i}.self_attn.q_proj": 4 for i in range(3)}],
        [8, {f"model.layers.{i}.self_attn.q_proj": 2 + 2 * i for i in range(3)}],
    ]
    for k, (name, plan) in enumerate(plans.items()):
        run = root / name
        run.mkdir(parents=True)
        plan.save(run / "plan.json")
        metrics = {"method": name, "accuracy": 0.7 + k / 100, "eval_loss": 0.5,
                   "trainable_params": plan.num_trainable_params(), "train_s": 1.0}  # fmt: skip
        (run / "metrics.json").write_text(json.dumps(metrics))
        if name == "flexlora":
            (run / R.HISTORY_FILE).write_text(json.dumps(history))
        if name == "ralora":  # the only probed run: the comparison says whose statistics
            _stats().save(run / "stats.safetensors")
        R.write_report(run, R.gather([run]), title=f"entrolora run: {name}")
    expected = {"lora": [4, 4, 4], "ralora": [4, 8, 16], "flexlora": [2, 4, 6]}
    for name, plan in plans.items():
        h = history if name == "flexlora" else None
        assert [b.rank for b in plan_bars(plan, h)[t]] == expected[name]
    return list(plans)


def test_cli_report_compares_runs_side_by_side(tmp_path):
    """`entrolora report RUN…`: the table, one plan per run titled with it, links that work
    from the published folder to each run's own report.html."""
    from typer.testing import CliRunner

    from entrolora.cli import app

    names = _synthetic_runs(tmp_path / "runs")
    out = tmp_path / "compare"
    args = ["report", *(str(tmp_path / "runs" / n) for n in names), "--output", str(out)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    page = _check_page(out / "report.html", names)
    plans = sorted(src for src in page.images if src.startswith("plan-"))
    assert len(plans) == 3 and "accuracy_vs_params.png" in page.images
    assert set(page.links) == {f"../runs/{n}/report.html" for n in names}
    assert any(src.startswith("rank_evolution-") for src in page.images)  # FlexLoRA's
    assert "similarity_entropy.png" in page.images and "(statistics of ralora)" in page.text
    for n in names:  # each run's own report opens too, its plan titled with the run
        _check_page(tmp_path / "runs" / n / "report.html", [])
        assert (tmp_path / "runs" / n / "plan.png").is_file()


def test_single_run_report_titles_its_plan(tmp_path):
    _synthetic_runs(tmp_path)
    page = _Page(tmp_path / "ralora" / "report.html")
    assert "plan.png" in page.images and "Effective rank trained per module" in page.text
    assert R.gather([tmp_path / "ralora"]).label == "ralora"


@pytest.mark.parametrize("record", ["runs", "methods only"])
def test_gather_demo_folder_stands_for_its_runs(tmp_path, record):
    names = _synthetic_runs(tmp_path / "demo")
    demo = {"methods": names, "runs": {n: n for n in names}}
    if record == "methods only":  # a demo.json written before it recorded each run's folder
        del demo["runs"]
    (tmp_path / "demo" / "demo.json").write_text(json.dumps(demo))
    inputs = R.gather([tmp_path / "demo"])
    assert [f.label for f in inputs.folders] == names and inputs.metrics is None
