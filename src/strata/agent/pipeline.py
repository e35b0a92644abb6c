"""Pipelined restore of a CVD onto new hardware: the boot set first (the files the
endpoint read at boot and first login, learned by agent/usage.py), then the working set,
then the rest, in slices, while the user works. The endpoint is usable, and says so, as
soon as the boot set is in place.

The plan is the one a whole restore applies (agent/update.py: the same image, rules and
mode); only its order and its cut into slices differ. Each slice is downloaded (chunks
kept one by one as they arrive: agent/resume.py) and then switched under the apply
journal, so a kill or power cut at any point leaves whole files only and the restore
resumes at its first slice not done. Slices after the first are laid down while the
user works: a file the user created or changed meanwhile at a path of a later slice is
the user's, and stays (reported; the CVD's version is in the snapshot).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from strata.agent.client import ServerClient, ServerUnreachable, parse_answer
from strata.agent.notify import notify_user
from strata.agent.signing import save_record
from strata.agent.state import AgentState
from strata.agent.update import (
    WORK_DIR,
    Centralizer,
    LayerSource,
    LocalTree,
    UpdateFailed,
    UpdateResult,
    compute_plan,
    owned_image,
    report,
)
from strata.engine.progress import Progress
from strata.errors import StrataError
from strata.layers.accounts import database_for
from strata.layers.apply import ApplyJournal
from strata.layers.changes import Action, Change
from strata.layers.rules import LayerRules, PathClass
from strata.model.entry import Entry, EntryType
from strata.model.manifest import decode_manifest, encode_manifest
from strata.model.update import UpdateState
from strata.model.usage import UsageSets
from strata.model.wire import DesiredState
from strata.signing.policy import Approval
from strata.store.backend import atomic_write
from strata.tree.order import path_key
from strata.tree.scan import display

SLICE_BYTES = 16 << 20  # content per slice after the boot set: files appear as they come
RECORD = "restore.json"
BASELINE = "restore-baseline.manifest"  # the tree the restore started from
BOOT, WORKING, REST, COMPLETE = "boot", "working", "rest", "complete"
_REPORT_SECONDS = 2.0
KEPT_LISTED = 20


@dataclass
class Slice:
    phase: str  # boot, working or rest
    changes: list[Change]
    bytes: int = 0  # file content it lays down


def _content(ch: Change) -> int:
    """Bytes of file content a change writes (0: nothing to download for it)."""
    e = ch.entry
    if ch.action in (Action.ADD, Action.REPLACE) and e is not None and \
            e.type is EntryType.FILE and ch.content is None:
        return e.size
    return 0


def order_restore(changes: list[Change], boot: set[bytes],
                  working: set[bytes] | dict[bytes, int], *,
                  slice_bytes: int = SLICE_BYTES) -> list[Slice]:
    """Cut a restore's changes into slices: first one slice with the boot set and
    everything that carries no content (directories, symlinks, empty files, metadata:
    the tree's skeleton, so that every later file has its parent), then the working set
    (by rank when `working` gives one: the most recently used first), then the rest in
    tree order (neighbours compress together), in slices of about `slice_bytes`;
    deletions last (the new machine's own files stay until the CVD is whole). A hardlink
    goes with the file it names, a directory that becomes a file with the deletions that
    empty it."""
    first: list[Change] = []
    by_phase: dict[str, list[Change]] = {WORKING: [], REST: []}
    last: list[Change] = []
    links: list[Change] = []
    for ch in sorted(changes, key=lambda c: path_key(c.path)):
        e = ch.entry
        if ch.action is Action.DELETE or (ch.old is not None and ch.old.type is EntryType.DIR
                                          and e is not None and e.type is not EntryType.DIR):
            last.append(ch)
        elif e is not None and e.type is EntryType.HARDLINK and \
                ch.action is not Action.META:
            links.append(ch)
        elif _content(ch) == 0 or ch.path in boot:
            first.append(ch)
        else:
            by_phase[WORKING if ch.path in working else REST].append(ch)
    if isinstance(working, dict):
        by_phase[WORKING].sort(key=lambda c: working[c.path])
    slices = [Slice(BOOT, first, sum(map(_content, first)))]
    for phase in (WORKING, REST):
        current: Slice | None = None
        for ch in by_phase[phase]:
            n = _content(ch)
            if current is None or current.changes and current.bytes + n > slice_bytes:
                current = Slice(phase, [])
                slices.append(current)
            current.changes.append(ch)
            current.bytes += n
    if last:
        slices.append(Slice(REST, last))
    where = {ch.path: s for s in slices for ch in s.changes}
    for ch in links:
        assert ch.entry is not None
        where.get(ch.entry.link_target, slices[0]).changes.append(ch)
    for s in slices:
        s.changes.sort(key=lambda c: path_key(c.path))
    return slices


def first_sets(sets: UsageSets, changes: list[Change],
               rules: LayerRules) -> tuple[set[bytes], dict[bytes, int], str]:
    """The boot set and the working set (path -> rank, most recent first) as paths of the
    plan, and where they come from. With nothing learned (a CVD whose endpoint never
    reported them), the system comes first and the user's data after: the best order
    known without it."""
    boot = {p.encode() for p in sets.boot}
    working = {p.encode(): rank for rank, p in enumerate(sets.working)}
    if boot:
        return boot, working, f"learned over {sets.boots_seen} boot(s)"
    system = {ch.path for ch in changes if ch.entry is not None and
              rules.classify(ch.path, ch.entry.type is EntryType.DIR) is not PathClass.USER_DATA}
    return system, working, "none learned: the system first, then user data"


# -- progress, kept across restarts ---------------------------------------------------------


@dataclass
class RestoreRecord:
    """Where a pipelined restore stands (state/restore.json): what `agent status` shows
    and what a resumed run skips."""

    key: str
    started: float  # seconds since the epoch (wall clock: a restart in between counts)
    phase: str = BOOT
    slices_done: int = 0
    bytes_total: int = 0
    bytes_done: int = 0
    usable_at: float | None = None
    complete_at: float | None = None
    pre_update_snapshot: str | None = None
    order: str = ""  # where the boot set came from
    boot_files: int = 0
    sets: dict = field(default_factory=dict)  # the UsageSets it restores by (a resume
    # orders exactly as the start did, whatever the server says by then)
    kept: list[str] = field(default_factory=list)  # the user's files, kept (first few)
    kept_count: int = 0
    snapshot: str = ""  # the CVD snapshot being restored (`agent restore PATH` reads it)

    @classmethod
    def load(cls, state_dir: Path) -> RestoreRecord | None:
        try:
            return cls(**json.loads((state_dir / RECORD).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def save(self, state_dir: Path) -> None:
        atomic_write(state_dir / RECORD, json.dumps(asdict(self)).encode())

    def status(self) -> dict:
        """The `restore` block of `agent status --json`."""
        return {"phase": self.phase,
                "usable_after_s": None if self.usable_at is None
                else round(self.usable_at - self.started, 3),
                "complete_after_s": None if self.complete_at is None
                else round(self.complete_at - self.started, 3),
                "bytes_total": self.bytes_total, "bytes_done": self.bytes_done,
                "boot_set": self.order, "boot_files": self.boot_files,
                "kept_user_files": self.kept_count, "snapshot": self.snapshot}


def restore_status(state_dir: Path) -> dict | None:
    rec = RestoreRecord.load(state_dir)
    return None if rec is None else rec.status()


def restoring_snapshot(state_dir: Path) -> str | None:
    """The snapshot a pipelined restore is laying down, while it is: a file that has not
    arrived yet is fetched from it at once by `strata agent restore PATH` (the restore
    then finds it in place and skips it)."""
    rec = RestoreRecord.load(state_dir)
    return rec.snapshot or None if rec is not None and rec.phase != COMPLETE else None


# -- the user's files, laid down meanwhile ----------------------------------------------------


def _same_file(st: os.stat_result, e: Entry) -> bool:
    return st.st_size == e.size and st.st_mtime_ns == e.mtime_ns


def _in_place(st: os.stat_result, e: Entry) -> bool:
    return _same_file(st, e) and (st.st_mode & 0o7777) == (e.mode & 0o7777)


def still_due(base: bytes, changes: list[Change]) -> tuple[list[Change], list[bytes]]:
    """The changes of a slice that are still to be made, and the paths the user wrote
    since the restore started (kept). A file already as the target has it (the slice ran
    before a kill, after its switch) is done; a file neither as the restore found it nor
    as the target has it is the user's."""
    due: list[Change] = []
    kept: list[bytes] = []
    for ch in changes:
        e, old = ch.entry, ch.old
        files = [x for x in (e, old) if x is not None and x.type is EntryType.FILE]
        if not files:
            due.append(ch)  # directories, links: no one's work is in them
            continue
        try:
            st: os.stat_result | None = os.lstat(os.path.join(base, ch.path))
        except FileNotFoundError:
            st = None
        except OSError:
            due.append(ch)  # the journal reports what it cannot do
            continue
        is_file = st is not None and stat.S_ISREG(st.st_mode)
        if st is not None and is_file and e is not None and e.type is EntryType.FILE \
                and _in_place(st, e):
            continue  # in place already
        as_found = (st is None) if old is None else (
            st is not None and (old.type is not EntryType.FILE or is_file and
                                _same_file(st, old)))
        if as_found:
            due.append(ch)
        elif ch.action is Action.DELETE and st is None:
            continue  # gone already
        else:
            kept.append(ch.path)
    return due, kept


# -- the run ----------------------------------------------------------------------------------


def say(line: str) -> None:
    """The agent's log line (stderr: the journal, when it runs as a systemd unit)."""
    print(f"strata agent: {line}", file=sys.stderr, flush=True)


@dataclass
class Pipeline:
    """Collaborators of a run, injected by tests: the clock, the log, the user's prompt."""

    clock: Callable[[], float] = time.time
    log: Callable[[str], None] = say
    notify: Callable[[str, str], object] = notify_user
    slice_bytes: int = SLICE_BYTES


def fetch_sets(client: ServerClient) -> UsageSets:
    """This endpoint's sets (the CVD's, moved here by the restore), validated like any
    answer; none when the server has none or cannot say (the order is all that is lost)."""
    resp = client.request("GET", "/api/v1/agent/usage")
    return parse_answer(resp, UsageSets)


def restore_pipelined(client: ServerClient, state: AgentState, tree: LocalTree,
                      desired: DesiredState, approval: Approval, centralize: Centralizer,
                      progress: Progress | None = None,
                      run: Pipeline | None = None) -> UpdateResult:
    """The whole restore, from where it stands: start (pre-restore snapshot, the sets,
    the baseline) or resume, lay the slices down, then record what IT owns, report
    applied and centralize."""
    run = run or Pipeline()
    root = tree.root
    rec = RestoreRecord.load(state.path)
    started = time.monotonic()
    if rec is None or rec.key != desired.key:
        rec = _start(client, state, desired, centralize, run)
    baseline = list(decode_manifest([(state.path / BASELINE).read_bytes()]))
    state.save_update({"key": desired.key, "state": UpdateState.DOWNLOADING,
                       "desired": desired.model_dump(), "approval": approval.to_dict(),
                       "pipelined": True})
    source = LayerSource(client, state, root, approval=approval)
    result = UpdateResult(key=desired.key, state=UpdateState.APPLIED,
                          pre_update_snapshot=rec.pre_update_snapshot)
    try:
        plan, image, rules = compute_plan(source, desired, baseline, state.owned())
        boot, working, rec.order = first_sets(UsageSets.model_validate(rec.sets),
                                              plan.changes, rules)
        slices = order_restore(plan.changes, boot, working, slice_bytes=run.slice_bytes)
        if rec.slices_done == 0:
            _check_space(root, plan.bytes_to_write())
        rec.bytes_total = sum(s.bytes for s in slices)
        rec.boot_files = sum(1 for c in slices[0].changes if _content(c))
        source.computed = plan.computed_chunks()
        lengths = plan.chunks_in_order()
        base = os.fsencode(root)
        last_report = [0.0]
        for i, sl in enumerate(slices):
            if i < rec.slices_done:
                continue
            # Checked before the download (a file the user fetched early is not fetched
            # again) and again before the switch (the user works meanwhile).
            due, kept = still_due(base, sl.changes)
            _download(source, due, lengths, progress, rec)
            due, later = still_due(base, due)
            _keep_noted(rec, kept + later)
            journal = ApplyJournal(root, root / WORK_DIR)
            try:
                stats = journal.apply(due, source.data)
            finally:
                journal.remove_work_dir()
            result.warnings += list(getattr(stats, "warnings", []))[:20]
            rec.slices_done, rec.bytes_done = i + 1, rec.bytes_done + sl.bytes
            following = slices[i + 1].phase if i + 1 < len(slices) else COMPLETE
            if rec.usable_at is None and following != BOOT:
                rec.usable_at = run.clock()
                _usable(rec, run, client, desired.key, rec.bytes_total - rec.bytes_done)
            rec.phase = following
            rec.save(state.path)
            if time.monotonic() - last_report[0] >= _REPORT_SECONDS:
                last_report[0] = time.monotonic()
                report(client, desired.key, UpdateState.DOWNLOADING,
                       percent=100.0 * rec.bytes_done / max(rec.bytes_total, 1),
                       detail=f"restoring: {rec.phase}; usable since the boot set arrived")
        owned = owned_image(source, desired, rules, image)
        result.warnings += source.keep(e for p, e in owned.entries.items()
                                       if e.type is EntryType.FILE
                                       and database_for(p, rules.family) is not None)
        state.save_owned(b"".join(encode_manifest(owned.sorted_entries())))
        summary = plan.summary()
        result.changes, result.conflicts = summary["changes"], summary["conflicts"]
        result.bytes_downloaded = source.bytes_downloaded
        result.chunks_downloaded = source.chunks_downloaded
        result.bytes_seeded = source.bytes_seeded
    finally:
        source.close()
    rec.complete_at, rec.phase = run.clock(), COMPLETE
    rec.save(state.path)
    save_record(state, approval.after)
    state.save_applied(desired.key)
    state.save_update({"key": desired.key, "state": UpdateState.APPLIED,
                       "changes": result.changes, "pipelined": True})
    (state.path / BASELINE).unlink(missing_ok=True)
    kept_note = f"; {rec.kept_count} file(s) the user wrote meanwhile kept" \
        if rec.kept_count else ""
    run.log(f"restore complete after {rec.complete_at - rec.started:.1f} s "
            f"({rec.bytes_total} bytes){kept_note}")
    report(client, desired.key, UpdateState.APPLIED, percent=100.0,
           detail=f"restored (pipelined): usable after {rec.status()['usable_after_s']} s, "
                  f"complete after {rec.status()['complete_after_s']} s{kept_note}",
           downloaded=result.bytes_downloaded)
    centralize("post-update")
    result.seconds = round(time.monotonic() - started, 3)
    return result


def _start(client: ServerClient, state: AgentState, desired: DesiredState,
           centralize: Centralizer, run: Pipeline) -> RestoreRecord:
    """A new restore: the revert point first (the new machine as it was), which is also
    the tree the plan is made against from now on, then the sets to order by."""
    started = run.clock()
    pre = centralize("pre-update")
    _, manifest = state.parent()
    if manifest is None:
        raise UpdateFailed("no snapshot of this endpoint to restore from")
    atomic_write(state.path / BASELINE, manifest)
    try:
        sets = fetch_sets(client)
    except ServerUnreachable:
        raise  # paused: the next check-in starts again from the record
    except StrataError as exc:  # an order is a hint: without one the restore goes on
        run.log(f"no boot set from the server ({exc}): the system comes first")
        sets = UsageSets()
    rec = RestoreRecord(key=desired.key, started=started, pre_update_snapshot=pre,
                        sets=sets.model_dump(mode="json"),
                        snapshot=next((dl.snapshot for dl in desired.layers
                                       if dl.kind == "snapshot"), ""))
    rec.save(state.path)
    run.log(f"restore started: boot set of {len(sets.boot)} file(s), working set of "
            f"{len(sets.working)}")
    return rec


def _download(source: LayerSource, changes: list[Change], lengths: dict[bytes, int],
              progress: Progress | None, rec: RestoreRecord) -> None:
    ids = list(dict.fromkeys(cid for ch in changes if _content(ch)
                             for cid, _ in ch.entry.chunks))  # type: ignore[union-attr]

    def shown(done: int, total: int) -> None:
        if progress is not None:
            progress.total_bytes, progress.bytes_done = rec.bytes_total, rec.bytes_done + done
    source.download(source.lacking(ids), lengths, shown)


def _keep_noted(rec: RestoreRecord, kept: list[bytes]) -> None:
    rec.kept_count += len(kept)
    room = KEPT_LISTED - len(rec.kept)
    rec.kept += [display(p) for p in kept[:max(room, 0)]]


def _usable(rec: RestoreRecord, run: Pipeline, client: ServerClient, key: str,
            remaining: int) -> None:
    after = rec.usable_at - rec.started if rec.usable_at is not None else 0.0
    run.log(f"usable after {after:.1f} s: the boot set is in place ({rec.boot_files} "
            f"files); {remaining} bytes follow in the background")
    run.notify("Your computer is ready", "Your files are being restored: you can work now; "
               "the rest keeps arriving in the background.")
    report(client, key, UpdateState.DOWNLOADING,
           percent=100.0 * rec.bytes_done / max(rec.bytes_total, 1),
           detail=f"usable after {after:.1f} s (boot set in place); the rest follows")


def _check_space(root: Path, need: int) -> None:
    free = shutil.disk_usage(root).free
    if need > free:
        raise UpdateFailed(f"not enough disk space: the restore writes {need} bytes, "
                           f"{free} are free")
