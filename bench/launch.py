"""Run a command and write its wall time and resource use as JSON: `python -S launch.py OUT CMD…`.

Why a separate, small process:
- Linux carries the RSS high-water mark of the memory a process had before exec() into its
  ru_maxrss, and Python's subprocess spawns with vfork, so a tool started straight from the
  (large) benchmark process would report the benchmark's own peak. Forked from this small
  launcher, the floor is a few MiB, far below any of the tools measured.
- A tool may run helper processes (Strata's backup uses a forkserver pool). This launcher is
  a child subreaper, so helpers orphaned by the tool are reaped here and their CPU time is
  counted; and it samples the summed PSS of the whole process tree every 0.1 s, because
  ru_maxrss is the peak of the largest single process, not of the tree.
Keep this file to the standard library.
"""

import ctypes
import json
import os
import resource
import signal
import sys
import threading
import time

PR_SET_CHILD_SUBREAPER = 36
ME = os.getpid()


def descendants() -> list[int]:
    """Our descendants (all have larger pids than us, barring pid wrap-around)."""
    parent = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) > ME:
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    parent[int(name)] = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    ours = {ME}
    for pid in sorted(parent):  # children have larger pids than their parents
        if parent[pid] in ours:
            ours.add(pid)
    return sorted(ours - {ME})


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("Pss:")), 0)
    except (OSError, ValueError):
        return 0


def main() -> int:
    out, cmd = sys.argv[1], sys.argv[2:]
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    peak = {"pss_kib": 0, "procs": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            pids = descendants()
            peak["pss_kib"] = max(peak["pss_kib"], sum(pss_kib(p) for p in pids))
            peak["procs"] = max(peak["procs"], len(pids))

    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            os.execvp(cmd[0], cmd)
        finally:
            os._exit(127)
    threading.Thread(target=sample, daemon=True).start()
    _, status, _ = os.wait4(pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    # reap helpers the tool left behind (they count towards its CPU time)
    deadline = time.monotonic() + 30
    while True:
        try:
            if os.wait4(-1, os.WNOHANG)[0] == 0:
                if time.monotonic() > deadline:
                    for p in descendants():
                        os.kill(p, signal.SIGKILL)
                time.sleep(0.05)
        except ChildProcessError:
            break
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(out, "w") as f:
        json.dump({"wall_s": wall, "user_s": ru.ru_utime, "sys_s": ru.ru_stime,
                   "maxrss_kib": ru.ru_maxrss, "tree_pss_kib": peak["pss_kib"],
                   "procs": max(peak["procs"], 1),
                   "returncode": os.waitstatus_to_exitcode(status)}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
