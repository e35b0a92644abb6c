"""The README's commands are the CLI's: every `strata …` it (or a page of docs/) shows, in
code blocks and in tables, names a command that exists, and every `--option` it gives
that command exists too, so a new administrator following it never meets "No such
command" or "No such option". Checked against the command tree itself, without running
anything."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer

from strata.cli.main import build_app

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
OPTION = re.compile(r"(?<![\w-])--[a-z0-9][a-z0-9-]*")


def snippets(text: str) -> list[str]:
    """Each `strata …` the README shows: code-block lines (continuations joined, comments
    dropped) and inline code in prose and tables."""
    out: list[str] = []
    in_code = False
    pending = ""
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        if in_code:
            line = pending + re.sub(r"\s+#.*$", "", line).strip()
            pending = ""
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            if line.startswith("strata "):
                out.append(line)
        else:
            out += [s for s in re.findall(r"`([^`]+)`", line.replace("\\|", "|"))
                    if s.startswith("strata ")]
    return out


def commands(snippet: str, root: typer.core.TyperGroup) -> list[tuple[str, object, str]]:
    """(path, click command, its part of the snippet) for a snippet, whose ` | `
    alternatives name sibling commands (`strata layer list | show N:V`)."""
    parts = snippet.split(" | ")
    found = []
    words = parts[0].split()[1:]
    group, path = root, ["strata"]
    while words and hasattr(group, "commands") and words[0] in group.commands:
        path.append(words[0])
        parent, group = group, group.commands[words.pop(0)]
    found.append((" ".join(path), group, parts[0]))
    for alt in parts[1:]:
        first = alt.split()[0] if alt.split() else ""
        if len(path) > 2 and first in parent.commands:  # a sibling of the last command
            found.append((" ".join([*path[:-1], first]), parent.commands[first], alt))
        else:  # a value that contains " | " (a table cell): it belongs to the command
            found[-1] = (found[-1][0], found[-1][1], found[-1][2] + " " + alt)
    return found


def problems(snippet: str, root: typer.core.TyperGroup) -> list[str]:
    """What in one snippet the CLI does not have: a command, an option."""
    wrong = []
    for path, cmd, text in commands(snippet, root):
        if len(path.split()) < 2 and not text.split()[1:2] == ["--version"]:
            wrong.append(f"{snippet}: no such command")
            continue
        known = {o for p in getattr(cmd, "params", []) for o in (*p.opts, *p.secondary_opts)}
        known.add("--help")
        for opt in OPTION.findall(text):
            if opt not in known:
                wrong.append(f"{path}: no option {opt} (README: {snippet[:80]})")
    return wrong


def test_every_documented_command_and_option_exists():
    root = typer.main.get_command(build_app(None))
    assert len(snippets(PAGES[0].read_text())) > 60, "the README's commands were not found"
    wrong = [f"{page.name}: {w}" for page in PAGES for snippet in snippets(page.read_text())
             for w in problems(snippet, root)]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(("snippet", "words"), [
    ("strata store backup DIR SRC --bogus", "strata store backup: no option --bogus"),
    ("strata stor init DIR", "no such command"),
    ("strata layer list | show N:V [--filez]", "strata layer show: no option --filez"),
])
def test_a_wrong_command_or_option_is_caught(snippet, words):
    root = typer.main.get_command(build_app(None))
    assert any(words in w for w in problems(snippet, root)), problems(snippet, root)


@pytest.mark.parametrize(("snippet", "paths"), [
    ("strata layer list | show N:V [--files] | delete N:V",
     ["strata layer list", "strata layer show", "strata layer delete"]),
    ("strata store init DIR [--compression zstd:3 | none]", ["strata store init"]),
])
def test_alternatives_split_into_sibling_commands(snippet, paths):
    root = typer.main.get_command(build_app(None))
    assert [p for p, _, _ in commands(snippet, root)] == paths


# The README's store examples are run as written, each expected to simply work, by the
# README walk (tests/test_readme_walk.py), which runs every other line too.
