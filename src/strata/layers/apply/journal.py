"""ApplyJournal: the public face of an apply (stage, switch, roll back, recover), and the
phase transitions that make each of them safe to interrupt."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterable
from typing import Any

import msgpack

from strata.errors import StrataError
from strata.layers.apply.crashpoints import step
from strata.layers.apply.format import (
    BACKUP,
    JOURNAL,
    PHASE,
    STAGE,
    Journal,
    Phase,
    decode_phase,
    encode_phase,
)
from strata.layers.apply.session import Session, lock_work_dir, session
from strata.layers.apply.staging import Stager, checked
from strata.layers.apply.switching import ApplyStats, backward, forward
from strata.layers.changes import Change
from strata.model.entry import Entry
from strata.tree.durable import replace_file
from strata.tree.scan import display

# What recover() and rollback() report.
COMPLETED, DISCARDED, ROLLED_BACK = "completed", "discarded", "rolled-back"
_UNSWITCHED = (Phase.STAGING, Phase.STAGED)


class ApplyJournal:
    """Stage a list of changes beside an endpoint's tree, then switch the tree to them
    under a journal (see the package docstring for the design)."""

    def __init__(self, root: str | os.PathLike, work: str | os.PathLike) -> None:
        """`root`: the endpoint's tree. `work`: a directory on the same filesystem (the
        agent passes ROOT/.strata-apply); created if needed. Changes may not touch it."""
        self.root = os.path.abspath(os.fsencode(root))
        self.work = os.path.abspath(os.fsencode(work))
        rel = os.path.relpath(self.work, self.root)
        if os.path.relpath(self.root, self.work).split(b"/")[0] != b"..":
            raise StrataError("the apply work directory cannot be or contain the tree")
        self._work_rel = None if rel.split(b"/")[0] == b".." else rel
        self.restore_owner = os.geteuid() == 0
        os.makedirs(self.work, mode=0o700, exist_ok=True)

    # -- public API ------------------------------------------------------------------------

    def pending(self) -> Phase | None:
        """The phase of an unfinished apply found on disk, or None."""
        try:
            with open(os.path.join(self.work, PHASE.encode()), "rb") as f:
                raw = f.read()
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            return decode_phase(raw)
        except (ValueError, KeyError, TypeError):
            raise StrataError(f"unreadable apply phase file in {display(self.work)}") from None

    def recover(self) -> str | None:
        """Finish what a killed run left: roll a started switch forward, discard an
        unfinished staging, finish a started rollback. Returns "completed", "discarded",
        "rolled-back", or None when nothing was pending."""
        with session(self.root, self.work) as s:
            phase = self.pending()
            if phase is None:
                self._cleanup(s, remove_phase=False)  # stray files of a finished run
                return None
            if phase in _UNSWITCHED:
                self._cleanup(s)
                return DISCARDED
            if phase is Phase.SWITCHING:
                forward(s, self._load())
                phase = self._set_phase(s, Phase.DONE)
            elif phase is Phase.ROLLING_BACK:
                backward(s, self._load())
                phase = self._set_phase(s, Phase.ROLLED_BACK)
            self._cleanup(s)
            return COMPLETED if phase is Phase.DONE else ROLLED_BACK

    def rollback(self) -> str | None:
        """Restore the old tree from the backups (a switch that failed, e.g. disk full).
        Returns "rolled-back", "discarded" (nothing was switched yet) or None."""
        with session(self.root, self.work) as s:
            phase = self.pending()
            if phase is None:
                return None
            if phase in _UNSWITCHED:
                self._cleanup(s)
                return DISCARDED
            if phase is Phase.DONE:
                self._cleanup(s)
                raise StrataError("the switch had already completed: nothing to roll back")
            if phase in (Phase.SWITCHING, Phase.ROLLING_BACK):
                if phase is Phase.SWITCHING:
                    self._set_phase(s, Phase.ROLLING_BACK)
                backward(s, self._load())
                self._set_phase(s, Phase.ROLLED_BACK)
            self._cleanup(s)
            return ROLLED_BACK

    def stage(self, changes: list[Change], data: Callable[[Entry], Iterable[bytes]]) -> None:
        """Write every ADD/REPLACE target into work/stage with its metadata (files fsynced),
        then the journal, durably. Nothing in the tree changes. `data(entry)` yields a
        FILE's content; it must raise (e.g. CorruptData) on bad bytes: staging then fails
        and is discarded. Raises StrataError if an apply is pending (recover first),
        UnsafePath for paths that would leave the tree."""
        changes = checked(changes, self._work_rel)
        with session(self.root, self.work) as s:
            phase = self.pending()
            if phase is not None:
                raise StrataError(f"an unfinished apply is pending in {display(self.work)} "
                                  f"(phase {phase}): recover it first")
            self._cleanup(s, remove_phase=False)
            self._set_phase(s, Phase.STAGING)
            try:
                s.open_work_dirs(create=True)
                journal = Stager(s, self.restore_owner).stage(changes, data)
                step("journal")
                self._write_durably(s, JOURNAL, journal.encode())
                self._set_phase(s, Phase.STAGED)
            except BaseException:
                try:
                    self._cleanup(s)
                except OSError:
                    pass  # the "staging" phase stays: recover() discards it
                raise

    def switch(self) -> ApplyStats:
        """Carry out the staged changes (phase "switching", durably, first), then mark the
        apply done and remove stage, backups and journal. On an exception the journal
        stays "switching": call rollback() or recover()."""
        with session(self.root, self.work) as s:
            phase = self.pending()
            if phase not in (Phase.STAGED, Phase.SWITCHING):
                raise StrataError(f"nothing staged to switch (apply phase: {phase})")
            journal = self._load()
            if phase is Phase.STAGED:
                self._set_phase(s, Phase.SWITCHING)
            stats = forward(s, journal)
            self._set_phase(s, Phase.DONE)
            stats.warnings += self._cleanup(s)
            return stats

    def apply(self, changes: list[Change],
              data: Callable[[Entry], Iterable[bytes]]) -> ApplyStats:
        """stage() then switch(); if the switch raises, roll back and re-raise."""
        if not changes:
            if self.pending() is not None:
                raise StrataError(f"an unfinished apply is pending in {display(self.work)}: "
                                  "recover it first")
            return ApplyStats()
        self.stage(changes, data)
        try:
            return self.switch()
        except Exception as exc:
            try:
                self.rollback()
            except Exception as again:
                exc.add_note(f"rolling back failed too ({again}); the next recovery retries")
            raise

    def remove_work_dir(self) -> bool:
        """Remove the work directory unless an apply is pending or running in it, so that
        a finished apply leaves nothing in the endpoint's tree. Returns whether it is
        gone. Never raises: it is tidying up."""
        try:
            fd = lock_work_dir(self.work, self.root) if os.path.isdir(self.work) else -1
        except (StrataError, OSError):
            return False  # another apply holds it
        if fd < 0:
            return not os.path.lexists(self.work)
        try:
            # Empty = nothing pending (a pending apply has its phase file); removed while
            # locked, so no apply starts in it meanwhile (see lock_work_dir).
            os.rmdir(self.work)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    # -- phase and journal files ------------------------------------------------------------

    def _write_durably(self, s: Session, name: str, data: bytes) -> None:
        try:
            replace_file(s.work_fd, name, data)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StrataError(f"no space left to write the apply {name}: "
                                  f"{exc.strerror}") from None
            raise

    def _set_phase(self, s: Session, phase: Phase) -> Phase:
        step(f"phase {phase}")
        self._write_durably(s, PHASE, encode_phase(phase))
        return phase

    def _load(self) -> Journal:
        try:
            with open(os.path.join(self.work, JOURNAL.encode()), "rb") as f:
                return Journal.decode(f.read())
        except (OSError, ValueError, KeyError, TypeError, msgpack.UnpackException) as e:
            raise StrataError(f"the apply journal in {display(self.work)} is unreadable "
                              f"({e}): the tree may be half switched") from None

    def _cleanup(self, s: Session, remove_phase: bool = True) -> list[str]:
        """Remove stage/, backup/ and the journal, then the phase file (last: until it
        goes, a crash here is cleaned up again). Returns warnings for what would not go."""
        step("cleanup")
        warnings: list[str] = []
        s.close_work_dirs()
        for name in (STAGE, BACKUP):
            path = os.path.join(self.work, name.encode())
            if os.path.lexists(path):
                _rmtree(path, warnings)
        for name in (JOURNAL, f".{JOURNAL}.tmp", f".{PHASE}.tmp",
                     *((PHASE,) if remove_phase else ())):
            try:
                os.unlink(name, dir_fd=s.work_fd)
            except FileNotFoundError:
                pass
        os.fsync(s.work_fd)
        return warnings


def _rmtree(path: bytes, warnings: list[str]) -> None:
    """Remove a work directory, making read-only directories in it writable if needed."""

    def retry(func: Callable[..., object], p: Any, _exc: object) -> None:  # p: bytes
        try:
            os.chmod(os.path.dirname(p), 0o700)
            func(p)
        except OSError as exc:
            warnings.append(f"{display(p)}: could not remove: {exc.strerror}")

    shutil.rmtree(path, onerror=retry)
