"""Account databases merged by key, record by record: what a base update does to
``/etc/passwd``, ``group``, ``shadow``, ``gshadow``, ``subuid`` and ``subgid`` instead of
replacing them, so that the endpoint's own accounts survive it.

Pure functions on bytes. Three inputs: O, the old base's copy (what the previously applied
layers laid down; None when unknown), E, the endpoint's copy, and N, the new base's. The
result is N's accounts (the system accounts its files are owned by) plus the endpoint's
own accounts, by these rules:

* A record of N is always in the result.
* A record the endpoint did not change (E's equals O's) takes N's version, or goes when N
  dropped it.
* A record only the endpoint has (not in O, or O unknown) is kept as it is; so is one the
  endpoint changed that N dropped.
* A record both E and N have is merged field by field (``Format``): a field that is the
  endpoint's business (a password hash, a full name, a login shell) keeps the endpoint's
  value when the endpoint changed it (E != O; always, when O does not have the record),
  every other field takes N's; member lists are merged as sets: N's members, minus those
  the endpoint removed, plus those it added ((N - (O - E)) | (E - O); N | E without O).
* Subordinate id ranges (``subuid``, ``subgid``) are whole-line records: N's ranges plus
  those the endpoint added.

The merge never decides between two owners of one id. A clash is reported and the caller
holds the update until someone resolves it: an endpoint's own account whose uid or gid the
new base gives to another name, an account both sides have under different ids (unless
the endpoint never renumbered it: then the base did, and its files follow N), or an
endpoint's subordinate range that overlaps one of the new base's.

Layout: N's lines keep their order (comments and blank lines included), then the
endpoint's own records in E's order; NIS compat entries (``+``/``-`` names) go last, as
their meaning needs. E's comments are not carried over (the files have no syntax to tie
them to a record).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

MAX_DATABASE_BYTES = 16 << 20  # far beyond any real account file; bounds the work


class AccountsUnmergeable(ValueError):
    """A database cannot be merged (malformed, duplicated names, too large)."""


@dataclass(frozen=True)
class Format:
    """One account database: its field count and what each field is."""

    name: str
    fields: int
    id_field: int | None = None  # uid (passwd) or gid (group): unique per name
    id_name: str = ""
    endpoint_fields: frozenset[int] = frozenset()  # the endpoint's business once changed
    member_fields: frozenset[int] = frozenset()  # comma-separated sets of names
    ranges: bool = False  # subuid/subgid: name:start:count, the whole line is the key


# passwd  name:password:uid:gid:gecos:home:shell. The password field ("x", or a hash on
#         systems without shadow), the full name (chfn) and the shell (chsh) are the
#         endpoint's; ids, primary group and home directory are the base's.
PASSWD = Format("passwd", 7, id_field=2, id_name="uid", endpoint_fields=frozenset({1, 4, 6}))
# group   name:password:gid:members. gpasswd's password is the endpoint's; members merge.
GROUP = Format("group", 4, id_field=2, id_name="gid", endpoint_fields=frozenset({1}),
               member_fields=frozenset({3}))
# shadow  name:hash:lastchg:min:max:warn:inactive:expire:reserved. All of it is the local
#         credential and its ageing (passwd, chage): the endpoint's once changed.
SHADOW = Format("shadow", 9, endpoint_fields=frozenset(range(1, 9)))
# gshadow name:password:administrators:members.
GSHADOW = Format("gshadow", 4, endpoint_fields=frozenset({1}),
                 member_fields=frozenset({2, 3}))
SUBUID = Format("subuid", 3, ranges=True)
SUBGID = Format("subgid", 3, ranges=True)

# The databases by path, per OS family. Windows keeps its accounts in the SAM hive, which
# the layer rules treat as identity (docs/windows.md).
DATABASES: dict[str, dict[bytes, Format]] = {
    "linux": {b"etc/passwd": PASSWD, b"etc/group": GROUP, b"etc/shadow": SHADOW,
              b"etc/gshadow": GSHADOW, b"etc/subuid": SUBUID, b"etc/subgid": SUBGID},
    "windows": {},
}


def database_for(path: bytes, family: str) -> Format | None:
    return DATABASES.get(family, {}).get(path)


@dataclass(frozen=True)
class Clash:
    """Two owners for one name, id or id range: the update waits until it is resolved."""

    database: str
    what: str  # "uid 1000", "name alice", "range 100000-165535"
    endpoint: str  # the endpoint's side, e.g. "alice (uid 1000)"
    base: str  # the new base's side

    def __str__(self) -> str:
        return (f"{self.database}: {self.what} is the endpoint's {self.endpoint} and the new "
                f"base's {self.base}")


@dataclass
class MergeResult:
    content: bytes
    clashes: list[Clash] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # the endpoint's own records kept
    added: list[str] = field(default_factory=list)  # N's records E did not have
    dropped: list[str] = field(default_factory=list)  # untouched records N no longer has

    def describe(self) -> str:
        parts = []
        if self.kept:
            parts.append(f"kept {len(self.kept)} of the endpoint's own ({_names(self.kept)})")
        if self.added:
            parts.append(f"the new base adds {len(self.added)} ({_names(self.added)})")
        if self.dropped:
            parts.append(f"the new base drops {len(self.dropped)} ({_names(self.dropped)})")
        return "; ".join(parts) or "merged"


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# -- parsing -------------------------------------------------------------------------------

Record = tuple[bytes, ...]


@dataclass
class _Table:
    """A parsed database: its lines in order (a record's key, or the raw line of a comment
    or blank line) and its records by key."""

    lines: list[tuple[bytes | None, bytes]]  # (key or None, raw line)
    records: dict[bytes, Record]


def _key(fmt: Format, rec: Record) -> bytes:
    return b":".join(rec) if fmt.ranges else rec[0]


def parse(fmt: Format, data: bytes, side: str) -> _Table:
    if len(data) > MAX_DATABASE_BYTES:
        raise AccountsUnmergeable(f"{side}'s {fmt.name} is {len(data)} bytes, more than the "
                                  f"{MAX_DATABASE_BYTES} a merge reads")
    lines: list[tuple[bytes | None, bytes]] = []
    records: dict[bytes, Record] = {}
    raw_lines = data.split(b"\n")
    if raw_lines[-1] == b"":
        raw_lines.pop()  # what follows the final newline
    for n, raw in enumerate(raw_lines, 1):
        line = raw.rstrip(b"\r")
        if not line.strip() or line.lstrip().startswith(b"#"):
            lines.append((None, line))
            continue
        rec = tuple(line.split(b":"))
        where = f"{side}'s {fmt.name}, line {n}"
        if len(rec) != fmt.fields:
            raise AccountsUnmergeable(f"{where}: {len(rec)} fields, expected {fmt.fields}")
        if not rec[0]:
            raise AccountsUnmergeable(f"{where}: no name")
        if fmt.id_field is not None and not _nis(rec[0]) and not rec[fmt.id_field].isdigit():
            raise AccountsUnmergeable(f"{where}: {fmt.id_name} {_text(rec[fmt.id_field])!r} is "
                                      "not a number")
        if fmt.ranges and not (rec[1].isdigit() and rec[2].isdigit()):
            raise AccountsUnmergeable(f"{where}: a range is START:COUNT in digits")
        key = _key(fmt, rec)
        if key in records:
            if fmt.ranges:
                continue  # the same range twice says nothing more
            raise AccountsUnmergeable(f"{where}: {_text(rec[0])} is named twice (pwck and "
                                      "grpck can fix it)")
        records[key] = rec
        lines.append((key, line))
    return _Table(lines, records)


def _nis(name: bytes) -> bool:
    return name[:1] in (b"+", b"-")


def _text(b: bytes) -> str:
    return b.decode("utf-8", "backslashreplace")


# -- merging ---------------------------------------------------------------------------------


def merge_database(fmt: Format, old: bytes | None, endpoint: bytes, new: bytes) -> MergeResult:
    """Merge one database; raise AccountsUnmergeable when one of the copies is malformed."""
    o = parse(fmt, old, "the old base") if old is not None else None
    e = parse(fmt, endpoint, "the endpoint")
    n = parse(fmt, new, "the new base")
    result = MergeResult(b"")
    if fmt.ranges:
        return _merge_ranges(fmt, o, e, n, result)
    out: list[bytes] = []  # lines, in N's order
    base_recs: dict[bytes, Record] = {}
    for key, raw in n.lines:
        if key is None:
            out.append(raw)
            continue
        nr = n.records[key]
        er = e.records.get(key)
        orr = o.records.get(key) if o is not None else None
        if er is None:
            rec = nr
            if o is None or orr is None:  # E never had it: new (or deleted locally: back)
                result.added.append(_text(key))
        elif er == nr:
            rec = nr
        else:
            rec = _merge_fields(fmt, orr, er, nr, result)
        base_recs[key] = rec
        out.append(b":".join(rec))
    own: list[Record] = []
    for key, _ in e.lines:
        if key is None or key in n.records:
            continue
        er = e.records[key]
        if o is not None and o.records.get(key) == er:
            result.dropped.append(_text(key))  # untouched, and the new base dropped it
            continue
        own.append(er)
        result.kept.append(_text(key))
    if fmt.id_field is not None:
        _id_clashes(fmt, base_recs, own, e, result)
    out += [b":".join(r) for r in own]
    result.content = _nis_last(out)
    return result


def _merge_fields(fmt: Format, o: Record | None, e: Record, n: Record,
                  result: MergeResult) -> Record:
    """One record both the endpoint and the new base have. `o` is the old base's (None
    when unknown or when the old base did not have it: a two-way merge)."""
    out = list(n)
    for i in range(1, fmt.fields):
        if i == fmt.id_field:
            continue
        if i in fmt.member_fields:
            out[i] = _merge_members(o[i] if o is not None else None, e[i], n[i])
        elif i in fmt.endpoint_fields and (o is None or e[i] != o[i]):
            out[i] = e[i]
    idf = fmt.id_field
    if idf is not None and e[idf] != n[idf]:
        # The base renumbering its own account (the endpoint kept O's id) is the base's
        # business: its files carry N's id. Any other disagreement has two owners.
        if o is None or e[idf] != o[idf]:
            name = _text(e[0])
            result.clashes.append(Clash(fmt.name, f"name {name}",
                                        f"{name} ({fmt.id_name} {_text(e[idf])})",
                                        f"{name} ({fmt.id_name} {_text(n[idf])})"))
    return tuple(out)


def _merge_members(o: bytes | None, e: bytes, n: bytes) -> bytes:
    def split(v: bytes) -> list[bytes]:
        return [m for m in v.split(b",") if m]
    ns, es = split(n), split(e)
    if o is None:  # nobody can tell what the endpoint removed: keep every membership
        return b",".join(ns + [m for m in es if m not in ns])
    os_ = set(split(o))
    removed = os_ - set(es)
    return b",".join([m for m in ns if m not in removed] +
                     [m for m in es if m not in os_ and m not in ns])


def _id_clashes(fmt: Format, base: dict[bytes, Record], own: list[Record], e: _Table,
                result: MergeResult) -> None:
    """An id the new base gives to one name while an endpoint's own account holds it."""
    assert fmt.id_field is not None
    idf = fmt.id_field
    own_by_id: dict[bytes, Record] = {}
    for r in own:
        if not _nis(r[0]):
            own_by_id.setdefault(r[idf], r)
    for key, r in base.items():
        other = own_by_id.get(r[idf])
        if other is None or _nis(key):
            continue
        had = e.records.get(key)
        if had is not None and had[idf] == r[idf]:
            continue  # both already lived side by side on the endpoint: nothing new
        result.clashes.append(Clash(fmt.name, f"{fmt.id_name} {_text(r[idf])}",
                                    _text(other[0]), _text(key)))


def _merge_ranges(fmt: Format, o: _Table | None, e: _Table, n: _Table,
                  result: MergeResult) -> MergeResult:
    out = [raw for _, raw in n.lines]
    mine: list[Record] = []
    for key, _ in e.lines:
        if key is None or key in n.records:
            continue
        if o is not None and key in o.records:
            result.dropped.append(_text(key))
            continue
        mine.append(e.records[key])
        result.kept.append(_text(key))
    # Each of the endpoint's ranges against each of N's: N's are the base's few lines, so
    # this stays linear in the endpoint's copy (which the server's dry-run reads too).
    for r in mine:
        start, count = int(r[1]), int(r[2])
        for b in n.records.values():
            if b[0] != r[0] and start < int(b[1]) + int(b[2]) and int(b[1]) < start + count:
                result.clashes.append(Clash(
                    fmt.name, f"range {start}-{start + count - 1}", _text(r[0]),
                    f"{_text(b[0])} ({int(b[1])}-{int(b[1]) + int(b[2]) - 1})"))
    out += [b":".join(r) for r in mine]
    result.content = _join(out)
    return result


def _nis_last(lines: list[bytes]) -> bytes:
    compat = [ln for ln in lines if ln[:1] in (b"+", b"-")]
    return _join([ln for ln in lines if ln[:1] not in (b"+", b"-")] + compat)


def _join(lines: Iterable[bytes]) -> bytes:
    text = b"\n".join(lines)
    return text + b"\n" if text else b""
