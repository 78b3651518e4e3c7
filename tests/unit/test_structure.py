"""The structure the README promises, checked on the source: every page
state transition is written in core/ (the shell reads the arrays, runs
ioctls and journals; it never assigns them), and no module grows past
what a newcomer can read in one go."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "uffdsrv"
ARRAYS = {"state", "slot", "expect", "batch", "heat", "stamp"}
MAX_LINES = 400


def array_writes(source: str) -> list[int]:
    """Lines that assign into (or augment) a page map array: `x.state[i] =`,
    `r.slot[a:b] += 1`, `x.state[i], y = ...`."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        else:
            continue
        flat = []
        for t in targets:
            flat.extend(t.elts if isinstance(t, ast.Tuple) else [t])
        for t in flat:
            base = t
            while isinstance(base, ast.Subscript):
                base = base.value
            if (isinstance(t, ast.Subscript) and isinstance(base, ast.Attribute)
                    and base.attr in ARRAYS):
                out.append(node.lineno)
    return out


def test_the_check_sees_array_writes():
    src = "r.state[i] = 1\nr.slot[a:b][m] += 1\nx, r.batch[j] = 1, 2\nr.state = y\nz = r.heat[i]\n"
    assert array_writes(src) == [1, 2, 3]


def test_no_page_state_is_assigned_outside_core():
    found = {}
    for path in sorted(PKG.rglob("*.py")):
        if path.relative_to(PKG).parts[0] == "core":
            continue
        lines = array_writes(path.read_text())
        if lines:
            found[str(path.relative_to(PKG))] = lines
    assert not found, f"page map arrays assigned outside core/: {found}"


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(PKG)): n for p in sorted(PKG.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long
