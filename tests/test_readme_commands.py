"""The README's commands are the CLI's: every `strata …` it (or a page of docs/) shows, in
code blocks and in tables, names a command that exists, and every `--option` it gives
that command exists too, so a new administrator following it never meets "No such
command" or "No such option". Checked against the command tree itself, without running
anything."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import typer

from server_fixtures import strata
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


def code_block_after(text: str, heading: str) -> list[str]:
    """The `strata …` lines of the first code block after `heading`."""
    rest = text[text.index(heading):]
    block = rest[rest.index("```"):].split("```")[1]
    return [line for line in snippets("```\n" + block + "\n```") if line.startswith("strata ")]


@pytest.mark.e2e
def test_the_store_examples_run_as_written(tmp_path):
    """The README's store examples, run line by line as a reader would (paths moved under
    a temporary directory, the example snapshot id replaced by a real one): each ends 0,
    with no traceback and nothing on stderr."""
    home = tmp_path / "home"
    (home / "alice/Documents").mkdir(parents=True)
    (home / "alice/Documents/report.odt").write_text("quarterly figures\n")
    (home / "alice/.cache").mkdir()
    (home / "alice/.cache/thumb.bin").write_bytes(b"x" * 1000)
    (home / "alice/draft.tmp").write_text("scratch\n")
    where = {"/srv/backup": str(tmp_path / "backup"), "/home": str(home),
             "/tmp/restore": str(tmp_path / "restore")}
    lines = code_block_after(PAGES[0].read_text(), "### Examples")
    assert len(lines) >= 6, lines
    first_id = ""
    for line in lines:
        args = [where.get(a, a) for a in shlex.split(line)[1:]]
        if "1d33b094" in args:
            args[args.index("1d33b094")] = first_id
        proc = strata(*args)  # exit 0, no traceback
        assert proc.stderr == "", (line, proc.stderr)
        if args[:2] == ["store", "backup"] and not first_id:
            first_id = json.loads(strata("store", "snapshots", where["/srv/backup"],
                                         "--json").stdout)[0]["id"][:8]
    restored = tmp_path / "restore/alice/Documents/report.odt"
    assert restored.read_text() == "quarterly figures\n"
    listed = strata("store", "ls", where["/srv/backup"], "latest", "--json").stdout
    assert ".cache/thumb.bin" not in listed and "draft.tmp" not in listed  # excluded
