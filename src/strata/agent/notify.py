"""Telling the person at the endpoint: a desktop notification in each graphical session
(notify-send, on that user's session bus), else a message on every terminal (wall),
else a line in the agent's log. The restart prompt (an update is ready) and the
pipelined restore's "usable" use it. Commands and their runner are injected (tests)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from strata.store.backend import atomic_write

Run = Callable[..., object]
TIMEOUT = 10.0  # a hung session bus must not hold the agent


def _log(line: str) -> None:
    print(f"strata agent: {line}", file=sys.stderr, flush=True)


def _user_buses(run_dir: str = "/run/user") -> list[tuple[int, str]]:
    """(uid, bus address) of each logged-in user with a session bus (systemd-logind)."""
    out = []
    try:
        names = sorted(os.listdir(run_dir))
    except OSError:
        return []
    for name in names[:100]:
        bus = Path(run_dir, name, "bus")
        if name.isdigit() and bus.exists():
            out.append((int(name), f"unix:path={bus}"))
    return out


@dataclass
class Notifier:
    which: Callable[[str], str | None] = shutil.which
    run: Run = subprocess.run
    log: Callable[[str], None] = _log
    buses: Callable[[], list[tuple[int, str]]] = _user_buses
    euid: Callable[[], int] = os.geteuid

    def __call__(self, title: str, body: str) -> str:
        """Notify; returns the channel that reached someone: notify-send, wall or log."""
        self.log(f"{title}: {body}")
        if self._desktop(title, body):
            return "notify-send"
        wall = self.which("wall")
        if wall and self._ok([wall, f"{title}: {body}"]):
            return "wall"
        return "log"

    def _desktop(self, title: str, body: str) -> bool:
        tool = self.which("notify-send")
        if not tool:
            return False
        args = [tool, "--app-name=Strata", title, body]
        if self.euid() != 0:  # the agent runs as the user: its own session
            return self._ok(args)
        runuser = self.which("runuser")
        reached = False
        for uid, bus in self.buses():
            if uid == 0 or not runuser:
                continue
            cmd: Sequence[str] = [runuser, "-u", _user_name(uid), "--", "env",
                                  f"DBUS_SESSION_BUS_ADDRESS={bus}", *args]
            reached = self._ok(list(cmd)) or reached
        return reached

    def _ok(self, cmd: list[str]) -> bool:
        try:
            proc = self.run(cmd, capture_output=True, timeout=TIMEOUT,
                            stdin=subprocess.DEVNULL)
        except (OSError, subprocess.SubprocessError):
            return False
        return getattr(proc, "returncode", 1) == 0


def _user_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def notify_user(title: str, body: str) -> str:
    return Notifier()(title, body)


PROMPTED = "restart-prompt.json"
REMIND_SECONDS = 86400.0  # an update left waiting is mentioned again once a day


def prompt_restart(state_dir: Path, key: str, detail: str, now: float,
                   notify: Callable[[str, str], object] = notify_user) -> bool:
    """The restart prompt: an update is downloaded and applies at the next restart (the
    boot unit of `strata agent install-service` runs `strata agent apply`). Once per
    update, and again after a day; returns whether the user was told now."""
    path = state_dir / PROMPTED
    try:
        last = json.loads(path.read_text())
        if last.get("key") == key and now - float(last.get("at", 0)) < REMIND_SECONDS:
            return False
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    notify("Restart to finish updating", f"An update is ready ({detail}). It is applied "
           "when you restart; your files and settings are kept.")
    atomic_write(path, json.dumps({"key": key, "at": now}).encode())
    return True


def ready_detail(saved: dict) -> str:
    """What the ready update changes, in a few words (state/update.json's plan)."""
    changes = (saved.get("plan") or {}).get("changes") or {}
    words = [f"{n} to {k}" for k, n in changes.items() if isinstance(n, int) and n]
    return ", ".join(words) or "a layer update"
