"""`strata store …`: the single-instance store as a standalone backup tool.

Each command turns its arguments into one library call and its result into a Rich
table or, with --json, a JSON document.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from strata.engine import prune as prune_mod
from strata.engine.backup import backup as run_backup
from strata.engine.check import check as run_check
from strata.engine.diff import diff_snapshots
from strata.engine.restore import normalize_include
from strata.engine.restore import restore as run_restore
from strata.engine.retention import RetentionPolicy, SnapshotInfo, apply_policy
from strata.engine.snapshot_tree import SnapshotTree
from strata.engine.stats import store_stats
from strata.errors import PathNotInSnapshot, StrataError
from strata.model.entry import Entry, EntryType
from strata.store.location import init_store_at, open_store_at
from strata.store.repository import Store

from .mount import ALLOW_OTHER_HELP, CACHE_SIZE_HELP, preflight, serve_mount
from .output import (
    console,
    count_tree,
    err_console,
    human_bytes,
    iso_time,
    print_json,
    run_with_progress,
    safe,
)

app = typer.Typer(help="The deduplicating, snapshotting store (usable on its own for backup).",
                  no_args_is_help=True)

JSON = typer.Option(False, "--json", help="Print a JSON document instead of a table.")
PASSFILE = typer.Option(None, "--passphrase-file", envvar="STRATA_PASSPHRASE_FILE",
                        help="File holding the store passphrase (or set STRATA_PASSPHRASE).")
StoreDir = typer.Argument(..., help="The store: a directory, or s3://BUCKET/PREFIX.")
STATE = typer.Option(None, "--state", help="For a store on an object store: the directory "
                     "of its local working state (index, locks), shared by every process "
                     "that writes to it (a server's is DATA/store-state).")
FULL_METADATA = typer.Option(
    False, "--full-metadata", help="Also restore device nodes, setuid/setgid bits and "
    "security.*/trusted.* xattrs (file capabilities): only for a tree to boot or serve as "
    "a system, never for a snapshot you do not trust.")


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]i?B?|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise typer.BadParameter(f"not a size: {text!r} (e.g. 64KiB, 16MiB)")
    unit = (m.group(2) or "B").upper().rstrip("B").rstrip("I")
    return int(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[unit]


def get_passphrase(passfile: Path | None, *, confirm: bool = False) -> str | None:
    if passfile is not None:
        try:
            return passfile.read_text().rstrip("\n")
        except OSError as exc:
            raise StrataError(f"cannot read passphrase file {passfile}: {exc.strerror}") from None
    if "STRATA_PASSPHRASE" in os.environ:
        return os.environ["STRATA_PASSPHRASE"]
    if sys.stdin.isatty():
        return typer.prompt("Store passphrase", hide_input=True,
                            confirmation_prompt=confirm)
    return None


def open_store(location: str, passfile: Path | None, state: Path | None) -> Store:
    """Endpoint, region and credentials of an object store come from the usual AWS
    variables (AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, ...)."""
    return open_store_at(location, state, lambda: get_passphrase(passfile))


@app.command()
def init(store_dir: str = StoreDir, state: Path | None = STATE,
         chunk_avg: str = typer.Option("64KiB", help="Average chunk size (power of two)."),
         compression: str = typer.Option("zstd:3", help="zstd:LEVEL or none."),
         encrypt: bool = typer.Option(False, help="Encrypt at rest (AES-256-GCM, scrypt key)."),
         pack_size: str = typer.Option("16MiB", help="Target pack size."),
         passfile: Path | None = PASSFILE, json: bool = JSON) -> None:
    """Create a new, empty store."""
    passphrase = None
    if encrypt:
        passphrase = get_passphrase(passfile, confirm=True)
        if not passphrase:
            raise StrataError("--encrypt needs a passphrase (STRATA_PASSPHRASE, "
                              "--passphrase-file, or a terminal to type it)")
    try:
        avg = parse_size(chunk_avg)
        store = init_store_at(store_dir, state, chunk_avg=avg, compression=compression,
                              passphrase=passphrase, pack_size=parse_size(pack_size))
    except ValueError as exc:
        raise StrataError(str(exc)) from None
    doc = {"store": str(store_dir), "id": store.config.id, "chunk_avg": avg,
           "compression": store.config.compression, "encryption": store.config.encryption}
    store.close()
    if json:
        print_json(doc)
    else:
        console.print(f"created store {store.config.id[:8]} at {store_dir} "
                      f"({doc['encryption']}, {doc['compression']})")


@app.command()
def backup(store_dir: str = StoreDir, state: Path | None = STATE,
           source: Path = typer.Argument(..., help="Directory to back up."),
           tag: list[str] = typer.Option([], "--tag", help="Tag the snapshot (repeatable)."),
           exclude: list[str] = typer.Option([], "--exclude", help="Pattern to skip."),
           one_file_system: bool = typer.Option(
               False, "--one-file-system", "-x", help="Stay on SOURCE's file system: "
               "mount points inside it are kept, empty."),
           passfile: Path | None = PASSFILE, json: bool = JSON) -> None:
    """Back up SOURCE; prints the new snapshot id."""
    with open_store(store_dir, passfile, state) as store:
        result = run_with_progress(
            "backup", lambda p: run_backup(store, source, tags=tag, excludes=exclude,
                                           progress=p, one_file_system=one_file_system),
            counter=lambda p: count_tree(str(source), p), json_mode=json)
    if json:
        print_json(result.to_dict())
        return
    for err in result.errors:
        console.print(f"[yellow]warning:[/] {safe(err)}", markup=True)
    for mount in result.mounts_skipped:
        console.print(f"not crossed into another file system: {mount}", markup=False,
                      highlight=False)
    console.print(
        f"snapshot [bold]{safe(result.snapshot[:8])}[/] saved: {result.files} files "
        f"({result.files_new} new, {result.files_changed} changed, "
        f"{result.files_unmodified} unmodified), read {human_bytes(result.bytes_read)}, "
        f"added {human_bytes(result.bytes_new)} ({human_bytes(result.bytes_stored)} stored) "
        f"in {result.seconds:.1f}s", markup=True)


@app.command()
def snapshots(store_dir: str = StoreDir, state: Path | None = STATE,
              passfile: Path | None = PASSFILE,
              json: bool = JSON) -> None:
    """List snapshots, oldest first."""
    damaged: list[str] = []
    with open_store(store_dir, passfile, state) as store:
        snaps = store.snapshots(damaged)
    for sid in damaged:
        err_console.print(f"[yellow]warning:[/] snapshot {safe(sid[:8])} is damaged and not "
                          "listed (see `strata store check`)", markup=True, highlight=False)
    if json:
        print_json([{"id": s.id, "time": s.time, "host": s.host, "paths": s.paths,
                     "tags": s.tags, "parent": s.parent, "trigger": s.trigger,
                     "files": s.stats.get("files"), "bytes": s.stats.get("bytes_total")}
                    for s in snaps])
        return
    table = Table("ID", "Time", "Host", "Tags", "Paths", "Files", "Size")
    for s in snaps:
        table.add_row(s.short_id, iso_time(s.datetime), s.host,
                      ",".join(s.tags), " ".join(s.paths), str(s.stats.get("files", "")),
                      human_bytes(s.stats.get("bytes_total", 0)))
    console.print(table)
    console.print(f"{len(snaps)} snapshot(s)")


def _mode_string(e: Entry) -> str:
    kind = {EntryType.DIR: "d", EntryType.SYMLINK: "l", EntryType.FIFO: "p",
            EntryType.CHARDEV: "c", EntryType.BLOCKDEV: "b"}.get(e.type, "-")
    bits = "".join(ch if e.mode & (1 << (8 - i)) else "-" for i, ch in enumerate("rwxrwxrwx"))
    return kind + bits


def _entry_doc(e: Entry) -> dict:
    return {"path": os.fsdecode(e.path), "type": e.type.name.lower(), "mode": f"{e.mode:04o}",
            "uid": e.uid, "gid": e.gid, "size": e.size, "mtime_ns": e.mtime_ns,
            "link_target": os.fsdecode(e.link_target) if e.link_target else None}


@app.command("ls")
def ls_cmd(store_dir: str = StoreDir, state: Path | None = STATE,
           snapshot: str = typer.Argument(...),
           path: str = typer.Argument("", help="Only entries under this path."),
           passfile: Path | None = PASSFILE, json: bool = JSON) -> None:
    """List the entries of a snapshot."""
    prefix = normalize_include(path) if path.strip("/") else b""
    with open_store(store_dir, passfile, state) as store:
        snap = store.resolve_snapshot(snapshot)
        entries = [e for e in store.iter_manifest(snap)
                   if not prefix or e.path == prefix or e.path.startswith(prefix + b"/")]
    if prefix and not entries:
        raise PathNotInSnapshot(f"not in snapshot {snap.id[:8]}: {os.fsdecode(prefix)}")
    if json:
        print_json([_entry_doc(e) for e in entries])
        return
    for e in entries:
        when = iso_time(e.mtime_ns / 1e9)
        name = os.fsdecode(e.path)
        if e.type is EntryType.SYMLINK:
            name += " -> " + os.fsdecode(e.link_target)
        elif e.type is EntryType.HARDLINK:
            name += " => " + os.fsdecode(e.link_target)
        console.print(f"{_mode_string(e)} {e.uid:>5} {e.gid:>5} {e.size:>12} {when} {name}",
                      markup=False, highlight=False)


@app.command()
def diff(store_dir: str = StoreDir, state: Path | None = STATE, snap1: str = typer.Argument(...),
         snap2: str = typer.Argument(...), passfile: Path | None = PASSFILE,
         json: bool = JSON) -> None:
    """Show what changed between two snapshots (+ added, - removed, M modified, U metadata)."""
    with open_store(store_dir, passfile, state) as store:
        a, b = store.resolve_snapshot(snap1), store.resolve_snapshot(snap2)
        changes = list(diff_snapshots(store, a, b))
    counts = {k: sum(1 for s, _ in changes if s == k) for k in "+-MU"}
    if json:
        print_json({"from": a.id, "to": b.id, "changes": [
            {"status": s, "path": os.fsdecode(e.path), "type": e.type.name.lower()}
            for s, e in changes], "added": counts["+"], "removed": counts["-"],
            "modified": counts["M"], "metadata": counts["U"]})
        return
    for status, e in changes:
        console.print(f"{status}  {os.fsdecode(e.path)}", markup=False, highlight=False)
    console.print(f"{counts['+']} added, {counts['-']} removed, {counts['M']} modified, "
                  f"{counts['U']} metadata only")


@app.command()
def restore(store_dir: str = StoreDir, state: Path | None = STATE,
            snapshot: str = typer.Argument(...),
            target: Path = typer.Argument(..., help="Directory to restore into."),
            include: list[str] = typer.Option([], "--include", help="Restore only this path."),
            full_metadata: bool = FULL_METADATA,
            passfile: Path | None = PASSFILE, json: bool = JSON) -> None:
    """Restore a snapshot (or some of its paths) into TARGET."""
    with open_store(store_dir, passfile, state) as store:
        snap = store.resolve_snapshot(snapshot)

        def count(p: object) -> None:
            p.total_files = snap.stats.get("files")  # type: ignore[attr-defined]
            p.total_bytes = snap.stats.get("bytes_total")  # type: ignore[attr-defined]
        result = run_with_progress(
            "restore", lambda p: run_restore(store, snap, target, includes=include, progress=p,
                                             full_metadata=full_metadata),
            counter=None if include else count, json_mode=json)
    if json:
        print_json(result.to_dict())
    else:
        for w in result.warnings:
            console.print(f"[yellow]warning:[/] {safe(w)}", markup=True, highlight=False)
        for w in result.withheld:
            console.print(f"withheld: {w}", highlight=False)
        for e in result.errors:
            err_console.print(f"[red]error:[/] {safe(e)}", markup=True, highlight=False)
        console.print(f"restored {result.files} files, {result.dirs} dirs, {result.other} "
                      f"other ({human_bytes(result.bytes_written)}) from {snap.short_id} "
                      f"into {target} in {result.seconds:.1f}s"
                      + (f"; {len(result.errors)} skipped" if result.errors else ""),
                      highlight=False)
        if result.withheld:
            console.print("device nodes, setuid/setgid bits and privileged xattrs were left "
                          "out: --full-metadata restores them", highlight=False)
    if result.errors:
        raise typer.Exit(1)


@app.command()
def mount(store_dir: str = StoreDir, state: Path | None = STATE,
          snapshot: str = typer.Argument(..., help="Snapshot id (or prefix), or 'latest'."),
          mountpoint: str = typer.Argument(..., help="An existing, empty folder."),
          cache_size: str = typer.Option("64MiB", help=CACHE_SIZE_HELP),
          allow_other: bool = typer.Option(False, "--allow-other", help=ALLOW_OTHER_HELP),
          passfile: Path | None = PASSFILE) -> None:
    """Mount a snapshot read-only at MOUNTPOINT (FUSE); runs until unmounted or Ctrl-C."""
    cache = parse_size(cache_size)
    preflight(mountpoint)
    with open_store(store_dir, passfile, state) as store:
        snap = store.resolve_snapshot(snapshot)
        tree = SnapshotTree.of_store(store, snap, cache_bytes=cache)
        serve_mount(tree, mountpoint, f"snapshot {snap.short_id}", f"strata:{snap.short_id}",
                    allow_other)


@app.command()
def check(store_dir: str = StoreDir, state: Path | None = STATE,
          read_data: bool = typer.Option(False, "--read-data",
                                         help="Read and verify every chunk."),
          passfile: Path | None = PASSFILE, json: bool = JSON) -> None:
    """Verify the store; exit 0 only if it is whole."""
    with open_store(store_dir, passfile, state) as store:
        result = run_with_progress(
            "check", lambda p: run_check(store, read_data=read_data,
                                         on_pack=lambda n: p.advance(files=1, nbytes=n)),
            counter=lambda p: setattr(p, "total_bytes", sum(store.index.packs().values())),
            json_mode=json)
    if json:
        print_json(result.to_dict())
    else:
        for w in result.warnings:
            console.print(f"[yellow]warning:[/] {safe(w)}", markup=True, highlight=False)
        for d in result.damaged_packs:
            console.print(f"[red]damaged pack[/] {safe(d['pack'])}: {safe(d['reason'])}",
                          markup=True, highlight=False)
        for d in result.damaged_snapshots:
            console.print(f"[red]damaged snapshot[/] {safe(d['snapshot'][:8])}: "
                          f"{safe(d['reason'])}", markup=True, highlight=False)
        for h in result.hurt:
            console.print(f"[red]snapshot {safe(h['snapshot'][:8])}[/]: {h['count']} file(s) "
                          "damaged", markup=True, highlight=False)
            for f in h["files"]:
                console.print(f"    {f}", markup=False, highlight=False)
        what = "read and verified " + str(result.chunks_verified) + " chunks, " \
            if read_data else ""
        verdict = "[green]no errors[/]" if result.ok else "[red]the store is damaged[/]"
        console.print(f"checked {result.snapshots} snapshots, {result.packs} packs, "
                      f"{what}{verdict}", markup=True)
    if not result.ok:
        raise typer.Exit(1)


@app.command()
def forget(store_dir: str = StoreDir, state: Path | None = STATE,
           snapshot_ids: list[str] = typer.Argument(None, help="Remove these snapshots "
                                                     "(ids or prefixes) instead of a policy."),
           keep_last: int = typer.Option(0, "--keep-last"),
           keep_hourly: int = typer.Option(0, "--keep-hourly"),
           keep_daily: int = typer.Option(0, "--keep-daily"),
           keep_weekly: int = typer.Option(0, "--keep-weekly"),
           keep_monthly: int = typer.Option(0, "--keep-monthly"),
           keep_yearly: int = typer.Option(0, "--keep-yearly"),
           keep_tag: list[str] = typer.Option([], "--keep-tag"),
           dry_run: bool = typer.Option(False, "--dry-run", help="Only show what would go."),
           prune: bool = typer.Option(False, "--prune", help="Prune right after."),
           passfile: Path | None = PASSFILE, json: bool = JSON) -> None:
    """Remove snapshots not kept by the policy (restic's forget semantics; -1 = unlimited)."""
    try:
        policy = RetentionPolicy(last=keep_last, hourly=keep_hourly, daily=keep_daily,
                                 weekly=keep_weekly, monthly=keep_monthly, yearly=keep_yearly,
                                 tags=tuple(keep_tag))
    except ValueError as exc:  # "last must be >= -1 …": named as the option that set it
        raise StrataError(f"--keep-{exc}") from None
    if snapshot_ids:
        if not policy.is_empty():
            raise StrataError("give snapshot ids or --keep-* options, not both")
        return _forget_ids(store_dir, state, snapshot_ids, passfile, dry_run, json)
    if policy.is_empty():
        raise StrataError("no policy given: pass at least one --keep-* option or snapshot ids")
    with open_store(store_dir, passfile, state) as store:
        snaps = {s.id: s for s in store.snapshots()}
        infos = [SnapshotInfo(id=s.id, time=s.datetime, host=s.host, paths=tuple(s.paths),
                              tags=tuple(s.tags)) for s in snaps.values()]
        decisions = apply_policy(infos, policy)
        removed = [d.snapshot.id for d in decisions if not d.keep]
        if not dry_run:
            for sid in removed:
                store.remove_snapshot(sid)
        pruned = prune_mod.prune(store) if prune and not dry_run else None
    if json:
        print_json({"dry_run": dry_run, "keep": [
            {"id": d.snapshot.id, "reasons": list(d.reasons)} for d in decisions if d.keep],
            "remove": removed, "prune": pruned.to_dict() if pruned else None})
        return
    table = Table("ID", "Time", "Host", "Decision", "Reasons")
    for d in decisions:
        table.add_row(d.snapshot.id[:8], iso_time(snaps[d.snapshot.id].time), d.snapshot.host,
                      "keep" if d.keep else Text("would remove" if dry_run else "removed",
                                                 style="red"), ", ".join(d.reasons))
    console.print(table)
    console.print(f"{len(decisions) - len(removed)} kept, {len(removed)} "
                  f"{'would be removed' if dry_run else 'removed'}")
    if pruned:
        _print_prune(pruned, False)


def _forget_ids(store_dir: str, state: Path | None, refs: list[str], passfile: Path | None,
                dry_run: bool, json: bool) -> None:
    with open_store(store_dir, passfile, state) as store:
        chosen = [store.resolve_id(ref) for ref in refs]
        if not dry_run:
            for sid in chosen:  # by file name: works for damaged records too
                store.remove_snapshot(sid)
    if json:
        print_json({"dry_run": dry_run, "remove": chosen})
    else:
        verb = "would remove" if dry_run else "removed"
        console.print(f"{verb} {len(chosen)} snapshot(s): {' '.join(s[:8] for s in chosen)}")


def _print_prune(result: prune_mod.PruneResult, dry_run: bool) -> None:
    p = result.plan
    console.print(f"{p.used_chunks} chunks in use across {len(p.snapshots)} snapshots; "
                  f"{len(p.delete)} dead pack(s), {len(p.repack)} to repack, "
                  f"{p.exempt} too new to judge; frees about {human_bytes(p.bytes_freed)}")
    if not dry_run:
        console.print(f"deleted {result.deleted_packs} pack(s), repacked "
                      f"{result.repacked_packs} into {result.new_packs} in {result.seconds:.1f}s")


@app.command("prune")
def prune_cmd(store_dir: str = StoreDir, state: Path | None = STATE,
              dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan only."),
              passfile: Path | None = PASSFILE, json: bool = JSON) -> None:
    """Delete chunks no snapshot uses; repack mostly-dead packs."""
    with open_store(store_dir, passfile, state) as store:
        result = prune_mod.prune(store, dry_run=dry_run)
    if json:
        print_json(result.to_dict())
    else:
        _print_prune(result, dry_run)


@app.command()
def stats(store_dir: str = StoreDir, state: Path | None = STATE, passfile: Path | None = PASSFILE,
          json: bool = JSON) -> None:
    """Logical bytes, stored bytes, dedup ratio, chunks and packs."""
    with open_store(store_dir, passfile, state) as store:
        s = store_stats(store)
    if json:
        print_json(s.to_dict())
        return
    table = Table("", "", show_header=False)
    table.add_row("snapshots", str(s.snapshots))
    table.add_row("logical size", human_bytes(s.logical_bytes))
    table.add_row("unique data", human_bytes(s.unique_bytes))
    table.add_row("stored on disk", human_bytes(s.stored_bytes))
    table.add_row("dedup ratio", f"{s.dedup_ratio:.2f}x")
    table.add_row("compression ratio", f"{s.compression_ratio:.2f}x")
    table.add_row("total saving", f"{s.space_saving_ratio:.2f}x")
    table.add_row("chunks / packs", f"{s.chunks} / {s.packs}")
    console.print(table)


@app.command("repair-index")
def repair_index(store_dir: str = StoreDir, state: Path | None = STATE,
                 passfile: Path | None = PASSFILE,
                 json: bool = JSON) -> None:
    """Rebuild the index from the pack trailers alone."""
    with open_store(store_dir, passfile, state) as store:
        count, damaged = store.rebuild_index()
        chunks = store.index.chunk_count()
    if json:
        print_json({"packs": count, "chunks": chunks, "damaged_packs": damaged})
        return
    console.print(f"indexed {chunks} chunks from {count} packs")
    for name in damaged:
        console.print(f"[red]unreadable pack[/] {safe(name)} (its trailer is damaged)",
                      markup=True)


@app.command("repair")
def repair(store_dir: str = StoreDir, state: Path | None = STATE,
           dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be done; "
                                        "change nothing."),
           passfile: Path | None = PASSFILE, json: bool = JSON) -> None:
    """Heal damaged packs: verify every chunk, keep the intact ones (copied to new packs),
    drop the rest, and name the snapshots and files that need what was lost; back the
    source up again to store those chunks anew. Exit 1 while a snapshot still lacks data."""
    from strata.engine.repair import repair as run_repair

    with open_store(store_dir, passfile, state) as store:
        result = run_with_progress(
            "repair", lambda p: run_repair(store, dry_run=dry_run,
                                           on_pack=lambda n: p.advance(files=1, nbytes=n)),
            counter=lambda p: setattr(p, "total_bytes", sum(store.index.packs().values())),
            json_mode=json)
    if json:
        print_json(result.to_dict())
    else:
        would = "would keep" if dry_run else "kept"
        for d in result.damaged:
            console.print(f"damaged pack {d.pack[:16]}: {d.reason}; {would} {d.salvaged} "
                          f"intact chunks, {d.lost} lost", markup=False, highlight=False)
        for ds in result.damaged_snapshots:
            console.print(f"damaged snapshot {ds['snapshot'][:8]}: {ds['reason']}",
                          markup=False, highlight=False)
        for h in result.hurt:
            console.print(f"snapshot {h['snapshot'][:8]}: {h['count']} file(s) need lost "
                          "data:", markup=False, highlight=False)
            for f in h["files"]:
                console.print(f"    {f}", markup=False, highlight=False)
        if not result.damaged:
            console.print(f"checked {result.packs_checked} packs: none is damaged",
                          highlight=False)
        elif not dry_run:
            console.print(f"dropped {len(result.damaged)} damaged pack(s) "
                          f"({result.chunks_lost} chunks lost); a backup of a source that "
                          "still has the files above stores them again", highlight=False)
    if not result.whole:
        raise typer.Exit(1)
