"""Switch an endpoint's tree to its target under a journal: whenever the power goes, the
next start ends in either the whole old tree or the whole new tree, never a mix.

Everything happens in `work`, a directory on the same filesystem as the tree (the agent
uses ROOT/.strata-apply, excludes it from scans and removes it once nothing is pending);
`format` describes its files. Phases (`format.Phase`): ``staging`` -> ``staged`` ->
``switching`` -> ``done``, or, when the switch fails, ``switching`` -> ``rolling-back``
-> ``rolled-back``. Every change to the phase file is an atomic, fsynced replace.
Nothing in the tree is touched before ``switching`` is on disk, so ``recover()``
discards a ``staging``/``staged`` apply, rolls a ``switching`` one forward, finishes a
rollback, and after ``done``/``rolled-back`` only cleans up.

Each change becomes one operation (`staging`), and each operation is one or two renames
whose state can be read off the disk (`switching`), so both directions are idempotent
and a crash inside recovery is recovered again the same way:

* put (ADD/REPLACE, and missing parent directories): if stage/N exists the new object has
  not moved in yet; then whatever is at the path is renamed to backup/N and stage/N is
  renamed into place. Undo: path -> stage/N (when stage/N is gone), backup/N -> path.
* delete: the path is renamed to backup/N (backup/N exists = done); a directory only when
  it is empty by then, otherwise it stays with a warning (files that are not part of the
  update live in it). Undo: backup/N -> path.
* meta (META, and ADD/REPLACE of a directory that is already a directory): mode, owner,
  times (a symlink's own too) and xattrs set in place; the old values are in the journal
  for the rollback.

Deletes run children first, then puts and metas parents first, then directory modes and
times deepest first (a directory's mtime moves whenever something is renamed into it).
A rollback undoes puts and metas children first, then deletes parents first, then puts
back the old mode and times of every directory the switch renamed things in or out of,
so the old tree comes back stat for stat.

Paths are validated, every directory of the tree is reached with openat(O_NOFOLLOW) from
a held fd of the root (`strata.tree.dirfd`) and every rename is relative to such fds: a
symlink in the tree (placed by a user, or swapped in mid-way) cannot redirect a write
outside it. Staged objects are written by the same `TreeWriter` as a restore.

Durability relies on the filesystem keeping metadata operations in order (ext4, xfs and
btrfs do): the renames of one switch are not fsynced one by one, but every directory
they touched is fsynced before ``done`` (or ``rolled-back``) is written.
"""

from strata.layers.apply.format import Phase
from strata.layers.apply.journal import COMPLETED, DISCARDED, ROLLED_BACK, ApplyJournal
from strata.layers.apply.switching import ApplyStats

__all__ = ["COMPLETED", "DISCARDED", "ROLLED_BACK", "ApplyJournal", "ApplyStats", "Phase"]
