"""Bad inputs and faults as a new user meets them (issue 13; docs/refusals.md lists the checks).

Each refusal is one line on stderr naming the problem and the fix, exit status 1, and leaves
nothing behind: no output, no hidden staging folder, nothing it was not asked to replace. Each
legitimate oddity (a byte-order mark, relative paths) simply works. Numbers in the case ids are
the issue's; the others were found on the way.

Tiny BERTs built from a config (hidden 32, 2 or 3 layers) with the MiniLM tokenizer saved next
to them (a tiny word-level tokenizer when the assets are not installed), and 40-row CSVs.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

import entrolora as el
from entrolora.cli import app
from entrolora.data import datasets as D
from test_data import WORDS, tiny_tokenizer

runner = CliRunner()
FAST = ["--epochs", "1", "--batch-size", "8", "--max-steps", "2", "--probe-steps", "1",
        "--limit", "40", "--quiet"]  # fmt: skip
BERT_TARGETS = ["attention.self.query", "attention.self.value"]


# -- the assets: models, data, a plan and a trained run -------------------------------------------
def _tokenizer():
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(D.minilm_path()))
    except D.AssetMissing:
        return tiny_tokenizer()


def _save_bert(root: Path, name: str, layers: int, tokenizer, with_tokenizer: bool = True) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=layers,
        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    path = root / name
    BertForSequenceClassification(cfg).save_pretrained(path)
    if with_tokenizer:
        tokenizer.save_pretrained(path)
    return path


def _rows(n: int = 40, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        pos = i % 2 == 0
        words = [rng.choice(WORDS[:80]) for _ in range(5)] + [rng.choice(["good", "bad"])]
        out.append({"text": " ".join(words), "label": "pos" if pos else "neg"})
    return out


def _write(path: Path, rows: list[dict], encoding: str = "utf-8", delimiter: str = ",") -> Path:
    with open(path, "w", newline="", encoding=encoding) as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    tok = _tokenizer()
    rows = _rows()
    rng = random.Random(1)
    floats = [{**r, "label": f"{rng.random():.3f}"} for r in rows]
    mixed = [{**r, "label": ["1", "1.0", "0", "0.0"][i % 4]} for i, r in enumerate(rows)]
    e = {
        "root": root,
        "bert2": _save_bert(root, "bert2", 2, tok),
        "bert3": _save_bert(root, "bert3", 3, tok),
        "notok": _save_bert(root, "notok", 2, tok, with_tokenizer=False),
        "csv": _write(root / "d.csv", rows),
        "bom": _write(root / "bom.csv", rows, encoding="utf-8-sig"),  # as Excel saves it
        "ids": _write(root / "ids.csv", [{**r, "label": f"id{i}"} for i, r in enumerate(rows)]),
        "floats": _write(root / "floats.csv", floats),
        "mixed": _write(root / "mixed.csv", mixed),
        "semicolon": _write(root / "semi.csv", rows, delimiter=";"),
        "latin1": _write(root / "latin1.csv", [{**r, "text": r["text"] + " café"} for r in rows],
                         encoding="latin-1"),
    }  # fmt: skip
    (root / "array.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    e["array"] = root / "array.json"
    listed = [{**r, "label": [r["label"]]} for r in rows]
    (root / "list.jsonl").write_text("".join(json.dumps(r) + "\n" for r in listed), "utf-8")
    e["listlabel"] = root / "list.jsonl"
    (root / "cut.csv.gz").write_bytes(gzip.compress(e["csv"].read_bytes())[:200])
    e["cutgz"] = root / "cut.csv.gz"
    from transformers import AutoModelForSequenceClassification

    net = AutoModelForSequenceClassification.from_pretrained(str(e["bert2"]))
    e["plan2"] = el.plan_lora(net, r=2, target_modules=BERT_TARGETS).save(root / "plan2.json")
    return e


@pytest.fixture(scope="module")
def run(env) -> Path:
    """One trained run, from inside the assets folder with relative --model/--data paths and the
    byte-order-marked CSV: cases 10 and 12 are its happy path."""
    cwd = Path.cwd()
    os.chdir(env["root"])
    try:
        r = invoke("train", "--model", "bert2", "--data", "bom.csv", "--method", "lora",
                   "--r", "2", "--target-modules", ",".join(BERT_TARGETS), "--output", "run",
                   *FAST)  # fmt: skip
    finally:
        os.chdir(cwd)
    assert r.exit_code == 0, r.output
    return env["root"] / "run"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def copy_run(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(run, dst)
    return dst


# -- what each refusal must look like -------------------------------------------------------------
def refused(result, match: str) -> None:
    """Exit status 1, one line on stderr starting with ``error:`` and holding ``match``."""
    assert result.exit_code == 1, (result.exit_code, result.output)
    err = result.stderr.strip()
    assert err.count("\n") == 0 and err.startswith("error: "), err
    assert match in err, err
    assert "Traceback" not in result.output


def nothing_left(output: Path) -> None:
    """Neither the output nor anything named after it (staging folders) exists."""
    assert not output.exists(), output
    left = [p.name for p in output.parent.iterdir() if f".{output.name}." in p.name]
    assert left == [], left


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes: what must be left exactly as it was."""
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


@dataclass(frozen=True)
class Case:
    """A command line (``{name}`` placeholders: ``env`` paths, ``{out}`` the output) that must
    be refused with ``match`` in its one line, leaving no ``{out}``."""

    id: str
    args: tuple[str, ...]
    match: str

    def argv(self, env: dict[str, Path], out: Path) -> list[str]:
        return [a.format(out=out, **{k: str(v) for k, v in env.items()}) for a in self.args]


TRAIN = ("train", "--method", "lora", "--r", "2", "--output", "{out}", *FAST)
CASES = [
    # 1: no tokenizer files: transformers builds a 5-token vocabulary, every word [UNK]
    Case("01-no-tokenizer-train", (*TRAIN, "--model", "{notok}", "--data", "{csv}"),
         "holds no tokenizer files"),
    Case("01-no-tokenizer-probe", ("probe", "--model", "{notok}", "--data", "{csv}",
                                   "--output", "{out}", "--quiet"), "holds no tokenizer files"),
    # 3: a bidirectional model asked for next-token training
    Case("03-causal-lm-on-bert", (*TRAIN, "--model", "{bert2}", "--data", "{csv}",
                                  "--task", "causal-lm"), "needs a model that reads left to right"),
    # 6: a 2-layer plan on a 3-layer model of the same width
    Case("06-plan-for-fewer-layers", (*TRAIN, "--model", "{bert3}", "--data", "{csv}",
                                      "--plan", "{plan2}"),
         "the plan leaves 2 module(s) of this model bare"),
    # 8: labels that are not classes
    Case("08-label-per-row", (*TRAIN, "--model", "{bert2}", "--data", "{ids}"),
         "has 40 distinct values in 40 rows"),
    Case("08-regression-targets", (*TRAIN, "--model", "{bert2}", "--data", "{floats}"),
         "look like regression targets"),
    # 9: --plan made by another method than --method
    Case("09-plan-of-another-method", ("train", "--method", "e2lora", "--model", "{bert2}",
                                       "--data", "{csv}", "--plan", "{plan2}", "--output",
                                       "{out}", *FAST), "was made by lora but --method is e2lora"),
    # found on the way: what a reused plan would silently ignore
    Case("plan-with-target-modules", (*TRAIN, "--model", "{bert2}", "--data", "{csv}", "--plan",
                                      "{plan2}", "--target-modules", "attention.self.key"),
         "--target-modules has no effect with --plan"),
    Case("plan-with-planner-option", (*TRAIN, "--model", "{bert2}", "--data", "{csv}", "--plan",
                                      "{plan2}", "-o", "lora_alpha=8"),
         "option(s) lora_alpha are planner options and --plan reuses a plan as it is"),
    Case("export-with-another-task", ("export", "{run}", "--task", "causal-lm", "--output",
                                      "{out}"), "the run was trained for --task classify"),
    # 11: --max-length beyond the position table
    Case("11-max-length-train", (*TRAIN, "--model", "{bert2}", "--data", "{csv}",
                                 "--max-length", "100"), "--max-length 100 is beyond the 64"),
    Case("11-max-length-probe", ("probe", "--model", "{bert2}", "--data", "{csv}",
                                 "--max-length", "65", "--output", "{out}", "--quiet"),
         "--max-length 65 is beyond the 64 positions"),
    # 13: thresholds outside the similarity's range silently turned E²LoRA into LoRA
    Case("13-threshold-above", ("train", "--method", "e2lora", "-o", "threshold=2", "--model",
                                "{bert2}", "--data", "{csv}", "--output", "{out}", *FAST),
         "threshold must be"),
    Case("13-threshold-negative", ("train", "--method", "e2lora", "-o", "threshold=-5",
                                   "--model", "{bert2}", "--data", "{csv}", "--output", "{out}",
                                   *FAST), "threshold must be"),
    # found on the way: data files as they come
    Case("semicolon-csv", (*TRAIN, "--model", "{bert2}", "--data", "{semicolon}"),
         "its fields look separated by ';'"),
    Case("latin1-csv", (*TRAIN, "--model", "{bert2}", "--data", "{latin1}"),
         "is not UTF-8 text"),
    Case("json-array", (*TRAIN, "--model", "{bert2}", "--data", "{array}"),
         "is one JSON array; write JSON Lines"),
    Case("data-is-a-folder", (*TRAIN, "--model", "{bert2}", "--data", "{root}"),
         "is a folder"),
    Case("label-is-a-list", (*TRAIN, "--model", "{bert2}", "--data", "{listlabel}"),
         "row 1 of list.jsonl has a list as its 'label' label"),
    Case("gz-cut-short", (*TRAIN, "--model", "{bert2}", "--data", "{cutgz}"), "cannot be read"),
    Case("max-length-1", (*TRAIN, "--model", "{bert2}", "--data", "{csv}", "--max-length", "1"),
         "--max-length must be ≥ 2"),
    Case("model-is-a-run", (*TRAIN, "--model", "{run}", "--data", "{csv}"),
         "is an entrolora run, not a model; pass the base model's folder"),
    Case("model-is-a-peft-adapter", (*TRAIN, "--model", "{run}/peft", "--data", "{csv}"),
         "is an adapter, not a model; pass its base model's folder"),
    Case("model-without-weights", (*TRAIN, "--model", "{noweights}", "--data", "{csv}"),
         "cannot load"),
    Case("model-corrupted-weights", (*TRAIN, "--model", "{badweights}", "--data", "{csv}"),
         "cannot load"),
]  # fmt: skip


@pytest.fixture(scope="module")
def broken_models(env) -> dict[str, Path]:
    """Model folders as downloads go wrong: weights missing, weights cut short."""
    root = env["root"]
    out = {"noweights": root / "noweights", "badweights": root / "badweights"}
    for name, path in out.items():
        if not path.exists():
            shutil.copytree(env["bert2"], path)
            weights = path / "model.safetensors"
            if name == "noweights":
                weights.unlink()
            else:
                weights.write_bytes(weights.read_bytes()[:1000])
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_refused(case, env, broken_models, run, tmp_path):
    out = tmp_path / "out"
    refused(invoke(*case.argv({**env, **broken_models, "run": run}, out)), case.match)
    nothing_left(out)


def test_03_causal_lm_on_the_embedded_default(tmp_path):
    try:
        D.minilm_path()
    except D.AssetMissing:
        pytest.skip("the embedded MiniLM is not installed (make assets)")
    out = tmp_path / "out"
    r = invoke("train", "--task", "causal-lm", "--method", "lora", "--output", out, *FAST)
    refused(r, "the embedded all-MiniLM-L6-v2 (model type 'bert') attends to later tokens too")
    nothing_left(out)


# -- legitimate oddities simply work --------------------------------------------------------------
def test_10_bom_csv_reads_like_any_csv(env):
    plain, bom = D.load_data(env["csv"]), D.load_data(env["bom"])
    assert bom.texts == plain.texts and bom.labels == plain.labels


def test_08_one_and_one_point_zero_are_one_class(env):
    ds = D.load_data(env["mixed"])
    assert ds.label_names == ("0", "1") and ds.labels == [1, 1, 0, 0] * 10


def test_10_12_relative_paths_stored_absolute_and_export_elsewhere(run, env, tmp_path):
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["config"]["model"] == str(env["bert2"].resolve())
    assert metrics["config"]["data"] == str(env["bom"].resolve())
    assert metrics["train_examples"] + metrics["test_examples"] == 40
    base = json.loads((run / "peft" / "adapter_config.json").read_text())
    assert base["base_model_name_or_path"] == str(env["bert2"].resolve())
    cwd = Path.cwd()
    os.chdir(tmp_path)  # another directory: the recorded model is still found
    try:
        r = invoke("export", run, "--output", "exported")
    finally:
        os.chdir(cwd)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "exported" / "adapter_config.json").is_file()
    modes_as_open_makes_them(tmp_path / "exported")  # case 4 for exports too


# -- 6: plans and adapters checked against the model both ways ------------------------------------
def test_06_adapter_for_fewer_layers_el_load(run, env):
    from transformers import AutoModelForSequenceClassification

    net = AutoModelForSequenceClassification.from_pretrained(str(env["bert3"]))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=r"does not fit this model: the plan leaves 2 module"):
        el.load(net, run / "adapter")
    assert not el.adapted_modules(net)  # the model is left as it was
    assert all((v == before[k]).all() for k, v in net.state_dict().items())


def test_06_adapter_for_fewer_layers_export(run, env, tmp_path):
    out = tmp_path / "out"
    r = invoke("export", run, "--model", env["bert3"], "--output", out)
    refused(r, "does not fit this model: the plan leaves 2 module(s) of this model bare")
    nothing_left(out)


# -- 14: a damaged file we read: one line naming it -----------------------------------------------
@pytest.mark.parametrize(
    "damaged, command, match",
    [
        ("adapter/head.safetensors", "export", "classifier head '{p}' is corrupted or truncated"),
        ("adapter/adapter.safetensors", "export", "adapter weights '{p}' is corrupted"),
        ("adapter/plan.json", "export", "plan file '{p}' is not valid JSON"),
        ("metrics.json", "export", "run metrics '{p}' is not valid JSON"),
        ("metrics.json", "report", "run metrics '{p}' is not valid JSON"),
        ("plan.json", "report", "plan file '{p}' is not valid JSON"),
    ],
)
def test_14_corrupted_file_named(run, tmp_path, damaged, command, match):
    copy = copy_run(run, tmp_path)
    path = copy / damaged
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])
    before = tree(copy)
    out = tmp_path / "out"
    refused(invoke(command, copy, "--output", out), match.format(p=path))
    nothing_left(out)
    assert tree(copy) == before  # the damaged run is left as it was


def test_14_corrupted_plan_for_train(env, tmp_path):
    bad = tmp_path / "plan.json"
    bad.write_text('{"method": "lora", "modules": {', encoding="utf-8")
    out = tmp_path / "out"
    r = invoke(*Case("", TRAIN, "").argv(env, out), "--model", env["bert2"], "--data", env["csv"],
               "--plan", bad)  # fmt: skip
    refused(r, f"plan file '{bad}' is not valid JSON")
    nothing_left(out)


# -- the output folders (guards/staging.py): 2, 4, 5, 7, 15 at the command line --------------------
def test_02_overwrite_never_deletes_runs_and_notes(run, env, tmp_path):
    runs = tmp_path / "runs"
    for name in ("a", "b"):
        shutil.copytree(run, runs / name)
    (runs / "notes.txt").write_text("do not lose me\n", encoding="utf-8")
    before = tree(runs)
    args = (*TRAIN, "--model", "{bert2}", "--data", "{csv}", "--overwrite")
    r = invoke(*Case("", args, "").argv(env, runs))
    refused(r, "holds 2 entrolora runs and 1 entry of other kinds ('notes.txt'), not an")
    assert tree(runs) == before


def test_02_a_folder_of_notes_is_not_called_a_run(env, tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n", encoding="utf-8")
    r = invoke(*Case("", (*TRAIN, "--model", "{bert2}", "--data", "{csv}"), "").argv(env, out))
    refused(r, "holds 1 entry entrolora did not write ('notes.txt'), not an entrolora run")
    assert tree(out) == {"notes.txt": b"mine\n"}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def modes_as_open_makes_them(folder: Path) -> None:
    """Every folder 0777 and file 0666 less the umask, as ``mkdir`` / ``open`` would make them."""
    mask = _umask()
    for p in [folder, *folder.rglob("*")]:
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        assert p.stat().st_mode & 0o777 == want, (p, oct(p.stat().st_mode & 0o777))


def test_04_outputs_readable_as_a_normal_open_makes_them(run):
    modes_as_open_makes_them(run)


def test_05_sigterm_leaves_nothing_and_orphans_are_swept(env, tmp_path, monkeypatch):
    import signal
    import subprocess
    import sys

    from entrolora.files import staging_prefix
    from entrolora.job import run as job_run

    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    orphan = tmp_path / staging_prefix(out.name).replace(f".{os.getpid()}.", f".{dead}.")
    orphan = Path(f"{orphan}killed.tmp")
    (orphan / "adapter").mkdir(parents=True)  # what a SIGKILLed run leaves

    def killed(job, adapted):  # `timeout`, Slurm, `docker stop` and Kubernetes send SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the run")

    monkeypatch.setattr(job_run, "train", killed)
    r = invoke(*Case("", (*TRAIN, "--model", "{bert2}", "--data", "{csv}"), "").argv(env, out))
    assert r.exit_code == 143, (r.exit_code, r.output)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is given back
    nothing_left(out)
    assert not orphan.exists()


def test_07_report_never_overwrites_another_run(run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(run, other)
    before = tree(other)
    refused(invoke("report", run, "--output", other), "holds an entrolora run, not an")
    assert tree(other) == before
    rep = tmp_path / "rep"
    assert invoke("report", run, "--output", rep).exit_code == 0
    html = (rep / "report.html").read_bytes()
    refused(invoke("report", run, "--output", rep), "already holds an entrolora report")
    assert (rep / "report.html").read_bytes() == html


@pytest.mark.parametrize("command", ["train", "probe", "plan", "report", "export"])
def test_15_unwritable_output_named_as_typed_before_work(command, run, env, tmp_path, monkeypatch):
    from entrolora import job
    from entrolora.job import export as job_export
    from entrolora.job import run as job_run

    def no_work(*a, **k):
        raise AssertionError("the work started before the output was checked")

    for module in (job, job_run, job_export):
        for name in ("load_model", "run_probe", "load_splits"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, no_work)
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be\n", encoding="utf-8")
    out = blocker / "out"
    args = {
        "train": (*TRAIN, "--model", "{bert2}", "--data", "{csv}"),
        "probe": ("probe", "--model", "{bert2}", "--data", "{csv}", "--output", "{out}"),
        "plan": ("plan", "--model", "{bert2}", "--method", "lora", "--output", "{out}"),
        "report": ("report", str(run), "--output", "{out}"),
        "export": ("export", str(run), "--output", "{out}"),
    }[command]
    r = invoke(*Case("", args, "").argv(env, out))
    refused(r, f"cannot write output '{out}': folder '{blocker}' is not writable")
    assert ".tmp" not in r.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_15_read_only_folder(env, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        r = invoke(
            *Case("", (*TRAIN, "--model", "{bert2}", "--data", "{csv}"), "").argv(env, ro / "run")
        )
        refused(r, f"cannot write output '{ro / 'run'}'")
    finally:
        ro.chmod(0o755)
    assert list(ro.iterdir()) == []


def test_06_plan_of_some_layers_probed_stays_valid():
    # the other direction must not refuse a plan meant for some layers: the probe's targets
    # are recorded in the plan, and select exactly its modules
    from entrolora.job import TrainConfig, make_plan
    from tiny import cls_batches, tiny_bert

    model = tiny_bert(layers=3)
    targets = ["layer.0.attention.self.query", "layer.1.attention.self.query"]
    stats = el.probe(model, cls_batches(2), targets, steps=2)
    plan = make_plan("e2lora", stats, None, [], TrainConfig(r=2))
    assert plan.options["target_modules"] == targets
    plan.validate(model)
    with pytest.raises(ValueError, match=r"adapts layer\(s\) 0-1 of .* the model has 0-2"):
        el.AdaptationPlan(plan.method, plan.modules, plan.groups).validate(model)
