"""What an endpoint reports about itself: identity, OS, hardware (DMI), disks, CPU, RAM."""

from __future__ import annotations

import json
import os
import platform
import socket
from pathlib import Path


def _read(path: str | Path) -> str:
    try:
        return Path(path).read_text(errors="replace").strip()
    except OSError:
        return ""


def _os_release(root: Path) -> dict[str, str]:
    out = {}
    for line in _read(root / "etc/os-release").splitlines():
        key, _, value = line.partition("=")
        if key:
            out[key] = value.strip().strip('"')
    return out


def _cpu() -> dict:
    model = ""
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            model = line.partition(":")[2].strip()
            break
    return {"model": model or platform.processor(), "count": os.cpu_count() or 0}


def _ram_bytes() -> int:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def _disks(root: Path) -> list[dict]:
    try:
        st = os.statvfs(root)
    except OSError:
        return []
    return [{"mount": str(root), "total_bytes": st.f_blocks * st.f_frsize,
             "free_bytes": st.f_bavail * st.f_frsize}]


def _hardware(override: Path | None) -> dict:
    """DMI facts; a `hardware.json` in the agent's state directory overrides them (for a
    VM or container root whose DMI says nothing useful, and for tests)."""
    dmi = Path("/sys/class/dmi/id")
    hw = {"vendor": _read(dmi / "sys_vendor"), "model": _read(dmi / "product_name"),
          "serial": _read(dmi / "product_serial"), "bios": _read(dmi / "bios_version")}
    if override is not None and override.is_file():
        try:
            extra = json.loads(override.read_text())
            hw.update({k: str(v) for k, v in extra.items() if k in hw})
        except (OSError, ValueError, AttributeError):
            pass
    return hw


def collect_inventory(root: Path, hardware_override: Path | None = None) -> dict:
    """Facts about the endpoint rooted at `root`. Identity (hostname, OS) is read from
    the managed tree when it has one, hardware from the machine the agent runs on."""
    release = _os_release(root)
    is_windows = (root / "Windows").is_dir() or platform.system() == "Windows"
    hostname = _read(root / "etc/hostname") or socket.gethostname()
    return {
        "hostname": hostname,
        "os": "windows" if is_windows else (release.get("ID") or platform.system().lower()),
        "os_version": release.get("VERSION_ID", platform.release()),
        "os_name": release.get("PRETTY_NAME", platform.platform()),
        "hardware": _hardware(hardware_override),
        "cpu": _cpu(),
        "ram_bytes": _ram_bytes(),
        "disks": _disks(root),
        "agent_root": str(root),
    }
