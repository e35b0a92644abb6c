"""Boot-set learning: which files this endpoint reads at boot and at the first login, and
which ones its user works with, learned from the endpoint's own use and sent to the server
(model/usage.py), so that a restore of its CVD onto new hardware lays them down first
(agent/pipeline.py).

The signal is each file's access time. A file whose atime falls within BOOT_SECONDS after
the boot (`btime` in /proc/stat) or LOGIN_SECONDS after the first user session of that
boot started (utmp/wtmp, systemd-logind) was read then; one read or written within
WORKING_DAYS is in the working set. The limits, and why they are acceptable (docs/
restore.md): under `relatime` (Linux's default) a read updates atime only when the old
atime is older than the mtime or than 24 hours, so one boot sees only part of what it
reads; the sessions of the last few boots are remembered and a file seen in any of them
stays in the boot set. Under `noatime` nothing is learned but the working set's writes.
The agent's own reads (backups) open files with O_NOATIME, so they do not pollute it.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from strata.agent.client import ServerClient
from strata.model.entry import EntryType
from strata.model.manifest import decode_manifest
from strata.model.usage import MAX_BOOT_PATHS, MAX_TOTAL_CHARS, MAX_WORKING_PATHS, UsageSets
from strata.store.backend import atomic_write

BOOT_SECONDS = 300.0  # services, libraries, the display manager
LOGIN_SECONDS = 300.0  # the desktop, the profile, the applications started at login
WORKING_DAYS = 14.0
SESSIONS_KEPT = 8  # boots whose reads count (relatime shows each boot only part of them)
RELEARN_SECONDS = 86400.0  # the working set moves with the user's days
USAGE_FILE = "usage.json"
PATHS_FILE = "usage-paths.json"

_UTMP_RECORD = 384  # struct utmp on Linux (glibc, 64-bit): ut_type at 0, ut_tv at 340
_USER_PROCESS = 7
_WTMP_TAIL = 4 << 20  # the last logins are at the end; a years-old wtmp is not read whole


@dataclass(frozen=True)
class Session:
    """One boot: when it started, and when its first user session did (None: none yet)."""

    boot: float
    login: float | None = None

    def windows(self, boot_seconds: float, login_seconds: float) -> list[tuple[float, float]]:
        out = [(self.boot, self.boot + boot_seconds)]
        if self.login is not None:
            out.append((self.login, self.login + login_seconds))
        return out

    def closes(self, boot_seconds: float, login_seconds: float) -> list[float]:
        return [end for _, end in self.windows(boot_seconds, login_seconds)]


@dataclass(frozen=True)
class Observation:
    """One file's times, as lstat gives them (seconds since the epoch)."""

    path: str
    atime: float
    mtime: float


@dataclass(frozen=True)
class Windows:
    boot_seconds: float = BOOT_SECONDS
    login_seconds: float = LOGIN_SECONDS
    working_days: float = WORKING_DAYS


def read_boot_time(proc_stat: str = "/proc/stat") -> float | None:
    try:
        with open(proc_stat) as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _utmp_logins(path: str, tail: int) -> list[float]:
    """Start times of user sessions recorded in a utmp-format file (utmp, wtmp)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = max(0, size - tail)
            f.seek(start - start % _UTMP_RECORD)
            data = f.read(tail + _UTMP_RECORD)
    except OSError:
        return []
    out = []
    for off in range(0, len(data) - _UTMP_RECORD + 1, _UTMP_RECORD):
        (kind,) = struct.unpack_from("<h", data, off)
        if kind == _USER_PROCESS:
            (sec,) = struct.unpack_from("<i", data, off + 340)
            out.append(float(sec))
    return out


def _logind_logins(pattern: str) -> list[float]:
    """Start times of systemd-logind's user sessions (REALTIME= in microseconds)."""
    out = []
    for path in glob.glob(pattern)[:1000]:
        try:
            text = Path(path).read_text(errors="replace")[:16384]
        except OSError:
            continue
        fields = dict(line.partition("=")[::2] for line in text.splitlines())
        if fields.get("CLASS", "user") == "user" and fields.get("REALTIME", "").isdigit():
            out.append(int(fields["REALTIME"]) / 1e6)
    return out


def read_first_login(after: float, *, utmp: Iterable[str] = ("/run/utmp", "/var/log/wtmp"),
                     logind: str = "/run/systemd/sessions/*") -> float | None:
    """The first user session that started after `after` (this boot), if any."""
    times = [t for p in utmp for t in _utmp_logins(p, _WTMP_TAIL)] + _logind_logins(logind)
    later = [t for t in times if t >= after]
    return min(later) if later else None


@dataclass
class SessionClock:
    """Where the learning gets its times; injected by tests (no real boot needed)."""

    now: Callable[[], float] = time.time
    boot_time: Callable[[], float | None] = read_boot_time
    first_login: Callable[[float], float | None] = read_first_login

    def session(self) -> Session | None:
        boot = self.boot_time()
        if boot is None:
            return None
        return Session(boot, self.first_login(boot))


def classify(observations: Iterable[Observation], sessions: list[Session], now: float,
             windows: Windows = Windows()) -> tuple[dict[str, list[float]], list[str]]:
    """Which files were read at boot or first login (path -> the boots they were read
    at), and the working set: used (read or written) within the last `working_days`,
    most recent first. A file both is in the boot set only; a file only written in a
    window (atime not after mtime) is not in it."""
    spans = [(s.boot, w) for s in sessions
             for w in s.windows(windows.boot_seconds, windows.login_seconds)]
    since = now - windows.working_days * 86400
    boot: dict[str, list[float]] = {}
    recent: list[tuple[float, str]] = []
    for o in observations:
        # Read, not only written: a file a boot creates (a log, a cache) has its atime
        # at its creation, in the window, and is not needed from the CVD to boot.
        hit = [b for b, (lo, hi) in spans if lo <= o.atime <= hi] if o.atime > o.mtime \
            else []
        if hit:
            boot[o.path] = sorted(set(hit))
            continue
        used = max(o.atime, o.mtime)
        if since <= used <= now + 60:  # a clock set far ahead proves nothing
            recent.append((used, o.path))
    recent.sort(key=lambda t: (-t[0], t[1]))
    return boot, [p for _, p in recent]


def observe(root: Path, manifest: bytes) -> list[Observation]:
    """lstat every regular file the last snapshot holds (its exclusions already applied);
    names that are not UTF-8 are left out (they arrive with the rest)."""
    out = []
    base = os.fsencode(root)
    for e in decode_manifest([manifest]):
        if e.type is not EntryType.FILE:
            continue
        try:
            text = e.path.decode("utf-8")
            st = os.lstat(os.path.join(base, e.path))
        except (UnicodeDecodeError, OSError):
            continue
        out.append(Observation(text, st.st_atime, st.st_mtime))
    return out


@dataclass
class Learned:
    """What the agent keeps between passes: a small head read at every cycle
    (state/usage.json: sessions, when learned, what the server has) and the paths, read
    only for a pass or a send (state/usage-paths.json)."""

    sessions: list[Session] = field(default_factory=list)
    boot_paths: dict[str, list[float]] = field(default_factory=dict)  # path -> boots seen
    working: list[str] = field(default_factory=list)
    learned: float | None = None
    sent: str = ""  # digest of the sets the server has
    current: str = ""  # digest of the sets learned last

    @classmethod
    def load(cls, state_dir: Path, *, paths: bool = True) -> Learned:
        try:
            doc = json.loads((state_dir / USAGE_FILE).read_text())
            out = cls(sessions=[Session(float(s["boot"]), None if s.get("login") is None
                                        else float(s["login"])) for s in doc["sessions"]],
                      learned=doc.get("learned"), sent=str(doc.get("sent", "")),
                      current=str(doc.get("current", "")))
            if paths:
                more = json.loads((state_dir / PATHS_FILE).read_text())
                out.boot_paths = {str(k): [float(b) for b in v]
                                  for k, v in more["boot_paths"].items()}
                out.working = [str(p) for p in more["working"]]
            return out
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return cls()  # none yet, or damaged: learned again from the files' times

    def save(self, state_dir: Path, *, paths: bool = True) -> None:
        if paths:  # first: a head never names sets whose paths are not on disk
            atomic_write(state_dir / PATHS_FILE, json.dumps(
                {"boot_paths": self.boot_paths, "working": self.working}).encode())
        doc = {"sessions": [{"boot": s.boot, "login": s.login} for s in self.sessions],
               "learned": self.learned, "sent": self.sent, "current": self.current}
        atomic_write(state_dir / USAGE_FILE, json.dumps(doc).encode())

    def sets(self) -> UsageSets:
        """The sets to send: the files read at the most boots first, then the most
        recently read, each list and all paths together within the wire's bounds."""
        ranked = sorted(self.boot_paths.items(), key=lambda kv: (-len(kv[1]), -max(kv[1]),
                                                                  kv[0]))
        budget = MAX_TOTAL_CHARS
        boot = _within([p for p, _ in ranked], MAX_BOOT_PATHS, budget)
        budget -= sum(map(len, boot))
        in_boot = set(boot)
        working = _within([p for p in self.working if p not in in_boot], MAX_WORKING_PATHS,
                          budget)
        return UsageSets(boot=boot, working=working, boots_seen=len(self.sessions),
                         learned_at=None if self.learned is None
                         else datetime.fromtimestamp(self.learned, UTC))


def _within(paths: list[str], most: int, chars: int) -> list[str]:
    out = []
    for p in paths[:most]:
        chars -= len(p)
        if chars < 0:
            break
        out.append(p)
    return out


def learn_due(learned: Learned, session: Session, now: float,
              windows: Windows = Windows()) -> bool:
    """A pass is due when none was made, when a window of this boot has closed since the
    last one (its reads are all in), or once a day (the working set)."""
    last = learned.learned
    if last is None or now - last >= RELEARN_SECONDS:
        return True
    return any(last < end <= now for end in session.closes(windows.boot_seconds,
                                                            windows.login_seconds))


def learn(learned: Learned, session: Session, observations: Iterable[Observation],
          now: float, windows: Windows = Windows()) -> Learned:
    """One pass: remember this boot's session, then read the files' times against the
    windows of every boot remembered. A file keeps its place in the boot set until none
    of the boots it was read at is remembered any more."""
    sessions = [s for s in learned.sessions if s.boot != session.boot] + [session]
    sessions = sorted(sessions, key=lambda s: s.boot)[-SESSIONS_KEPT:]
    kept = {s.boot for s in sessions}
    boot, working = classify(observations, sessions, now, windows)
    paths: dict[str, list[float]] = {}
    for p, boots in [*learned.boot_paths.items(), *boot.items()]:
        seen = sorted(set(paths.get(p, [])) | {b for b in boots if b in kept})
        if seen:
            paths[p] = seen
    if len(paths) > 2 * MAX_BOOT_PATHS:  # what sets() would never send is not kept either
        ranked = sorted(paths.items(), key=lambda kv: (-len(kv[1]), -max(kv[1]), kv[0]))
        paths = dict(ranked[:2 * MAX_BOOT_PATHS])
    return Learned(sessions=sessions, boot_paths=paths,
                   working=working[:MAX_WORKING_PATHS], learned=now, sent=learned.sent,
                   current=learned.current)


def digest(sets: UsageSets) -> str:
    doc = json.dumps({"boot": sets.boot, "working": sets.working}).encode()
    return hashlib.blake2b(doc, digest_size=16).hexdigest()


def learn_and_report(state_dir: Path, root: Path, manifest: Callable[[], bytes | None],
                     send: Callable[[UsageSets], object], *,
                     clock: SessionClock | None = None,
                     windows: Windows = Windows()) -> UsageSets | None:
    """What a cycle does: a learning pass when one is due (over the last snapshot's files,
    `manifest` read only then), and the sets sent when the server does not have them
    yet. Returns the sets sent, if any. A failed send raises; the next cycle sends them.
    Between passes a cycle reads only the small head file."""
    clock = clock or SessionClock()
    session = clock.session()
    if session is None:
        return None  # no boot time: not Linux
    learned = Learned.load(state_dir, paths=False)
    now = clock.now()
    if learn_due(learned, session, now, windows):
        data = manifest()
        if data is None:
            return None  # nothing centralized yet
        learned = learn(Learned.load(state_dir), session, observe(root, data), now, windows)
        learned.current = digest(learned.sets())
        learned.save(state_dir)
    if not learned.current or learned.current == learned.sent:
        return None
    if not learned.boot_paths and not learned.working:
        learned = Learned.load(state_dir)
    sets = learned.sets()
    send(sets)
    learned.sent = learned.current
    with contextlib.suppress(OSError):
        learned.save(state_dir, paths=False)
    return sets


def send_with(client: ServerClient) -> Callable[[UsageSets], object]:
    """The sets to the server (PUT /agent/usage), which validates and bounds them again."""
    return lambda sets: client.request("PUT", "/api/v1/agent/usage",
                                       json=sets.model_dump(mode="json"), retries=1)
