"""`.leptonignore` matching: the gitignore cases people rely on."""

from __future__ import annotations

import pytest

from leptond.blocks.ignore import IgnoreRules

RULES = IgnoreRules.parse(
    "\n".join(
        [
            "# build output",
            "*.pyc",
            "/build/",
            "data/**/raw",
            "logs/",
            "!keep.pyc",
            "out[0-9].txt",
            "ckpt_?.pt",
            "**/cache",
            "docs/*.md",
            "\\#literal",
            "trailing\\ ",  # an escaped trailing space is kept
            "*.tmp   ",  # unescaped trailing spaces are not
            "",
        ]
    )
)


@pytest.mark.parametrize(
    ("path", "is_dir", "ignored"),
    [
        ("a.pyc", False, True),
        ("deep/down/b.pyc", False, True),
        ("x/keep.pyc", False, False),  # negated later
        ("build", True, True),
        ("build", False, False),  # dir-only rule, and this is a file
        ("src/build", True, False),  # anchored: only at the root
        ("data/raw", True, True),  # ** matches zero directories
        ("data/a/b/raw", False, True),
        ("other/data/raw", False, False),
        ("logs", True, True),
        ("svc/logs", True, True),  # no slash but the trailing one: any depth
        ("svc/logs/x.txt", False, True),  # inside an ignored directory
        ("out7.txt", False, True),
        ("outx.txt", False, False),
        ("ckpt_1.pt", False, True),
        ("ckpt_12.pt", False, False),  # ? is exactly one character
        ("a/b/cache", True, True),
        ("cache", False, True),
        ("docs/a.md", False, True),
        ("docs/sub/a.md", False, False),  # * does not cross "/"
        ("x/docs/a.md", False, False),
        ("#literal", False, True),
        ("trailing ", False, True),
        ("x.tmp", False, True),
        ("main.py", False, False),
        ("# build output", False, False),  # comments are not patterns
    ],
)
def test_gitignore_cases(path: str, is_dir: bool, ignored: bool) -> None:
    assert RULES.ignored(path, is_dir) is ignored


def test_last_matching_rule_wins() -> None:
    rules = IgnoreRules.parse("*.log\n!important.log\nimportant.log\n")
    assert rules.ignored("important.log", False)
    assert not IgnoreRules.parse("*.log\n!important.log\n").ignored("important.log", False)


def test_negation_cannot_reinclude_inside_ignored_directory() -> None:
    rules = IgnoreRules.parse("secret/\n!secret/ok.txt\n")
    assert rules.ignored("secret/ok.txt", False)


def test_character_classes() -> None:
    rules = IgnoreRules.parse("[!a-c]x\n[^q]y\nz[]]\nbad[\n")
    assert rules.ignored("dx", False) and not rules.ignored("bx", False)
    assert rules.ignored("ry", False) and not rules.ignored("qy", False)
    assert rules.ignored("z]", False)
    assert rules.ignored("bad[", False)  # unclosed class: a literal "["
    assert not rules.ignored("a/x", False)  # a class never matches "/"


def test_double_star_forms() -> None:
    rules = IgnoreRules.parse("**/foo\nbar/**\na/**/b\nx**y\n")
    assert rules.ignored("foo", False) and rules.ignored("p/q/foo", False)
    assert rules.ignored("bar/z", False) and rules.ignored("bar/z/w", False)
    assert not rules.match("bar", True)  # "bar/**" is what is inside, not bar
    assert rules.ignored("a/b", False) and rules.ignored("a/x/y/b", False)
    assert rules.ignored("xzzy", False) and not rules.ignored("x/y", False)


def test_empty_rules_ignore_nothing() -> None:
    assert not IgnoreRules.parse("\n\n# only comments\n").ignored("anything", False)
