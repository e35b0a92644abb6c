"""The layer commands as a new administrator types them, mistakes included: every bad
input (unknown or malformed NAME:VERSION, an unknown endpoint, a missing directory, a
wrong token, nothing to assign) is one line on stderr and exit code 2, never a
traceback, and never a request to some other URL; `--json` output always parses.

One small server and one endpoint are shared by the module; the tests run in file order.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

import web
from server_fixtures import (
    Agent,
    Server,
    admin,
    admin_json,
    assert_one_line_error,
    centralized,
    strata,
)

pytestmark = pytest.mark.e2e


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("layers-cli")
    ref = base / "ref"
    write(ref / "etc/os-release", 'ID=debian\nVERSION_ID="12"\n')
    write(ref / "etc/motd", "welcome v1\n")
    write(ref / "usr/bin/tool", "tool v1\n")
    ref2 = base / "ref2"
    shutil.copytree(ref, ref2)
    write(ref2 / "usr/bin/tool", "tool v2\n")
    root = base / "endpoint"
    shutil.copytree(ref, root)
    write(root / "etc/hostname", "pc-1\n")
    write(root / "home/alice/documents/report.txt", "alice's report\n")
    server = Server(base / "server").start()
    try:
        agent = Agent(server, root, base / "state")
        agent.enroll(server.create_token())
        centralized(agent.run_once())
        yield SimpleNamespace(server=server, agent=agent, base=base, ref=ref, ref2=ref2)
    finally:
        server.stop()
        server.kill()


def refused(world, *args: object, needle: str = "") -> None:
    proc = admin(world, *args, rc=None)
    assert_one_line_error(proc, *((needle,) if needle else ()))


def test_capture_and_json_outputs_parse(world):
    eid = world.agent.endpoint_id
    admin(world, "layer", "capture", "--kind", "base", "--name", "corp-os", "--version", "1",
          "--from-dir", world.ref)
    admin(world, "layer", "capture", "--kind", "base", "--name", "corp-os", "--version", "2",
          "--from-dir", world.ref2)
    for args in (("layer", "list"), ("layer", "show", "corp-os:1", "--files"),
                 ("layer", "diff", "corp-os:1", "corp-os:2"),
                 ("layer", "dry-run", "--endpoint", eid, "--base", "corp-os:2"),
                 ("collection", "list"), ("task", "list"),
                 ("endpoint", "list"), ("endpoint", "show", eid[:8]),
                 ("policy", "show", "layers")):
        admin_json(world, *args)
    # compliance exits 1 when an endpoint drifts: its JSON reads the same either way
    proc = admin(world, "compliance", "--json", rc=None)
    assert proc.returncode in (0, 1) and "endpoints" in json.loads(proc.stdout)


def test_malformed_layer_references_are_refused_before_any_request(world):
    for ref in ("", "corp-os", "corp-os:", ":2", "corp-os:2:3", "corp os:2", "a/b:1", "..",
                "corp-os:1?x=1", "corp-os:2#frag"):
        refused(world, "layer", "show", ref, needle="NAME:VERSION")
        refused(world, "layer", "delete", ref, needle="NAME:VERSION")
    # A bare name used to mean "the newest version": an assignment must not guess.
    eid = world.agent.endpoint_id
    refused(world, "assign", "--endpoint", eid, "--base", "corp-os", needle="no version")
    refused(world, "endpoint", "provision", eid, "--base", "corp-os", needle="no version")
    refused(world, "migrate", "--endpoint", eid, "--base", "corp-os:", needle="NAME:VERSION")
    # The server checks the same, whoever calls it.
    resp = web.post(world.server.url + "/api/v1/admin/assign", timeout=30,
                    headers={"Authorization": f"Bearer {world.server.admin_token}"},
                    json={"all": True, "base": "corp-os"})
    assert resp.status_code == 422 and "NAME:VERSION" in resp.text, resp.text
    assert admin_json(world, "layer", "show", "corp-os:2")["endpoints"] == []


def test_unknown_layers_and_endpoints(world):
    eid = world.agent.endpoint_id
    refused(world, "layer", "show", "nosuch:1", needle="no layer 'nosuch:1'")
    refused(world, "layer", "diff", "corp-os:1", "corp-os:9", needle="no layer 'corp-os:9'")
    refused(world, "assign", "--endpoint", "deadbeef", "--base", "corp-os:1",
            needle="no endpoint 'deadbeef'")
    refused(world, "assign", "--endpoint", eid, "--base", "nosuch:1", needle="no layer")
    refused(world, "endpoint", "show", "", needle="must not be empty")
    refused(world, "endpoint", "show", "a/b", needle="not valid")
    refused(world, "layer", "list", "--kind", "os", needle="base, driver, app")
    resp = web.get(world.server.url + "/api/v1/admin/layers?kind=os", timeout=30,
                   headers={"Authorization": f"Bearer {world.server.admin_token}"})
    assert resp.status_code == 422


def test_bad_captures(world):
    before = admin_json(world, "layer", "list")
    missing = world.base / "nope"
    cap = ("layer", "capture", "--name", "office", "--version", "1")
    refused(world, *cap, "--kind", "app", "--from-dir", missing, "--before-dir", world.ref,
            needle="is not a directory")
    refused(world, *cap, "--kind", "app", "--from-dir", world.ref, "--before-dir", missing,
            needle="is not a directory")
    refused(world, *cap, "--kind", "app", "--from-dir", world.ref, needle="--before-dir")
    refused(world, *cap, "--kind", "os", "--from-dir", world.ref, needle="--kind")
    refused(world, *cap, "--kind", "base", "--os", "macos", "--from-dir", world.ref,
            needle="--os")
    refused(world, *cap, "--kind", "driver", "--from-dir", world.ref, needle="--match")
    refused(world, *cap, "--kind", "base", "--from-dir", world.ref, "--match", "vendor=x",
            needle="driver layers only")
    refused(world, "layer", "capture", "--kind", "base", "--name", "bad name", "--version",
            "1", "--from-dir", world.ref, needle="--name 'bad name'")
    assert admin_json(world, "layer", "list") == before


def test_assign_mistakes(world):
    eid = world.agent.endpoint_id
    refused(world, "assign", "--endpoint", eid, needle="nothing to assign")
    refused(world, "assign", "--endpoint", eid, "--no-apps", "--app", "office:1",
            needle="--no-apps removes every app layer")
    refused(world, "assign", "--base", "corp-os:1", needle="endpoints, a collection, or all")
    refused(world, "assign", "--endpoint", eid, "--app", "corp-os:1",
            needle="is a base layer, not app")
    admin(world, "layer", "capture", "--kind", "app", "--name", "office", "--version", "1",
          "--from-dir", world.ref2, "--before-dir", world.ref)
    refused(world, "assign", "--endpoint", eid, "--driver", "office:1",
            needle="is an app layer, not driver")


def test_collections(world):
    refused(world, "collection", "create", "empty", needle="--rule")
    refused(world, "collection", "create", "bad name", "--rule", "tag=x",
            needle="collection name")
    admin(world, "endpoint", "tag", world.agent.endpoint_id, "lab")
    out = admin(world, "collection", "create", "lab", "--rule", "os=debian,tag=lab").stdout
    assert "1 endpoint(s)" in out, out
    doc = admin_json(world, "collection", "create", "one", "--endpoint",
                     world.agent.endpoint_id[:8])
    assert doc["endpoints"] == [world.agent.endpoint_id]
    assert admin_json(world, "collection", "delete", "one") == {"deleted": "one"}
    refused(world, "collection", "delete", "one", needle="no collection")


def test_wrong_admin_token(world, tmp_path):
    bad = tmp_path / "token"
    bad.write_text("sadm_not-the-token\n")
    proc = strata("layer", "list", "--server", world.server.url, "--admin-token-file", bad,
                  rc=None)
    assert_one_line_error(proc, "403")
    proc = strata("layer", "list", "--server", world.server.url, "--admin-token-file",
                  tmp_path / "absent", rc=None)
    assert_one_line_error(proc, "cannot read admin token file")


def test_delete_refused_while_assigned_then_allowed_once_the_endpoint_is_revoked(world):
    eid = world.agent.endpoint_id
    admin(world, "layer", "capture", "--kind", "base", "--name", "scratch", "--version", "1",
          "--from-dir", world.ref)
    admin(world, "assign", "--endpoint", eid, "--base", "scratch:1")
    refused(world, "layer", "delete", "scratch:1", "--yes", needle="assigned to or applied on")
    # A revoked endpoint never checks in again: it no longer pins the layer.
    admin(world, "endpoint", "revoke", eid)
    assert admin_json(world, "layer", "delete", "scratch:1", "--yes") == {"deleted": "scratch:1"}


def test_validation_errors_read_as_a_sentence():
    from strata.cli.admin_client import error_detail as _detail

    doc = {"detail": [{"type": "string_pattern_mismatch", "loc": ["body", "name"],
                       "msg": "String should match pattern '^[a-z]+$'", "input": "a b"}]}
    assert _detail(doc) == "name: String should match pattern '^[a-z]+$' (got 'a b')"
    assert _detail({"detail": "no layer 'x:1'"}) == "no layer 'x:1'"
