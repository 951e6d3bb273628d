"""The package map holds: the folder tree is the architecture, imports only flow downward.

Rules between packages, not a list of modules: a module may import from its own package and
from any layer below its own; the simulator imports nothing from the rest of `runner`; storage
never reaches for HTTP; only the presentation layer (cli.py, screens.py) prints; each
third-party library keeps one home.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "runner"
# Layers, lowest first. A top-level module is its own layer; a subpackage is one layer.
LAYERS = [
    "errors",
    "records",
    "spec",
    "tuning",
    "input",
    "output",
    "http",
    "store",
    "report",
    "engine",
    "cluster",
    "screens",
    "api",
    "__init__",
    "cli",
    "__main__",
]
# Layers that stand apart: they import nothing from runner/ outside themselves.
ISLANDS = {"sim", "tuning", "errors"}
# The simulator is started only by the entry points (`base_url = "simulator"`, `runner simulate`).
SIM_USERS = {"cli", "api"}
# Pairs that must never meet although the order would allow it.
FORBIDDEN = {("store", "http"), ("report", "http"), ("input", "http"), ("report", "engine")}
# Third-party libraries and their one home (a module, or a whole package).
HOMES = {
    "aiohttp": {"http.client"},
    "tenacity": {"http.retry"},
    "duckdb": {"report.query"},
    "tqdm": {"screens"},
    "click": {"cli"},
    "pydantic": {"spec", "report.pricing"},
    "genai_prices": {"report.pricing"},
    "ray": {"cluster"},
    "jsonschema": {"output"},
    "fastjsonschema": {"output"},
}
# Only the presentation layer writes to the terminal: the command line, and the progress
# renderer it (and the Python API, in a notebook) draws with.
PRINTERS = {"cli", "screens"}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if node.module in ("runner", *(f"runner.{p}" for p in packages())):
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def packages() -> list[str]:
    return sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))


def modules() -> list[str]:
    """Every module as a dotted name below `runner`: `cli`, `run.pool`, `sim.server`."""
    return sorted(
        ".".join(p.relative_to(PACKAGE).with_suffix("").parts) for p in PACKAGE.rglob("*.py")
    )


def layer_of(module: str) -> str:
    """`run.pool` -> `run`; `cli` -> `cli`; `sim.__init__` -> `sim`."""
    return module.split(".")[0]


def runner_target(name: str) -> str | None:
    """The layer an import names (`runner.store.state` -> `store`), or None if not ours."""
    parts = name.split(".")
    if parts[0] != "runner" or len(parts) == 1:
        return None
    return parts[1]


def test_every_module_is_on_the_map() -> None:
    """A new module or package must be placed in the map before anything may import it."""
    unplaced = {layer_of(m) for m in modules()} - set(LAYERS) - ISLANDS
    assert not unplaced, unplaced


def test_the_tree_is_the_architecture() -> None:
    """Subpackages own the parts of a run; no loose module is left beside them."""
    assert {"input", "http", "store", "report", "engine", "sim"} <= set(packages())
    top = {m for m in modules() if "." not in m}
    assert top <= {"__init__", "__main__", "api", "cli", "errors", "records", "screens", "spec",
                   "tuning"}, top  # fmt: skip


@pytest.mark.parametrize("module", modules())
def test_imports_flow_downward(module: str) -> None:
    """A module imports from its own layer and the layers below it, never above."""
    own = layer_of(module)
    path = PACKAGE / (module.replace(".", "/") + ".py")
    for name in imports_of(path):
        target = runner_target(name)
        if target is None or target == own:
            continue
        assert own not in ISLANDS, f"runner/{module} imports {name}: {own} stands apart"
        if target == "sim":
            assert own in SIM_USERS, f"runner/{module} imports the simulator: {name}"
            continue
        assert (own, target) not in FORBIDDEN, f"runner/{module} imports {name}"
        assert target in LAYERS, f"runner/{module} imports {name}, which is not on the map"
        assert LAYERS.index(target) < LAYERS.index(own), f"runner/{module} imports upward: {name}"


@pytest.mark.parametrize("module", modules())
def test_libraries_stay_in_their_home(module: str) -> None:
    """aiohttp, tenacity, duckdb, tqdm, click, pydantic, ray... are each imported by their home."""
    path = PACKAGE / (module.replace(".", "/") + ".py")
    for name in imports_of(path):
        top = name.split(".")[0]
        if top in HOMES:
            homes = HOMES[top]
            assert module in homes or layer_of(module) in homes, f"runner/{module} imports {top}"


@pytest.mark.parametrize("module", modules())
def test_only_the_command_line_prints(module: str) -> None:
    """print() and writes to sys.stdout/stderr live in cli.py and screens.py alone."""
    if module in PRINTERS:
        return
    path = PACKAGE / (module.replace(".", "/") + ".py")
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id == "print":
            pytest.fail(f"runner/{module} calls print() on line {node.lineno}")
        if (
            isinstance(func, ast.Attribute)
            and func.attr == "write"
            and isinstance(func.value, ast.Attribute)
            and func.value.attr in ("stdout", "stderr")
        ):
            pytest.fail(f"runner/{module} writes to sys.{func.value.attr} on line {node.lineno}")


def test_map_catches_an_upward_import(tmp_path: Path) -> None:
    """The checker itself sees planted upward and cross imports (so it cannot pass vacuously)."""
    planted = tmp_path / "state.py"
    planted.write_text(
        "from runner.cli import main\nfrom runner.http import client\nfrom runner import engine\n"
    )
    found = imports_of(planted)
    assert {"runner.cli", "runner.http", "runner.engine"} <= found
    assert LAYERS.index(runner_target("runner.cli") or "") > LAYERS.index("store")
    assert ("store", runner_target("runner.http.client")) in FORBIDDEN
