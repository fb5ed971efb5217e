"""Every command that README.md and README.zh.md show names only flags its script has, and their flags tables give
MNIST's defaults as train.py has them."""

import argparse
import importlib
import re
from pathlib import Path

import pytest

import settings

REPO = Path(__file__).resolve().parent.parent
READMES = ("README.md", "README.zh.md")
# `python X ...` or `torchrun ... train.py ...`, up to the end of the command.
COMMAND = re.compile(
    r"(?:python (?:-m )?|torchrun [^`\n]*?(?=\w+\.py))((?:tools[./])?\w+)(?:\.py)?((?:[^`\n|#&;<>]|&(?!&))*)"
)


class Parsed(Exception):
    """Raised instead of parsing, carrying the parser that a script built."""

    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def flags_of(module_name: str, monkeypatch) -> set[str]:
    """The option strings of the parser that a script's main() or parse_args() builds."""

    def capture(self, *args, **kwargs):
        raise Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    module = importlib.import_module(module_name)
    entry = getattr(module, "parse_args", None) or module.main
    with pytest.raises(Parsed) as parsed:
        entry([])
    return set(parsed.value.parser._option_string_actions)


def commands() -> list[tuple[str, str, str]]:
    found = []
    for readme in READMES:
        text = (REPO / readme).read_text(encoding="utf-8").replace("\\\n", " ")  # a command continued on the next line
        for match in COMMAND.finditer(text):
            script, rest = match.group(1).replace("/", "."), match.group(2)
            if script in ("pip", "pytest") or not (REPO / (script.replace(".", "/") + ".py")).is_file():
                continue
            found.append((readme, script, rest))
    return found


def test_both_readmes_show_the_same_commands_a_user_runs():
    shown = {
        readme: [(script, " ".join(rest.split())) for name, script, rest in commands() if name == readme]
        for readme in READMES
    }
    assert {"train", "inference", "demo"} <= {script for script, _ in shown["README.md"]}
    assert shown["README.md"] == shown["README.zh.md"]


@pytest.mark.parametrize("readme, script, rest", commands())
def test_each_flag_of_a_readme_command_exists(readme: str, script: str, rest: str, monkeypatch):
    flags = flags_of(script, monkeypatch)
    named = {word.split("=")[0] for word in rest.split() if word.startswith("--")}
    assert named <= flags, f"{readme}: python {script} {rest.strip()} names {sorted(named - flags)}"


@pytest.mark.parametrize("readme", READMES)
def test_the_flags_table_gives_mnist_s_defaults_as_train_py_has_them(readme: str):
    # The table's first default of each of these rows is MNIST's recipe: a recipe change must change the table too.
    args = settings.parse_args([])
    shown = {  # the row's flags (the Chinese README joins them with "、"), and what its default cell starts with
        "`--epochs`": str(args.epochs),
        "`--batch-size`(?:, |、)`--lr`": f"{args.batch_size}, {args.lr:.0e}".replace("e-0", "e-"),
        "`--image-widths`": ",".join(map(str, args.image_widths)),
    }
    text = (REPO / readme).read_text(encoding="utf-8")
    for flags, default in shown.items():
        row = re.search(rf"^\| {flags} \| ([^|（(]+)", text, re.MULTILINE)
        assert row is not None, f"{readme} has no flags-table row for {flags}"
        cell = row.group(1).strip().replace("、", ", ")
        assert cell == default, f"{readme}: {flags} shows {cell!r}, train.py has {default}"
