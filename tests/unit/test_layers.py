"""The layering the README promises, checked on the source: core/ imports
nothing from system/, server/ or the native module; no module of uffdsrv
imports itself back through others; and the unit tests run where nothing
is built (each is imported in a fresh interpreter in which importing
uffdsrv._native fails)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "uffdsrv"
UNIT = Path(__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every uffdsrv module `name` imports, at module level or inside a
    function (a lazy import closes a circle just the same)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from . import ctl` names a module; `from .x import y` a name in x
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod
                       for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t.startswith("uffdsrv") and t != name:
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods) | {"uffdsrv._native"}
    return {n: imports(n, p, known) for n, p in mods.items()}


def test_graph_sees_relative_and_absolute_imports():
    g = graph()
    assert "uffdsrv.core.protocol" in g["uffdsrv.ctl"]
    assert "uffdsrv.ctl" in g["uffdsrv.cli"]  # `from . import ctl`
    assert "uffdsrv._native" in g["uffdsrv.system.uffd"]


def test_core_imports_only_core():
    bad = {n: sorted(d for d in deps if not d.startswith("uffdsrv.core"))
           for n, deps in graph().items() if n.startswith("uffdsrv.core")}
    assert not {n: d for n, d in bad.items() if d}, bad


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in sorted(g.get(n, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None
    for n in sorted(g):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_circle():
    # a package's __init__ importing its own modules is not a circle
    g = {n: {d for d in deps if not n.startswith(d + ".") or n == d}
         for n, deps in graph().items()}
    assert find_cycle(g) is None, " -> ".join(find_cycle(g))


BLOCKED = """
import importlib, importlib.abc, sys
class NoNative(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "uffdsrv._native":
            raise ImportError("uffdsrv._native is not built (blocked by test_layers)")
sys.meta_path.insert(0, NoNative())
sys.path.insert(0, {root!r})
failed = []
for mod in {mods!r}:
    try:
        importlib.import_module(mod)
    except Exception as e:
        failed.append(f"{{mod}}: {{type(e).__name__}}: {{e}}")
print("\\n".join(failed))
"""


def test_unit_tests_import_without_the_native_build():
    mods = [f"tests.unit.{p.stem}" for p in sorted(UNIT.glob("test_*.py"))]
    code = BLOCKED.format(root=str(ROOT), mods=mods)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", r.stdout


def test_the_blocker_blocks():
    code = BLOCKED.format(root=str(ROOT), mods=["uffdsrv.system.uffd"])
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert "uffdsrv._native is not built" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("mod", ["uffdsrv.ctl", "uffdsrv.harness", "uffdsrv.top",
                                 "uffdsrv.cli", "uffdsrv.core.ratelimit"])
def test_control_side_needs_no_native_build(mod):
    code = BLOCKED.format(root=str(ROOT), mods=[mod])
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "", r.stdout + r.stderr
