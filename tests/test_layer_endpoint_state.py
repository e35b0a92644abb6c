"""A base update keeps what belongs to the endpoint, on a generated Debian-like tree (real
owners, modes, setuid binaries, symlinks such as /bin -> usr/bin, /etc/localtime and
systemd *.wants links) with a local user (uid 1000, a home, sudo membership, a password),
a local root password, a local edit of /etc/ssh/sshd_config, and an app under /opt:
`assign` -> `agent run --once` -> `agent apply` of a new base leaves the tree equal to the
new base plus the endpoint's identity, user data, user apps and merged accounts, in every
path the layer lays down (type, mode, owner, mtime, contents, link target).

Then: an account clash holds an update until it is resolved on the endpoint; an IT app
layer goes on and comes off again (`assign --no-apps`); a base captured from the managed
endpoint leaves out the app layer and the endpoint's identity and user data.

One server and one endpoint are shared by the module; the tests run in file order.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from types import SimpleNamespace

import pytest

from generated_trees import accounts, build_base, copy_tree, full_state
from server_fixtures import Agent, Server, admin, admin_json, centralized, strata, strata_json

pytestmark = pytest.mark.e2e

ALICE = {  # the endpoint's own user, in every account database
    "etc/passwd": "alice:x:1000:1000:Alice Liddell,,,:/home/alice:/bin/bash",
    "etc/shadow": "alice:$y$j9T$Q2V4$localhashofalice:19800:0:99999:7:::",
    "etc/group": "alice:x:1000:",
    "etc/gshadow": "alice:!::",
    "etc/subuid": "alice:100000:65536",
    "etc/subgid": "alice:100000:65536",
}
ROOT_SHADOW = "root:$y$j9T$Uk9P$localrootpassword:19800:0:99999:7:::"
SUPPLEMENTARY = ("sudo", "users")
OWN = ("etc/hostname", "etc/machine-id", "home", "opt")  # identity, user data, user app
LOCAL_EDIT = "etc/ssh/sshd_config"


def localized(dbs: dict[str, bytes]) -> dict[str, bytes]:
    """What the endpoint's admin did to a base's account databases: alice added (with
    her groups), root's password set."""
    out = {}
    for path, data in dbs.items():
        lines = data.decode().splitlines()
        for i, line in enumerate(lines):
            name = line.split(":")[0]
            if path == "etc/shadow" and name == "root":
                lines[i] = ROOT_SHADOW
            elif path in ("etc/group", "etc/gshadow") and name in SUPPLEMENTARY:
                lines[i] = line + "alice"  # their member lists are empty in the base
        out[path] = "".join(f"{x}\n" for x in [*lines, ALICE[path]]).encode()
    return out


def write_keeping_meta(path: Path, data: bytes) -> None:
    path.write_bytes(data)  # in place: mode and owner stay


def make_endpoint(root: Path, base: Path) -> None:
    copy_tree(base, root)
    for path, data in localized(accounts(1)).items():
        write_keeping_meta(root / path, data)
    (root / "etc/hostname").write_text("pc-alice\n")
    (root / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    write_keeping_meta(root / LOCAL_EDIT, (root / LOCAL_EDIT).read_bytes()
                       + b"PasswordAuthentication no\n")
    home = root / "home/alice"
    (home / "Documents").mkdir(parents=True)
    (home / "Documents/thesis.odt").write_bytes(random.Random(1).randbytes(150_000))
    (home / ".bashrc").write_text("alias ll='ls -l'\n")
    for p in (home, home / "Documents", home / "Documents/thesis.odt", home / ".bashrc"):
        os.chown(p, 1000, 1000)
    app = root / "opt/userapp/bin"
    app.mkdir(parents=True)
    (app / "userapp").write_bytes(b"#!/bin/sh\necho the user's own app\n")
    (app / "userapp").chmod(0o755)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("endpoint-state")
    v1, v2 = base / "base-v1", base / "base-v2"
    build_base(v1, 1)
    build_base(v2, 2)
    root = base / "endpoint"
    make_endpoint(root, v1)
    server = Server(base / "server").start()
    try:
        agent = Agent(server, root, base / "state")
        agent.enroll(server.create_token())
        centralized(agent.run_once())
        yield SimpleNamespace(server=server, agent=agent, base=base, v1=v1, v2=v2, root=root)
    finally:
        server.stop()
        server.kill()


def layers_doc(world) -> dict:
    return admin_json(world, "endpoint", "show", world.agent.endpoint_id)["layers"]


def records(root: Path, path: str) -> dict[str, list[str]]:
    return {line.split(":")[0]: line.split(":")
            for line in (root / path).read_text().splitlines() if line}


def test_the_base_the_endpoint_runs_is_assigned_without_a_change(world):
    admin(world, "layer", "capture", "--kind", "base", "--name", "deb", "--version", "1",
          "--from-dir", world.v1)
    admin(world, "layer", "capture", "--kind", "base", "--name", "deb", "--version", "2",
          "--from-dir", world.v2)
    before = full_state(world.root)
    admin(world, "assign", "--endpoint", world.agent.endpoint_id, "--base", "deb:1")
    out = world.agent.run_once()
    # The accounts merge (two-way: no layer was applied before) gives back exactly the
    # endpoint's own databases: nothing to switch, no restart.
    assert out["update"]["state"] == "applied", out
    assert not any(out["update"]["changes"].values()), out
    assert full_state(world.root) == before


def test_dry_run_shows_merged_accounts_and_local_configuration_kept(world):
    doc = admin_json(world, "layer", "dry-run", "--endpoint", world.agent.endpoint_id,
                     "--base", "deb:2")
    by_path: dict[str, list[dict]] = {}
    for c in doc["conflict_list"]:
        by_path.setdefault(c["path"], []).append(c)
    assert doc["held"] == 0, doc
    merged = {p for p, cs in by_path.items() if any(c["kind"] == "accounts-merged" for c in cs)}
    assert merged == set(ALICE), doc  # all six: alice is in each
    passwd = by_path["etc/passwd"][0]["detail"]
    assert "alice" in passwd and "_chrony" in passwd and "games" in passwd, passwd
    assert "two-way" not in passwd  # the server knows the old base
    assert [c["kind"] for c in by_path[LOCAL_EDIT]] == ["local-change-kept"]
    assert "etc/default/locale" not in by_path  # untouched: simply takes the new version


def test_base_update_keeps_the_endpoints_own_and_lays_down_the_rest_exactly(world):
    agent = world.agent
    before = full_state(world.root)
    admin(world, "assign", "--endpoint", agent.endpoint_id, "--base", "deb:2")
    out = agent.run_once()
    assert out["update"]["state"] == "ready", out
    assert full_state(world.root) == before  # nothing switched before the restart
    res = strata_json(*agent.cmd("apply"))
    assert res["state"] == "applied" and res["pre_update_snapshot"], res
    assert layers_doc(world)["state"] == "applied"
    now = full_state(world.root)
    new = full_state(world.v2)
    expect_accounts = localized(accounts(2))

    # Every path the new base lays down is exactly the new base's ...
    for path, want in new.items():
        got = now.get(path)
        assert got is not None, f"{path} missing"
        if path in expect_accounts:  # ... merged accounts: base's mode and owner ...
            assert got[:4] == want[:4] and got[5] == expect_accounts[path], path
        elif path == LOCAL_EDIT:  # ... the local edit of the configuration stays ...
            assert got == before[path], path
        else:
            assert got == want, (path, got[:5], want[:5])
    # ... and everything else is the endpoint's own, as it was (v1's libfoo.so.1.2.3 went).
    rest = {p: s for p, s in now.items() if p not in new}
    assert rest == {p: s for p, s in before.items()
                    if any(p == o or p.startswith(o + "/") for o in OWN)}

    # The local user can still log in: her records intact, her groups kept; root keeps
    # its local password; the new base's account is there, the one it dropped is gone
    # (a three-way merge: the agent kept the old base's copy from the last apply).
    passwd, shadow = records(world.root, "etc/passwd"), records(world.root, "etc/shadow")
    group = records(world.root, "etc/group")
    assert ":".join(passwd["alice"]) == ALICE["etc/passwd"]
    assert ":".join(shadow["alice"]) == ALICE["etc/shadow"]
    assert ":".join(shadow["root"]) == ROOT_SHADOW
    assert all("alice" in group[g][3].split(",") for g in SUPPLEMENTARY)
    assert group["alice"][2] == passwd["alice"][3] == "1000"
    assert (world.root / "home/alice/Documents/thesis.odt").stat().st_uid == 1000
    assert "_chrony" in passwd and "_chrony" in shadow and "_chrony" in group
    assert "games" not in passwd and "games" not in group


def test_nothing_more_to_do_and_compliance_counts_only_the_local_edit(world):
    before = full_state(world.root)
    out = world.agent.run_once()
    assert "update" not in out, out
    assert full_state(world.root) == before
    centralized(world.agent.backup())
    rep = json.loads(admin(world, "compliance", "--endpoint", world.agent.endpoint_id,
                           "--json", rc=1).stdout)  # 1: it drifts
    assert rep["endpoints"][0]["changed"] == [LOCAL_EDIT], rep


def test_an_account_clash_holds_the_update_until_resolved(world, tmp_path):
    agent = world.agent
    v3 = tmp_path / "base-v3"
    copy_tree(world.v2, v3)
    with open(v3 / "etc/passwd", "a") as f:  # a new system account on alice's uid
        f.write("newsvc:x:1000:1000:New service:/nonexistent:/usr/sbin/nologin\n")
    admin(world, "layer", "capture", "--kind", "base", "--name", "deb", "--version", "3",
          "--from-dir", v3)
    doc = admin_json(world, "layer", "dry-run", "--endpoint", agent.endpoint_id, "--base",
                     "deb:3")
    assert doc["held"] == 1 and doc["conflict_list"][0]["kind"] == "account-clash", doc
    assert "uid 1000 is the endpoint's alice and the new base's newsvc" in \
        doc["conflict_list"][0]["detail"]
    before = full_state(world.root)
    admin(world, "assign", "--endpoint", agent.endpoint_id, "--base", "deb:3")
    proc = strata(*agent.cmd("run", "--once"), rc=None)
    assert proc.returncode != 0 and "update held" in proc.stderr, proc
    assert "uid 1000 is the endpoint's alice and the new base's newsvc" in proc.stderr
    shown = layers_doc(world)
    assert shown["state"] == "failed" and "newsvc" in shown["detail"], shown
    assert full_state(world.root) == before  # nothing switched
    # The endpoint's admin renumbers alice (usermod -u 1001, groupmod -g 1001): it goes on.
    for path in ("etc/passwd", "etc/group"):
        text = (world.root / path).read_text()
        write_keeping_meta(world.root / path, text.replace(":1000:", ":1001:").encode())
    out = agent.run_once()
    assert out["update"]["state"] == "ready", out
    strata_json(*agent.cmd("apply"))
    passwd = records(world.root, "etc/passwd")
    assert passwd["alice"][2] == "1001" and passwd["newsvc"][2] == "1000"
    assert "alice" in records(world.root, "etc/group")["sudo"][3]


APP_FILES = {"opt/corp-tool/bin/corp-tool": (0o755, b"#!/bin/sh\necho corp tool\n"),
             "opt/corp-tool/lib/libcorp.so": (0o644, bytes(range(256)) * 300),
             "usr/share/applications/corp-tool.desktop": (0o644, b"[Desktop Entry]\n"),
             "etc/corp-tool.conf": (0o644, b"server = corp.example\n")}


def test_an_app_layer_goes_on_end_to_end(world, tmp_path):
    before_dir, after_dir = tmp_path / "before", tmp_path / "after"
    copy_tree(world.v2, before_dir)
    copy_tree(world.v2, after_dir)
    for path, (mode, data) in APP_FILES.items():
        p = after_dir / path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        p.chmod(mode)
    doc = admin_json(world, "layer", "capture", "--kind", "app", "--name", "corp-tool",
                     "--version", "1", "--from-dir", after_dir, "--before-dir", before_dir)
    assert doc["files"] == len(APP_FILES), doc
    agent = world.agent
    admin(world, "assign", "--endpoint", agent.endpoint_id, "--app", "corp-tool:1")
    out = agent.run_once()
    assert out["update"]["state"] == "ready", out
    assert out["update"]["bytes_downloaded"] > 0
    strata_json(*agent.cmd("apply"))
    now = full_state(world.root)
    want = full_state(after_dir)
    for path in APP_FILES:
        assert now[path] == want[path], path
    assert "app corp-tool:1" in layers_doc(world)["applied"]


def test_a_base_captured_from_the_endpoint_leaves_out_app_identity_and_user_data(world):
    centralized(world.agent.backup())
    admin(world, "layer", "capture", "--kind", "base", "--name", "deb-from-pc",
          "--version", "1", "--from-endpoint", world.agent.endpoint_id)
    files = admin_json(world, "layer", "show", "deb-from-pc:1", "--files")["file_list"]
    assert "usr/bin/bash" in files and "etc/passwd" in files and "bin" in files
    assert not [p for p in files if p in APP_FILES or p.startswith("opt/corp-tool")], files
    assert not [p for p in files if p.startswith("home") or p in ("etc/hostname",
                                                                 "etc/machine-id")]
    assert "opt/userapp/bin/userapp" in files  # not a layer's: the machine's own software


def test_assign_no_apps_removes_the_last_app_layer(world):
    agent = world.agent
    admin(world, "assign", "--endpoint", agent.endpoint_id, "--no-apps")
    out = agent.run_once()
    assert out["update"]["state"] == "ready", out
    strata_json(*agent.cmd("apply"))
    for path in APP_FILES:
        assert not (world.root / path).exists(), path
    assert not (world.root / "opt/corp-tool").exists()
    assert (world.root / "opt/userapp/bin/userapp").exists()
    assert not (world.root / "usr/share/applications").exists()  # the app's own directory
    assert layers_doc(world)["applied"] == ["base deb:3"]
