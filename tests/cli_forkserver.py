"""Run `strata` commands in processes forked from one that has already imported the CLI.

About two thirds of the suite's CPU went to `strata` commands, and most of each
command's CPU to importing Python modules (0.5-0.7 s of a 0.8 s `agent status`). A fork
server, one per test session (all its workers share it), imports the CLI and what its
commands use once; each command then runs in a child forked from it: its own process and
session, its own environment, working directory, stdin, stdout and stderr, its own exit
code, killed with its process group on a timeout, exactly as `subprocess.run` would
give. Only the imports are shared. `STRATA_TEST_EXEC=1` runs every command as a fresh
`exec` instead, as the first-run tests and the README walk's `make demo` always do (the
walk's own commands run in a fork server of its clone's code). The tests with a network
namespace (tests/test_wan_netns.py) start one of their own in it, as `ip netns exec`
would run a command.

The server side is single-threaded (a fork copies only the calling thread): it accepts a
connection, forks, hands the child the three descriptors it received, and reports the
child's pid, then its exit status.
"""

from __future__ import annotations

import array
import atexit
import ctypes
import fcntl
import gc
import json
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

# Loaded once in the fork server: what the commands import (strata.cli.main's
# COMMAND_MODULES), and what `strata server` does (its imports cost about 2 s of CPU at
# each start; a server loads uvicorn, the SQLite dialect and anyio's event loop only when
# first used). In a branch's network namespace only agents and reflectors run: the
# server's imports would cost more than they save.
PRELOAD = ("strata.server.app", "strata.server.catalog.db", "uvicorn.main",
           "uvicorn.loops.uvloop", "uvicorn.lifespan.on", "uvicorn.protocols.http.httptools_impl",
           "sqlalchemy.dialects.sqlite.pysqlite", "anyio._backends._asyncio")


def _recv_fds(conn: socket.socket) -> tuple[dict, list[int]]:
    fds = array.array("i")
    data, anc, _flags, _addr = conn.recvmsg(1 << 20, socket.CMSG_SPACE(3 * fds.itemsize))
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    return json.loads(data), list(fds)


def _child(request: dict, fds: list[int], siblings: list[socket.socket]) -> None:
    """In the forked child: become the command, run it, exit with its status."""
    code = 1
    try:
        os.setsid()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        for other in siblings:  # the connections of commands still running
            other.close()
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        sys.argv = ["strata", *request["args"]]
        from strata.cli.main import main_status

        code = main_status()
    except BaseException:  # in the set-up above
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code & 0xFF)


def _heap_in_huge_pages() -> None:
    """Back this process's heap (about 75 of its 120 MiB) with 2 MiB pages where the
    kernel offers them (transparent huge pages in `madvise` mode, collapse since Linux
    6.1). A fork then copies one page-table entry per 2 MiB instead of 512, and exiting
    drops as few: a fork and exit of this process cost about 35 ms of CPU with 4 KiB
    pages, 25 ms with these; what a child writes is still copied 4 KiB at a time."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madv_hugepage, madv_collapse, huge = 14, 25, 2 << 20  # <sys/mman.h>, Linux
    for line in maps:
        fields = line.split()
        if not fields[1].startswith("rw") or fields[5:] not in ([], ["[heap]"]):
            continue  # anonymous, writable memory only: no files, no stack
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        first, end = -(-lo // huge) * huge, hi // huge * huge
        if end > first:  # a failure (no THP, an older kernel) leaves the pages as they are
            libc.madvise(lo, hi - lo, madv_hugepage)
            libc.madvise(first, end - first, madv_collapse)


def serve(path: str, owner: str, report: str = "", preload: str = ",".join(PRELOAD)) -> None:
    """The fork server's loop (runs in its own process: `python cli_forkserver.py PATH
    OWNER [REPORT [MODULES]]`). OWNER: the pid of the process whose end ends this one.
    REPORT: a file to append "CPU-seconds wall-seconds command" to per command. MODULES:
    what to import first besides the commands, comma-separated."""
    owner_fd = os.pidfd_open(int(owner))  # readable once the owner has ended
    from strata.cli.main import import_commands

    import_commands()
    for name in filter(None, preload.split(",")):
        __import__(name)
    import cost_factors  # beside this file

    cost_factors.lower(server="strata.server.app" in sys.modules)
    if "strata.server.app" in sys.modules:  # what every server would build at its start
        sys.modules["strata.server.app"].prepare_routes()
        sys.modules["strata.server.catalog.db"].prepare()
    from strata.transport import system_trust

    system_trust()  # the system's CAs, which every client command loads once (35 ms)
    # What was imported lives as long as every child: frozen, the children's collections
    # never walk it (`strata server` starts with a full one: 0.14 s of CPU otherwise).
    gc.collect()
    gc.freeze()
    _heap_in_huge_pages()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Bound under another name and renamed once listening: the client waits for `path`
    # to exist, and a connect between bind and listen would be refused.
    listener.bind(path + ".new")
    listener.listen(64)
    os.rename(path + ".new", path)
    children: dict[int, socket.socket] = {}
    began: dict[int, tuple[float, list[str]]] = {}  # for the report
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    sel.register(owner_fd, selectors.EVENT_READ)
    while True:
        for key, _ev in sel.select(timeout=0.02):
            if key.fd == owner_fd:  # the owner is gone (killed: no atexit)
                return
            conn, _ = listener.accept()
            request, fds = _recv_fds(conn)
            pid = os.fork()
            if pid == 0:
                listener.close()
                conn.close()
                _child(request, fds, list(children.values()))
            for fd in fds:
                os.close(fd)
            conn.sendall(struct.pack("!q", pid))
            children[pid] = conn
            began[pid] = (time.monotonic(), request["args"])
        while children:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            waiter = children.pop(pid) if pid in children else None
            start, args = began.pop(pid, (time.monotonic(), []))
            if report:
                with open(report, "a") as f:
                    f.write(f"{usage.ru_utime + usage.ru_stime:.3f} "
                            f"{time.monotonic() - start:.3f} {' '.join(args[:3])}\n")
            if waiter is not None:
                try:
                    waiter.sendall(struct.pack("!qd", os.waitstatus_to_exitcode(status),
                                               usage.ru_utime + usage.ru_stime))
                except OSError:
                    pass
                waiter.close()


class ForkServer:
    """`prefix`: what the server runs under, e.g. `ip netns exec NS` for a network
    namespace (a pathname socket is reachable from any namespace); `preload`: the modules
    it imports besides the commands'; `pythonpath`: where it imports `strata` from (the
    README walk's clone), instead of this checkout; `folder`: where its socket goes (a
    new folder, removed with it, by default); `owner`: the process whose end ends it
    (this one by default, which then closes it at exit)."""

    def __init__(self, prefix: Sequence[str] = (), preload: Sequence[str] = PRELOAD,
                 pythonpath: str | None = None, folder: str | None = None,
                 owner: int | None = None) -> None:
        self._dir = folder or tempfile.mkdtemp(prefix="strata-fork-")
        self.path = os.path.join(self._dir, "sock")
        self.cpu_s = 0.0  # of its commands, as collected here (see close())
        env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
        if pythonpath is not None:
            env["PYTHONPATH"] = pythonpath
        report = os.environ.get("STRATA_CMD_REPORT", "")  # see serve()
        owner = os.getpid() if owner is None else owner
        self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            [*prefix, sys.executable, __file__, self.path, str(owner), report,
             ",".join(preload)], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not os.path.exists(self.path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the CLI fork server did not start")
            time.sleep(0.02)
        if owner == os.getpid():
            atexit.register(self.close)

    @classmethod
    def attach(cls, folder: str) -> ForkServer:
        """A client of the fork server already listening in `folder`."""
        self = cls.__new__(cls)
        self._dir, self.path = folder, os.path.join(folder, "sock")
        self.cpu_s, self.proc = 0.0, None
        return self

    def close(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        atexit.unregister(self.close)  # closed once, by its owner or at exit
        self.proc.kill()
        self.proc.wait()
        # Waited for, the server brings the CPU of the commands it reaped into this
        # process's children's: those collected here were counted already.
        global forked_cpu_s
        forked_cpu_s -= self.cpu_s
        shutil.rmtree(self._dir, ignore_errors=True)

    def _start(self, args: Sequence[str], env: dict[str, str], fds: tuple[int, int, int],
               cwd: str | None = None) -> tuple[socket.socket, int]:
        """Fork a child running `strata ARGS` on these stdin, stdout and stderr."""
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(self.path)
        request = json.dumps({"args": list(args), "env": env, "cwd": cwd or os.getcwd()})
        conn.sendmsg([request.encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                           array.array("i", fds))])
        return conn, struct.unpack("!q", _read_exact(conn, 8))[0]

    def spawn(self, args: Sequence[str], env: dict[str, str], stdout: int,
              stderr: int, cwd: str | None = None) -> ForkedProcess:
        """Like `subprocess.Popen(..., stdin=DEVNULL, start_new_session=True)` with the
        output into these descriptors (a log file)."""
        null = os.open(os.devnull, os.O_RDONLY)
        try:
            conn, pid = self._start(args, env, (null, stdout, stderr), cwd)
        finally:
            os.close(null)
        return ForkedProcess(["strata", *args], pid, conn, self)

    def popen(self, args: Sequence[str], env: dict[str, str], cwd: str | None = None,
              errors: str = "replace") -> ForkedProcess:
        """`subprocess.Popen(["strata", *args], env=env, cwd=cwd, stdin=DEVNULL,
        stdout=PIPE, stderr=PIPE, text=True, errors=errors, start_new_session=True)`,
        forked."""
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            proc = self.spawn(args, env, out_w, err_w, cwd)
        except BaseException:
            os.close(out_r)
            os.close(err_r)
            raise
        finally:
            os.close(out_w)
            os.close(err_w)
        # As text=True reads (universal newlines); undecodable bytes as `errors` says
        proc.stdout = open(out_r, encoding="utf-8", errors=errors)  # noqa: SIM115
        proc.stderr = open(err_r, encoding="utf-8", errors=errors)  # noqa: SIM115
        proc.errors = errors
        return proc

    def run(self, args: Sequence[str], env: dict[str, str], timeout: float,
            cwd: str | None = None, errors: str = "replace") -> subprocess.CompletedProcess[str]:
        """`subprocess.run(["strata", *args], env=env, cwd=cwd, stdin=DEVNULL,
        capture_output=True, text=True, errors=errors, timeout=timeout)`, forked."""
        proc = self.popen(args, env, cwd, errors)
        try:
            out, err = proc.communicate(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            raise
        finally:
            proc.close()
        assert proc.returncode is not None and out is not None and err is not None
        return subprocess.CompletedProcess(["strata", *args], proc.returncode, out, err)


def _text(data: bytes, errors: str = "replace") -> str:
    """As subprocess's text mode reads a pipe: decoded, universal newlines."""
    return data.decode(errors=errors).replace("\r\n", "\n").replace("\r", "\n")


class ForkedProcess:
    """The part of `subprocess.Popen` the tests use, for a forked command: its exit status
    comes over the fork server's connection (it is not our child); `stdout` and `stderr`
    are text files on its pipes when made by `ForkServer.popen`."""

    def __init__(self, args: list[str], pid: int, conn: socket.socket,
                 server: ForkServer) -> None:
        self.args, self.pid, self._conn, self._server = args, pid, conn, server
        self.returncode: int | None = None
        self.stdout: TextIO | None = None
        self.stderr: TextIO | None = None
        self._read: dict[TextIO, list[bytes]] = {}  # by communicate(), across timeouts
        self.errors = "replace"  # how communicate() decodes what it read

    def _collect(self, timeout: float | None) -> int | None:
        if self.returncode is None:
            self._conn.settimeout(timeout)
            try:
                code, cpu = struct.unpack("!qd", _read_exact(self._conn, 16))
            except (TimeoutError, BlockingIOError):
                return None
            global forked_cpu_s
            forked_cpu_s += cpu
            self._server.cpu_s += cpu
            self.returncode = code
            self._conn.close()
        return self.returncode

    def poll(self) -> int | None:
        return self._collect(0)

    def wait(self, timeout: float | None = None) -> int:
        code = self._collect(timeout)
        if code is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        return code

    def communicate(self, timeout: float | None = None) -> tuple[str | None, str | None]:
        """Both pipes read to their end side by side (a child filling one does not block),
        then the exit status; `subprocess.TimeoutExpired` keeps what was read so far."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            for f in (self.stdout, self.stderr):
                if f is not None and not f.closed:
                    self._read.setdefault(f, [])
                    sel.register(f.fileno(), selectors.EVENT_READ, f)
            while sel.get_map():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise subprocess.TimeoutExpired(self.args, timeout or 0)
                for key, _ in sel.select(left):
                    data = os.read(key.fd, 1 << 16)
                    if data:
                        self._read[key.data].append(data)
                    else:
                        sel.unregister(key.fd)
                        key.data.close()
        # The output ended: the status follows within the server's polling interval.
        self.wait(None if deadline is None else max(1.0, deadline - time.monotonic()))
        return self._output(self.stdout), self._output(self.stderr)

    def _output(self, f: TextIO | None) -> str | None:
        return None if f is None else _text(b"".join(self._read.get(f, [])), self.errors)

    def close(self) -> None:
        """Our ends of its pipes and of the fork server's connection."""
        for f in (self.stdout, self.stderr):
            if f is not None:
                f.close()
        self._conn.close()

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _read_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = conn.recv(n - len(data))
        if not more:
            raise RuntimeError("the CLI fork server went away")
        data += more
    return data


_servers: dict[str, ForkServer] = {}  # by network namespace ("": this session's)
# CPU seconds of the commands run here: not this process's children (the fork server's),
# so tests/cpu_report.py adds them.
forked_cpu_s = 0.0


def exec_only() -> bool:
    """STRATA_TEST_EXEC=1: every command a fresh exec, no fork server."""
    return os.environ.get("STRATA_TEST_EXEC") == "1"


# One fork server serves every test worker of a session: each would otherwise import the
# same modules into one of its own (4.4 s of CPU each). The session's first process
# (tests/conftest.py) names a folder for it; the first worker that needs it starts it
# there, under a lock, and it lives as long as that first process.
SHARED = "STRATA_TEST_FORK_DIR"


def share_fork_servers() -> str:
    """In the session's first process, before the workers start: the shared server's
    folder, which `fork_server()` finds through the environment. End with
    `end_shared_fork_server(folder)`."""
    folder = tempfile.mkdtemp(prefix="strata-forks-")
    Path(folder, "owner").write_text(str(os.getpid()))
    os.environ[SHARED] = folder
    return folder


def end_shared_fork_server(folder: str) -> None:
    """At the session's end, in its first process: the shared server, if a worker started
    one, and its folder."""
    pid = Path(folder, "pid")
    if pid.exists():
        try:
            os.kill(int(pid.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(folder, ignore_errors=True)


def _shared(folder: str) -> ForkServer:
    with open(os.path.join(folder, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one worker starts it, the others wait and attach
        if os.path.exists(os.path.join(folder, "sock")):
            return ForkServer.attach(folder)
        server = ForkServer(folder=folder, owner=int(Path(folder, "owner").read_text()))
        assert server.proc is not None
        Path(folder, "pid").write_text(str(server.proc.pid))
        return server


def fork_server(netns: str = "") -> ForkServer | None:
    """The session's fork server, started at first use; in network namespace `netns` if
    given, this worker's own (see close_fork_server). None under STRATA_TEST_EXEC=1."""
    if exec_only():
        return None
    if netns not in _servers:
        if netns:
            _servers[netns] = ForkServer(("ip", "netns", "exec", netns), preload=())
        elif os.environ.get(SHARED):
            _servers[netns] = _shared(os.environ[SHARED])
        else:
            _servers[netns] = ForkServer()
    return _servers[netns]


def close_fork_server(netns: str) -> None:
    """End the fork server of a network namespace (before the namespace goes)."""
    server = _servers.pop(netns, None)
    if server is not None:
        server.close()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    serve(*sys.argv[1:5])
