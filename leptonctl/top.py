"""`leptonctl top`: the cluster on one full screen, refreshed every second.

Nodes with their GPUs as a grid (one cell per GPU: `#` held by a task, `.`
free, `x` unhealthy, `-` on a node that is down), then the running jobs and
the pending ones with why they wait. `q` quits (so do Ctrl-C and Esc). A
cluster that cannot be reached is said on the screen and asked again the
next second. What is drawn comes from `render`, a pure function of the
`overview` answer, so it is tested without a terminal.
"""

from __future__ import annotations

import curses
from datetime import UTC, datetime
from typing import Any

from leptond.client import calls as api
from leptond.clock import REAL as clock
from leptond.wire.client import ClusterClient
from leptond.wire.errors import RpcError

from .output import clean, duration, size

REFRESH_S = 1.0
QUIT_KEYS = {ord("q"), ord("Q"), 27}  # 27: Esc


def gpu_cells(n: dict[str, Any]) -> str:
    """One character per GPU of a node, in index order."""
    faulty = {int(f["index"]) for f in n.get("gpu_faults") or []}
    held = n["gpus_used"]
    total = n["gpus_total"]
    if n["state"] == "down":
        return "-" * total
    # The summary says how many are held, not which: held ones first.
    cells = []
    busy = held
    for i in range(total):
        if i in faulty:
            cells.append("x")
        elif busy > 0:
            cells.append("#")
            busy -= 1
        else:
            cells.append(".")
    return "".join(cells)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


def _ago(now: float, ts: float | None) -> str:
    return "-" if not ts else duration(max(0.0, now - ts))


# The order an array's counts by state are shown in.
TASK_STATES = (
    "running", "assigned", "pending", "succeeded", "failed", "lost", "cancelled", "preempted",
)  # fmt: skip


def array_note(j: dict[str, Any]) -> str:
    """An array's tasks by state, as "array 0-99: 8 running, 92 pending" ('' for other jobs)."""
    if not j.get("array"):
        return ""
    counts = j.get("task_states") or {}
    parts = [f"{counts[st]} {st}" for st in TASK_STATES if counts.get(st)]
    return f"array {j['array']}: {', '.join(parts) or 'no tasks'}"


def render(ov: dict[str, Any], width: int, height: int, now: float) -> list[str]:
    """The screen's lines for one `overview` answer."""
    nodes = ov["nodes"]
    # Counted by the master over every node: the list may hold only the
    # first of many (a master from before the counts: count the list).
    by_state: dict[str, int] = dict(ov.get("node_counts") or {})
    if not by_state:
        for n in nodes:
            by_state[n["state"]] = by_state.get(n["state"], 0) + 1
    total = sum(by_state.values())
    g = ov["gpus"]
    clock_s = datetime.fromtimestamp(now, UTC).strftime("%H:%M:%S")
    states = ", ".join(f"{k} {v}" for k, v in sorted(by_state.items())) or "none"
    summary = (
        f"leader {ov['cluster'].get('leader') or 'none'} - nodes: {states} - "
        f"GPUs {g['allocated']}/{g['total']} in use"
        + (f", {g['unhealthy']} unhealthy" if g["unhealthy"] else "")
    )
    lines = [f"leptond top - {clock_s} UTC - q quits", summary, ""]
    lines.append(
        f"NODES ({total})"
        if total == len(nodes)
        else f"NODES ({total}; the first {len(nodes)} below, leptonctl nodes lists all)"
    )
    name_w = max([4, *(len(n["name"]) for n in nodes)])
    for n in nodes:
        util = "-" if n.get("gpu_util_pct") is None else f"{n['gpu_util_pct']:.0f}%"
        state = n["state"] + (
            " (drained)" if n["state"] == "down" and n.get("drain_reason") else ""
        )
        lines.append(
            f"  {n['name']:<{name_w}}  {state:<16} [{gpu_cells(n)}]  util {util:>4}  "
            f"cpu {n['cpus_used']:g}/{n['cpus']:g}  "
            f"mem {size(n['mem_used_bytes'])}/{size(n['mem_bytes'])}"
        )
        for f in n.get("gpu_faults") or []:
            lines.append(f"  {'':<{name_w}}  GPU {f['index']} unhealthy: {f['reason']}")
    counts = ov["counts"]
    lines += ["", f"RUNNING ({counts['running']})"]
    lines.append(f"  {'JOB':<16} {'USER':<12} {'NAME':<16} {'GPUS':>4}  {'RUNNING':>8}  NODES")
    for j in ov["running"]:
        # An array holds the GPUs of its live tasks, not its spec's per-task count.
        gpus = j.get("gpus_held", j["gpus_total"]) if j.get("array") else j["gpus_total"]
        where = ",".join(j["on"]) or "-"
        if j.get("array"):
            where = f"{where}  [{array_note(j)}]"
        lines.append(
            f"  {j['id']:<16} {_cut(j['user'], 12):<12} {_cut(j['name'], 16):<16} "
            f"{gpus:>4}  {_ago(now, j['started_at']):>8}  {where}"
        )
    lines += ["", f"PENDING ({counts['pending']})"]
    lines.append(f"  {'JOB':<16} {'USER':<12} {'NAME':<16} {'GPUS':>4}  {'WAITING':>8}  WHY")
    for j in ov["pending"]:
        lines.append(
            f"  {j['id']:<16} {_cut(j['user'], 12):<12} {_cut(j['name'], 16):<16} "
            f"{j['gpus_total']:>4}  {_ago(now, j['submitted_at']):>8}  "
            f"{j.get('reason') or 'waiting for the next scheduling pass'}"
            + (f"  [{array_note(j)}]" if j.get("array") else "")
        )
    # Names, reasons and messages come from other users and from hosts: no
    # character of theirs may drive the terminal (leptonctl/output.py).
    out = [_cut(clean(line), width) for line in lines]
    if len(out) > height:
        out = [*out[: height - 1], _cut(f"... {len(out) - height + 1} more lines", width)]
    return out


async def run(c: ClusterClient, timeout_s: float) -> int:
    screen = curses.initscr()
    try:
        curses.noecho()
        curses.cbreak()
        screen.keypad(True)
        screen.nodelay(True)
        try:
            curses.curs_set(0)
        except curses.error:
            pass  # terminals that cannot hide the cursor
        while True:
            try:
                ov = await api.overview(c, timeout_s=timeout_s)
                lines = render(ov, *_size(screen), clock.now())
            except RpcError as exc:
                lines = [f"leptond top - cannot reach the cluster: {exc.message}", "", "q quits"]
            _draw(screen, lines)
            if await _wait_for_quit(screen, REFRESH_S):
                return 0
    finally:
        curses.nocbreak()
        screen.keypad(False)
        curses.echo()
        curses.endwin()


def _size(screen: Any) -> tuple[int, int]:
    h, w = screen.getmaxyx()
    return w - 1, h  # the last column: curses cannot write the bottom-right cell


def _draw(screen: Any, lines: list[str]) -> None:
    screen.erase()
    _, height = _size(screen)
    for y, line in enumerate(lines[:height]):
        try:
            screen.addstr(y, 0, line, curses.A_BOLD if y == 0 or line.isupper() else 0)
        except curses.error:
            pass  # a terminal shrunk meanwhile
    screen.refresh()


async def _wait_for_quit(screen: Any, seconds: float) -> bool:
    """Sleep `seconds` in small steps; True as soon as a quit key is pressed."""
    steps = max(1, int(seconds / 0.05))
    for _ in range(steps):
        while (key := screen.getch()) != -1:
            if key in QUIT_KEYS:
                return True
        await clock.sleep(seconds / steps)
    return False
