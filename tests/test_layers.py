"""The module map in STYLE.md holds: imports only flow downward, libraries stay home."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "runner"
# Lowest first; a module may import only modules listed before it.
ORDER = [
    "errors",
    "records",
    "spec",
    "output",
    "source",
    "client",
    "retry",
    "rate_headers",
    "limiter",
    "pool",
    "journal",
    "starts",
    "sink",
    "state",
    "pricing",
    "plan",
    "job",
    "report",
    "sim_http",
    "sim_answers",
    "simulator",
    "screens",
    "cli",
]
# Third-party libraries and the one module allowed to import each.
HOMES = {
    "aiohttp": {"client"},
    "tenacity": {"retry"},
    "duckdb": {"report"},
    "tqdm": {"screens"},
    "click": {"cli"},
    "pydantic": {"spec", "pricing"},
    "genai_prices": {"pricing"},
}
TOP_LEVEL = {"__init__", "__main__"}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def modules() -> list[str]:
    return sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in TOP_LEVEL)


def test_every_module_is_on_the_map() -> None:
    """A new module must be placed in the map before it can be imported by anything."""
    assert set(modules()) <= set(ORDER), set(modules()) - set(ORDER)


@pytest.mark.parametrize("module", modules())
def test_imports_flow_downward(module: str) -> None:
    """A module imports only runner modules listed below it in the map."""
    rank = ORDER.index(module)
    for name in imports_of(PACKAGE / f"{module}.py"):
        if name.startswith("runner."):
            target = name.split(".")[1]
            assert ORDER.index(target) < rank, f"runner/{module}.py imports upward: {name}"


@pytest.mark.parametrize("module", modules())
def test_libraries_stay_in_their_home(module: str) -> None:
    """httpx2, tenacity, duckdb, tqdm, click and pydantic are each imported by their home only."""
    for name in imports_of(PACKAGE / f"{module}.py"):
        top = name.split(".")[0]
        if top in HOMES:
            assert module in HOMES[top], f"runner/{module}.py imports {top}"


def test_map_catches_an_upward_import(tmp_path: Path) -> None:
    """The checker itself sees a planted upward import (so it cannot pass vacuously)."""
    planted = tmp_path / "errors.py"
    planted.write_text("from runner.cli import main\n")
    assert "runner.cli" in imports_of(planted)
