"""`.leptonignore` rules: the gitignore syntax, matched against paths
relative to the working directory root (with ``/`` separators).

Supported: comments (``#``), blank lines, ``!`` negation, trailing ``/``
(directories only), a leading or inner ``/`` (anchored to the root), ``*``,
``?``, ``**`` (any number of directories), character classes (``[a-z]``,
``[!0-9]``, ``[^x]``) and backslash escapes.  As in git, the last matching
rule wins, and a file inside an ignored directory stays ignored whatever a
later ``!`` rule says (the scanner never enters the directory).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

IGNORE_FILE = ".leptonignore"


@dataclass(frozen=True, slots=True)
class IgnoreRule:
    pattern: str  # as written, for messages
    regex: re.Pattern[str]
    negated: bool
    dir_only: bool


def _translate_class(glob: str, start: int) -> tuple[str, int] | None:
    """Translate ``[...]`` starting at ``glob[start] == "["``.

    Returns the regex and the index after ``]``, or None when the class is
    not closed (then ``[`` is literal, as in git).
    """
    i = start + 1
    negated = i < len(glob) and glob[i] in "!^"
    if negated:
        i += 1
    parts: list[str] = []
    first = True
    while i < len(glob):
        ch = glob[i]
        if ch == "]" and not first:
            body = "".join(parts)
            # A class never matches "/": paths are matched as a whole string.
            return (f"[^/{body}]" if negated else f"(?!/)[{body}]"), i + 1
        if ch == "\\" and i + 1 < len(glob):
            i += 1
            ch = glob[i]
        if ch == "-" and parts and i + 1 < len(glob) and glob[i + 1] != "]":
            parts.append("-")
        else:
            parts.append(re.escape(ch))
        first = False
        i += 1
    return None


def _translate(glob: str) -> str:
    """Regex (without anchors) for a gitignore glob with no leading slash."""
    out: list[str] = []
    i = 0
    n = len(glob)
    while i < n:
        ch = glob[i]
        if ch == "*":
            if glob.startswith("**", i):
                at_start = i == 0 or glob[i - 1] == "/"
                at_end = i + 2 == n or glob[i + 2] == "/"
                if at_start and at_end:
                    if i + 2 == n:
                        out.append(".*")  # "dir/**": everything inside
                        i += 2
                    else:
                        out.append("(?:.*/)?")  # "**/" : zero or more directories
                        i += 3
                    continue
                # "a**b" is two ordinary stars in git.
            out.append("[^/]*")
            while i < n and glob[i] == "*":
                i += 1
            continue
        if ch == "?":
            out.append("[^/]")
        elif ch == "[":
            translated = _translate_class(glob, i)
            if translated is not None:
                out.append(translated[0])
                i = translated[1]
                continue
            out.append(re.escape(ch))
        elif ch == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(glob[i]))
        else:
            out.append(re.escape(ch))
        i += 1
    return "".join(out)


def _strip_trailing_spaces(line: str) -> str:
    # Trailing spaces are ignored unless escaped with a backslash.
    while line.endswith(" ") and not line.endswith("\\ "):
        line = line[:-1]
    return line


def parse_rule(line: str) -> IgnoreRule | None:
    """One line of an ignore file, or None for blank lines and comments."""
    line = _strip_trailing_spaces(line.rstrip("\r\n"))
    if not line or line.startswith("#"):
        return None
    written = line
    negated = line.startswith("!")
    if negated:
        line = line[1:]
    dir_only = line.endswith("/")
    line = line.rstrip("/")
    # A slash anywhere but the end ties the pattern to the root.
    anchored = "/" in line
    line = line.lstrip("/")
    if not line:
        return None
    body = _translate(line)
    regex = f"^{body}$" if anchored else f"^(?:.*/)?{body}$"
    return IgnoreRule(written, re.compile(regex, re.DOTALL), negated, dir_only)


class IgnoreRules:
    """An ordered list of rules; the last rule matching a path decides."""

    __slots__ = ("rules",)

    def __init__(self, rules: list[IgnoreRule] | None = None) -> None:
        self.rules: list[IgnoreRule] = rules or []

    @classmethod
    def parse(cls, text: str) -> IgnoreRules:
        rules = [r for r in (parse_rule(line) for line in text.splitlines()) if r is not None]
        return cls(rules)

    def match(self, path: str, is_dir: bool) -> bool:
        """Does this path itself match (ignoring its parent directories)?"""
        ignored = False
        for rule in self.rules:
            if rule.negated != ignored:
                continue  # cannot change the outcome
            if rule.dir_only and not is_dir:
                continue
            if rule.regex.match(path):
                ignored = not rule.negated
        return ignored

    def ignored(self, path: str, is_dir: bool) -> bool:
        """Is the path excluded, counting exclusion of any parent directory?"""
        parts = path.split("/")
        for depth in range(1, len(parts)):
            if self.match("/".join(parts[:depth]), True):
                return True
        return self.match(path, is_dir)
