"""Memory budgets: how much managed memory each program may keep resident.

A budget comes from, in order: `uffdsrv limit` or the program's own API
call (set at run time), the first matching rule of the config file, or the
default budget. No budget means no automatic reclaim.

Config file (TOML, `uffdsrv serve --config FILE`):

    default_budget = "1G"          # optional

    [[client]]
    comm = "redis-server"          # /proc/PID/comm, exact
    budget = "256M"

    [[client]]
    cgroup = "/system.slice/worker.service"   # prefix of the cgroup path
    budget = "64M"
"""
import tomllib
from dataclasses import dataclass, field

UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text) -> int:
    """'64M', '1.5G', '4096', 4096 -> bytes. ValueError on anything else."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"negative size: {text}")
        return text
    if not isinstance(text, str):
        raise ValueError(f"not a size: {text!r}")
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in UNITS else (t, "")
    try:
        value = int(float(num) * UNITS[unit])
    except ValueError:
        raise ValueError(f"not a size: {text!r}") from None
    if value < 0:
        raise ValueError(f"negative size: {text!r}")
    return value


@dataclass
class Rule:
    budget: int
    comm: str | None = None
    cgroup: str | None = None

    def matches(self, comm: str, cgroup: str) -> bool:
        if self.comm is not None and comm != self.comm:
            return False
        if self.cgroup is not None and not cgroup.startswith(self.cgroup):
            return False
        return True


@dataclass
class Budgets:
    default: int | None = None
    rules: list[Rule] = field(default_factory=list)

    def for_client(self, comm: str, cgroup: str) -> int | None:
        for rule in self.rules:
            if rule.matches(comm, cgroup):
                return rule.budget
        return self.default


def load(text: str) -> Budgets:
    """Parse a config file; ValueError with a one-line reason if it is wrong."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"config is not valid TOML: {e}") from None
    unknown = set(doc) - {"default_budget", "client"}
    if unknown:
        raise ValueError(f"unknown config keys: {', '.join(sorted(unknown))}")
    out = Budgets()
    if "default_budget" in doc:
        out.default = parse_size(doc["default_budget"])
    clients = doc.get("client", [])
    if not isinstance(clients, list):
        raise ValueError("[[client]] must be an array of tables")
    for i, c in enumerate(clients):
        if not isinstance(c, dict) or "budget" not in c:
            raise ValueError(f"client rule {i + 1} has no budget")
        extra = set(c) - {"comm", "cgroup", "budget"}
        if extra:
            raise ValueError(f"client rule {i + 1}: unknown keys {', '.join(sorted(extra))}")
        if "comm" not in c and "cgroup" not in c:
            raise ValueError(f"client rule {i + 1} matches nothing (give comm or cgroup)")
        for key in ("comm", "cgroup"):
            if key in c and not isinstance(c[key], str):
                raise ValueError(f"client rule {i + 1}: {key} must be a string")
        out.rules.append(Rule(parse_size(c["budget"]), c.get("comm"), c.get("cgroup")))
    return out
