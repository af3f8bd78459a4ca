"""Text that is safe to print to a terminal: `clean` writes each character
that could drive one (control characters, escapes, line and paragraph
separators, bidirectional overrides, bytes of a command line that were not
UTF-8) as its escape. leptonctl prints what came from the cluster through it
(leptonctl/output.py), and the command lines print their one-line errors
through it (leptond/cliargs.py)."""

from __future__ import annotations

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def clean(value: object) -> str:
    """`value` as text that is safe to print to a terminal: each character
    that is not printable (control characters, escapes, line and paragraph
    separators, bidirectional overrides, ...) is written as its escape,
    `\x1b`, `\n`, `\u202e`. Printable text, any script, is kept as it is."""
    s = "" if value is None else str(value)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else _escape(c) for c in s)


def _escape(c: str) -> str:
    if c in _NAMED:
        return _NAMED[c]
    o = ord(c)
    if o < 0x100:
        return f"\\x{o:02x}"
    if o < 0x10000:
        return f"\\u{o:04x}"
    return f"\\U{o:08x}"
