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


def _sources(*pkgs: str) -> list[Path]:
    return [p for pkg in pkgs for p in sorted((ROOT / pkg).rglob("*.py"))]


# Reading the time, or waiting on it, other than through a Clock. An AST walk
# that resolves what each name was imported as (`import time as t`, `from
# asyncio import sleep`, `dt = datetime.datetime`), so no spelling of a read
# hides it. What it flags (each kind proved on a sample below):
#   import-time   any binding of the `time` module or of a name from it
#                 (`import os, time`, `import time as t`, `from time import
#                 monotonic`, `__import__("time")`, `importlib.import_module`)
#   wall-read     datetime.now / utcnow / today and date.today, by any alias
#   sleep         asyncio.sleep with a delay other than a literal 0 (sleep(0)
#                 only yields to the loop), by any alias
#   timer         `.call_at(` or `.call_later(` on anything but a clock (an
#                 object whose name ends in `clock`, or leptond.clock.REAL)
#   loop-time     `.time()` on an event loop (a name with `loop` in it, or one
#                 given get_running_loop()/get_event_loop()/new_event_loop())
#   thread-timer  threading.Timer
# Allowed, on purpose: timeouts that ride the running event loop's own timers,
# `asyncio.wait_for(aw, t)`, `asyncio.wait(fs, timeout=t)`, `asyncio.timeout(t)`.
# They read no clock themselves, and the loop they wait on is the one every
# Clock is built on: RealClock.call_later is the running loop's call_later,
# and its monotonic() is time.monotonic, the loop's own time(); under the
# simulator that loop is leptond/sim/vtime.VirtualLoop, whose time() is the
# virtual time, so these timeouts follow simulated time as a Clock's timers
# do. (They are not held while a simulated agent is paused, which a
# HostClock's timers are, nor moved by a Clock that is not the loop's, such
# as a test's fake: where that matters, use clock.wait_event.) Threads that
# block with a timeout (Event.wait, Popen.wait, Queue.get) are not flagged
# either: they are real threads and processes, which a simulation replaces.
CLOCK_IMPLS: dict[Path, set[str]] = {
    ROOT / "leptond" / "clock.py": {"*"},  # the real Clock: the one place that reads the time
    # The virtual Clock sets its timers on the loop it defines (VirtualLoop,
    # whose time is a number the simulation moves); it reads no real time.
    ROOT / "leptond" / "sim" / "vtime.py": {"timer"},
}
_WALL_READS = {
    "datetime.datetime.now",
    "datetime.datetime.utcnow",
    "datetime.datetime.today",
    "datetime.date.today",
}
_LOOP_GETTERS = {
    f"asyncio{sub}.{f}"
    for sub in ("", ".events")
    for f in ("get_running_loop", "get_event_loop", "new_event_loop")
}


def _last_name(e: ast.expr) -> str:
    return e.id if isinstance(e, ast.Name) else e.attr if isinstance(e, ast.Attribute) else ""


def _time_reads(text: str) -> list[tuple[int, str]]:
    """(line, kind) of each way `text` reads or waits on the time, sorted."""
    tree = ast.parse(text)
    nodes = list(ast.walk(tree))
    # What each name stands for, wherever it is bound in the module (scopes are
    # not told apart: a name bound to a clock read anywhere is suspect everywhere).
    alias: dict[str, str] = {}
    for node in nodes:
        if isinstance(node, ast.Import):
            for a in node.names:
                top = a.name.split(".")[0]
                alias[a.asname or top] = a.name if a.asname else top
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = "." * node.level + node.module
            for a in node.names:
                alias[a.asname or a.name] = f"{base}.{a.name}"

    def qual(e: ast.expr) -> str | None:
        if isinstance(e, ast.Name):
            return alias.get(e.id)
        if isinstance(e, ast.Attribute) and (base := qual(e.value)):
            return f"{base}.{e.attr}"
        return None

    loops = {"loop"}  # names given an event loop
    for _ in range(2):  # twice: an alias of an alias
        for node in nodes:
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target, value = node.targets[0], node.value
                if isinstance(target, ast.Name) and (q := qual(value)):
                    alias[target.id] = q
                if isinstance(value, ast.Call) and qual(value.func) in _LOOP_GETTERS:
                    loops.add(_last_name(target))

    def is_clock(e: ast.expr) -> bool:
        q = qual(e) or ""
        if q == "leptond.clock.REAL" or (q.startswith(".") and q.endswith(".clock.REAL")):
            return True
        name = _last_name(e)
        return name.lower().endswith("clock") and name not in loops

    def is_loop(e: ast.expr) -> bool:
        if isinstance(e, ast.Call):
            return qual(e.func) in _LOOP_GETTERS
        name = _last_name(e)
        return "loop" in name.lower() or name in loops

    hits: set[tuple[int, str]] = set()
    for node in nodes:
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            if any(a.name.split(".")[0] == "time" for a in node.names):
                hits.add((line, "import-time"))
        elif isinstance(node, ast.ImportFrom) and not node.level:
            if node.module == "time":
                hits.add((line, "import-time"))
            elif node.module == "threading" and any(a.name == "Timer" for a in node.names):
                hits.add((line, "thread-timer"))
        elif isinstance(node, ast.Name | ast.Attribute):
            if qual(node) == "threading.Timer":
                hits.add((line, "thread-timer"))
        elif isinstance(node, ast.Call):
            func = qual(node.func) or (node.func.id if isinstance(node.func, ast.Name) else "")
            first = node.args[0] if node.args else None
            if func in _WALL_READS:
                hits.add((line, "wall-read"))
            elif func == "asyncio.sleep":
                delay = first or next((k.value for k in node.keywords if k.arg == "delay"), None)
                if not (isinstance(delay, ast.Constant) and delay.value == 0):
                    hits.add((line, "sleep"))
            elif func in ("__import__", "importlib.import_module"):
                if isinstance(first, ast.Constant) and first.value == "time":
                    hits.add((line, "import-time"))
            elif isinstance(node.func, ast.Attribute):
                recv, attr = node.func.value, node.func.attr
                if attr in ("call_at", "call_later") and not is_clock(recv):
                    hits.add((line, "timer"))
                elif attr == "time" and not node.args and is_loop(recv):
                    hits.add((line, "loop-time"))
    return sorted(hits)


# Samples: a line marked `# ! KIND` must be flagged as KIND, and no other line.
BAD_TIME = [
    "import time  # ! import-time\nnow = time.time()",
    "import os, time  # ! import-time\nt0 = time.monotonic()",
    "import time as t  # ! import-time\nt0 = t.monotonic()",
    "from time import monotonic as m  # ! import-time\nt0 = m()",
    "def f():\n    import time  # ! import-time\n    time.sleep(1)",
    "t = __import__('time')  # ! import-time",
    "import importlib\nt = importlib.import_module('time')  # ! import-time",
    "import datetime\nwhen = datetime.datetime.now()  # ! wall-read",
    "from datetime import datetime as dt\nstamp = dt.now()  # ! wall-read",
    "from datetime import datetime\nstamp = datetime.utcnow()  # ! wall-read",
    "from datetime import date\nday = date.today()  # ! wall-read",
    "import datetime as d\nD = d.datetime\nx = D.today()  # ! wall-read",
    "import asyncio\nasync def f():\n    await asyncio.sleep(0.5)  # ! sleep",
    "from asyncio import sleep\nasync def f():\n    await sleep(1)  # ! sleep",
    "import asyncio as aio\nasync def f():\n    await aio.sleep(5)  # ! sleep",
    "import asyncio\nasync def f(s):\n    await asyncio.sleep(s)  # ! sleep",
    "import asyncio\nasync def f():\n    await asyncio.sleep(delay=2)  # ! sleep",
    "deadline = loop.time() + 5  # ! loop-time",
    "deadline = self._loop.time() + 5  # ! loop-time",
    "import asyncio\nt = asyncio.get_running_loop().time()  # ! loop-time",
    "import asyncio\nev = asyncio.get_event_loop()\nt = ev.time()  # ! loop-time",
    "loop.call_at(when, f)  # ! timer",
    "self.loop.call_later(1, f)  # ! timer",
    "import asyncio\nasyncio.get_running_loop().call_later(1, f)  # ! timer",
    "import asyncio\nclock = asyncio.get_running_loop()\nclock.call_later(1, f)  # ! timer",
    "import threading\nthreading.Timer(5, f).start()  # ! thread-timer",
    "import threading as th\nth.Timer(5, f).start()  # ! thread-timer",
    "from threading import Timer  # ! thread-timer\nTimer(5, f).start()  # ! thread-timer",
]
GOOD_TIME = [
    "import asyncio\nasync def f():\n    await asyncio.sleep(0)",
    "self._clock.call_later(1, f)\nself.world_clock.call_at(t, f)\nclock.now()",
    "from leptond.clock import REAL\nREAL.call_later(1, f)",
    "from ..clock import REAL\nt = REAL.monotonic()\nREAL.call_later(1, f)",
    "from leptond.clock import REAL as clock\nclock.block(1)",
    # Timeouts on the running loop's own timers (see above).
    "import asyncio\nasync def f(aw, fs):\n    await asyncio.wait_for(aw, 5)\n"
    "    await asyncio.wait(fs, timeout=5)\n    async with asyncio.timeout(5):\n        pass",
    "from datetime import UTC, datetime\ns = datetime.fromtimestamp(now, UTC).isoformat()",
    "day_time = stamp.time()",  # a datetime's time of day, not a loop's
    "# time.time() in a comment\n'''and time.sleep(1) in a docstring'''",
    "import threading\nlock = threading.Lock()",
    "def sleep(s): ...\nsleep(3)",
]


def _marked(sample: str) -> list[tuple[int, str]]:
    return [
        (n, line.split("# ! ")[1])
        for n, line in enumerate(sample.splitlines(), 1)
        if "# ! " in line
    ]


def test_the_time_check_catches_each_way_of_reading_the_time() -> None:
    assert all(_marked(s) for s in BAD_TIME)
    assert [_time_reads(s) for s in BAD_TIME] == [_marked(s) for s in BAD_TIME]
    assert [_time_reads(s) for s in GOOD_TIME] == [[]] * len(GOOD_TIME)


def test_no_module_reads_the_time_except_the_clock() -> None:
    sources = _sources(*PRODUCT)
    hits = [
        f"{p.relative_to(ROOT)}:{n} ({kind})"
        for p in sources
        for n, kind in _time_reads(p.read_text())
        if not ({"*", kind} & CLOCK_IMPLS.get(p, set()))
    ]
    assert len(sources) > 50
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
    live = re.compile(
        r"\bfrom raft\.state import|\bimport raft\.state\b|\braft\.lock\b"
        r"|\bfrom raft import\b.*\bstate\b|\bfrom \.\.?raft import\b.*\bstate\b"
    )
    for sample in (
        "from raft.state import ClusterState",
        "import raft.state as st",
        "from raft import state",
        "from raft import commands, state as st",
        "with self.raft.lock:",
    ):
        assert live.search(sample), sample
    for sample in ("from raft.view import StateView", "from raft import commands"):
        assert not live.search(sample), sample
    hits = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in _sources("leptond")
        if p.name != "master.py" and p not in own
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if live.search(line)
    ]
    assert not hits, hits
