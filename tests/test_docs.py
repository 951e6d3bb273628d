"""The README stays true: every command, every spec key and the quick start are documented."""

from __future__ import annotations

import re

import click
import pytest
from click.testing import CliRunner
from pydantic import BaseModel

from runner.cli import cli
from runner.spec import EndpointSpec, InputSpec, JobSpec, RequestSpec, RunSpec

from .conftest import ROOT

README = (ROOT / "README.md").read_text()
COMMANDS = sorted(cli.commands)


def test_quick_start_is_the_two_commands() -> None:
    """The quick start block holds exactly the demo command and the test command."""
    block = README.split("## Quick start", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["uv run runner submit jobs/demo.toml", "uv run pytest"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_and_is_in_the_readme(command: str) -> None:
    """`runner COMMAND --help` works and says something, and the README names the command."""
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert len(result.output.splitlines()) > 3
    assert f"`runner {command}" in README


@pytest.mark.parametrize(
    ("table", "model"),
    [("input", InputSpec), ("endpoint", EndpointSpec), ("request", RequestSpec), ("run", RunSpec)],
)
def test_every_spec_key_is_documented(table: str, model: type[BaseModel]) -> None:
    """Each key a spec table accepts appears, in backquotes, in that table's README section."""
    section = README.split(f"### `[{table}]`", 1)[1].split("\n### ", 1)[0]
    missing = [name for name in model.model_fields if f"`{name}`" not in section]
    assert not missing, f"[{table}] keys missing from the README: {missing}"


def test_top_level_keys_are_documented() -> None:
    """The top-level spec keys are documented too."""
    for name in JobSpec.model_fields:
        assert re.search(rf"`(\[{name}\]|{name})`", README), name


def test_group_help_lists_every_command() -> None:
    """`runner --help` lists every command."""
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.output
    assert isinstance(cli, click.Group)


def readme_block(after: str) -> list[str]:
    """The lines of the first ```text block after the README line that starts with `after`."""
    rest = README.split(after, 1)[1].split("```text\n", 1)[1]
    return rest.split("```", 1)[0].rstrip("\n").splitlines()


@pytest.mark.parametrize(
    ("after", "golden", "all_digits"),
    [
        ("On a terminal, `runner submit`", "progress-80.txt", True),
        ("The first Ctrl-C answers at once", "summary.txt", False),
    ],
)
def test_readme_screens_are_the_golden_ones(after: str, golden: str, all_digits: bool) -> None:
    """The README's progress and summary blocks are real screens: normalised as the golden
    screens are, they are those screens (a change of layout must update both)."""
    from .test_screens import GOLDEN, normalise

    shown = normalise(readme_block(after), ROOT, all_digits=all_digits)
    assert shown == (GOLDEN / golden).read_text()
