"""The tools under test, how to install them, and how one step is measured."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from importlib.metadata import version as pkg_version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = Path(__file__).resolve().parent / "launch.py"
APT_PACKAGES = {"restic": "restic", "borg": "borgbackup"}


@dataclass
class Step:
    tool: str
    scenario: str
    wall_s: float
    user_s: float
    sys_s: float
    maxrss_kib: int  # ru_maxrss: peak of the largest single process
    tree_pss_kib: int  # peak of the summed PSS of the tool's process tree, sampled
    procs: int  # most processes the tool ran at once
    returncode: int
    store_bytes: int
    cache_dropped: bool
    other_cpu_s: float  # CPU time the rest of the machine used meanwhile (noise indicator)
    output: dict | None = None  # the tool's own JSON summary, where it prints one
    verify: list[str] | None = None  # restore only: differences from the source (empty = ok)

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s

    @property
    def peak_kib(self) -> int:
        """Peak memory: the larger of ru_maxrss and the tree's summed PSS."""
        return max(self.maxrss_kib, self.tree_pss_kib)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.verify

    def to_dict(self) -> dict:
        return {**asdict(self), "cpu_s": round(self.cpu_s, 3), "peak_kib": self.peak_kib}


class Tool:
    name = ""
    encrypted = False

    def __init__(self, work: Path) -> None:
        self.work = work
        self.repo = work / "repos" / self.name
        self.env = dict(os.environ)

    def version(self) -> str:
        raise NotImplementedError

    def init_cmd(self) -> list[str]:
        raise NotImplementedError

    def backup_cmd(self, src: Path, n: int) -> tuple[list[str], Path | None]:
        """Command and working directory for backup number `n` of `src`."""
        raise NotImplementedError

    def restore_cmd(self, src: Path, n: int, target: Path) -> tuple[list[str], Path | None, Path]:
        """Command, working directory, and where the restored copy of `src` ends up."""
        raise NotImplementedError


class Strata(Tool):
    name = "strata"
    settings = "zstd:3 (default), 64 KiB average chunks, no encryption"

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        self.exe = str(Path(sys.executable).parent / "strata")
        self.env["STRATA_NO_PROGRESS"] = "1"

    def version(self) -> str:
        rev = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                             capture_output=True, text=True).stdout.strip()
        return f"strata {pkg_version('strata')}" + (f" ({rev})" if rev else "")

    def init_cmd(self) -> list[str]:
        return [self.exe, "store", "init", str(self.repo), "--json"]

    def backup_cmd(self, src: Path, n: int) -> tuple[list[str], Path | None]:
        return [self.exe, "store", "backup", str(self.repo), str(src), "--json"], None

    def restore_cmd(self, src: Path, n: int, target: Path) -> tuple[list[str], Path | None, Path]:
        return ([self.exe, "store", "restore", str(self.repo), "latest", str(target), "--json"],
                None, target)


class Restic(Tool):
    name = "restic"
    encrypted = True
    settings = "repo v2, --compression auto, always encrypted (AES-256 + Poly1305)"

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        self.env["RESTIC_PASSWORD"] = "bench"
        self.base = ["restic", "-r", str(self.repo), "--cache-dir", str(work / "cache" / "restic"),
                     "--compression", "auto"]

    def version(self) -> str:
        out = subprocess.run(["restic", "version"], capture_output=True, text=True).stdout
        return " ".join(out.split()[:2])

    def init_cmd(self) -> list[str]:
        return [*self.base, "init", "--repository-version", "2"]

    def backup_cmd(self, src: Path, n: int) -> tuple[list[str], Path | None]:
        return [*self.base, "backup", str(src), "--host", "bench"], None

    def restore_cmd(self, src: Path, n: int, target: Path) -> tuple[list[str], Path | None, Path]:
        # restic recreates the absolute source path under the target
        return ([*self.base, "restore", "latest", "--target", str(target)], None,
                target / src.relative_to("/"))


class Borg(Tool):
    name = "borg"
    settings = "--encryption=none, --compression zstd,3, default chunker"

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        self.env.update(BORG_BASE_DIR=str(work / "cache" / "borg"),
                        BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
                        BORG_RELOCATED_REPO_ACCESS_IS_OK="yes")

    def version(self) -> str:
        return subprocess.run(["borg", "--version"], capture_output=True, text=True).stdout.strip()

    def init_cmd(self) -> list[str]:
        return ["borg", "init", "--encryption=none", str(self.repo)]

    def backup_cmd(self, src: Path, n: int) -> tuple[list[str], Path | None]:
        # run inside the source so the archive holds relative paths
        return ["borg", "create", "--compression", "zstd,3", f"{self.repo}::bench-{n}", "."], src

    def restore_cmd(self, src: Path, n: int, target: Path) -> tuple[list[str], Path | None, Path]:
        return ["borg", "extract", f"{self.repo}::bench-{n}"], target, target


TOOLS = {t.name: t for t in (Strata, Restic, Borg)}


def ensure_installed(names: list[str]) -> list[str]:
    """Install missing peers from Debian's packages; return notes about what happened."""
    missing = [n for n in names if n in APT_PACKAGES and not shutil.which(n)]
    if not missing:
        return []
    pkgs = [APT_PACKAGES[n] for n in missing]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print(f"installing {' '.join(pkgs)} with apt-get …", flush=True)
    install = ["apt-get", "install", "-y", *pkgs]
    try:
        if subprocess.run(install, env=env).returncode != 0:
            subprocess.run(["apt-get", "update"], env=env)
            subprocess.run(install, env=env)
    except OSError as exc:
        print(f"apt-get failed: {exc}", file=sys.stderr)
    return [f"{n} was not installed; the benchmark installed it with apt-get"
            if shutil.which(n) else f"{n} could not be installed ({APT_PACKAGES[n]}): skipped"
            for n in missing]


def drop_caches() -> bool:
    """Flush dirty pages and drop the page cache so each step starts cold (needs root)."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def du(path: Path) -> int:
    """Apparent size of all files under `path`."""
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def busy_cpu_s() -> float:
    """CPU time the whole machine has spent busy since boot (from /proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def run(tool: Tool, scenario: str, cmd: list[str], cwd: Path | None = None) -> Step:
    """Run one measured step: cold caches, wall time, the tool's rusage, then the store size."""
    logs = tool.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    base = logs / f"{tool.name}-{scenario}"
    out_file, err_file, usage_file = (base.with_suffix(s) for s in (".out", ".err", ".usage"))
    dropped = drop_caches()
    with open(out_file, "wb") as out, open(err_file, "wb") as err:
        err.write(f"$ {' '.join(cmd)}\n".encode())
        err.flush()
        launcher = [sys.executable, "-S", "-E", str(LAUNCHER), str(usage_file), *cmd]
        busy = busy_cpu_s()
        subprocess.run(launcher, cwd=cwd, env=tool.env, stdin=subprocess.DEVNULL,
                       stdout=out, stderr=err, check=True)
        busy = busy_cpu_s() - busy
    usage = json.loads(usage_file.read_text())
    other = max(0.0, busy - usage["user_s"] - usage["sys_s"])
    output = None
    if tool.name == "strata":
        try:
            output = json.loads(out_file.read_text())
        except ValueError:
            pass
    step = Step(tool.name, scenario, **usage, store_bytes=du(tool.repo), cache_dropped=dropped,
                other_cpu_s=round(other, 2), output=output)
    if step.returncode != 0:
        tail = err_file.read_text(errors="replace").splitlines()[-10:]
        print(f"!!! {tool.name} {scenario} FAILED with exit code {step.returncode}:", *tail,
              sep="\n  ", file=sys.stderr)
    return step
