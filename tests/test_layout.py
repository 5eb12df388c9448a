"""The package's walls: every ``pti`` module imports only the rooms its subpackage may use, never Cog, never a
module of the repo root, and the import graph between modules has no cycle (static read of every import)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pti"
ALLOWED = {  # room → the other rooms it may import (pti/__init__.py says the same in words)
    "models": set(),
    "preprocessing": set(),
    "dataset": set(),
    "formats": set(),
    "training": {"models", "dataset", "formats"},
    "inference": {"models", "preprocessing"},
    "toyworld": {"models", "dataset"},
}
ROOT_MODULES = {path.stem for path in ROOT.glob("*.py")}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module named by an import statement anywhere in the file (top level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_room_is_a_documented_subpackage():
    rooms = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert rooms == set(ALLOWED)
    for room in rooms:
        doc = ast.get_docstring(ast.parse((PACKAGE / room / "__init__.py").read_text()))
        assert doc and "import" in doc.lower(), f"pti/{room}/__init__.py must say what the room does and may import"


def test_every_module_says_what_it_is_for():
    missing = [str(p.relative_to(ROOT)) for p in package_files() if not ast.get_docstring(ast.parse(p.read_text()))]
    assert missing == []


def test_rooms_import_only_what_they_may():
    wrong = []
    for path in package_files():
        room = path.relative_to(PACKAGE).parts[0]
        if room.endswith(".py"):
            continue
        for name in imported_modules(path):
            top = name.split(".")[0]
            if top == "cog" or top in ROOT_MODULES:
                wrong.append(f"{path.relative_to(ROOT)} imports {name} (Cog or the repo root)")
            elif top == "pti" and len(name.split(".")) > 1:
                other = name.split(".")[1]
                if other != room and other not in ALLOWED[room]:
                    wrong.append(f"{path.relative_to(ROOT)} imports {name} (room {other})")
    assert wrong == []


def test_module_import_graph_has_no_cycle():
    modules = {module_name(p): p for p in package_files()}
    graph = {name: {m for m in imported_modules(path) if m in modules and m != name} for name, path in modules.items()}
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != "open", "import cycle: " + " → ".join(trail + [node, nxt])
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
