"""Layer commands (`strata layer …`, `strata assign`, `strata collection …`,
`strata compliance`, `strata migrate`, `strata task …`): thin clients of the server's
admin API. The operations on one endpoint are in `endpoint.py`."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.table import Table

from strata.errors import StrataError
from strata.model.names import COLLECTION_NAME, LAYER_KINDS, OS_FAMILIES

from .admin_args import (
    JSON,
    NAME_RE,
    SERVER,
    TOKEN_FILE,
    VERSION_RE,
    client,
    layer_ref,
    layer_refs,
    print_model,
)
from .confirm import YES, confirm
from .output import (
    clean,
    console,
    count_tree,
    err_console,
    human_bytes,
    iso_time,
    print_json,
    run_with_progress,
)
from .signing import KEYS, PASSPHRASE_FILE, publisher_for, signable_refs, signed_after

if TYPE_CHECKING:
    from strata.model.admin import TaskInfo

    from .admin_client import AdminClient

layer_app = typer.Typer(help="Base images, driver sets and application layers.",
                        no_args_is_help=True)
collection_app = typer.Typer(help="Collections of endpoints (by name or by rule).",
                             no_args_is_help=True)
task_app = typer.Typer(help="Tracked operations (assignments, migrations, reverts and "
                        "provisioning of a collection): list, show, cancel, retry.",
                        no_args_is_help=True)
# The shape the server accepts, checked here first for a clear message.
COLLECTION_RE = re.compile(COLLECTION_NAME)


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


def _upload_tree(api: AdminClient, directory: Path, family: str, before: Path | None,
                 json: bool) -> dict:
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

    from .admin_client import API

    for d in (directory, before):
        if d is not None and not d.is_dir():
            raise StrataError(f"{d} is not a directory")
    cfg = api.capture_config(family)
    rules = LayerRules.from_doc(cfg.rules, family)
    server = ServerClient(api.server, api.token, verify=api.verify)
    sink = RemoteSink(server, cfg.chunker, api=API)
    hash_only = HashOnlySink(sink.chunker)  # the same cut points as the upload
    try:
        removes: list[str] = []
        if before is not None:
            hashed = archive_tree(hash_only, before, parent_entries=None,
                                  excludes=rules.capture_excludes())
            after = run_with_progress("scan", lambda p: archive_tree(
                hash_only, directory, parent_entries=None,
                excludes=rules.capture_excludes(), progress=p),
                counter=lambda p: count_tree(str(directory), p), json_mode=json)
            entries, gone = app_difference(decode_manifest([hashed.manifest_bytes]),
                                           decode_manifest([after.manifest_bytes]))
            manifest_bytes = b"".join(encode_manifest(entries, stat_keys=False))
            _upload_files(sink, directory, entries)
            removes = [os.fsdecode(p) for p in gone]
        else:
            archive = run_with_progress("capture", lambda p: archive_tree(
                sink, directory, parent_entries=None, excludes=rules.capture_excludes(),
                progress=p, stat_keys=False), counter=lambda p: count_tree(str(directory), p),
                json_mode=json)
            manifest_bytes = archive.manifest_bytes
        manifest = store_manifest(sink, manifest_bytes)
        sink.flush()
    finally:
        sink.close()
        server.close()
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
    from strata.model.admin import LayerCaptureRequest

    from .admin_client import build

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
    api = client(server, admin_token_file)
    fields: dict = {"kind": kind, "name": name, "version": version, "os": os_family,
                    "match": _pairs(match, {"vendor", "model"}, "--match")}
    pub = publisher_for(server, admin_token_file, keys, passphrase_file, required=False)
    uploaded: bytes | None = None
    if from_dir is not None:
        if kind == "app" and before_dir is None:
            raise StrataError("an app layer is the difference between two trees: give "
                              "--before-dir (the reference machine before the install)")
        up = _upload_tree(api, from_dir.resolve(), os_family,
                          before_dir.resolve() if before_dir else None, json)
        fields.update(manifest=up["manifest"], manifest_id=up["manifest_id"],
                      removes=up["removes"], source=f"directory {from_dir.resolve()}"[:255])
        uploaded = up["manifest_bytes"]
    else:
        if kind == "app" and not before:
            raise StrataError("an app layer from an endpoint needs --before SNAPSHOT "
                              "(taken before the install)")
        fields.update(endpoint=from_endpoint, snapshot=snapshot, before_snapshot=before or "")
    doc = api.capture_layer(build(LayerCaptureRequest, **fields))
    serial = None
    if pub is not None:
        # What this capture asked for and uploaded is what gets signed: the server may
        # only have dropped entries (the layer rules) and, from an endpoint, chosen them.
        expect = {k: fields[k] for k in ("kind", "name", "version", "match")}
        if uploaded is not None:
            expect.update(os=os_family, removes=fields["removes"])
        serial = signed_after(f"layer {doc.ref}", lambda: pub.sign_layer(
            doc.ref, expect, uploaded).serial)
    if json:
        print_json({**doc.model_dump(mode="json"), "signed": serial})
        return
    console.print(f"captured {doc.kind} layer {doc.ref}: {doc.files} files, "
                  f"{human_bytes(doc.bytes)}", highlight=False)
    _say_signed(doc.ref, serial)


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
    layer_ref(ref)
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
    rows = client(server, admin_token_file).layers(
        _choice(kind, LAYER_KINDS, "--kind") if kind else None)
    if json:
        print_model(rows)
        return
    table = Table("ID", "Kind", "Layer", "Files", "Size", "Match", "Source")
    for r in rows:
        table.add_row(str(r.id), r.kind, r.ref, str(r.files), human_bytes(r.bytes),
                      ",".join(f"{k}={v}" for k, v in r.match.items()), r.source)
    console.print(table)


@layer_app.command("show")
def layer_show(ref: str = typer.Argument(..., help="NAME:VERSION or id"),
               files: bool = typer.Option(False, "--files", help="List its paths."),
               server: str | None = SERVER, admin_token_file: Path | None = TOKEN_FILE,
               json: bool = JSON) -> None:
    """One layer: what it is, where it came from, who uses it."""
    from strata.model.admin import LayerDetailWithFiles

    from .admin_client import as_json

    doc = client(server, admin_token_file).layer(layer_ref(ref), files)
    if json:
        print_model(doc)
        return
    shown: dict = as_json(doc)  # type: ignore[assignment]  # values as the API writes them
    for key in ("ref", "kind", "os", "files", "bytes", "source", "match", "created_at",
                "endpoints", "removes"):
        console.print(f"{key}: {_plain(key, shown[key])}", markup=False, highlight=False)
    if isinstance(doc, LayerDetailWithFiles):
        for p in doc.file_list:
            console.print(p, highlight=False)


def _plain(key: str, value: object) -> str:
    """A value as a person reads it, not as Python writes it."""
    if key == "bytes" and isinstance(value, int):
        return human_bytes(value)
    if key == "created_at":
        return iso_time(value)  # type: ignore[arg-type]
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "-"
    return str(value)


@layer_app.command("diff")
def layer_diff(a: str, b: str, server: str | None = SERVER,
               admin_token_file: Path | None = TOKEN_FILE, json: bool = JSON) -> None:
    """What changes between two layers (e.g. base v1 and v2)."""
    doc = client(server, admin_token_file).diff_layers(layer_ref(a), layer_ref(b))
    if json:
        print_model(doc)
        return
    for mark, paths in (("+", doc.added), ("-", doc.removed), ("M", doc.changed),
                        ("U", doc.metadata)):
        for p in paths:
            console.print(f"{mark} {p}", highlight=False)
    c = doc.counts
    console.print(f"{c.added} added, {c.removed} removed, {c.changed} changed, "
                  f"{c.metadata} metadata only", highlight=False)


@layer_app.command("delete")
def layer_delete(ref: str, yes: bool = YES, server: str | None = SERVER,
                 admin_token_file: Path | None = TOKEN_FILE, json: bool = JSON) -> None:
    """Delete a layer (refused while assigned, applied, or referenced by a snapshot);
    asks first (--yes for scripts)."""
    api = client(server, admin_token_file)
    if not yes:
        info = api.layer(layer_ref(ref))
        confirm(f"delete layer {info.ref} ({info.kind})", [
            f"{info.files} files, {human_bytes(info.bytes)}, captured "
            f"{iso_time(info.created_at)} from {info.source}: capturing it again "
            "is the only way back"], yes=yes)
    doc = api.delete_layer(layer_ref(ref))
    print_model(doc) if json else console.print(f"deleted {doc.deleted}")


@layer_app.command("export")
def layer_export(ref: str, file: Path = typer.Argument(..., help="The bundle to write."),
                 yes: bool = YES, server: str | None = SERVER,
                 admin_token_file: Path | None = TOKEN_FILE, json: bool = JSON) -> None:
    """Write every chunk of a layer to FILE (a chunk bundle), to seed a branch
    reflector's cache offline: `strata reflector import FILE` on the reflector."""
    if file.exists():
        confirm(f"overwrite {file}", [f"{file}: {file.stat().st_size} bytes"], yes=yes)
    written = client(server, admin_token_file).export_layer(layer_ref(ref), file)
    if json:
        print_model({"layer": ref, "file": str(file), "bytes": written})
    else:
        console.print(f"exported layer {ref} to {file} ({human_bytes(written)})",
                      markup=False, highlight=False)


@layer_app.command("dry-run")
def layer_dry_run(endpoint: str = typer.Option(..., "--endpoint"),
                  base: str | None = typer.Option(None, "--base", help="NAME:VERSION"),
                  app: list[str] | None = typer.Option(None, "--app", help="NAME:VERSION"),
                  server: str | None = SERVER, admin_token_file: Path | None = TOKEN_FILE,
                  json: bool = JSON) -> None:
    """What an update would change on an endpoint, and every conflict, before doing it."""
    from strata.model.admin import DryRunRequest

    from .admin_client import build

    req = build(DryRunRequest, endpoint=endpoint, base=base and layer_ref(base),
                apps=layer_refs(app))
    doc = client(server, admin_token_file).dry_run(req)
    if json:
        print_model(doc)
        return
    c = doc.changes
    console.print(f"endpoint {doc.endpoint[:8]} -> {', '.join(doc.layers)}\n"
                  f"{c.get('add', 0)} add, {c.get('replace', 0)} replace, "
                  f"{c.get('meta', 0)} metadata, {c.get('delete', 0)} delete; writes "
                  f"{human_bytes(doc.bytes_to_write)}; {doc.chunks_to_download} chunks to "
                  "download", highlight=False)
    if doc.held:
        console.print(f"the update would be held: {doc.held} conflict(s) to resolve "
                      "first (nothing is switched until then)", highlight=False)
    for conflict in doc.conflict_list:
        console.print(f"  {conflict.kind}: {conflict.path} ({conflict.detail})",
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
    from strata.model.admin import AssignRequest

    from .admin_client import build

    if no_apps and app:
        raise StrataError("--no-apps removes every app layer: give it or --app, not both")
    if base is None and app is None and driver is None and enforce is None and not no_apps:
        raise StrataError("nothing to assign: give --base, --app, --no-apps, --driver or "
                          "--enforce/--no-enforce")
    fields: dict[str, Any] = {"base": base and layer_ref(base),
                              "apps": [] if no_apps else layer_refs(app),
                              "drivers": layer_refs(driver)}
    layered = any(v is not None for v in fields.values())
    pub = publisher_for(server, admin_token_file, keys, passphrase_file, required=layered)
    if pub is not None:
        fields = signable_refs(pub, server, admin_token_file, fields)
    req = build(AssignRequest, endpoints=endpoint or [], collection=collection or "",
                all=all_, enforce=enforce, **fields)
    doc = client(server, admin_token_file).assign(req)
    signed = None
    if pub is not None and layered:
        signed = signed_after("the assignment", lambda: pub.sign_assignments(
            _scopes(all_, collection, doc.endpoints), base=fields["base"],
            apps=fields["apps"], drivers=fields["drivers"]))
    if json:
        print_json({**doc.model_dump(mode="json"), "signed": signed})
    else:
        console.print(f"assigned to {len(doc.endpoints)} endpoint(s)"
                      + (f", signed (metadata version {signed})" if signed else "")
                      + (f"; task {doc.task} (`strata task show {doc.task}`)"
                         if doc.task is not None else ""), highlight=False)


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
    from strata.model.admin import CollectionRequest

    from .admin_client import build

    if not COLLECTION_RE.fullmatch(name):
        raise StrataError(f"collection name {name!r}: use letters, digits and . _ - "
                          "(e.g. lab)")
    pairs = _pairs(rule, {"os", "vendor", "model", "tag", "hostname"}, "--rule")
    if not pairs and not endpoint:
        raise StrataError("a collection needs --rule KEY=GLOB,… or --endpoint ID (repeatable)")
    doc = client(server, admin_token_file).save_collection(
        build(CollectionRequest, name=name, members=endpoint or [], rule=pairs))
    if json:
        print_model(doc)
        return
    console.print(f"collection {name} saved: {len(doc.endpoints)} endpoint(s) in it now",
                  highlight=False)


@collection_app.command("list")
def collection_list(server: str | None = SERVER, admin_token_file: Path | None = TOKEN_FILE,
                    json: bool = JSON) -> None:
    rows = client(server, admin_token_file).collections()
    if json:
        print_model(rows)
        return
    table = Table("Name", "Rule", "Endpoints")
    for r in rows:
        table.add_row(r.name, ",".join(f"{k}={v}" for k, v in r.rule.items()),
                      str(len(r.endpoints)))
    console.print(table)


@collection_app.command("delete")
def collection_delete(name: str, server: str | None = SERVER,
                      admin_token_file: Path | None = TOKEN_FILE, json: bool = JSON) -> None:
    """Delete a collection (its endpoints keep their layers)."""
    doc = client(server, admin_token_file).delete_collection(name)
    print_model(doc) if json else console.print(f"deleted collection {name}")


def compliance(endpoint: str | None = typer.Option(None, "--endpoint"),
               server: str | None = SERVER, admin_token_file: Path | None = TOKEN_FILE,
               json: bool = JSON) -> None:
    """Drift of each endpoint from its IT layers, with scores per endpoint and layer: as
    its agent last measured its live tree, or as its latest snapshot shows, whichever is
    newer. Exit code 1 when any endpoint drifts, as `store check` does when it finds
    damage."""
    from strata.model.admin import EndpointCompliance

    doc = client(server, admin_token_file).compliance(endpoint)
    drifting = any(isinstance(r, EndpointCompliance) and r.drift for r in doc.endpoints)
    if json:
        print_model(doc)
        if drifting:
            raise typer.Exit(1)
        return
    # Drift is measured on the live tree (by the agent) or from the latest snapshot,
    # whichever is newer: say which, and how old it is.
    table = Table("Endpoint", "Host", "Score", "Changed", "Missing", "Added", "As of",
                  "From")
    for r in doc.endpoints:
        if not isinstance(r, EndpointCompliance):
            table.add_row(r.endpoint[:8], r.hostname, r.state, "", "", "", "", "")
            continue
        n = r.counts
        table.add_row(r.endpoint[:8], r.hostname, f"{r.score}%", str(n.changed),
                      str(n.missing), str(n.added),
                      iso_time(r.measured_at or r.snapshot_time),
                      "live tree" if r.source == "live" else f"snapshot {r.snapshot[:8]}")
    console.print(table)
    for label, score in doc.layers.items():
        console.print(f"layer {label}: {score}% compliant", highlight=False)
    if endpoint:
        for r in doc.endpoints:
            if isinstance(r, EndpointCompliance):
                for key, paths in (("changed", r.changed), ("missing", r.missing),
                                   ("added", r.added)):
                    for p in paths:
                        console.print(f"  {key}: {p}", highlight=False)
    if drifting:
        raise typer.Exit(1)


def migrate(collection: str | None = typer.Option(None, "--collection"),
            endpoint: list[str] | None = typer.Option(None, "--endpoint"),
            base: str | None = typer.Option(None, "--base", help="OS migration: NAME:VERSION"),
            driver: list[str] | None = typer.Option(None, "--driver", help="Hardware "
                                                    "migration: driver layer(s)."),
            keys: Path | None = KEYS, passphrase_file: Path | None = PASSPHRASE_FILE,
            server: str | None = SERVER, admin_token_file: Path | None = TOKEN_FILE,
            json: bool = JSON) -> None:
    """Re-base endpoints onto another base or driver layer, as a tracked task (signed
    with --keys)."""
    from strata.model.admin import MigrateRequest

    from .admin_client import build

    fields: dict[str, Any] = {"base": base and layer_ref(base), "drivers": layer_refs(driver)}
    pub = publisher_for(server, admin_token_file, keys, passphrase_file, required=True)
    if pub is not None:
        fields = signable_refs(pub, server, admin_token_file, fields)
    req = build(MigrateRequest, collection=collection or "", endpoints=endpoint or [],
                **fields)
    doc = client(server, admin_token_file).migrate(req)
    signed = None
    if pub is not None:
        members = [r.endpoint for r in doc.endpoints]
        signed = signed_after(f"migration task {doc.id}", lambda: pub.sign_assignments(
            _scopes(False, collection, members), base=fields["base"],
            drivers=fields["drivers"]))
    if json:
        print_json({**doc.model_dump(mode="json"), "signed": signed})
    else:
        _print_task(doc)


def _print_task(doc: TaskInfo) -> None:
    size = doc.size or len(doc.endpoints)
    counts = ", ".join(f"{n} {state}" for state, n in sorted(doc.counts.items()))
    console.print(f"task {doc.id} ({doc.kind}): {doc.state}, {doc.progress}% of {size} "
                  f"endpoint(s) done" + (f" ({counts})" if counts else ""), highlight=False)
    for r in doc.endpoints:
        again = f" (attempt {r.attempts})" if r.attempts > 1 else ""
        console.print(f"  {r.endpoint[:8]} {clean(r.hostname)}: {r.state} {r.percent}%"
                      f"{again} {clean(r.detail)}".rstrip(), highlight=False)


@task_app.command("list")
def task_list(server: str | None = SERVER, admin_token_file: Path | None = TOKEN_FILE,
              json: bool = JSON) -> None:
    """Every task, oldest first, with its endpoints counted by state."""
    rows = client(server, admin_token_file).tasks()
    if json:
        print_model(rows)
        return
    table = Table("Task", "Kind", "Created", "Endpoints", "State", "Done", "By state")
    for doc in rows:
        table.add_row(str(doc.id), doc.kind, iso_time(doc.created_at), str(doc.size),
                      doc.state, f"{doc.progress:.0f}%",
                      ", ".join(f"{n} {k}" for k, n in sorted(doc.counts.items())))
    console.print(table)


@task_app.command("show")
def task_show(task_id: int, server: str | None = SERVER,
              admin_token_file: Path | None = TOKEN_FILE, json: bool = JSON) -> None:
    """A task and each endpoint's progress."""
    doc = client(server, admin_token_file).task(task_id)
    print_model(doc) if json else _print_task(doc)


def _members(api: AdminClient, collection: str | None, endpoints: list[str] | None) -> list[str]:
    """What a task over a collection or endpoints will touch, for the confirmation."""
    if collection:
        found = [c for c in api.collections() if c.name == collection]
        if not found:
            raise StrataError(f"no collection {collection!r}")
        ids = found[0].endpoints
    else:
        ids = endpoints or []
    return [f"{clean((d := api.endpoint(e)).hostname)} ({d.id[:8]})" for e in ids]


@task_app.command("revert")
def task_revert(collection: str | None = typer.Option(None, "--collection"),
                endpoint: list[str] | None = typer.Option(None, "--endpoint"),
                snapshot: str = typer.Option("pre-update", "--snapshot", help="Each "
                                             "endpoint's pre-update (the newest taken "
                                             "before an update) or latest snapshot."),
                keep_user_apps: bool = typer.Option(False, "--keep-user-apps"),
                keys: Path | None = KEYS, passphrase_file: Path | None = PASSPHRASE_FILE,
                yes: bool = YES, server: str | None = SERVER,
                admin_token_file: Path | None = TOKEN_FILE, json: bool = JSON) -> None:
    """Revert a collection (or endpoints) as one tracked task: each endpoint's system back
    to its own snapshot, today's user data kept (signed with --keys). Asks first."""
    from strata.model.admin import MassRevertRequest

    from .admin_client import build

    if snapshot not in ("pre-update", "latest"):
        raise StrataError(f"--snapshot is pre-update or latest for a task; got {snapshot!r} "
                          "(`strata endpoint revert ID --snapshot S` takes a snapshot id)")
    api = client(server, admin_token_file)
    req = build(MassRevertRequest, collection=collection or "", endpoints=endpoint or [],
                snapshot=snapshot, keep_user_apps=keep_user_apps)
    if not yes:
        confirm(f"revert each endpoint to its {snapshot} snapshot (system files and "
                f"{'' if keep_user_apps else 'user '}applications back as they were then; "
                "user data kept as it is now)", _members(api, collection, endpoint), yes=yes)
    pub = publisher_for(server, admin_token_file, keys, passphrase_file, required=True)
    doc = api.revert_task(req)
    signed = None
    if pub is not None:
        signed = signed_after(f"revert task {doc.id}", lambda: pub.sign_operations(
            [r.endpoint for r in doc.endpoints], "revert"))
    if json:
        print_json({**doc.model_dump(mode="json"), "signed": signed})
    else:
        _print_task(doc)


@task_app.command("provision")
def task_provision(collection: str | None = typer.Option(None, "--collection"),
                   endpoint: list[str] | None = typer.Option(None, "--endpoint"),
                   base: str = typer.Option(..., "--base"),
                   app: list[str] | None = typer.Option(None, "--app"),
                   keys: Path | None = KEYS, passphrase_file: Path | None = PASSPHRASE_FILE,
                   yes: bool = YES, server: str | None = SERVER,
                   admin_token_file: Path | None = TOKEN_FILE, json: bool = JSON) -> None:
    """Provision a collection (or endpoints) from layers as one tracked task: each is
    wiped but for its identity, user data too (signed with --keys). Asks first."""
    from strata.model.admin import MassProvisionRequest

    from .admin_client import build

    fields: dict[str, Any] = {"base": layer_ref(base), "apps": layer_refs(app) or []}
    api = client(server, admin_token_file)
    if not yes:
        confirm("provision each endpoint: everything on it but its identity is wiped "
                "(system, applications, user data); its snapshots stay on the server",
                _members(api, collection, endpoint), yes=yes)
    pub = publisher_for(server, admin_token_file, keys, passphrase_file, required=True)
    if pub is not None:
        fields = signable_refs(pub, server, admin_token_file, fields)
    doc = api.provision_task(build(MassProvisionRequest, collection=collection or "",
                                   endpoints=endpoint or [], **fields))
    signed = None
    if pub is not None:
        signed = signed_after(f"provisioning task {doc.id}", lambda: pub.sign_operations(
            [r.endpoint for r in doc.endpoints], "provision", base=fields["base"],
            apps=fields["apps"]))
    if json:
        print_json({**doc.model_dump(mode="json"), "signed": signed})
    else:
        _print_task(doc)


@task_app.command("cancel")
def task_cancel(task_id: int, yes: bool = YES, server: str | None = SERVER,
                admin_token_file: Path | None = TOKEN_FILE, json: bool = JSON) -> None:
    """Skip the endpoints that have not started (their assignment goes back to what it
    was); those already downloading or applying finish."""
    api = client(server, admin_token_file)
    doc = api.task(task_id)
    waiting = [r for r in doc.endpoints if r.state == "assigned"]
    confirm(f"cancel task {task_id} ({doc.kind}): {len(waiting)} endpoint(s) not started "
            "go back to their previous assignment",
            [f"{r.endpoint[:8]} {r.hostname}" for r in waiting], yes=yes)
    doc = api.cancel_task(task_id)
    print_model(doc) if json else _print_task(doc)


@task_app.command("retry")
def task_retry(task_id: int, server: str | None = SERVER,
               admin_token_file: Path | None = TOKEN_FILE, json: bool = JSON) -> None:
    """Queue the task's failed and cancelled endpoints again."""
    doc = client(server, admin_token_file).retry_task(task_id)
    print_model(doc) if json else _print_task(doc)
