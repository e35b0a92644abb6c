"""Layer updates on the endpoint: learn the desired state at check-in, download in the
background only the chunks the endpoint lacks (its own files and its cache are seeds),
report "ready", and at apply time (the restart) take a pre-update snapshot and switch the
tree under a journal. The plan comes from the engine the server uses for dry-runs and
compliance (strata.layers), so both sides agree on what an update does.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import zstandard

from strata.agent.client import ServerClient, ServerUnreachable
from strata.agent.deltas import fill_by_deltas, manifest_by_delta, note_manifest
from strata.agent.drift import tree_changed
from strata.agent.reflector_source import ReflectorFetcher
from strata.agent.resume import ChunkReceiver, fetch_chunks
from strata.agent.signing import approve_update, save_record
from strata.agent.state import AgentState
from strata.engine.backup import HashOnlySink, archive_tree
from strata.engine.progress import Progress
from strata.errors import CorruptData, StrataError
from strata.layers.accounts import MAX_DATABASE_BYTES, database_for
from strata.layers.apply import ApplyJournal
from strata.layers.changes import Action
from strata.layers.config_merge import require_no_holds, resolve_merges
from strata.layers.image import Image, LayerContent, build_image
from strata.layers.plan import AccountMerge, Mode, Plan, plan_update
from strata.layers.rules import LayerRules, PathClass
from strata.model.entry import Entry, EntryType
from strata.model.ids import content_id, is_hex_id
from strata.model.manifest import decode_manifest, encode_manifest
from strata.model.update import UpdateState
from strata.model.wire import DesiredLayer, DesiredState
from strata.signing import LayerRefused
from strata.signing.policy import Approval
from strata.store.backend import atomic_write
from strata.store.chunker import Chunker, ChunkerParams
from strata.store.repository import Store
from strata.tree.scan import open_path

WORK_DIR = ".strata-apply"  # beneath the root: renames into place stay on one filesystem
BATCH_BYTES = 64 << 20  # raw bytes per download request (the most the server sends)
BATCH_CHUNKS = 4096  # chunk ids per download request
_REPORT_SECONDS = 2.0
MAX_MANIFEST = 1 << 30
DOWNLOAD_JOURNAL = "download.journal"  # chunks received since the cache was last flushed


class UpdateFailed(StrataError):
    pass


CONFLICTS_LISTED = 20  # in an apply's result; all are counted


@dataclass
class UpdateResult:
    key: str
    state: UpdateState | Literal["repaired", "refused"]  # ready, applied, drift repaired,
    # or refused: unsigned, forged or stale (see strata.signing.policy)
    changes: dict = field(default_factory=dict)
    conflicts: dict = field(default_factory=dict)
    # The first conflicts one by one ({kind, path, detail}): a count alone names no file.
    conflict_list: list = field(default_factory=list)
    chunks_downloaded: int = 0
    bytes_downloaded: int = 0  # on the wire, compressed
    bytes_seeded: int = 0  # read from the endpoint's own files instead
    files_by_delta: int = 0  # changed files rebuilt from the endpoint's old copy + a delta
    reflector: dict = field(default_factory=dict)  # what came through the branch reflector
    warnings: list[str] = field(default_factory=list)
    pre_update_snapshot: str | None = None
    seconds: float = 0.0
    error: str = ""  # why it was refused (state "refused")

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def mode_for(desired: DesiredState, *, repair: bool = False) -> Mode:
    """How the plan treats the endpoint's own state. Account databases are merged by key
    except where the target carries the accounts its files need whole (provisioning wipes
    user data too; a full restore brings the CVD's own accounts); the endpoint's changes
    to configuration stay only in an update (a revert sets the system of a snapshot,
    compliance repair sets the layers' versions back)."""
    op = desired.operation
    if op == "revert":
        return Mode(wipe_unmanaged=not desired.keep_user_apps,
                    keep_user_apps=desired.keep_user_apps, keep_local_config=False)
    if op == "provision":
        return Mode(wipe_unmanaged=True, protect=frozenset({PathClass.NEVER,
                                                            PathClass.IDENTITY}),
                    keep_local_config=False, merge_accounts=False)
    if op == "restore":
        return Mode(wipe_unmanaged=True, protect=frozenset({PathClass.NEVER}),
                    keep_local_config=False, merge_accounts=False)
    return Mode(keep_local_config=not repair)


class LayerSource:
    """Everything the update reads: layer manifests from the server (each checked against
    its signed digest, cached or not), chunks from the local cache (a Store, the same
    engine as the server's), the endpoint's own files, or the server, each verified
    against its id before use."""

    def __init__(self, client: ServerClient | None, state: AgentState, root: Path, *,
                 approval: Approval):
        self.client = client
        self.state = state
        self.root = root
        self.approval = approval
        self.cache = _open_cache(state.path / "cache")
        self.receiver = ChunkReceiver(self.cache, state.path / DOWNLOAD_JOURNAL)
        self.seeds: dict[bytes, tuple[bytes, int, int]] = {}  # id -> (path, offset, length)
        self.computed: dict[bytes, bytes] = {}  # content merged here (Plan.computed_chunks)
        self.bytes_downloaded = 0
        self.chunks_downloaded = 0
        self.bytes_seeded = 0
        # The branch reflector first, when the check-in named one (agent/reflector_source.py).
        self.reflectors = ReflectorFetcher.for_state(client, state)

    def close(self) -> None:
        self.cache.close()
        if self.reflectors is not None:
            self.reflectors.close()

    def manifest(self, layer: DesiredLayer) -> bytes:
        if not is_hex_id(layer.snapshot):  # it names a file: never a path from the server
            raise UpdateFailed(f"layer {layer.name}:{layer.version}: the server named its "
                               "snapshot with something other than an id: refused")
        cached = self.state.path / "layers" / f"{layer.snapshot}.manifest"
        try:
            data = cached.read_bytes()
        except FileNotFoundError:
            pass
        else:
            try:
                self.approval.verify_manifest(layer, data)
                return data
            except LayerRefused:
                cached.unlink()  # not what is signed now: fetch it again, then judge
        if self.client is None:
            raise UpdateFailed(f"layer {layer.name}:{layer.version} is not cached and the "
                               "server is unreachable")
        cached.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        patched = manifest_by_delta(self.client, cached.parent, layer, self.reflectors)
        try:
            if patched is None:
                raise LayerRefused("no delta")
            self.approval.verify_manifest(layer, patched)
            data = patched
        except LayerRefused:  # whole, then: judged below like any fetched manifest
            data = self._whole_manifest(layer)
            self.approval.verify_manifest(layer, data)  # before it is kept or used
        atomic_write(cached, data)
        note_manifest(cached.parent, layer)
        return data

    def _whole_manifest(self, layer: DesiredLayer) -> bytes:
        assert self.client is not None
        resp = self.client.request("GET", f"/api/v1/agent/layers/{layer.snapshot}/manifest")
        try:
            return zstandard.ZstdDecompressor().stream_reader(resp.content).read(MAX_MANIFEST)
        except zstandard.ZstdError as exc:
            raise CorruptData(f"layer {layer.name}:{layer.version}: manifest does not "
                              f"decompress ({exc})") from None

    def contents(self, layers: list[DesiredLayer]) -> list[LayerContent]:
        return [LayerContent(label=f"{dl.kind} {dl.name}:{dl.version}", kind=dl.kind,
                             entries=decode_manifest([self.manifest(dl)]),
                             removes=[os.fsencode(p) for p in dl.removes]) for dl in layers]

    def add_seeds(self, entries: Iterable[Entry]) -> None:
        for e in entries:
            if e.type is EntryType.FILE:
                offset = 0
                for cid, n in e.chunks:
                    self.seeds.setdefault(cid, (e.path, offset, n))
                    offset += n

    def lacking(self, ids: list[bytes]) -> list[bytes]:
        """Chunks neither the cache nor the endpoint's files can supply, in the order given
        (Plan.chunks_in_order: the tree's, which is what makes the stream compress)."""
        missing = set(self.cache.missing_chunks(sorted(set(ids))))
        return [c for c in ids if c in missing and c not in self.seeds]

    def download(self, ids: list[bytes], lengths: dict[bytes, int],
                 progress: Callable[[int, int], None] | None = None,
                 arriving: Callable[[int, int], None] | None = None) -> None:
        """Fetch into the cache in batches; each batch is durable before the next, so an
        interrupted download resumes where it stopped. `progress` is told (done, total)
        bytes after each batch, `arriving` as each chunk arrives (a bar on a terminal:
        the first batch can take minutes while the server compresses it)."""
        if not ids:
            return
        if self.client is None:
            raise UpdateFailed(f"{len(ids)} chunks still to download and the server is "
                               "unreachable")
        total = sum(lengths.get(c, 0) for c in ids)
        done = 0
        batch: list[bytes] = []
        size = 0

        def arrived(nbytes: int) -> None:
            if arriving:
                arriving(min(done + nbytes, total), total)
        for cid in [*ids, None]:
            n = 0 if cid is None else lengths.get(cid, 0)
            if batch and (cid is None or size + n > BATCH_BYTES or len(batch) >= BATCH_CHUNKS):
                self._fetch(batch, arrived)
                done += size
                if progress:
                    progress(done, total)
                batch, size = [], 0
            if cid is not None:
                batch.append(cid)
                size += n

    def _fetch(self, ids: list[bytes], arrived: Callable[[int], None] | None = None) -> None:
        """One batch, kept chunk by chunk as it arrives (agent/resume.py): a broken link
        costs at most the chunk in flight, even if the agent is killed. `arrived` is told
        the raw bytes of this batch received so far, as each chunk comes."""
        assert self.client is not None
        before, received = self.client.bytes_received, self.receiver.received
        path = "/api/v1/agent/layers/chunks"
        got = [0]

        def keep(cid: bytes, data: bytes) -> None:
            self.receiver.keep(cid, data)
            got[0] += len(data)
            if arrived is not None:
                arrived(got[0])
        try:
            rest = self.reflectors.fetch(path, ids, keep) \
                if self.reflectors is not None else ids
            missing = fetch_chunks(self.client, path, rest, keep) if rest else []
            if missing:
                raise CorruptData(f"server did not send {len(missing)} chunk(s)")
        finally:
            self.receiver.settle()
            self.chunks_downloaded += self.receiver.received - received
            self.bytes_downloaded += self.client.bytes_received - before

    def local_chunk(self, cid: bytes) -> bytes | None:
        """A chunk from the endpoint's files or the cache, never the network (None)."""
        data = self._seed(cid)
        if data is not None:
            return data
        try:
            return self.cache.load_chunk(cid)
        except StrataError:
            return None

    def chunk(self, cid: bytes) -> bytes:
        computed = self.computed.get(cid)
        if computed is not None:
            return computed
        data = self.local_chunk(cid)
        if data is not None:
            return data
        self.download([cid], {cid: 0})
        return self.cache.load_chunk(cid)

    def _seed(self, cid: bytes) -> bytes | None:
        seed = self.seeds.get(cid)
        if seed is not None:
            path, offset, n = seed
            try:
                fd = open_path(os.path.join(os.fsencode(self.root), path))
                try:
                    data = os.pread(fd, n, offset)
                finally:
                    os.close(fd)
                if content_id(data) == cid:
                    self.bytes_seeded += n
                    return data
            except OSError:
                pass
            del self.seeds[cid]  # changed since the scan: not a seed any more
        return None

    def data(self, entry: Entry) -> Iterator[bytes]:
        for cid, _ in entry.chunks:
            yield self.chunk(cid)

    def keep(self, entries: Iterable[Entry]) -> list[str]:
        """Make sure the cache holds these files' chunks (the account databases as the
        layers laid them down: the old base of the next update's three-way merge). Their
        ids are in the owned manifest, and every read is verified against them. Returns
        a warning per file that could not be kept (the next merge is then two-way)."""
        warnings = []
        for e in entries:
            ids = [cid for cid, _ in e.chunks]
            missing = self.cache.missing_chunks(ids)
            try:
                datas: list[bytes | memoryview] = [self.chunk(cid) for cid in missing]
            except StrataError as exc:
                warnings.append(f"{e.path.decode(errors='replace')}: not kept for the next "
                                f"update's merge ({exc})")
                continue
            if missing:
                self.cache.store_chunks(missing, datas)
        self.cache.flush()
        return warnings


class AccountInputs:
    """The three copies of an account database on the agent: the old base's from the
    cache or the endpoint's own files (never the network: the old layers may no longer be
    assigned), the endpoint's from its tree, the new layers' like any file of the update."""

    def __init__(self, source: LayerSource, merges: list[AccountMerge]):
        self.source = source
        ids = [cid for m in merges for cid, _ in m.new.chunks]
        source.download(source.lacking(ids), dict(c for m in merges for c in m.new.chunks))

    def old(self, entry: Entry) -> bytes | None:
        pieces = [self.source.local_chunk(cid) for cid, _ in entry.chunks]
        if any(p is None for p in pieces):
            return None
        return b"".join(pieces)  # type: ignore[arg-type]

    def endpoint(self, entry: Entry) -> bytes:
        fd = open_path(os.path.join(os.fsencode(self.source.root), entry.path),
                       os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            return f.read(MAX_DATABASE_BYTES + 1)

    def new(self, entry: Entry) -> bytes:
        return b"".join(self.source.data(entry))


def _open_cache(path: Path) -> Store:
    if not (path / "config").exists():
        shutil.rmtree(path, ignore_errors=True)  # a half-made cache from a killed run
        Store.init(path, compression="zstd:3").close()
    store = Store.open(path)
    store.reconcile_index()
    return store


def target_image(source: LayerSource, desired: DesiredState, rules: LayerRules) -> Image:
    return build_image(source.contents(desired.layers), rules,
                       full=desired.operation == "restore")


def owned_image(source: LayerSource, desired: DesiredState, rules: LayerRules,
                image: Image) -> Image:
    if desired.owned is None:
        return image
    return build_image(source.contents(desired.owned), rules)


def compute_plan(source: LayerSource, desired: DesiredState, current: list[Entry],
                 owned: dict[bytes, Entry], *, repair: bool = False
                 ) -> tuple[Plan, Image, LayerRules]:
    """The plan, account databases merged (their new copies fetched first: they are
    small), or UpdateHeld when a clash waits for someone to resolve it."""
    rules = LayerRules.from_doc(desired.rules, desired.family)
    image = target_image(source, desired, rules)
    plan = plan_update(current, image, rules, owned=owned,
                       mode=mode_for(desired, repair=repair))
    source.add_seeds(current)
    if plan.merges:
        resolve_merges(plan, AccountInputs(source, plan.merges), rules.family, time.time_ns())
    require_no_holds(plan)
    return plan, image, rules


def report(client: ServerClient | None, key: str, state: UpdateState, *, percent: float = 0.0,
           detail: str = "", downloaded: int = 0, refused: bool = False) -> None:
    if client is None:
        return
    try:
        client.request("POST", "/api/v1/agent/update", retries=1,
                       json={"key": key, "state": state, "percent": round(percent, 1),
                             "detail": detail[:4000], "downloaded_bytes": downloaded,
                             "refused": refused})
    except StrataError:
        pass  # the next check-in reports again


def refuse(client: ServerClient | None, state: AgentState, desired: DesiredState,
           exc: LayerRefused) -> UpdateResult:
    """Keep what the endpoint has, and tell the server why (once per reason: the agent
    checks again at every check-in, the audit log needs it once)."""
    saved = state.update()
    again = saved.get("key") == desired.key and saved.get("error") == str(exc)
    state.save_update({"key": desired.key, "state": UpdateState.FAILED, "refused": True,
                       "error": str(exc), "desired": desired.model_dump()})
    if not again:
        report(client, desired.key, UpdateState.FAILED, detail=f"refused: {exc}",
               refused=True)
    return UpdateResult(key=desired.key, state="refused", error=str(exc))


def prepare(client: ServerClient, state: AgentState, root: Path, desired: DesiredState,
            current: list[Entry], approval: Approval,
            shown: Progress | None = None) -> UpdateResult:
    """Download what the update needs (in the background of normal work) and say ready;
    `shown` follows the bytes (a bar with an ETA on a terminal)."""
    started = time.monotonic()
    received0 = client.bytes_received  # manifests, chunks, reports: all of it counts
    source = LayerSource(client, state, root, approval=approval)
    try:
        plan, _, _ = compute_plan(source, desired, current, state.owned())
        state.save_update({"key": desired.key, "state": UpdateState.DOWNLOADING,
                           "desired": desired.model_dump(), "approval": approval.to_dict()})
        lengths = plan.chunks_in_order()
        report(client, desired.key, UpdateState.DOWNLOADING, percent=0.0)
        by_delta = fill_by_deltas(client, os.fsencode(root), source.cache, plan, current,
                                  source.lacking(list(lengths)), source.reflectors)
        lacking = source.lacking(list(lengths))
        last = [0.0]

        def received() -> int:  # one figure everywhere: all this update took on the wire
            return client.bytes_received - received0

        def show(done: int, total: int) -> None:
            if shown is not None:
                shown.total_bytes, shown.bytes_done = total, done

        def progress(done: int, total: int) -> None:
            show(done, total)
            if time.monotonic() - last[0] >= _REPORT_SECONDS or done >= total:
                last[0] = time.monotonic()
                report(client, desired.key, UpdateState.DOWNLOADING,
                       percent=100.0 * done / max(total, 1), downloaded=received())
        source.download(lacking, lengths, progress, show)
        summary = plan.summary()
        state.save_update({"key": desired.key, "state": UpdateState.READY,
                           "desired": desired.model_dump(), "plan": summary,
                           "downloaded": received(), "approval": approval.to_dict()})
        report(client, desired.key, UpdateState.READY, percent=100.0,
               detail=f"restart to apply: {_describe(summary)}", downloaded=received())
        return UpdateResult(key=desired.key, state=UpdateState.READY,
                            changes=summary["changes"],
                            conflicts=summary["conflicts"],
                            chunks_downloaded=source.chunks_downloaded,
                            bytes_downloaded=received(), files_by_delta=by_delta.rebuilt,
                            reflector=source.reflectors.summary() if source.reflectors else {},
                            warnings=by_delta.failed[:20],
                            seconds=round(time.monotonic() - started, 3))
    finally:
        source.close()


def _describe(summary: dict, *, done: bool = False) -> str:
    c = summary["changes"]
    text = (f"{c['add']} added, {c['replace']} replaced, {c['delete']} deleted" if done else
            f"{c['add']} to add, {c['replace']} to replace, {c['delete']} to delete")
    if summary["conflicts"]:
        text += "; conflicts: " + ", ".join(f"{n} {k}" for k, n in summary["conflicts"].items())
    return text


def switch(client: ServerClient | None, state: AgentState, root: Path, desired: DesiredState,
           current: list[Entry], result: UpdateResult, approval: Approval, *,
           repair: bool = False, progress: Progress | None = None) -> None:
    """Plan against the tree as it is now, fetch anything still missing, check the disk,
    then switch under the journal and record what IT now owns on the endpoint.
    `progress` follows the download of what is missing, then the files written."""
    source = LayerSource(client, state, root, approval=approval)
    try:
        plan, image, rules = compute_plan(source, desired, current, state.owned(),
                                          repair=repair)
        lengths = plan.chunks_in_order()
        by_delta = fill_by_deltas(client, os.fsencode(root), source.cache, plan, current,
                                  source.lacking(list(lengths)), source.reflectors)
        result.files_by_delta += by_delta.rebuilt
        lacking = source.lacking(list(lengths))
        if progress is not None and lacking:
            progress.restart("download")

        def arriving(done: int, total: int) -> None:
            if progress is not None:
                progress.total_bytes, progress.bytes_done = total, done
        source.download(lacking, lengths, arriving=arriving)
        need = plan.bytes_to_write()
        free = shutil.disk_usage(root).free
        if need > free:
            raise UpdateFailed(f"not enough disk space: the update writes {need} bytes, "
                               f"{free} are free")
        owned = owned_image(source, desired, rules, image)
        result.warnings += source.keep(e for p, e in owned.entries.items()
                                       if e.type is EntryType.FILE
                                       and database_for(p, rules.family) is not None)
        source.computed = plan.computed_chunks()
        journal = ApplyJournal(root, root / WORK_DIR)
        data: Callable[[Entry], Iterable[bytes]] = source.data
        if progress is not None:
            progress.restart("apply", len(plan.changes), need)
            data = _counted(source.data, progress)
        try:
            stats = journal.apply(plan.changes, data)
        finally:
            journal.remove_work_dir()  # kept only while an apply is pending in it
        state.save_owned(b"".join(encode_manifest(owned.sorted_entries())))
        summary = plan.summary()
        result.changes, result.conflicts = summary["changes"], summary["conflicts"]
        result.conflict_list = summary["conflict_list"][:CONFLICTS_LISTED]
        result.warnings += list(getattr(stats, "warnings", []))
        result.bytes_downloaded += source.bytes_downloaded
        result.chunks_downloaded += source.chunks_downloaded
        result.bytes_seeded += source.bytes_seeded
    finally:
        source.close()


def _counted(data: Callable[[Entry], Iterable[bytes]],
             progress: Progress) -> Callable[[Entry], Iterator[bytes]]:
    """`data`, telling `progress` of each file's bytes as they are written."""
    def counted(entry: Entry) -> Iterator[bytes]:
        for piece in data(entry):
            progress.advance(nbytes=len(piece))
            yield piece
        progress.advance(files=1)
    return counted


def recover(root: Path) -> str | None:
    """Finish (or undo) an apply that a power cut or kill interrupted."""
    work = root / WORK_DIR
    if not work.exists():
        return None
    journal = ApplyJournal(root, work)
    try:
        return journal.recover()
    finally:
        journal.remove_work_dir()



Centralizer = Callable[[str], str]  # trigger -> snapshot id (a centralization, now)


@dataclass(frozen=True)
class LocalTree:
    """The endpoint's tree as the agent reads it: its root, the exclusions its snapshots
    are taken with, and the store's chunker (so that ids computed here match the server's)."""

    root: Path
    excludes: list[str]
    chunker: ChunkerParams
    one_file_system: bool = False  # mounts inside the root are not the endpoint's tree


def current_entries(state: AgentState, tree: LocalTree) -> list[Entry]:
    """The endpoint's tree as it is now: the last snapshot's manifest when a stat-only walk
    finds nothing changed since, else a local scan (unchanged files keep their chunk lists,
    changed ones are hashed here, nothing is uploaded). The last snapshot alone can be stale:
    user work since, or an apply whose post-update snapshot never completed (a power cut),
    after which an update back to the old image would look like nothing to do."""
    return live_entries(state, tree)[0]


def live_entries(state: AgentState, tree: LocalTree) -> tuple[list[Entry], int]:
    """`current_entries`, and how many bytes were read to hash what changed."""
    _, manifest = state.parent()
    if manifest is None:
        raise UpdateFailed("this endpoint has not centralized yet: it must, before an update")
    if not tree_changed(tree.root, tree.excludes, manifest,
                        one_file_system=tree.one_file_system):
        return list(decode_manifest([manifest])), 0
    archive = archive_tree(HashOnlySink(Chunker(tree.chunker)), tree.root,
                           parent_entries=decode_manifest([manifest]), excludes=tree.excludes,
                           one_file_system=tree.one_file_system)
    return list(decode_manifest([archive.manifest_bytes])), archive.result.bytes_read


def on_checkin(client: ServerClient, state: AgentState, tree: LocalTree,
               desired: DesiredState | None, centralize: Centralizer,
               progress: Progress | None = None) -> UpdateResult | None:
    """What a check-in does about layers: download a new desired state and report ready
    (or apply at once when nothing needs a restart), or repair drift when enforced."""
    if desired is None:
        return None
    root = tree.root
    if desired.key == state.applied_key() and not desired.enforce:
        drop_unwanted(state, desired.key)
        return None
    saved = state.update()
    if saved.get("key") == desired.key and saved.get("state") == UpdateState.READY:
        report(client, desired.key, UpdateState.READY, percent=100.0,
               detail="restart to apply: " + _describe(saved.get("plan") or
                                                      {"changes": {}, "conflicts": {}}))
        return UpdateResult(key=desired.key, state=UpdateState.READY)
    try:  # nothing is downloaded, let alone applied, before the metadata and state verify
        approval = approve_update(client, state, desired, root)
        if desired.key == state.applied_key():
            return repair(client, state, tree, desired, centralize, approval)
        if desired.pipelined and desired.operation == "restore":
            from strata.agent.pipeline import restore_pipelined  # it builds on this module

            return restore_pipelined(client, state, tree, desired, approval, centralize,
                                     progress)
        result = prepare(client, state, root, desired, current_entries(state, tree), approval,
                         progress)
    except LayerRefused as exc:
        return refuse(client, state, desired, exc)
    except ServerUnreachable as exc:
        # An outage pauses the download, it does not fail it: what arrived is in the cache,
        # and the next check-in resumes (the cycle reports the agent offline meanwhile).
        state.save_update({"key": desired.key, "state": UpdateState.DOWNLOADING,
                           "paused": str(exc), "desired": desired.model_dump()})
        raise
    except StrataError as exc:
        state.save_update({"key": desired.key, "state": UpdateState.FAILED, "error": str(exc),
                           "desired": desired.model_dump()})
        report(client, desired.key, UpdateState.FAILED, detail=str(exc))
        raise
    if not any(result.changes.values()):  # nothing to switch: no restart needed
        return apply_update(client, state, tree, centralize, snapshot=False,
                            approval=approval)
    return result


APPLIABLE = (UpdateState.READY, UpdateState.APPLYING, UpdateState.FAILED)


def drop_unwanted(state: AgentState, wanted: str) -> None:
    """The server wants what the endpoint already has (a task cancelled, an assignment
    taken back): an update downloaded for something else is not applied at the next
    restart. One being applied (APPLYING) is never dropped: its journal must finish."""
    saved = state.update()
    if saved.get("key") not in (None, wanted) and saved.get("state") in (
            UpdateState.DOWNLOADING, UpdateState.READY, UpdateState.FAILED):
        state.save_update({"key": saved.get("key"), "state": "dropped"})


def appliable(saved: dict) -> bool:
    """An update is waiting to be applied: downloaded, interrupted, or failed (retried)."""
    return saved.get("state") in APPLIABLE and "desired" in saved


def apply_update(client: ServerClient | None, state: AgentState, tree: LocalTree,
                 centralize: Centralizer | None, *, snapshot: bool = True,
                 approval: Approval | None = None,
                 progress: Progress | None = None) -> UpdateResult:
    """The restart: pre-update snapshot, switch under the journal, report, centralize.

    An apply found in the APPLYING state was interrupted (killed, power cut): it carries
    on, reusing the pre-update snapshot it had taken (the tree is still the one it saw,
    or the journal's recovery made it the new one). The desired state is verified again
    first: with fresh metadata when the server answers, else (resuming offline) the
    manifests are checked against what was verified at download."""
    started = time.monotonic()
    root = tree.root
    recover(root)
    saved = state.update()
    if not appliable(saved):
        raise UpdateFailed("no update is ready to apply")
    desired = DesiredState.model_validate(saved["desired"])
    result = UpdateResult(key=desired.key, state=UpdateState.APPLIED)
    resuming = saved["state"] == UpdateState.APPLYING
    pre = saved.get("pre_update_snapshot") if resuming else None
    if snapshot and pre is None and centralize is None:
        raise ServerUnreachable("the server is unreachable and the pre-update snapshot must "
                                "be taken first: the update stays ready")
    try:
        approval = approval or _reapprove(client, state, desired, root, saved)
    except LayerRefused as exc:
        refuse(client, state, desired, exc)
        raise
    state.save_update({**saved, "state": UpdateState.APPLYING})
    report(client, desired.key, UpdateState.APPLYING, percent=100.0)
    try:
        if snapshot:
            if pre is None:
                assert centralize is not None
                pre = centralize("pre-update")
                # Recorded, so that an apply killed from here on does not take it again.
                state.save_update({**saved, "state": UpdateState.APPLYING,
                                   "pre_update_snapshot": pre})
            result.pre_update_snapshot = pre
        switch(client, state, root, desired, current_entries(state, tree), result, approval,
               progress=progress)
    except LayerRefused as exc:
        refuse(client, state, desired, exc)
        raise
    except ServerUnreachable as exc:
        # Lost before the switch (it needs the network only for what it still lacks): the
        # apply stays where it was, and the next cycle or `agent apply` carries on.
        state.save_update({**state.update(), "paused": str(exc)})
        raise
    except StrataError as exc:
        state.save_update({**saved, "state": UpdateState.FAILED, "error": str(exc)})
        report(client, desired.key, UpdateState.FAILED, detail=str(exc))
        raise
    save_record(state, approval.after)
    state.save_applied(desired.key, desired.model_dump(mode="json"))
    state.save_update({"key": desired.key, "state": UpdateState.APPLIED,
                       "changes": result.changes})
    if desired.operation == "provision":
        state.reset_parent()  # a fresh CVD: the next centralization starts over
    report(client, desired.key, UpdateState.APPLIED, percent=100.0,
           detail=_describe({"changes": result.changes, "conflicts": result.conflicts},
                            done=True),
           downloaded=saved.get("downloaded", 0) + result.bytes_downloaded)
    # A resumed apply whose journal was rolled forward switched the tree before this run
    # (its change list here is empty): the tree says whether a snapshot is owed.
    if centralize is not None and (any(result.changes.values()) or resuming and tree_changed(
            root, tree.excludes, state.parent()[1], one_file_system=tree.one_file_system)):
        centralize("post-update")
    result.seconds = round(time.monotonic() - started, 3)
    return result


def _reapprove(client: ServerClient | None, state: AgentState, desired: DesiredState,
               root: Path, saved: dict) -> Approval:
    if client is not None:
        return approve_update(client, state, desired, root)
    if "approval" not in saved:
        raise LayerRefused("this update was not verified when it was downloaded: it is "
                           "applied only once the server answers again")
    return Approval.from_dict(saved["approval"])


def repair(client: ServerClient, state: AgentState, tree: LocalTree, desired: DesiredState,
           centralize: Centralizer, approval: Approval) -> UpdateResult | None:
    """Enforced compliance: put back what drifted from the layers (only the differing
    files are fetched); the snapshot just taken keeps the endpoint's versions."""
    root = tree.root
    current = current_entries(state, tree)
    source = LayerSource(client, state, root, approval=approval)
    try:
        plan, _, _ = compute_plan(source, desired, current, state.owned(), repair=True)
    finally:
        source.close()
    drift = [c for c in plan.changes if c.action is not Action.DELETE or
             c.path in state.owned()]
    if not drift:
        return None
    result = UpdateResult(key=desired.key, state="repaired")
    switch(client, state, root, desired, current, result, approval, repair=True)
    report(client, desired.key, UpdateState.APPLIED, percent=100.0,
           detail="repaired drift: " + _describe({"changes": result.changes, "conflicts": {}},
                                                 done=True),
           downloaded=result.bytes_downloaded)
    centralize("post-update")
    return result
