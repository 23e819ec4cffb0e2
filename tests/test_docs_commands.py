"""The `entrolora` commands the docs show parse with the CLI's own parser.

Every shell snippet of README.md and docs/serving.md (and every command's --help example) that
runs `entrolora` is split as a shell would, and click (under Typer) parses it for its subcommand:
an unknown option, a flag given a value, an option missing its value or a wrong number of
arguments fails here with the line that has it. Nothing runs: no models, no files.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from entrolora.cli import app

try:  # Typer ≥ 0.23 vendors click as typer._click; older ones use click itself
    from typer._click.exceptions import UsageError
except ImportError:
    from click.exceptions import UsageError

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/serving.md")
FENCE = re.compile(r"^```(\w*)\s*$")
SHELLS = {"bash", "sh", "shell", "console", ""}


def shell_blocks(text: str) -> list[tuple[int, list[str]]]:
    """``(first line number, lines)`` of each fenced block tagged bash/sh/shell or untagged."""
    blocks, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        if m.group(1) in SHELLS:
            blocks.append((i + 2, lines[i + 1 : j]))
        i = j + 1
    return blocks


def commands(lines: list[str], first: int) -> list[tuple[int, list[str]]]:
    """``(line number, argv after 'entrolora')`` of each command in a block; comments dropped,
    backslash continuations joined."""
    out, pending, start = [], "", first
    for k, line in enumerate(lines):
        if not pending:
            start = first + k
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        words = shlex.split(pending + line, comments=True)
        pending = ""
        if words and words[0] == "$":
            words = words[1:]
        if words and words[0] == "entrolora":
            out.append((start, words[1:]))
    return out


def doc_commands() -> list[tuple[str, list[str]]]:
    found = []
    for doc in DOCS:
        for first, block in shell_blocks((ROOT / doc).read_text(encoding="utf-8")):
            for line, argv in commands(block, first):
                found.append((f"{doc}:{line}", argv))
    return found


def epilog_commands() -> list[tuple[str, list[str]]]:
    found = []
    for name, cmd in typer.main.get_command(app).commands.items():
        for line in (cmd.epilog or "").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["entrolora"]:
                found.append((f"entrolora {name} --help", words[1:]))
    return found


def check(argv: list[str]) -> None:
    """Parse ``argv`` as ``entrolora`` would, without running it; UsageError if wrong."""
    group = typer.main.get_command(app)
    if not argv:
        return  # `entrolora` alone lists the commands
    name, args = argv[0], argv[1:]
    cmd = group.commands.get(name)
    if cmd is None:
        raise UsageError(f"no such command {name!r}")
    with cmd.make_context(f"entrolora {name}", list(args), resilient_parsing=False):
        pass


DOC_COMMANDS = doc_commands()


def test_the_docs_show_commands():
    """The extraction finds the commands it is meant to check (so the test below checks some)."""
    where = {w.split(":")[0] for w, _ in DOC_COMMANDS}
    assert where == set(DOCS)
    used = {argv[0] for _, argv in DOC_COMMANDS if argv}
    assert {"demo", "train", "probe", "plan", "report", "export"} <= used
    assert any("--hf-base" in argv for _, argv in DOC_COMMANDS)


@pytest.mark.parametrize(("where", "argv"), DOC_COMMANDS + epilog_commands(),
                         ids=lambda v: v if isinstance(v, str) else None)  # fmt: skip
def test_documented_command_parses(where, argv):
    try:
        check(argv)
    except UsageError as e:
        pytest.fail(f"{where}: `entrolora {shlex.join(argv)}`: {e.format_message()}")


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["export", "runs/mine", "--output", "mine-peft", "--hf-base", "base-hf"],
         "unexpected extra argument"),
        (["train", "--methd", "lora"], "No such option"),
        (["train", "--method"], "requires an argument"),
        (["report", "--output", "x"], "Missing parameter: paths"),
        (["serve"], "no such command"),
    ],
)  # fmt: skip
def test_check_refuses_wrong_usage(argv, match):
    """The checker fails on what the docs once had (``--hf-base`` given a folder) and the like."""
    with pytest.raises(UsageError, match=match):
        check(argv)


def test_commands_join_continuations_and_drop_comments():
    lines = [
        "entrolora train --model ./m --data d.csv \\",
        "                --method e2lora   # a comment --bogus",
        "python convert.py x   # not entrolora",
        "$ entrolora demo",
    ]
    assert commands(lines, 10) == [
        (10, ["train", "--model", "./m", "--data", "d.csv", "--method", "e2lora"]),
        (13, ["demo"]),
    ]


def test_model_card_commands_parse(tmp_path):
    """The `entrolora` commands the export's model card quotes parse too (``--hf-base`` a flag)."""
    import entrolora as el
    from test_adapters import build

    model, _ = build("plain")
    el.export_peft(model, tmp_path)
    card = (tmp_path / "README.md").read_text(encoding="utf-8")
    quoted = re.findall(r"`(entrolora [^`]+)`", card)
    assert any("--hf-base" in q for q in quoted), quoted
    for q in quoted:
        check(shlex.split(q)[1:])
    assert "PeftModel.from_pretrained(base, 'ADAPTER')" in card
    assert "from_pretrained('BASE_HF')" in card
