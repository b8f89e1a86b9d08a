"""The layering of ARCHITECTURE.md, checked on the code: imports only go down the layers, there are
no import cycles, and the HTTP layer can be imported without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parents[1] / "app"

# Lowest first. A module may import its own layer or the ones below it, never one above.
LAYERS = [
    (
        "values",
        [
            "app",
            "app.config",
            "app.jobs",
            "app.errors",
            "app.samplers",
            "app.infotext",
            "app.access",
            "app.editing",
            "app.db",
        ],
    ),
    ("lora files", ["app.lora"]),
    ("engine", ["app.engine"]),
    ("request path", ["app.queueing", "app.service", "app.observability", "app.prompt_tags"]),
    ("features", ["app.ab", "app.train", "app.jobqueue"]),
    ("assembly", ["app.state"]),
    ("http", ["app.api"]),
    ("entry points", ["app.main", "app.demo", "app.train.__main__", "app.serve", "app.keys"]),
]


def layer_of(module: str) -> int:
    best, depth = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or module.startswith(prefix + ".")
            if matches and prefix.count(".") > depth and (prefix != "app" or module == "app"):
                best, depth = index, prefix.count(".")
    assert best is not None, f"{module} is in no layer of ARCHITECTURE.md"
    return best


def module_name(path: Path) -> str:
    parts = path.relative_to(APP.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("app"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("app")}
    return found


MODULES = {module_name(p): p for p in sorted(APP.rglob("*.py"))}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_layers(module):
    own = layer_of(module)
    upward = [m for m in imports(MODULES[module]) if layer_of(m) > own]
    assert not upward, f"{module} ({LAYERS[own][0]}) imports from higher layers: {upward}"


def test_no_import_cycles():
    """Imports inside functions count too: a lazy import that closes a circle (app/serve/ had one)
    still ties the two modules together, it only hides the circle from the interpreter."""
    graph = {m: {i for i in imports(p) if i in MODULES and i != m} for m, p in MODULES.items()}
    assert "app.serve.replica" in graph and "app.serve.deployment" in graph  # app/serve/ is checked too
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            assert state.get(target) != 1, f"import cycle: {' -> '.join([*path, module, target])}"
            if target not in state:
                visit(target, [*path, module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_the_http_layer_imports_without_torch():
    code = "import sys, app.main, app.api.schemas, app.service; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=APP.parent).returncode == 0
