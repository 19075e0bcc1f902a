"""The layer rule: imports (function-level ones too) point down, and no module cycle exists."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "imgclf"

# Lower numbers are lower layers. A module may import its own package and any lower layer.
LAYERS = {
    "core": 0,
    "data": 1,
    "models": 1,
    "runtime": 2,
    "training": 3,
    "exporters": 3,
    "analysis": 3,
    "serving": 4,
    "commands": 5,
    "cli": 6,
    "__main__": 7,
    "__init__": 7,
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imgclf_imports(path: Path) -> set[str]:
    """Every imgclf module ``path`` imports, wherever the import statement is."""
    mod = module_name(path)
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), str(path))
    # `if TYPE_CHECKING:` imports never run, so they cannot form a cycle or a runtime dependency.
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "imgclf")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "imgclf":
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.add(
                    sub
                    if (PKG.parent / (sub.replace(".", "/") + ".py")).exists()
                    or (PKG.parent / sub.replace(".", "/")).is_dir()
                    else target
                )
    out.discard(mod)
    return out


def layer_of(mod: str) -> tuple[str, int]:
    parts = mod.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    return top, LAYERS[top]


def graph() -> dict[str, set[str]]:
    return {module_name(p): imgclf_imports(p) for p in PKG.rglob("*.py")}


def test_every_subpackage_has_a_layer() -> None:
    tops = {
        p.name.removesuffix(".py") for p in PKG.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()
    }
    assert tops <= set(LAYERS), sorted(tops - set(LAYERS))


def test_imports_only_point_down() -> None:
    bad = []
    for mod, targets in graph().items():
        top, rank = layer_of(mod)
        for t in targets:
            ttop, trank = layer_of(t)
            if ttop != top and trank >= rank:
                bad.append(f"{mod} -> {t}")
    assert not bad, "upward or sideways imports:\n" + "\n".join(sorted(bad))


def test_no_import_cycles() -> None:
    g = graph()
    # package __init__ files are namespaces: an edge to a package means its __init__ module
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt] if nxt in stack else [node, nxt])
            elif not state.get(nxt):
                visit(nxt, stack + [nxt])
        state[node] = 2

    for n in sorted(g):
        if not state.get(n):
            visit(n, [n])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)
