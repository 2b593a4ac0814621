"""The package's structure (issue 15, "one room per job"): every module imports the package modules it uses
at its top, the import graph has no cycle, and no module reaches into another's private names."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "ssah_utils"
MODULES = {p.stem: ast.parse(p.read_text()) for p in sorted(PKG.glob("*.py"))}


def _package_imports(tree: ast.Module):
    """(node, module names, inside a function?) for every relative import."""
    out = []

    def visit(node, in_func):
        for ch in ast.iter_child_nodes(node):
            if isinstance(ch, ast.ImportFrom) and ch.level == 1:
                mods = [ch.module.split(".")[0]] if ch.module else [a.name for a in ch.names]
                out.append((ch, mods, in_func))
            visit(ch, in_func or isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))
    visit(tree, False)
    return out


def test_package_imports_are_at_module_top():
    late = [f"{m}.py:{n.lineno} imports .{'/'.join(mods)}" for m, t in MODULES.items()
            for n, mods, in_func in _package_imports(t) if in_func]
    assert not late, "function-level imports of the package (move them to the top; a cycle means the code needs a new home): " + "; ".join(late)


def test_import_graph_has_no_cycle():
    graph = {m: {x for _, mods, _ in _package_imports(t) for x in mods if x in MODULES} for m, t in MODULES.items()}
    state: dict[str, int] = {}

    def dfs(m, path):
        state[m] = 1
        for x in sorted(graph[m]):
            if state.get(x) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(x):] + [x]))
            if x not in state:
                dfs(x, path + [x])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m, [m])


def test_no_private_names_across_modules():
    bad = []
    for m, tree in MODULES.items():
        aliases = {}
        for n, _mods, _ in _package_imports(tree):
            for a in n.names:
                if a.name.startswith("_"):
                    bad.append(f"{m}.py:{n.lineno} imports {a.name} from .{n.module}")
                if not n.module:  # from . import x as y
                    aliases[a.asname or a.name] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{m}.py:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not bad, "; ".join(bad)


PLOTTING = ("matplotlib", "seaborn")


def _imports_of(tree: ast.Module) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_no_module_mixes_compute_with_plotting():
    """Plotting lives in `plots` and the reports (`report`, `report_<stage>`); the stage modules and every other
    compute module import no plotting library and define no `plot_` function. A report computes nothing: it
    imports no torch and calls its stage for results."""
    drawers = {"plots", "report"} | {m for m in MODULES if m.startswith("report_")}
    assert {"report_probe", "report_classify", "report_freeze", "report_budget"} <= drawers
    for name, tree in MODULES.items():
        if name in drawers:
            continue
        assert not _imports_of(tree) & set(PLOTTING), f"{name} imports a plotting library"
        plot_defs = [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("plot_")]
        assert not plot_defs, f"{name} defines {plot_defs}: drawing belongs in its report module"
    for name in drawers - {"plots"}:
        assert "torch" not in _imports_of(MODULES[name]), f"{name} imports torch: a report draws, it does not compute"
