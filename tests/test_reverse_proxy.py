"""The documented deployment, run: two `strata server` processes started as the systemd
unit starts them (docs/deploy/strata-server@.service: `--config server.toml --listen
127.0.0.1:PORT`), behind Debian's nginx with docs/deploy/nginx-strata.conf (TLS, the
agents pinning its certificate), on one PostgreSQL catalog and one S3 store. Agents
centralize and restore through nginx, and go on when one process is killed.

Skipped without nginx (installed by .ci/run).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from server_fixtures import (
    MIB,
    Agent,
    Server,
    build_os_tree,
    centralized,
    file_map,
    free_port,
    strata_json,
    wait_for,
    write_random,
)
from strata.server.tls import self_signed_certificate

pytestmark = pytest.mark.e2e

DEPLOY = Path(__file__).parent.parent / "docs" / "deploy"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def _toml(dest: Path, data: Path, catalog: str, store: str, s3_url: str) -> Path:
    """docs/deploy/server.toml with this test's data directory, catalog and store."""
    text = (DEPLOY / "server.toml").read_text()
    values = {"data": str(data), "catalog": catalog, "store": store,
              "s3-endpoint-url": s3_url, "s3-region": "us-east-1"}
    for key, value in values.items():
        text, n = re.subn(rf'^{re.escape(key)} = "[^"]*"', f'{key} = "{value}"', text, flags=re.M)
        assert n == 1, key
    dest.write_text(text)
    return dest


def _nginx_conf(base: Path, port: int, upstreams: list[int], cert: Path, key: Path) -> Path:
    """docs/deploy/nginx-strata.conf, its ports and certificate this test's, inside a
    main configuration of the test's own (paths in `base`)."""
    site = (DEPLOY / "nginx-strata.conf").read_text()
    site = re.sub(r"listen \[::\]:443 ssl;\n", "", site)
    site = site.replace("listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;")
    site = site.replace("/etc/strata/tls/cert.pem", str(cert))
    site = site.replace("/etc/strata/tls/key.pem", str(key))
    servers = re.findall(r"server 127\.0\.0\.1:\d+", site)
    assert len(servers) == len(upstreams)
    for old, new in zip(servers, upstreams, strict=True):
        site = site.replace(old, f"server 127.0.0.1:{new}", 1)
    (base / "strata.conf").write_text(site)
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (base / sub).mkdir(exist_ok=True)
    main = base / "nginx.conf"
    main.write_text(f"""
user root;
worker_processes 1;
daemon off;
pid {base}/nginx.pid;
error_log {base}/error.log warn;
events {{ worker_connections 512; }}
http {{
    access_log {base}/access.log;
    client_body_temp_path {base}/body;
    proxy_temp_path {base}/proxy;
    fastcgi_temp_path {base}/fastcgi;
    uwsgi_temp_path {base}/uwsgi;
    scgi_temp_path {base}/scgi;
    include {base}/strata.conf;
}}
""")
    return main


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, pg_cluster, s3):
    if not os.path.exists(NGINX) or os.geteuid() != 0:
        pytest.skip("nginx is not installed (Debian package nginx), or not root")
    base = tmp_path_factory.mktemp("deploy")
    bucket = s3.new_bucket()
    env = pytest.MonkeyPatch()
    for name, value in {**s3.env(), "AWS_EC2_METADATA_DISABLED": "true"}.items():
        env.setenv(name, value)
    data = base / "data"
    config = _toml(base / "server.toml", data, pg_cluster.new_database("deploy"),
                   f"s3://{bucket}/site-a", s3.url)
    servers = []
    for name in ("8471", "8472"):  # the unit's instances; ports free here
        srv = Server(data, args=["--config", config])  # + --listen, as the unit adds
        srv.log = base / f"server-{name}.log"
        servers.append(srv.start())
    cert = self_signed_certificate(base / "proxy", ["127.0.0.1"])
    port = free_port()
    conf = _nginx_conf(base, port, [s.port for s in servers], cert.cert, cert.key)
    test = subprocess.run([NGINX, "-t", "-c", str(conf)], capture_output=True, text=True)
    assert test.returncode == 0, test.stderr
    nginx = subprocess.Popen([NGINX, "-c", str(conf)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"https://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: _up(url), 30), (base / "error.log").read_text()
        yield {"servers": servers, "url": url, "fingerprint": cert.fingerprint, "base": base}
    finally:
        nginx.terminate()
        nginx.wait(30)
        for srv in servers:
            srv.stop()
            srv.kill()
        env.undo()
        s3.drop_bucket(bucket)


def _up(url: str) -> bool:
    try:
        return httpx.get(url + "/api/v1/health", verify=False, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_agents_centralize_and_restore_through_nginx_and_survive_a_killed_process(
        deployment, tmp_path):
    one, two = deployment["servers"]
    os_tree = tmp_path / "os"
    build_os_tree(os_tree, 4 * MIB)
    agents = []
    for i in (1, 2):
        root = tmp_path / f"endpoint-{i}"
        shutil.copytree(os_tree, root, symlinks=True)
        write_random(root / f"home/user{i}/own.bin", MIB, random.Random(i))
        agent = Agent(one, root, tmp_path / f"state-{i}")
        strata_json("agent", "enroll", "--server", deployment["url"], "--server-fingerprint",
                    deployment["fingerprint"], "--token", one.create_token(),
                    "--root", root, "--state", agent.state)
        agents.append(agent)
    for agent in agents:
        centralized(agent.run_once())
    # Both processes answer through the proxy: each has its own access to one catalog.
    assert len(one.admin("GET", "/endpoints")) == len(two.admin("GET", "/endpoints")) == 2
    # Process one dies; nginx sends everything to process two, which carries on.
    one.kill()
    for i, agent in enumerate(agents, 1):
        (agent.root / f"home/user{i}/later.txt").write_text("written after the kill\n")
        started = time.monotonic()
        r = centralized(agent.backup())
        assert r["files_changed"] >= 1 and time.monotonic() - started < 120
        out = tmp_path / f"restored-{i}"
        assert not agent.restore("home", "etc", "usr", to=out)["errors"]
        assert file_map(out) == file_map(agent.root)
