"""Layer commands (`strata layer …`, `strata assign`, `strata collection …`,
`strata compliance`, `strata migrate`, `strata task …`, and the endpoint operations
revert/restore/provision/tag): thin clients of the server's admin API."""

from __future__ import annotations

import os
import re
from pathlib import Path

import typer
from rich.table import Table

from strata.errors import StrataError
from strata.model.names import (
    COLLECTION_NAME,
    LAYER_KINDS,
    LAYER_NAME,
    LAYER_VERSION,
    OS_FAMILIES,
)

from .admin import JSON, SERVER, TOKEN_FILE, admin_call, admin_token, endpoint_app, path_part
from .output import console, err_console, human_bytes, print_json, run_with_progress
from .signing import KEYS, PASSPHRASE_FILE, publisher_for, signable_refs, signed_after

layer_app = typer.Typer(help="Base images, driver sets and application layers.",
                        no_args_is_help=True)
collection_app = typer.Typer(help="Collections of endpoints (by name or by rule).",
                             no_args_is_help=True)
task_app = typer.Typer(help="Tracked operations (migrations).", no_args_is_help=True)
API = "/api/v1/admin"
# The shapes the server accepts, checked here first for a clear message.
NAME_RE, VERSION_RE, COLLECTION_RE = (re.compile(p) for p in (LAYER_NAME, LAYER_VERSION,
                                                                 COLLECTION_NAME))


def _ref(text: str) -> str:
    """A layer reference as the admin typed it: NAME:VERSION (or a numeric id from
    `layer list`). Anything else is refused here, before it can become another URL."""
    if text.isascii() and text.isdigit():
        return text
    name, sep, version = text.partition(":")
    if not sep and NAME_RE.fullmatch(name) and name.strip("."):
        raise StrataError(f"layer {text!r} has no version: give NAME:VERSION, e.g. "
                          f"{name}:1 (`strata layer list` shows the versions)")
    if not (NAME_RE.fullmatch(name) and VERSION_RE.fullmatch(version) and name.strip(".")):
        raise StrataError(f"malformed layer reference {text!r}: expected NAME:VERSION, "
                          "e.g. corp-os:2")
    return text


def _refs(texts: list[str] | None) -> list[str] | None:
    return None if texts is None else [_ref(t) for t in texts]


def _choice(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise StrataError(f"{what} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def _pairs(text: str | None, allowed: set[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in allowed or not value:
            raise StrataError(f"{what} takes {', '.join(sorted(allowed))} as KEY=GLOB "
                              f"pairs, e.g. vendor=Dell*,model=Latitude*; got {part!r}")
        out[key] = value
    return out


def _upload_tree(server: str | None, token_file: Path | None, directory: Path, family: str,
                 before: Path | None, json: bool) -> dict:
    """Chunk a local tree and upload what the server lacks (the agent's sync engine).
    For an app layer, `before` is scanned (hashed, not uploaded) and only the difference
    is kept."""
    from strata.agent.client import ServerClient
    from strata.agent.sink import RemoteSink
    from strata.engine.backup import HashOnlySink, archive_tree, store_manifest
    from strata.layers.capture import app_difference
    from strata.layers.rules import LayerRules
    from strata.model.ids import content_id
    from strata.model.manifest import decode_manifest, encode_manifest
    from strata.model.wire import ChunkerSpec

    for d in (directory, before):
        if d is not None and not d.is_dir():
            raise StrataError(f"{d} is not a directory")
    cfg = admin_call(server, token_file, "GET", f"{API}/capture-config?os_family={family}")
    spec = ChunkerSpec(**cfg["chunker"])  # type: ignore[index]
    rules = LayerRules.from_doc(cfg["rules"], family)  # type: ignore[index]
    client = ServerClient(server or "", admin_token(token_file))
    sink = RemoteSink(client, spec, api=API)
    hash_only = HashOnlySink(sink.chunker)  # the same cut points as the upload
    try:
        removes: list[str] = []
        if before is not None:
            hashed = archive_tree(hash_only, before, parent_entries=None,
                                  excludes=rules.capture_excludes())
            after = run_with_progress("scan", lambda p: archive_tree(
                hash_only, directory, parent_entries=None,
                excludes=rules.capture_excludes(), progress=p), json_mode=json)
            entries, gone = app_difference(decode_manifest([hashed.manifest_bytes]),
                                           decode_manifest([after.manifest_bytes]))
            manifest_bytes = b"".join(encode_manifest(entries))
            _upload_files(sink, directory, entries)
            removes = [os.fsdecode(p) for p in gone]
        else:
            archive = run_with_progress("capture", lambda p: archive_tree(
                sink, directory, parent_entries=None, excludes=rules.capture_excludes(),
                progress=p), json_mode=json)
            manifest_bytes = archive.manifest_bytes
        manifest = store_manifest(sink, manifest_bytes)
        sink.flush()
    finally:
        sink.close()
        client.close()
    return {"manifest": [(c.hex(), n) for c, n in manifest],
            "manifest_id": content_id(manifest_bytes).hex(), "removes": removes,
            "uploaded_bytes": sink.payload_uploaded, "manifest_bytes": manifest_bytes}


def _upload_files(sink: object, root: Path, entries: list) -> None:
    """Send the chunks of an app layer's files (those the server lacks)."""
    from strata.model.entry import EntryType
    from strata.tree.scan import open_path

    for e in entries:
        if e.type is not EntryType.FILE or not e.chunks:
            continue
        fd = open_path(os.path.join(os.fsencode(root), e.path))
        with os.fdopen(fd, "rb") as f:
            for cid, n in e.chunks:
                sink.store_chunk(cid, f.read(n))  # type: ignore[attr-defined]


@layer_app.command("capture")
def capture(kind: str = typer.Option(..., "--kind", help="base, driver or app"),
            name: str = typer.Option(..., "--name"),
            version: str = typer.Option(..., "--version"),
            from_dir: Path | None = typer.Option(None, "--from-dir", help="A reference "
                                                 "machine's tree (for an app: after the "
                                                 "install)."),
            before_dir: Path | None = typer.Option(None, "--before-dir", help="App layer: "
                                                   "the same tree before the install."),
            from_endpoint: str | None = typer.Option(None, "--from-endpoint", help="A "
                                                     "centralized reference endpoint."),
            snapshot: str = typer.Option("latest", "--snapshot", help="With --from-endpoint:"
                                         " the snapshot to capture (app: after the install)."),
            before: str | None = typer.Option(None, "--before", help="App layer from an "
                                              "endpoint: its snapshot before the install."),
            match: str | None = typer.Option(None, "--match", help="Driver layers: "
                                             "vendor=GLOB,model=GLOB"),
            os_family: str = typer.Option("linux", "--os", help="linux or windows (rules "
                                          "for --from-dir)"),
            keys: Path | None = KEYS, passphrase_file: Path | None = PASSPHRASE_FILE,
            server: str | None = SERVER, admin_token_file: Path | None = TOKEN_FILE,
            json: bool = JSON) -> None:
    """Capture a layer from a reference machine (a directory or a centralized endpoint);
    with --keys, sign it too (agents take only signed layers)."""
    if (from_dir is None) == (from_endpoint is None):
        raise StrataError("capture --from-dir DIR or --from-endpoint ID")
    _choice(kind, LAYER_KINDS, "--kind")
    _choice(os_family, OS_FAMILIES, "--os")
    if not NAME_RE.fullmatch(name):
        raise StrataError(f"--name {name!r}: use letters, digits and . _ + - (e.g. corp-os)")
    if not VERSION_RE.fullmatch(version):
        raise StrataError(f"--version {version!r}: use letters, digits and . _ + ~ - "
                          "(e.g. 2 or 2024.1)")
    if kind == "driver" and not match:
        raise StrataError("a driver layer needs --match vendor=GLOB,model=GLOB (the "
                          "hardware it is for, e.g. vendor=Dell*,model=Latitude*)")
    if kind != "driver" and match:
        raise StrataError("--match is for driver layers only")
    if before_dir is not None and kind != "app":
        raise StrataError("--before-dir is for app layers only")
    body: dict = {"kind": kind, "name": name, "version": version, "os": os_family,
                  "match": _pairs(match, {"vendor", "model"}, "--match")}
    pub = publisher_for(server, admin_token_file, keys, passphrase_file, required=False)
    uploaded: bytes | None = None
    if from_dir is not None:
        if kind == "app" and before_dir is None:
            raise StrataError("an app layer is the difference between two trees: give "
                              "--before-dir (the reference machine before the install)")
        up = _upload_tree(server, admin_token_file, from_dir.resolve(), os_family,
                          before_dir.resolve() if before_dir else None, json)
        body.update(manifest=up["manifest"], manifest_id=up["manifest_id"],
                    removes=up["removes"], source=f"directory {from_dir.resolve()}"[:255])
        uploaded = up["manifest_bytes"]
    else:
        if kind == "app" and not before:
            raise StrataError("an app layer from an endpoint needs --before SNAPSHOT "
                              "(taken before the install)")
        body.update(endpoint=from_endpoint, snapshot=snapshot, before_snapshot=before or "")
    doc: dict = admin_call(server, admin_token_file, "POST", f"{API}/layers", body)  # type: ignore[assignment]
    if pub is not None:
        # What this capture asked for and uploaded is what gets signed: the server may
        # only have dropped entries (the layer rules) and, from an endpoint, chosen them.
        expect = {k: body[k] for k in ("kind", "name", "version", "match")}
        if uploaded is not None:
            expect.update(os=os_family, removes=body["removes"])
        doc["signed"] = signed_after(f"layer {doc['ref']}", lambda: pub.sign_layer(
            doc["ref"], expect, uploaded).serial)
    if json:
        print_json(doc)
        return
    console.print(f"captured {doc['kind']} layer {doc['ref']}: {doc['files']} files, "
                  f"{human_bytes(doc['bytes'])}", highlight=False)
    _say_signed(doc["ref"], doc.get("signed"))


def _say_signed(ref: str, serial: int | None) -> None:
    if serial:
        console.print(f"signed layer {ref} (serial {serial})", highlight=False)
    else:
        err_console.print(f"note: layer {ref} is not signed: agents refuse it until `strata "
                          f"layer sign {ref} --keys DIR`", highlight=False)


@layer_app.command("sign")
def layer_sign(ref: str = typer.Argument(..., help="NAME:VERSION"), keys: Path = KEYS,
               passphrase_file: Path | None = PASSPHRASE_FILE, server: str | None = SERVER,
               admin_token_file: Path | None = TOKEN_FILE, json: bool = JSON) -> None:
    """Sign a captured layer (one captured without --keys, or whose signing failed): its
    manifest is hashed here, as agents will receive it."""
    _ref(ref)
    if keys is None:
        raise StrataError("give --keys DIR (or set STRATA_SIGNING_KEYS)")
    pub = publisher_for(server, admin_token_file, keys, passphrase_file, required=True)
    assert pub is not None
    layer = pub.sign_layer(ref)
    if json:
        print_json({"ref": layer.ref, "serial": layer.serial,
                    "manifest": layer.manifest.model_dump()})
    else:
        _say_signed(layer.ref, layer.serial)


@layer_app.command("list")
def layer_list(kind: str | None = typer.Option(None, "--kind"), server: str | None = SERVER,
               admin_token_file: Path | None = TOKEN_FILE, json: bool = JSON) -> None:
    """List layers."""
    rows = admin_call(server, admin_token_file, "GET",
                      f"{API}/layers" + (f"?kind={_choice(kind, LAYER_KINDS, '--kind')}"
                                         if kind else ""))
    if json:
        print_json(rows)
        return
    table = Table("ID", "Kind", "Layer", "Files", "Size", "Match", "Source")
    for r in rows:  # type: ignore[union-attr]
        table.add_row(str(r["id"]), r["kind"], r["ref"], str(r["files"]),
                      human_bytes(r["bytes"]),
                      ",".join(f"{k}={v}" for k, v in r["match"].items()), r["source"])
    console.print(table)


@layer_app.command("show")
def layer_show(ref: str = typer.Argument(..., help="NAME:VERSION or id"),
               files: bool = typer.Option(False, "--files", help="List its paths."),
               server: str | None = SERVER, admin_token_file: Path | None = TOKEN_FILE,
               json: bool = JSON) -> None:
    """One layer: what it is, where it came from, who uses it."""
    doc = admin_call(server, admin_token_file, "GET",
                     f"{API}/layers/{path_part(_ref(ref), 'layer')}"
                     + ("?files=true" if files else ""))
    if json:
        print_json(doc)
        return
    for key in ("ref", "kind", "os", "files", "bytes", "source", "match", "created_at",
                "endpoints", "removes"):
        console.print(f"{key}: {doc[key]}", highlight=False)  # type: ignore[index]
    for p in doc.get("file_list", []):  # type: ignore[union-attr]
        console.print(p, highlight=False)


@layer_app.command("diff")
def layer_diff(a: str, b: str, server: str | None = SERVER,
               admin_token_file: Path | None = TOKEN_FILE, json: bool = JSON) -> None:
    """What changes between two layers (e.g. base v1 and v2)."""
    doc = admin_call(server, admin_token_file, "GET", f"{API}/layers/"
                     f"{path_part(_ref(a), 'layer')}/diff/{path_part(_ref(b), 'layer')}")
    if json:
        print_json(doc)
        return
    for mark, key in (("+", "added"), ("-", "removed"), ("M", "changed"), ("U", "metadata")):
        for p in doc[key]:  # type: ignore[index]
            console.print(f"{mark} {p}", highlight=False)
    c = doc["counts"]  # type: ignore[index]
    console.print(f"{c['added']} added, {c['removed']} removed, {c['changed']} changed, "
                  f"{c['metadata']} metadata only", highlight=False)


@layer_app.command("delete")
def layer_delete(ref: str, server: str | None = SERVER,
                 admin_token_file: Path | None = TOKEN_FILE, json: bool = JSON) -> None:
    """Delete a layer (refused while assigned, applied, or referenced by a snapshot)."""
    doc = admin_call(server, admin_token_file, "DELETE",
                     f"{API}/layers/{path_part(_ref(ref), 'layer')}")
    print_json(doc) if json else console.print(f"deleted {doc['deleted']}")  # type: ignore[index]


@layer_app.command("dry-run")
def layer_dry_run(endpoint: str = typer.Option(..., "--endpoint"),
                  base: str | None = typer.Option(None, "--base", help="NAME:VERSION"),
                  app: list[str] | None = typer.Option(None, "--app", help="NAME:VERSION"),
                  server: str | None = SERVER, admin_token_file: Path | None = TOKEN_FILE,
                  json: bool = JSON) -> None:
    """What an update would change on an endpoint, and every conflict, before doing it."""
    doc = admin_call(server, admin_token_file, "POST", f"{API}/layers/dry-run",
                     {"endpoint": endpoint, "base": base and _ref(base), "apps": _refs(app)})
    if json:
        print_json(doc)
        return
    c = doc["changes"]  # type: ignore[index]
    console.print(f"endpoint {doc['endpoint'][:8]} -> {', '.join(doc['layers'])}\n"  # type: ignore[index]
                  f"{c['add']} add, {c['replace']} replace, {c['meta']} metadata, "
                  f"{c['delete']} delete; writes {human_bytes(doc['bytes_to_write'])}; "  # type: ignore[index]
                  f"{doc['chunks_to_download']} chunks to download", highlight=False)  # type: ignore[index]
    if doc.get("held"):  # type: ignore[attr-defined]
        console.print(f"the update would be held: {doc['held']} conflict(s) to resolve "  # type: ignore[index]
                      "first (nothing is switched until then)", highlight=False)
    for conflict in doc["conflict_list"]:  # type: ignore[index]
        console.print(f"  {conflict['kind']}: {conflict['path']} ({conflict['detail']})",
                      highlight=False)


def assign(endpoint: list[str] | None = typer.Option(None, "--endpoint", help="Endpoint id "
                                                     "(repeatable)."),
           collection: str | None = typer.Option(None, "--collection"),
           all_: bool = typer.Option(False, "--all", help="Every active endpoint."),
           base: str | None = typer.Option(None, "--base", help="NAME:VERSION"),
           app: list[str] | None = typer.Option(None, "--app", help="NAME:VERSION "
                                                "(repeatable; replaces the app list)"),
           no_apps: bool = typer.Option(False, "--no-apps", help="Remove every app layer "
                                        "(the endpoints uninstall them at the next update)."),
           driver: list[str] | None = typer.Option(None, "--driver", help="Pin driver "
                                                   "layers instead of matching hardware."),
           enforce: bool | None = typer.Option(None, "--enforce/--no-enforce", help="Repair "
                                               "drift at every check-in."),
           keys: Path | None = KEYS, passphrase_file: Path | None = PASSPHRASE_FILE,
           server: str | None = SERVER, admin_token_file: Path | None = TOKEN_FILE,
           json: bool = JSON) -> None:
    """Assign layers to endpoints, a collection or all, signed with --keys; agents pick it
    up at check-in."""
    if no_apps and app:
        raise StrataError("--no-apps removes every app layer: give it or --app, not both")
    if base is None and app is None and driver is None and enforce is None and not no_apps:
        raise StrataError("nothing to assign: give --base, --app, --no-apps, --driver or "
                          "--enforce/--no-enforce")
    fields = {"base": base and _ref(base), "apps": [] if no_apps else _refs(app),
              "drivers": _refs(driver)}
    layered = base is not None or fields["apps"] is not None or driver is not None
    pub = publisher_for(server, admin_token_file, keys, passphrase_file, required=layered)
    if pub is not None:
        fields = signable_refs(pub, server, admin_token_file, fields)
    doc: dict = admin_call(server, admin_token_file, "POST", f"{API}/assign", {  # type: ignore[assignment]
        "endpoints": endpoint or [], "collection": collection or "", "all": all_,
        **fields, "enforce": enforce})
    if pub is not None and layered:
        doc["signed"] = signed_after("the assignment", lambda: pub.sign_assignments(
            _scopes(all_, collection, doc["endpoints"]), **fields))
    if json:
        print_json(doc)
    else:
        console.print(f"assigned to {len(doc['endpoints'])} endpoint(s)"
                      + (f", signed (metadata version {doc['signed']})"
                         if doc.get("signed") else ""), highlight=False)


def _scopes(all_: bool, collection: str | None,
            endpoints: list[str]) -> list[tuple[str, str, list[str] | None]]:
    """The signed assignment scopes of an assignment the server just made: all, the
    collection (its members as the server resolved them now), or each endpoint."""
    if all_:
        return [("all", "", None)]
    if collection:
        return [("collection", collection, list(endpoints))]
    return [("endpoint", e, [e]) for e in endpoints]


@collection_app.command("create")
def collection_create(name: str, endpoint: list[str] | None = typer.Option(
                          None, "--endpoint", help="Member endpoint (repeatable)."),
                      rule: str | None = typer.Option(None, "--rule", help="os=GLOB,vendor="
                                                      "GLOB,model=GLOB,tag=GLOB"),
                      server: str | None = SERVER, admin_token_file: Path | None = TOKEN_FILE,
                      json: bool = JSON) -> None:
    """Create or replace a collection of endpoints."""
    if not COLLECTION_RE.fullmatch(name):
        raise StrataError(f"collection name {name!r}: use letters, digits and . _ - "
                          "(e.g. lab)")
    pairs = _pairs(rule, {"os", "vendor", "model", "tag", "hostname"}, "--rule")
    if not pairs and not endpoint:
        raise StrataError("a collection needs --rule KEY=GLOB,… or --endpoint ID (repeatable)")
    doc = admin_call(server, admin_token_file, "POST", f"{API}/collections", {
        "name": name, "members": endpoint or [], "rule": pairs})
    if json:
        print_json(doc)
        return
    matched = doc.get("endpoints", doc["members"])  # type: ignore[union-attr,index]
    console.print(f"collection {name} saved: {len(matched)} endpoint(s) in it now",
                  highlight=False)


@collection_app.command("list")
def collection_list(server: str | None = SERVER, admin_token_file: Path | None = TOKEN_FILE,
                    json: bool = JSON) -> None:
    rows = admin_call(server, admin_token_file, "GET", f"{API}/collections")
    if json:
        print_json(rows)
        return
    table = Table("Name", "Rule", "Endpoints")
    for r in rows:  # type: ignore[union-attr]
        table.add_row(r["name"], ",".join(f"{k}={v}" for k, v in r["rule"].items()),
                      str(len(r["endpoints"])))
    console.print(table)


@collection_app.command("delete")
def collection_delete(name: str, server: str | None = SERVER,
                      admin_token_file: Path | None = TOKEN_FILE, json: bool = JSON) -> None:
    """Delete a collection (its endpoints keep their layers)."""
    doc = admin_call(server, admin_token_file, "DELETE",
                     f"{API}/collections/{path_part(name, 'collection')}")
    print_json(doc) if json else console.print(f"deleted collection {name}")


def compliance(endpoint: str | None = typer.Option(None, "--endpoint"),
               server: str | None = SERVER, admin_token_file: Path | None = TOKEN_FILE,
               json: bool = JSON) -> None:
    """Drift of each endpoint from its IT layers, with scores per endpoint and layer."""
    doc = admin_call(server, admin_token_file, "GET", f"{API}/compliance"
                     + (f"?endpoint={path_part(endpoint, 'endpoint id')}" if endpoint else ""))
    if json:
        print_json(doc)
        return
    table = Table("Endpoint", "Host", "Score", "Changed", "Missing", "Added")
    for r in doc["endpoints"]:  # type: ignore[index]
        if "score" not in r:
            table.add_row(r["endpoint"][:8], r["hostname"], r["state"], "", "", "")
            continue
        n = r["counts"]
        table.add_row(r["endpoint"][:8], r["hostname"], f"{r['score']}%", str(n["changed"]),
                      str(n["missing"]), str(n["added"]))
    console.print(table)
    for label, score in doc["layers"].items():  # type: ignore[index]
        console.print(f"layer {label}: {score}% compliant", highlight=False)
    if endpoint:
        for r in doc["endpoints"]:  # type: ignore[index]
            for key in ("changed", "missing", "added"):
                for p in r.get(key, []):
                    console.print(f"  {key}: {p}", highlight=False)


def migrate(collection: str | None = typer.Option(None, "--collection"),
            endpoint: list[str] | None = typer.Option(None, "--endpoint"),
            base: str | None = typer.Option(None, "--base", help="OS migration: NAME:VERSION"),
            driver: list[str] | None = typer.Option(None, "--driver", help="Hardware "
                                                    "migration: driver layer(s)."),
            keys: Path | None = KEYS, passphrase_file: Path | None = PASSPHRASE_FILE,
            server: str | None = SERVER, admin_token_file: Path | None = TOKEN_FILE,
            json: bool = JSON) -> None:
    """Re-base endpoints onto another base or driver layer, as a tracked task."""
    fields = {"base": base and _ref(base), "drivers": _refs(driver)}
    pub = publisher_for(server, admin_token_file, keys, passphrase_file, required=True)
    if pub is not None:
        fields = signable_refs(pub, server, admin_token_file, fields)
    doc: dict = admin_call(server, admin_token_file, "POST", f"{API}/migrate", {  # type: ignore[assignment]
        "collection": collection or "", "endpoints": endpoint or [], **fields})
    if pub is not None:
        members = [r["endpoint"] for r in doc["endpoints"]]
        doc["signed"] = signed_after(f"migration task {doc['id']}", lambda: pub.sign_assignments(
            _scopes(False, collection, members), **fields))
    print_json(doc) if json else _print_task(doc)


def _print_task(doc: dict) -> None:
    console.print(f"task {doc['id']} ({doc['kind']}): {doc['state']}, {doc['progress']}% "
                  "of endpoints done", highlight=False)
    for r in doc["endpoints"]:
        console.print(f"  {r['endpoint'][:8]} {r['hostname']}: {r['state']} "
                      f"{r['percent']}% {r['detail']}", highlight=False)


@task_app.command("list")
def task_list(server: str | None = SERVER, admin_token_file: Path | None = TOKEN_FILE,
              json: bool = JSON) -> None:
    rows = admin_call(server, admin_token_file, "GET", f"{API}/tasks")
    if json:
        print_json(rows)
        return
    for doc in rows:  # type: ignore[union-attr]
        _print_task(doc)


@task_app.command("show")
def task_show(task_id: int, server: str | None = SERVER,
              admin_token_file: Path | None = TOKEN_FILE, json: bool = JSON) -> None:
    doc = admin_call(server, admin_token_file, "GET", f"{API}/tasks/{task_id}")
    print_json(doc) if json else _print_task(doc)  # type: ignore[arg-type]


@endpoint_app.command("revert")
def endpoint_revert(endpoint: str, snapshot: str = typer.Option(..., "--snapshot"),
                    keep_user_apps: bool = typer.Option(False, "--keep-user-apps"),
                    keys: Path | None = KEYS, passphrase_file: Path | None = PASSPHRASE_FILE,
                    server: str | None = SERVER, admin_token_file: Path | None = TOKEN_FILE,
                    json: bool = JSON) -> None:
    """System layers back to a snapshot; the user's data stays as it is now."""
    pub = publisher_for(server, admin_token_file, keys, passphrase_file, required=True)
    doc: dict = admin_call(server, admin_token_file, "POST",  # type: ignore[assignment]
                           f"{API}/endpoints/{path_part(endpoint, 'endpoint id')}/revert",
                           {"snapshot": snapshot, "keep_user_apps": keep_user_apps})
    if pub is not None:
        doc["signed"] = signed_after("the revert", lambda: pub.sign_operation(
            doc["endpoint"], "revert", snapshot=doc["snapshot"]))
    print_json(doc) if json else console.print(
        f"revert of {doc['endpoint'][:8]} to {doc['snapshot'][:8]} assigned")  # type: ignore[index]


@endpoint_app.command("restore")
def endpoint_restore(endpoint: str, to_endpoint: str = typer.Option(..., "--to-endpoint"),
                     keys: Path | None = KEYS, passphrase_file: Path | None = PASSPHRASE_FILE,
                     server: str | None = SERVER, admin_token_file: Path | None = TOKEN_FILE,
                     json: bool = JSON) -> None:
    """Full restore of an endpoint's CVD onto new hardware (drivers chosen again)."""
    pub = publisher_for(server, admin_token_file, keys, passphrase_file, required=True)
    doc: dict = admin_call(server, admin_token_file, "POST",  # type: ignore[assignment]
                           f"{API}/endpoints/{path_part(endpoint, 'endpoint id')}/restore",
                           {"to_endpoint": to_endpoint})
    if pub is not None:
        doc["signed"] = signed_after("the restore", lambda: pub.sign_operation(
            doc["to"], "restore", snapshot=doc["snapshot"]))
    print_json(doc) if json else console.print(
        f"CVD of {doc['from'][:8]} moves to {doc['to'][:8]} (snapshot {doc['snapshot'][:8]})")  # type: ignore[index]


@endpoint_app.command("provision")
def endpoint_provision(endpoint: str, base: str = typer.Option(..., "--base"),
                       app: list[str] | None = typer.Option(None, "--app"),
                       keys: Path | None = KEYS, passphrase_file: Path | None = PASSPHRASE_FILE,
                       server: str | None = SERVER, admin_token_file: Path | None = TOKEN_FILE,
                       json: bool = JSON) -> None:
    """Wipe an endpoint's system and lay down layers; it then starts a fresh CVD."""
    fields = {"base": _ref(base), "apps": _refs(app) or []}
    pub = publisher_for(server, admin_token_file, keys, passphrase_file, required=True)
    if pub is not None:
        fields = signable_refs(pub, server, admin_token_file, fields)
    doc: dict = admin_call(server, admin_token_file, "POST",  # type: ignore[assignment]
                           f"{API}/endpoints/{path_part(endpoint, 'endpoint id')}/provision",
                           fields)
    if pub is not None:
        doc["signed"] = signed_after("the provisioning", lambda: pub.sign_operation(
            doc["endpoint"], "provision", **fields))
    print_json(doc) if json else console.print(f"provisioning of {doc['endpoint'][:8]} assigned")  # type: ignore[index]


@endpoint_app.command("tag")
def endpoint_tag(endpoint: str, tags: list[str], server: str | None = SERVER,
                 admin_token_file: Path | None = TOKEN_FILE, json: bool = JSON) -> None:
    """Set an endpoint's tags (used by collection rules)."""
    doc = admin_call(server, admin_token_file, "PUT",
                     f"{API}/endpoints/{path_part(endpoint, 'endpoint id')}/tags",
                     {"tags": tags})
    print_json(doc) if json else console.print(f"tags: {', '.join(doc['tags'])}")  # type: ignore[index]
