"""`strata agent install-service`: systemd units for the agent daemon and for the
boot-time apply (a downloaded update is applied at the next boot, before the display
manager lets anyone log in). Units are written into a unit directory; `systemctl
daemon-reload` and `enable` run only when that is the system's own (/etc/systemd/system),
so a test, or an image being prepared, writes them without root and without touching
the running system."""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from strata.errors import StrataError
from strata.store.backend import atomic_write

SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
AGENT_UNIT = "strata-agent.service"
APPLY_UNIT = "strata-agent-apply.service"


class ServiceInstallFailed(StrataError):
    pass


def _args(strata: str, command: str, state: Path | None) -> str:
    words = [strata, "agent", command]
    if state is not None:  # `run` and `apply` read the endpoint's root from the credential
        words += ["--state", str(state)]
    return shlex.join(words)


def unit_dir_for(root: Path | None, unit_dir: Path | None) -> Path:
    """Where the units go: --unit-dir, else ROOT/etc/systemd/system (ROOT: / by default;
    another root is an image or a mounted disk being prepared, like `systemctl --root`)."""
    if unit_dir is not None:
        return unit_dir
    return (root or Path("/")) / SYSTEM_UNIT_DIR.relative_to("/")


def units(strata: str, *, state: Path | None = None) -> dict[str, str]:
    """The two unit files, by name."""
    run = _args(strata, "run", state)
    apply = _args(strata, "apply", state)
    return {
        APPLY_UNIT: f"""# Written by `strata agent install-service`.
[Unit]
Description=Strata: apply a downloaded layer update before anyone logs in
Documentation=https://github.com/strata/strata/blob/main/docs/restore.md
# The pre-update snapshot goes to the server first when it can be reached.
Wants=network-online.target
After=network-online.target local-fs.target
Before=display-manager.service systemd-user-sessions.service {AGENT_UNIT}

[Service]
Type=oneshot
ExecStart={apply}
# 0: applied or nothing to apply; 3: server unreachable, the update stays ready for the
# next boot (the agent applies it offline once its pre-update snapshot exists).
SuccessExitStatus=3
TimeoutStartSec=2h

[Install]
WantedBy=multi-user.target
""",
        AGENT_UNIT: f"""# Written by `strata agent install-service`.
[Unit]
Description=Strata agent: centralize this endpoint, download its layer updates
Documentation=https://github.com/strata/strata/blob/main/README.md
Wants=network-online.target
After=network-online.target {APPLY_UNIT}

[Service]
Type=simple
ExecStart={run}
Restart=on-failure
RestartSec=30
# 5: access revoked or credential unknown: no restart can change that (enroll anew).
RestartPreventExitStatus=5

[Install]
WantedBy=multi-user.target
""",
    }


@dataclass
class InstallResult:
    unit_dir: str
    units: list[str]
    written: list[str] = field(default_factory=list)
    enabled: bool = False
    dry_run: bool = False
    commands: list[list[str]] = field(default_factory=list)  # systemctl calls (made or not)
    note: str = ""

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def install_service(strata: str, *, unit_dir: Path = SYSTEM_UNIT_DIR,
                    state: Path | None = None, dry_run: bool = False,
                    run: Callable[..., object] = subprocess.run) -> InstallResult:
    """Write both units (atomically, 0644) and, in the system's own unit directory,
    reload systemd and enable them; `dry_run` writes nothing and runs nothing."""
    docs = units(strata, state=state)
    system = unit_dir.resolve() == SYSTEM_UNIT_DIR.resolve()
    commands = [["systemctl", "daemon-reload"],
                ["systemctl", "enable", APPLY_UNIT, AGENT_UNIT]]
    out = InstallResult(unit_dir=str(unit_dir), units=sorted(docs), dry_run=dry_run,
                        commands=commands if system else [])
    if dry_run:
        out.note = "dry run: nothing written" + ("" if system else "; not the system's unit "
                                                 "directory, so nothing would be enabled")
        return out
    try:
        unit_dir.mkdir(parents=True, exist_ok=True)
        for name, text in docs.items():
            path = unit_dir / name
            atomic_write(path, text.encode())
            path.chmod(0o644)
            out.written.append(str(path))
    except OSError as exc:
        raise ServiceInstallFailed(f"cannot write the units into {unit_dir}: "
                                   f"{exc.strerror}") from None
    if not system:
        out.note = (f"written into {unit_dir}, not the system's unit directory: not enabled "
                    f"(copy them to {SYSTEM_UNIT_DIR} and `systemctl enable` them)")
        return out
    for cmd in commands:
        try:
            proc = run(cmd, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as exc:
            raise ServiceInstallFailed(f"{shlex.join(cmd)} failed: {exc}") from None
        if getattr(proc, "returncode", 1) != 0:
            err = (getattr(proc, "stderr", "") or "").strip().splitlines()
            raise ServiceInstallFailed(f"{shlex.join(cmd)} failed: "
                                       f"{err[-1] if err else 'exit ' + str(proc)}")
    out.enabled = True
    return out
