"""The shape of the code (DESIGN §11): time through a Clock only, services that
never reach the master or the live state, and no import cycles in leptond/.

These read the source tree; each check first proves on a sample that it
catches what it is meant to catch.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("leptond", "agent", "raft", "scheduler", "leptonctl")
CLOCK_MODULE = ROOT / "leptond" / "clock.py"

# Reading the time, or waiting on it, other than through leptond/clock.py.
TIME_READS = [
    re.compile(r"^\s*(import time\b|from time import)"),
    re.compile(r"\btime\.(time|monotonic|perf_counter|process_time|clock_gettime|sleep)(_ns)?\("),
    re.compile(r"\bdatetime\b.*\.(now|utcnow|today)\("),
    re.compile(r"\b(loop|get_running_loop\(\)|get_event_loop\(\))\.time\("),
    re.compile(r"\basyncio\.sleep\((?!0\))"),
    re.compile(r"(?<!clock)\.call_later\("),
]


def _sources(*pkgs: str) -> list[Path]:
    return [p for pkg in pkgs for p in sorted((ROOT / pkg).rglob("*.py"))]


def _time_reads(text: str) -> list[int]:
    return [
        n
        for n, line in enumerate(text.splitlines(), 1)
        if not line.lstrip().startswith("#") and any(p.search(line) for p in TIME_READS)
    ]


def test_the_time_check_catches_each_way_of_reading_the_time() -> None:
    bad = [
        "import time",
        "from time import monotonic",
        "    now = time.time()",
        "x = time.monotonic_ns()",
        "time.sleep(1)",
        "deadline = loop.time() + 5",
        "asyncio.get_running_loop().time()",
        "await asyncio.sleep(0.5)",
        "when = datetime.datetime.now()",
        "self.loop.call_later(1, f)",
    ]
    good = ["await asyncio.sleep(0)", "self._clock.call_later(1, f)", "clock.now()"]
    assert [_time_reads(line) for line in bad] == [[1]] * len(bad)
    assert [_time_reads(line) for line in good] == [[]] * len(good)


def test_no_module_reads_the_time_except_the_clock() -> None:
    hits = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in _sources(*PRODUCT)
        if p != CLOCK_MODULE
        for n in _time_reads(p.read_text())
    ]
    assert len(_sources(*PRODUCT)) > 50
    assert not hits, f"read the time through a Clock (leptond/clock.py): {hits}"


# -- imports among leptond's modules ----------------------------------------------


def _leptond_imports(path: Path) -> set[str]:
    """The leptond modules `path` imports, anywhere in it (TYPE_CHECKING blocks
    and function bodies included), named by their first part under leptond/:
    `leptond.wire.client` counts as `wire`."""
    rel = path.relative_to(ROOT / "leptond").with_suffix("")
    return _imports_of(path.read_text(), list(rel.parts[:-1]))


def _imports_of(text: str, package: list[str]) -> set[str]:
    """`_leptond_imports` of source `text` in leptond's subpackage `package`
    (its parts: [] for leptond/ itself)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(text)):
        names: list[list[str]] = []
        if isinstance(node, ast.Import):
            names = [a.name.split(".") for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            up = len(package) - node.level + 1  # from ..x: the package above
            base = ["leptond", *package[:up]] if node.level else []
            mod = [*base, *(node.module.split(".") if node.module else [])]
            if mod == ["leptond"]:  # from leptond import a, b / from . import a, b
                names = [[*mod, a.name] for a in node.names if a.name != "*"]
            else:
                names = [mod]
        for parts in names:
            if parts[0] == "leptond" and len(parts) > 1:
                out.add(parts[1])
    return out


def test_the_import_check_sees_each_way_of_importing_a_module() -> None:
    assert _imports_of("from leptond import master", []) == {"master"}
    assert _imports_of("from leptond import master as m, wire", ["sim"]) == {"master", "wire"}
    assert _imports_of("def f():\n    from . import master, ports", []) == {"master", "ports"}
    assert _imports_of("from .. import master", ["sim"]) == {"master"}
    assert _imports_of("from ..wire import client", ["sim"]) == {"wire"}
    assert _imports_of("from .host import SimHost", ["sim"]) == {"sim"}
    assert _imports_of("from .ports import Clock", []) == {"ports"}
    assert _imports_of("import leptond.master as m", []) == {"master"}
    assert _imports_of("from leptond.wire.client import Client", []) == {"wire"}
    assert _imports_of("import leptond\nfrom raft import node", []) == set()


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for p in sorted((ROOT / "leptond").rglob("*.py")):
        rel = p.relative_to(ROOT / "leptond").with_suffix("")
        node = rel.parts[0]
        if node == "__init__":
            continue
        graph.setdefault(node, set()).update(_leptond_imports(p) - {node})
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return [*path[path.index(m) :], m]
            if m not in state and (found := visit(m)):
                return found
        path.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_cycle_check_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_imports_among_leptond_modules_have_no_cycle() -> None:
    graph = _graph()
    assert {"api", "master", "agents", "controllers", "wire"} <= set(graph)
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph) or [])}"


def test_only_the_entry_point_imports_the_master() -> None:
    users = sorted(n for n, deps in _graph().items() if "master" in deps)
    assert users == ["cli"], f"services get ports (leptond/ports.py), not the master: {users}"


def test_services_read_views_not_the_live_state() -> None:
    # The live ClusterState and its apply lock belong to the Raft shell and
    # the composition root; everyone else reads StateReader views. The
    # simulation has its own of both: its model of the Raft log and the
    # place where it wires its masters as master.py does.
    own = {ROOT / "leptond" / "sim" / "raftmodel.py", ROOT / "leptond" / "sim" / "masters.py"}
    live = re.compile(r"\bfrom raft\.state import|\bimport raft\.state\b|\braft\.lock\b")
    assert live.search("from raft.state import ClusterState")
    hits = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in _sources("leptond")
        if p.name != "master.py" and p not in own
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if live.search(line)
    ]
    assert not hits, hits
