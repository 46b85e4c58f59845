"""The package's floors: no module imports a package above its own, and the packages' import graph has
no cycle (issue 13). A new top-level package must be placed on a floor here."""
import ast
import pathlib

import lorakern

# bottom to top; a package may import its own floor's packages and the floors below
FLOORS = (("_native", "formats", "data"), ("ops", "triton"), ("quant",), ("multilora",), ("nn",), ("models",),
          ("adapters",), ("testing",), ("apps.evaluation", "apps.train", "apps.dlp", "apps.icm", "integrations"), ("cli", "__main__"))
FLOOR = {name: i for i, names in enumerate(FLOORS) for name in names}
ROOT = pathlib.Path(lorakern.__file__).parent


def _imports():
    """(file, line, importing package, imported package) for every import of a lorakern package."""
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("").parts
        if rel in (("__init__",), ("apps", "__init__")):
            continue
        here = list(rel[:-1])  # the module's package path
        src = _package(list(rel))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = here[:len(here) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
                names = [_package(target)] if target else [_package(here + [a.name]) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lorakern."):
                names = [_package(node.module.split(".")[1:])]
            elif isinstance(node, ast.Import):
                names = [_package(a.name.split(".")[1:]) for a in node.names if a.name.startswith("lorakern.")]
            else:
                continue
            for name in names:
                yield path.relative_to(ROOT.parent), node.lineno, src, name


def _package(parts: list) -> str:
    """The floor unit of a module path inside lorakern: its top package (``apps.<name>`` under apps)."""
    return ".".join(parts[:2]) if parts[0] == "apps" and len(parts) > 1 else parts[0]


def test_every_package_has_a_floor():
    tops = {_package(list(p.relative_to(ROOT).with_suffix("").parts)) for p in ROOT.rglob("*.py")}
    tops -= {"__init__", "apps.__init__"}
    assert tops <= set(FLOOR), f"place these packages on a floor: {sorted(tops - set(FLOOR))}"


def test_no_import_runs_up_a_floor():
    bad = [f"{f}:{line}: {src} imports {dst}" for f, line, src, dst in _imports()
           if dst in FLOOR and FLOOR[dst] > FLOOR[src]]
    assert not bad, "\n".join(bad)


def test_packages_import_graph_has_no_cycle():
    graph = {}
    for _, _, src, dst in _imports():
        if dst in FLOOR and dst != src:
            graph.setdefault(src, set()).add(dst)
    state = {}

    def visit(node, path):
        if state.get(node) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path + [node]))
        if state.get(node) == 2:
            return
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, path + [node])
        state[node] = 2
    for node in sorted(graph):
        visit(node, [])


REPO = ROOT.parent


def test_benchmarks_and_tests_import_no_paths_or_test_modules():
    """Benchmarks run as scripts (their folder is on the path already); tests share code through
    lorakern.testing, never by importing another test module."""
    for p in sorted((REPO / "benchmarks").glob("*.py")):
        assert "sys.path.insert" not in p.read_text(), p
    for p in sorted((REPO / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                assert not node.module.startswith(("test_", "helpers", "conftest")), f"{p}: imports {node.module}"


def test_every_op_is_documented():
    import torch
    docs = (REPO / "docs" / "formats.md").read_text()
    ops = sorted({n.split("::")[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names()
                  if n.startswith("lorakern::")})
    assert len(ops) >= 9
    missing = [op for op in ops if f"`lorakern::{op}`" not in docs]
    assert not missing, f"ops without a row in docs/formats.md: {missing}"
