"""Helpers for the server and agent tests: real `strata server` processes on loopback, real
`strata agent` processes, and trees of files to centralize.

Not a conftest: test modules import what they use (`from server_fixtures import ...`) and
declare their own fixtures around `running_server`, so every fixture is visible where used.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from cli_forkserver import ForkedProcess, fork_server
from generated_trees import os_tree, word_text, words_by_byte
from strata.transport import system_trust

STRATA = Path(sys.executable).parent / "strata"
HEALTH = "/api/v1/health"
MIB = 1 << 20


# -- running the CLI ------------------------------------------------------------------------


def cli_env() -> dict[str, str]:
    """The environment of every subprocess: no inherited STRATA_* settings, no progress bars."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("STRATA_") and k not in ("COLUMNS", "LINES")}
    env["STRATA_NO_PROGRESS"] = "1"
    return env


def argv(args: Sequence[object], netns: str = "") -> list[str]:
    return [*(["ip", "netns", "exec", netns] if netns else []), str(STRATA),
            *(str(a) for a in args)]


def strata(*args: object, rc: int | None = 0, timeout: float = 300,
           env: dict[str, str] | None = None, netns: str = "") -> subprocess.CompletedProcess[str]:
    """Run `strata ARGS…` to completion; check its exit code unless `rc` is None. `env`:
    settings on top of the clean environment (e.g. the signing keys). `netns`: in that
    network namespace (`ip netns exec`)."""
    forks = fork_server(netns)
    if forks is not None:  # the same process boundaries, without re-importing the CLI
        proc = forks.run([str(a) for a in args], {**cli_env(), **(env or {})}, timeout)
    else:
        proc = subprocess.run(argv(args, netns), env={**cli_env(), **(env or {})},
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout)
    if rc is not None:
        assert proc.returncode == rc, (args, proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def strata_json(*args: object, timeout: float = 300) -> object:
    return json.loads(strata(*args, "--json", timeout=timeout).stdout)


# A spawned command: forked (tests/cli_forkserver.py), or exec'd under STRATA_TEST_EXEC=1.
Proc = subprocess.Popen[str] | ForkedProcess


def spawn(*args: object, netns: str = "") -> Proc:
    """Start `strata ARGS…` in its own process group (so a SIGKILL reaches its helpers),
    its stdout and stderr on pipes (text), as `subprocess.Popen` does."""
    forks = fork_server(netns)
    if forks is not None:
        return forks.popen([str(a) for a in args], cli_env())
    return subprocess.Popen(argv(args, netns), env=cli_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(proc: Proc, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode is not None and out is not None and err is not None
    return proc.returncode, out, err


def kill_group(proc: subprocess.Popen[Any] | ForkedProcess) -> None:
    """SIGKILL a process we spawned and the helpers it forked (its own process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def run_all(commands: Sequence[Sequence[object]], timeout: float = 300) -> list[object]:
    """Run several `strata … --json` commands side by side; their parsed outputs, in order."""
    procs = [spawn(*cmd, "--json") for cmd in commands]
    outs = []
    for cmd, p in zip(commands, procs, strict=True):
        rc, out, err = finish(p, timeout)
        assert rc == 0, (cmd, rc, out, err)
        assert "Traceback" not in err, err
        outs.append(json.loads(out))
    return outs


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str,
                          rc: int = 2) -> None:
    assert proc.returncode == rc, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip(), "nothing was printed on stderr"
    assert proc.stderr.strip().count("\n") == 0, f"more than one line:\n{proc.stderr}"
    assert proc.stderr.lower().startswith("error"), proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)


# -- the server ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `strata server` process on 127.0.0.1; unpacks as (url, admin_token_file, data, proc).

    `catalog`: the URL of its catalog database ('' for SQLite in the data directory); the
    tests that run on both databases get one from the `catalogs` fixture (pg_fixture.py).
    `args`: more `strata server` options (e.g. --store s3://…).

    Layer signing is set up at the first start (`strata signing init`, keys beside the data
    directory), as an administrator does before enrolling endpoints: agents then pin its
    root, and `admin_cli` signs captures and assignments with the keys (STRATA_SIGNING_*).
    `signing=False` leaves a server without it. `tls=True` serves HTTPS with the data
    directory's self-signed certificate (`--tls`), which `verify` trusts."""

    PASSPHRASE = "strata test passphrase"

    def __init__(self, data: Path, port: int | None = None, args: Sequence[object] = (),
                 catalog: str = "", *, signing: bool = True, tls: bool = False):
        self.data = data
        self.port = port or free_port()
        self.args = list(args)
        self.catalog = catalog
        self.proc: subprocess.Popen[bytes] | ForkedProcess | None = None
        self.log = data.parent / f"{data.name}.server.log"
        self.signing = signing
        self.keys = data.parent / f"{data.name}.keys"
        self.passphrase_file = data.parent / f"{data.name}.passphrase"
        self.tls = tls

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def verify(self) -> ssl.SSLContext | bool:
        """What an HTTP client trusts: the server's own certificate when it serves TLS.
        Otherwise the system's CAs loaded once (a client told verify=True loads them each
        time: 35 ms of CPU, and the helpers below make thousands of requests a run)."""
        if not self.tls:
            return system_trust()
        return ssl.create_default_context(cafile=self.data / "tls" / "cert.pem")

    @property
    def token_file(self) -> Path:
        return self.data / "admin.token"

    @property
    def store(self) -> Path:
        return self.data / "store"

    def __iter__(self) -> Iterator[object]:
        return iter((self.url, self.token_file, self.data, self.proc))

    def start(self, timeout: float = 120) -> Server:
        """Start the process and wait until GET /api/v1/health answers."""
        self.data.mkdir(parents=True, exist_ok=True)
        args = ["server", "--data", self.data, "--listen", f"127.0.0.1:{self.port}",
                *(["--catalog", self.catalog] if self.catalog else []),
                *(["--tls"] if self.tls else []), *self.args]
        forks = fork_server()
        with open(self.log, "ab") as log:
            if forks is not None:  # see tests/cli_forkserver.py
                self.proc = forks.spawn([str(a) for a in args], cli_env(), log.fileno(),
                                        log.fileno())
            else:
                self.proc = subprocess.Popen(argv(args), env=cli_env(),
                                             stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n"
                                   + self.log.read_text(errors="replace"))
            try:
                # Liveness only (the certificate is checked by the tests that use it).
                if httpx.get(self.url + HEALTH, timeout=2, verify=False).status_code == 200:
                    if self.signing and not self.keys.exists():
                        self.init_signing()
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("server did not answer /api/v1/health in time:\n"
                                   + self.log.read_text(errors="replace"))
            time.sleep(0.1)

    def init_signing(self) -> str:
        """`strata signing init`: keys beside the data directory; the root's fingerprint."""
        self.passphrase_file.write_text(self.PASSPHRASE + "\n")
        out = strata("signing", "init", "--keys", self.keys, "--passphrase-file",
                     self.passphrase_file, "--server", self.url, "--admin-token-file",
                     self.token_file, "--json", env=self.trust_env)
        return json.loads(out.stdout)["fingerprint"]

    @property
    def trust_env(self) -> dict[str, str]:
        """What makes an admin command trust this server's certificate (TLS only)."""
        return {"STRATA_CA_CERT": str(self.data / "tls" / "cert.pem")} if self.tls else {}

    @property
    def signing_env(self) -> dict[str, str]:
        """What lets the admin CLI sign (empty for a server without signing)."""
        if not self.keys.exists():
            return {}
        return {"STRATA_SIGNING_KEYS": str(self.keys),
                "STRATA_SIGNING_PASSPHRASE_FILE": str(self.passphrase_file)}

    def stop(self, timeout: float = 30) -> None:
        """A clean shutdown (SIGTERM), or SIGKILL if it does not come."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL: the server dies without any chance to tidy up."""
        if self.proc is not None and self.proc.poll() is None:
            kill_group(self.proc)

    def alive(self) -> bool:
        try:
            return httpx.get(self.url + HEALTH, timeout=5,
                             verify=self.verify).json()["status"] == "ok"
        except httpx.TransportError:
            return False

    # -- admin API (the CLI's `token`/`endpoint`/`policy` commands are thin clients of it) --
    @property
    def admin_token(self) -> str:
        return self.token_file.read_text().strip()

    def admin(self, method: str, path: str, body: object = None, status: int = 200) -> object:
        resp = httpx.request(method, self.url + "/api/v1/admin" + path, json=body, timeout=60,
                             headers={"Authorization": f"Bearer {self.admin_token}"},
                             verify=self.verify)
        assert resp.status_code == status, (method, path, resp.status_code, resp.text)
        return resp.json()

    def admin_raw(self, method: str, path: str, status: int = 200) -> bytes:
        resp = httpx.request(method, self.url + "/api/v1/admin" + path, timeout=60,
                             headers={"Authorization": f"Bearer {self.admin_token}"},
                             verify=self.verify)
        assert resp.status_code == status, (method, path, resp.status_code, resp.text)
        return resp.content

    def create_token(self, uses: int | None = 1, expires: str | None = "24h",
                     require_approval: bool = False) -> str:
        doc = self.admin("POST", "/tokens", {"uses": uses, "expires": expires,
                                             "require_approval": require_approval})
        return doc["token"]  # type: ignore[index]

    def admin_cli(self, *args: object, rc: int | None = 0,
                  sign: bool = True) -> subprocess.CompletedProcess[str]:
        """An admin command; with the signing keys unless `sign` is False."""
        return strata(*args, "--server", self.url, "--admin-token-file", self.token_file, rc=rc,
                      env={**self.trust_env, **(self.signing_env if sign else {})})

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=5, verify=self.verify,
                         headers={"Authorization": f"Bearer {self.admin_token}"}).text
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0


def admin(world: Any, *args: object, rc: int | None = 0) -> subprocess.CompletedProcess[str]:
    """An admin command against `world.server` (a test module's fixture namespace)."""
    return world.server.admin_cli(*args, rc=rc)


def admin_json(world: Any, *args: object) -> Any:
    """The same with --json, its output parsed."""
    return json.loads(admin(world, *args, "--json").stdout)


def enroll_request(server: Server, token: str, hostname: str = "probe") -> httpx.Response:
    """POST /api/v1/agent/enroll directly (what `strata agent enroll` sends)."""
    return httpx.post(server.url + "/api/v1/agent/enroll", timeout=30, verify=server.verify,
                      json={"token": token, "hostname": hostname, "os": "linux"})


def device(server: Server, credential: str) -> httpx.Client:
    """An HTTP client presenting a device credential."""
    return httpx.Client(base_url=server.url, timeout=60, verify=server.verify,
                        headers={"Authorization": f"Bearer {credential}"})


def enrolled_device(server: Server, hostname: str = "probe") -> tuple[str, httpx.Client]:
    """Enroll over the API with a fresh token; (endpoint id, client with its credential)."""
    resp = enroll_request(server, server.create_token(), hostname)
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    return doc["endpoint_id"], device(server, doc["credential"])


def running_server(data: Path, port: int | None = None, args: Sequence[object] = (),
                   catalog: str = "") -> Iterator[Server]:
    """Body of the `server` fixtures: start, yield, and always stop at teardown."""
    srv = Server(data, port, args, catalog).start()
    try:
        yield srv
    finally:
        srv.stop()
        srv.kill()


# -- agents ----------------------------------------------------------------------------------


@dataclass
class Agent:
    server: Server
    root: Path
    state: Path

    def enroll_cmd(self, token: str) -> list[object]:
        return ["agent", "enroll", "--server", self.server.url, "--token", token,
                "--root", self.root, "--state", self.state]

    def enroll(self, token: str) -> dict:
        return strata_json(*self.enroll_cmd(token))  # type: ignore[return-value]

    def cmd(self, *args: object) -> list[object]:
        return ["agent", *args, "--state", self.state]

    def run_once(self, *extra: object) -> dict:
        return strata_json(*self.cmd("run", "--once", *extra))  # type: ignore[return-value]

    def backup(self, *extra: object) -> dict:
        return strata_json(*self.cmd("backup", *extra))  # type: ignore[return-value]

    def restore(self, *paths: object, snapshot: str | None = None,
                to: Path | None = None) -> dict:
        extra: list[object] = []
        if snapshot:
            extra += ["--snapshot", snapshot]
        if to is not None:
            extra += ["--to", to]
        return strata_json(*self.cmd("restore", *paths, *extra))  # type: ignore[return-value]

    def status(self) -> dict:
        return strata_json(*self.cmd("status"))  # type: ignore[return-value]

    def snapshots(self) -> list[dict]:
        return strata_json(*self.cmd("snapshots"))  # type: ignore[return-value]

    @property
    def credential(self) -> str:
        return json.loads((self.state / "credential.json").read_text())["credential"]

    @property
    def endpoint_id(self) -> str:
        return json.loads((self.state / "credential.json").read_text())["endpoint_id"]

    def http(self) -> httpx.Client:
        """An HTTP client holding this endpoint's device credential."""
        return device(self.server, self.credential)


def centralized(out: dict) -> dict:
    """The centralization result of an `agent run --once`/`agent backup` JSON document."""
    assert out.get("checked_in") and not out.get("offline"), out
    assert out.get("centralized"), out
    assert not out["result"]["errors"], out["result"]["errors"]
    return out["result"]


# -- trees -----------------------------------------------------------------------------------


def build_os_tree(dest: Path, budget: int, seed: int = 0) -> int:
    """An OS-like tree of `budget` bytes under dest/usr plus dest/etc/os-release, generated
    (generated_trees.os_tree: the same on every machine, nothing read from the host's /usr);
    its bytes under usr."""
    return os_tree(dest, budget, seed)


WORDS = words_by_byte(("quarterly", "report", "budget", "meeting", "strata", "endpoint",
                       "layer", "policy", "customer", "invoice", "the", "and", "of", "a",
                       "to", "is"))


def write_documents(dest: Path, seed: int, count: int, size: int) -> int:
    """Compressible text documents (deterministic for a seed); their total bytes."""
    rng = random.Random(seed)
    dest.mkdir(parents=True, exist_ok=True)
    total = 0
    for i in range(count):
        words = word_text(rng, WORDS, size // 5)
        data = (f"document {i} seed {seed}\n".encode() + words + b"\n")[:size]
        (dest / f"doc-{i:03d}.txt").write_bytes(data)
        total += len(data)
    return total


def write_random(path: Path, size: int, rng: random.Random) -> bytes:
    """Incompressible bytes (random from `rng`); returns what was written."""
    data = rng.randbytes(size)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def random_tree(root: Path, total: int, seed: int, sizes: tuple[int, int] = (1 * MIB, 8 * MIB),
                sub: str = "home/user/data") -> int:
    """Files of random (incompressible) bytes, sizes drawn from `sizes`, until `total`."""
    rng = random.Random(seed)
    written = i = 0
    while written < total:
        size = min(rng.randint(*sizes), total - written)
        write_random(root / sub / f"blob-{i:03d}.bin", size, rng)
        written += size
        i += 1
    return written


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def file_map(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def wait_for(predicate: object, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(interval)
    return False
