"""bench/speed/speed.py: runs every benchmark script's --smoke under one entry point (so none can
rot), records each output, and keeps going past a missing or broken script. No timing asserts."""

from __future__ import annotations

import pytest

from scripts import ROOT, load_script

BENCH = ROOT / "bench"
speed = load_script("bench/speed/speed.py")


@pytest.mark.slow  # every script's smoke again (each has its own test): minutes on 2 busy cores
def test_speed_smoke_runs_every_present_script(tmp_path, capsys):
    outcomes = speed.main(["--smoke", "--results", str(tmp_path)])
    assert list(outcomes) == list(speed.SCRIPTS)
    for name, o in outcomes.items():
        present = (BENCH / f"{name}.py").is_file()
        assert o.status == ("ok" if present else "missing"), o.output
        saved = (tmp_path / "speed-smoke" / f"{name}.txt").read_text(encoding="utf-8")
        assert f"# status: {o.status}" in saved and f"python bench/{name}.py --smoke" in saved
        assert o.output in saved
    assert "FlexLoRA r=8 c=16" in outcomes["flexlora"].output  # its table was captured
    assert "| flexlora | ok |" in capsys.readouterr().out


def test_speed_smoke_entry_point(tmp_path, capsys):
    # The cheapest real benchmark through the whole entry point: import, --smoke, capture, save.
    outcomes = speed.main(["--smoke", "--only", "planner", "--results", str(tmp_path)])
    assert list(outcomes) == ["planner"]
    o = outcomes["planner"]
    assert o.status == "ok", o.output
    assert "plan_lora" in o.output and o.value  # the script's own result came back
    saved = (tmp_path / "speed-smoke" / "planner.txt").read_text(encoding="utf-8")
    assert saved.startswith(
        "# python bench/speed/planner.py --smoke  (via: python bench/speed/speed.py --smoke)"
    )
    assert "# status: ok" in saved and saved.endswith(o.output)
    assert "| planner | ok |" in capsys.readouterr().out


def test_broken_and_missing_scripts_do_not_stop_the_others(tmp_path):
    (tmp_path / "good.py").write_text("def main(argv):\n    print('figures', argv)\n    return 7\n")
    (tmp_path / "bad.py").write_text("def main(argv):\n    raise RuntimeError('boom')\n")
    (tmp_path / "nomain.py").write_text("X = 1\n")
    good = speed.run_script("good", ["--smoke"], tmp_path)
    assert (good.status, good.value) == ("ok", 7)
    assert good.output == "figures ['--smoke']\n"
    bad = speed.run_script("bad", [], tmp_path)
    assert bad.status == "failed" and "RuntimeError: boom" in bad.output
    assert speed.run_script("nomain", [], tmp_path).status == "failed"
    assert speed.run_script("absent", [], tmp_path).status == "missing"


def test_unknown_benchmark_is_refused():
    with pytest.raises(ValueError, match=r"unknown benchmark\(s\) \['nope'\]; choose from"):
        speed.main(["--smoke", "--only", "nope", "--no-save"])
