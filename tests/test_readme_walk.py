"""A new administrator's walk through the README on a fresh clone: `make demo` as the
Quick start says, then every `strata …` line of the README's code blocks and tables, in
order, as written, against the demo's server, with their placeholders (`/srv/strata`,
`ID`, `1d33b094`, `N:V`, `5eb2f21e…` …) replaced by what the demo printed (its HTTPS URL,
its certificate's fingerprint, its admin token) and by the real ones of this walk.
Whatever a command does, it must end with a documented exit code and, when it fails, say
why in one plain line on stderr: no traceback, no panel, no Python text. Most lines must
simply work. Then Ctrl-C stops the demo, which must end cleanly, its server gone, having
written nothing outside its folder (demo-work/).

The clone is of this checkout's last commit: uncommitted changes are not in it, so the
walk tests what is committed (a file left out of a commit fails here). The clone's code
runs (PYTHONPATH) in this checkout's virtual environment, linked as the clone's `.venv`
so that `make demo` does not install one again (15-30 s; CI's fresh clone and `make test`
cover that install). The walk's commands are forked from a process that imported
the clone's code once (tests/cli_forkserver.py), `make demo` is a real exec (and forks its
own commands from itself, as it does for a user).

What is not run, and why: `make` lines but `make demo` (this is the test), `strata
server` (the demo's is used), `mount` (FUSE in the foreground: tests/test_mount.py),
`reflector run` (a daemon in the foreground: tests/test_reflector.py), shell lines
(`curl`, `cp`, `mkdir`). The daemon `agent run` runs one cycle (`--once`). Agent and
reflector commands get this walk's `--state` (and `--root` to enroll), as the README says
to do for a state directory that is not the default. The `strata store …` lines need no
server: they run while the demo builds its fleet (two cores: one each).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from cli_forkserver import ForkServer, exec_only
from server_fixtures import argv, cli_env

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
DOCUMENTED = {0, 1, 2, 3, 4, 5, 10, 11, 12}  # README: exit codes
NOT_RUN = ("strata server ", "strata endpoint mount ", "strata store mount ",
           "strata reflector run")  # a foreground daemon: tests/test_reflector.py runs it
# The reflector's commands that keep state on the branch host (default /var/lib/…).
REFLECTOR_STATE = ("enroll", "status", "warm", "import")
# Optional arguments the walk gives (the others are left out, as a first try would).
KEPT_OPTIONS = ("--password-file", "--yes", "--json")
# In what a command prints when it works: Python's own forms instead of the documented
# ones (bytes and dict reprs, 0o modes, None, timestamps not in ISO 8601 UTC with Z).
PYTHON_OUTPUT = re.compile(r"(?<![\w])b'|\{'|\b0o[0-7]{3,4}\b|\bNone\b|datetime\(|"
                           r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(\.\d+)?(\+00:00|[+-]\d\d:\d\d)")
PYTHON_TEXT = re.compile(r"Errno|Traceback|Error\(|Exception|(?<![\w])b'|\\x[0-9a-f]{2}|"
                         r"could not convert|object has no attribute|NoneType")


def not_run(command: str) -> bool:
    """A daemon or a mount in the foreground, named with its arguments or alone in prose."""
    return command.strip() in [n.strip() for n in NOT_RUN] or command.startswith(NOT_RUN)


def code_lines(text: str) -> list[str]:
    """The `strata …` and `export …` lines of the README's code blocks, in order
    (continuations joined, comments dropped)."""
    out, in_code, pending = [], False, ""
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        if not in_code:
            continue
        line = pending + re.sub(r"\s+#.*$", "", line).strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
        elif line.startswith(("strata ", "export ")):
            # A pipe into a shell tool shows the command's output: the command is run.
            line = re.sub(r"\s+\|\s+(jq|head|grep|less|sort)\b.*$", "", line)
            out += [part.strip() for part in line.split(" && ")]  # one after the other
    return out


def table_lines(text: str) -> list[str]:
    """The `strata …` the README's prose and tables show inline, less those that only
    name a group of commands (`strata store …`)."""
    out = []
    in_code = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code:
            out += [s for s in re.findall(r"`([^`]+)`", line.replace("\\|", "|"))
                    if s.startswith("strata ") and not re.fullmatch(r"strata \w+ …", s)]
    return out


def _drop_optional(text: str, kept: tuple[str, ...] = KEPT_OPTIONS) -> str:
    """`[...]` groups left out, innermost first, except those naming one of `kept`."""
    while True:
        m = re.search(r"\s*\[([^\[\]]*)\]", text)
        if m is None:
            return text
        inner = m.group(1)
        keep = inner.split()[0] in kept if inner.split() else False
        text = text[:m.start()] + (" " + inner if keep else "") + text[m.end():]


def expand(line: str, kept: tuple[str, ...] = KEPT_OPTIONS) -> list[str]:
    """One README line as the commands it shows: `(a | b)` takes its first choice,
    optional parts go, and `cmd x | y` alternatives name sibling commands."""
    line = re.sub(r"\(([^()|]*)\|[^()]*\)", r"\1", line).replace("…", "")
    line = line.replace("--keep-last/-hourly/-daily/-weekly/-monthly/-yearly", "--keep-last")
    line = _drop_optional(line, kept)
    line = re.sub(r"(?<=\S)\|\S+", "", line)  # a value's choices: targets|root|online
    parts = [p.strip() for p in line.split(" | ")]
    words = parts[0].split()
    group = words[:2] if len(words) > 2 else words[:1]  # "strata layer"
    return [parts[0], *[" ".join([*group, p]) for p in parts[1:]]]


@dataclass
class Demo:
    """What `make demo` printed of its server."""
    url: str
    token_file: Path
    fingerprint: str


class Walk:
    def __init__(self, base: Path, demo_work: Path, env: dict[str, str],
                 forks: ForkServer | None = None):
        self.base, self.demo_work, self.forks = base, demo_work, forks
        # The demo's signing keys: `signing init` is refused on its server (set up already),
        # so a reader goes on with the keys the demo made.
        self.env = {**env,
                    "STRATA_SIGNING_PASSPHRASE_FILE": str(demo_work / "signing-passphrase")}
        (base / "pw").write_text("a long enough password 1\n")
        self.root, self.state = base / "endpoint", base / "agent-state"
        self.values: dict[str, str] = {
            "enroll.token": str(base / "enroll.token"),
            "~/strata-keys": str(demo_work / "signing-keys"), "F": str(base / "pw"),
            "/mnt/reference": str(base / "reference"), "AFTER": str(base / "after"),
            "BEFORE": str(base / "before"), "DIR": str(base / "driver"),
            "N:V": "corp-os:2", "corp-os:7": "corp-os:2", "NAME": "hana",
            "/srv/backup": str(base / "backup"), "/home": str(base / "home"),
            "/tmp/restore": str(base / "restore"), "/tmp/alice": str(base / "alice"),
            "/srv/strata-cache": str(base / "cache"),
            "cvd.tar": str(base / "cvd.tar"),
            "KIND": "retention", "FILE.json": str(base / "retention.json"),
            "P": "home/alice", "PATH": "home", "N": "3",
        }
        (base / "retention.json").write_text('{"daily": 14}')
        self.results: list[tuple[str, subprocess.CompletedProcess[str]]] = []
        self.seconds: list[float] = []

    def serving(self, demo: Demo) -> None:
        """The demo's server, in place of the README's."""
        self.values.update({
            "/srv/strata/admin.token": str(demo.token_file),
            "DATA/admin.token": str(demo.token_file),
            "/srv/strata": str(demo.token_file.parent),
            "https://strata.example.net:8470": demo.url,
            "https://server.example.net:8470": demo.url,
            "5eb2f21e": demo.fingerprint, "TLS_FP": demo.fingerprint})

    def ids(self) -> None:
        """What later lines name: the endpoint, its first snapshot, the root key."""
        cred = self.state / "credential.json"
        if cred.exists() and "S" not in self.values:
            import json

            eid = json.loads(cred.read_text())["endpoint_id"]
            for name in ("ID", "3f2a", "ENDPOINT", "OLD"):
                self.values[name] = eid
            # New hardware: one of the demo's endpoints (the same one is refused: a revert).
            self.values["NEW"] = json.loads(
                (self.demo_work / "agents/bob/credential.json").read_text())["endpoint_id"]
            snaps = self.json("agent", "snapshots", "--state", self.state)
            if snaps:
                self.values["1d33b094"] = self.values["S"] = snaps[-1]["id"][:8]  # type: ignore[index]

    def args(self, command: str) -> tuple[list[str], Path | None]:
        words = shlex.split(command.replace("~/", "TILDE/"))
        out_file = None
        if ">" in words:
            at = words.index(">")
            out_file, words = self.base / self.sub(words[at + 1]), words[:at]
        if words[1:2] == ["store"]:  # the table's names for the store's own things
            where = {"DIR": self.values["/srv/backup"], "SOURCE": self.values["/home"],
                     "SNAP": "latest", "SNAP1": "latest", "SNAP2": "latest",
                     "TARGET": str(self.base / "restore2"), "PATH": "alice", "N": "5"}
            words = [where.get(w, w) for w in words]
        if words[1:2] == ["store"] and "1d33b094" in words:  # the store's own snapshot
            words[words.index("1d33b094")] = self.json(  # type: ignore[index]
                "store", "snapshots", self.values["/srv/backup"])[0]["id"][:8]
        args = [self.sub(w.replace("TILDE/", "~/")) for w in words[1:]]
        if args[:1] == ["agent"]:
            if args[1:2] == ["run"] and "--once" not in args:
                args.append("--once")
            args += ["--state", str(self.state)]
            if args[1:2] == ["enroll"]:
                args += ["--root", str(self.root)]
        if args[:2] == ["agent", "install-service"]:  # never into this host's systemd
            args += ["--unit-dir", str(self.base / "units")]
        if args[:1] == ["reflector"] and "REFLECTOR_ID" in self.values:  # not an endpoint
            args = [self.values["REFLECTOR_ID"] if w == self.values.get("ID") else w
                    for w in args]
        if args[:1] == ["reflector"] and args[1:2] and args[1] in REFLECTOR_STATE:
            args += ["--state", str(self.base / "reflector.state")]
        return args, out_file

    def sub(self, word: str) -> str:
        if word in self.values:
            return self.values[word]
        for key, value in sorted(self.values.items(), key=lambda kv: -len(kv[0])):
            if key.startswith(("/", "~", "http")) and word.startswith(key):
                return value + word[len(key):]
        return word

    def run(self, command: str) -> None:
        if command.startswith("export "):
            name, _, value = command[len("export "):].partition("=")
            self.env[name] = self.sub(value.replace("…", ""))
            return
        args, out_file = self.args(command)
        # In the walk's folder: a relative path (`> reflector.token`) lands there.
        began = time.monotonic()
        proc = self.strata(args)
        self.seconds.append(time.monotonic() - began)
        if out_file is not None and proc.returncode == 0:
            out_file.write_text(proc.stdout)
        self.results.append((command, proc))
        if args[:2] == ["reflector", "status"] and "--json" in args and proc.returncode == 0:
            import json

            self.values["REFLECTOR_ID"] = json.loads(proc.stdout)["reflector_id"]
        self.ids()

    def strata(self, args: list[str]) -> subprocess.CompletedProcess[str]:
        """`strata ARGS` in the walk's folder, in the clone's code."""
        if self.forks is not None:
            return self.forks.run(args, self.env, 300, cwd=str(self.base))
        return subprocess.run(argv(args), env=self.env, cwd=self.base,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=300)

    def json(self, *args: object) -> object:
        import json

        proc = self.strata([str(a) for a in (*args, "--json")])
        assert proc.returncode == 0, (args, proc.stderr)
        return json.loads(proc.stdout)

    def problems(self) -> list[str]:
        wrong = []
        for command, proc in self.results:
            err = proc.stderr.strip()
            if proc.returncode not in DOCUMENTED:
                wrong.append(f"{command}: exit code {proc.returncode} is not documented")
            if "Traceback" in proc.stderr or "─" in proc.stderr:
                wrong.append(f"{command}: {proc.stderr[-600:]}")
            elif proc.returncode != 0 and (err.count("\n") or not err.startswith("error")):
                wrong.append(f"{command}: exit {proc.returncode}, not one plain line:\n{err}")
            elif proc.returncode != 0 and PYTHON_TEXT.search(err):
                wrong.append(f"{command}: Python's words, not plain ones: {err}")
            found = PYTHON_OUTPUT.search(proc.stdout)
            if found:
                at = proc.stdout[max(0, found.start() - 80):found.end() + 40]
                wrong.append(f"{command}: prints {found.group(0)!r}: …{at}…")
        return wrong


def trees(base: Path) -> None:
    """The files the README's lines name: an endpoint with alice's report, a reference
    machine for corp-os:2, an app's before and after, a driver set, a /home."""
    def put(path: Path, text: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for tree in ("endpoint", "reference", "before", "after", "driver"):
        put(base / tree / "etc/os-release", 'ID=debian\nVERSION_ID="12"\n')
        put(base / tree / "usr/bin/tool", "tool\n")
    put(base / "endpoint/etc/hostname", "pc-alice\n")
    put(base / "endpoint/home/alice/report.odt", "quarterly figures\n")
    put(base / "endpoint/docs/readme.txt", "docs\n")
    put(base / "reference/usr/bin/tool", "tool v2\n")
    put(base / "after/opt/office/office", "office 1\n")
    put(base / "driver/usr/lib/firmware/dell.bin", "firmware\n")
    put(base / "home/alice/Documents/report.odt", "figures\n")
    put(base / "home/alice/.cache/thumb.bin", "x" * 1000)  # what the examples exclude
    put(base / "home/alice/draft.tmp", "scratch\n")


def examples(text: str) -> list[str]:
    """The store's examples: the first code block after `### Examples`."""
    block = text[text.index("### Examples"):].split("```")[1]
    return code_lines(f"```{block}```")


VENV = Path(sys.executable).parent.parent  # this checkout's virtual environment
SERVING = re.compile(r"The server keeps serving at (https://127\.0\.0\.1:\d+) \(admin token in "
                     r"(\S+); its certificate's fingerprint \(SHA-256\) is ([0-9a-f]{64})")


def fresh_clone(tmp_path: Path) -> Path:
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(clone)],
                   check=True, capture_output=True, timeout=120)
    if not (VENV / ".installed").exists():
        pytest.skip(f"{VENV} was not made by `make venv`: `make demo` would install one "
                    "(into this checkout's venv, through the link)")
    (clone / ".venv").symlink_to(VENV)
    # A fresh clone's pyproject.toml is newer than the venv's stamp: dated back, so `make`
    # takes the venv as installed (it is: from this same pyproject.toml, or a later one).
    os.utime(clone / "pyproject.toml", (0, 0))
    return clone


def wait_for_demo(demo: subprocess.Popen[bytes], log: Path, deadline: float) -> re.Match[str]:
    """The demo's last words before it serves until Ctrl-C (polled, with a deadline)."""
    while True:
        text = log.read_text(errors="replace")
        found = SERVING.search(text)
        if found and "Ctrl-C to stop." in text:
            return found
        assert demo.poll() is None, f"make demo exited with {demo.returncode}:\n{text[-3000:]}"
        assert time.monotonic() < deadline, f"make demo did not finish in time:\n{text[-3000:]}"
        time.sleep(0.2)


def test_make_demo_then_the_readme_on_a_fresh_clone(tmp_path):
    clone = fresh_clone(tmp_path)
    forks: ForkServer | None = None
    base, home, tmp = tmp_path / "walk", tmp_path / "home", tmp_path / "tmp"
    for folder in (base, home, tmp):
        folder.mkdir()
    trees(base)
    code = {**cli_env(), "PYTHONPATH": str(clone / "src")}  # the clone's code, not this one's
    for name in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL"):  # under `make test`: not its jobs
        code.pop(name, None)
    log = tmp_path / "demo.log"
    with open(log, "wb") as out:  # `make demo` as the README gives it, in its own session
        demo = subprocess.Popen([*AS_IN_A_TERMINAL, "make", "demo"], cwd=clone, stdout=out,
                                stderr=out, stdin=subprocess.DEVNULL, start_new_session=True,
                                env={**code, "STRATA_DEMO_SMALL": "1", "HOME": str(home),
                                     "TMPDIR": str(tmp)})
    try:
        readme = (clone / "README.md").read_text()  # the committed one
        lines = code_lines(readme)
        assert len(lines) > 50
        # Every command as the walk runs it: (line, command); the tables' commands as a
        # reader tries them, without --yes (one that would destroy refuses in one line).
        commands = [(line, c) for line in lines for c in expand(line)
                    if c.startswith(("strata", "export")) and not not_run(c)]
        commands += [(line, c) for line in table_lines(readme)
                     for c in expand(line, kept=("--password-file",)) if not not_run(c)]
        offline = [(line, c) for line, c in commands if c.startswith("strata store ")]
        # The commands run in children of a fork server that imported the clone's code
        # (tests/cli_forkserver.py: each still its own process, environment, folder and
        # exit code; 0.06 s of CPU instead of 0.6). `make demo` and its server are real
        # execs (its commands fork from it); STRATA_TEST_EXEC=1 makes the walk's so too.
        if not exec_only():
            forks = ForkServer(preload=(), pythonpath=str(clone / "src"))  # no server
        walk = Walk(base, clone / "demo-work", code, forks)
        for _, command in offline:  # no server needed: while the demo builds its fleet
            walk.run(command)
        # The store's examples are the first thing a reader copies: each simply works.
        shown = examples(readme)
        assert len(shown) >= 6, shown
        for command, proc in walk.results:
            if command in shown:
                assert (proc.returncode, proc.stderr) == (0, ""), (command, proc.stderr)
        restored = base / "restore/alice/Documents/report.odt"
        assert restored.read_text() == "figures\n"
        store = base / "backup"
        first = walk.json("store", "snapshots", store)[0]["id"]  # type: ignore[index]
        listed = {e["path"] for e in walk.json("store", "ls", store, first)}  # type: ignore[attr-defined]
        assert "alice/Documents/report.odt" in listed, listed
        assert not {"alice/.cache/thumb.bin", "alice/draft.tmp"} & listed, listed  # excluded
        serving = wait_for_demo(demo, log, time.monotonic() + 600)
        text = log.read_text(errors="replace")
        assert "Traceback" not in text, text
        url, token_file, fingerprint = serving.groups()
        # The fingerprint the demo names is the one its server printed at its start.
        assert f"certificate fingerprint (SHA-256): {fingerprint}" in text, text
        walk.serving(Demo(url, Path(token_file), fingerprint))
        for line, command in commands:
            if (line, command) in offline:
                continue
            if "root-fingerprint" in line and "FP" not in walk.values:
                walk.values["FP"] = walk.json(  # type: ignore[index]
                    "signing", "status", "--server", url, "--server-fingerprint", fingerprint,
                    "--admin-token-file", token_file).get("root_fingerprint", "FP")
            walk.run(command)
    finally:
        stopped = stop(demo)
        if forks is not None:
            forks.close()
    ran = len(walk.results)
    ok = [c for c, p in walk.results if p.returncode == 0]
    report = "\n".join(f"{p.returncode:3} {t:5.1f}s {c}" + (f"\n      {p.stderr.strip()}"
                                                             if p.returncode else "")
                       for (c, p), t in zip(walk.results, walk.seconds, strict=True))
    assert not walk.problems(), "\n\n".join(walk.problems()) + "\n\n" + report
    # Most lines work as written. The rest are refusals a reader meets on a first try (no
    # --yes, no terminal for a password) or name what this walk does not create (a task
    # number, a reflector's id, debian:13); each was checked above to be one plain line.
    assert len(ok) >= 0.66 * ran, report
    os.environ.get("STRATA_WALK_REPORT") and print(report)
    # Ctrl-C: the demo stops its server and ends, without a traceback.
    text = log.read_text(errors="replace")
    assert stopped and "stopping the server" in text and "Traceback" not in text, text[-3000:]
    # make itself dies of the SIGINT (as in a terminal); a crash would be another code
    assert demo.returncode in (0, 130, -signal.SIGINT), (demo.returncode, text[-3000:])
    port = int(url.rsplit(":", 1)[1])
    with socket.socket() as s, pytest.raises(OSError):
        s.connect(("127.0.0.1", port))
    # Nothing outside its folder: the clone holds nothing new but demo-work/ (and Python's
    # bytecode caches), and its HOME and TMPDIR are empty.
    new = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=clone,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert [n for n in new if n not in ("?? .venv", "!! demo-work/")
            and "__pycache__" not in n] == [], new
    assert list(home.iterdir()) == [] and list(tmp.iterdir()) == []


# A terminal's Ctrl-C works on what it runs; a command started in the background of a
# non-interactive shell (CI's `... &`) inherits SIGINT ignored, and so would make and the
# demo: the command is started with SIGINT at its default, as an interactive shell does.
AS_IN_A_TERMINAL = [sys.executable, "-c", "import os, signal, sys; "
                    "signal.signal(signal.SIGINT, signal.SIG_DFL); "
                    "os.execvp(sys.argv[1], sys.argv[1:])"]


def stop(demo: subprocess.Popen[bytes]) -> bool:
    """Ctrl-C as a terminal sends it (SIGINT to the foreground group); True if the whole
    group ended by itself, SIGKILL after a deadline otherwise."""
    try:
        os.killpg(demo.pid, signal.SIGINT)
        demo.wait(timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the server, make's grandchild, too
            os.killpg(demo.pid, 0)
            time.sleep(0.1)
    except ProcessLookupError:
        return True
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(demo.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    demo.wait(timeout=30)
    return False
