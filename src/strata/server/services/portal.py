"""The file portal: an end user signs in and reads their own files in their own
endpoint's snapshots (browse by date, search by name, download), nothing else.

What a portal user may read is decided here, for every request, from the catalog and the
snapshot itself, never from the URL: the endpoint is the account's; the path must be the
account's folder (`home`) or beneath it; and an entry is shown only if the home folder's
owner owns it or anyone may read it (a hard link to a root-only file planted in a home
folder stays hidden). Symlinks are listed, never followed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select

from strata.engine.snapshot_tree import Attr
from strata.errors import Conflict, Forbidden, Invalid, NotFound, PathNotInSnapshot
from strata.model.admin import Deleted
from strata.model.entry import EntryType
from strata.model.users import PortalAccountInfo, PortalAccountRequest
from strata.server.catalog.models import Endpoint, PortalAccount, PortalSession, SnapshotRecord
from strata.server.context import ServerContext
from strata.server.passwords import hash_password
from strata.server.services import audit, snapshot_files, snapshots
from strata.server.services.facts import endpoint_family
from strata.server.services.lookup import find_endpoint
from strata.server.services.signin import (
    AddressThrottle,
    check_sign_in,
    end_session,
    live_session,
    open_session,
)

SEARCH_RESULTS = 200  # matches one search shows
SEARCH_VISITS = 200_000  # entries one search may look at (bounded work per request)
_TYPE_NAMES = {EntryType.FILE: "file", EntryType.DIR: "dir", EntryType.SYMLINK: "symlink"}


@dataclass(frozen=True)
class PortalUser:
    name: str
    endpoint_id: str
    home: bytes

    @property
    def actor(self) -> str:
        return f"portal:{self.name}"


@dataclass(frozen=True)
class PortalEntry:
    name: str
    path_hex: str  # the entry's path in the snapshot, as hex (what links carry)
    type: str
    size: int
    mtime: datetime


@dataclass(frozen=True)
class PortalFolder:
    snapshot: str
    time: datetime
    path: str  # relative to home, for display
    path_hex: str
    entries: list[PortalEntry]


# -- accounts (set up by the help desk) ------------------------------------------------------


def _default_home(ep: Endpoint, name: str) -> str:
    return f"Users/{name}" if endpoint_family(ep) == "windows" else f"home/{name}"


def _info(acc: PortalAccount, ep: Endpoint) -> PortalAccountInfo:
    return PortalAccountInfo(name=acc.name, endpoint=ep.id, hostname=ep.hostname,
                             home=acc.home, created_at=acc.created_at)


def create_account(ctx: ServerContext, endpoint_ref: str, req: PortalAccountRequest, *,
                   actor: str) -> PortalAccountInfo:
    hashed = hash_password(req.password)
    with ctx.write() as db:
        ep = find_endpoint(db, endpoint_ref)
        home = snapshot_files.parse_path(req.home or _default_home(ep, req.name))
        if not home:
            raise Invalid("home must be a folder, not the whole snapshot")
        if db.scalar(select(PortalAccount).where(PortalAccount.name == req.name)):
            raise Conflict(f"portal account {req.name!r} exists already")
        acc = PortalAccount(name=req.name, endpoint_id=ep.id, home=home.decode(),
                            password_hash=hashed)
        db.add(acc)
        db.flush()
        info = _info(acc, ep)
    audit.record(ctx, actor, "create-portal-account", req.name, endpoint=info.endpoint,
                 home=info.home)
    return info


def list_accounts(ctx: ServerContext, endpoint_ref: str = "") -> list[PortalAccountInfo]:
    with ctx.session() as db:
        q = select(PortalAccount, Endpoint).join(Endpoint,
                                                 Endpoint.id == PortalAccount.endpoint_id)
        if endpoint_ref:
            q = q.where(PortalAccount.endpoint_id == find_endpoint(db, endpoint_ref).id)
        return [_info(a, e) for a, e in db.execute(q.order_by(PortalAccount.name))]


def delete_account(ctx: ServerContext, name: str, *, actor: str) -> Deleted:
    with ctx.write() as db:
        acc = db.scalar(select(PortalAccount).where(PortalAccount.name == name))
        if acc is None:
            raise NotFound(f"no portal account {name!r}")
        db.delete(acc)  # its sessions go with it (ON DELETE CASCADE)
    audit.record(ctx, actor, "delete-portal-account", name)
    return Deleted(deleted=name)


# -- signing in --------------------------------------------------------------------------------


def login(ctx: ServerContext, name: str, password: str, ip: str,
          throttle: AddressThrottle) -> tuple[PortalUser, str, str]:
    """(the user, the session cookie's value, its CSRF token)."""
    aid = check_sign_in(ctx, PortalAccount, name, password, ip, throttle,
                        who=f"portal:{name}")
    secret, csrf = open_session(ctx, PortalSession, {"account_id": aid})
    user = _user(ctx, aid)
    if user is None:
        raise NotFound("this portal account was deleted")
    audit.record(ctx, user.actor, "portal-login", user.endpoint_id, ip=ip)
    return user, secret, csrf


def _user(ctx: ServerContext, account_id: int) -> PortalUser | None:
    with ctx.session() as db:
        acc = db.get(PortalAccount, account_id)
        return PortalUser(acc.name, acc.endpoint_id, acc.home.encode()) if acc else None


def session_user(ctx: ServerContext, secret: str) -> tuple[PortalUser, str] | None:
    sess = live_session(ctx, PortalSession, secret)
    if sess is None:
        return None
    user = _user(ctx, sess.account_id)
    return (user, sess.csrf) if user else None


def logout(ctx: ServerContext, secret: str) -> None:
    end_session(ctx, PortalSession, secret)


# -- reading one's own files -------------------------------------------------------------------


def own_snapshots(ctx: ServerContext, user: PortalUser) -> list[tuple[str, datetime]]:
    """(id, time) of the user's endpoint's snapshots, newest first."""
    with ctx.session() as db:
        cvd = snapshots.cvd_of(db, user.endpoint_id)
        if cvd is None:
            return []
        return [(r.id, r.time) for r in db.scalars(
            select(SnapshotRecord).where(SnapshotRecord.cvd_id == cvd.id)
            .order_by(SnapshotRecord.time.desc()))]


def _inside(user: PortalUser, p: bytes) -> bool:
    return p == user.home or p.startswith(user.home + b"/")


def _visible(attr: Attr, owner: int) -> bool:
    if attr.type not in (EntryType.FILE, EntryType.DIR, EntryType.SYMLINK):
        return False
    return attr.uid == owner or bool(attr.mode & 0o004)


class _View:
    """One snapshot of the user's endpoint, as the user may see it."""

    def __init__(self, ctx: ServerContext, user: PortalUser, snapshot: str):
        _, self.sid = snapshot_files.locate(ctx, user.endpoint_id, snapshot)
        with ctx.session() as db:
            rec = db.get(SnapshotRecord, self.sid)
            assert rec is not None
            self.time = rec.time
        self.tree = snapshot_files.snapshot_tree(ctx, self.sid)
        self.user = user
        try:
            home = self.tree.resolve(user.home)
        except PathNotInSnapshot:
            raise NotFound(f"this snapshot has no folder {user.home.decode()}") from None
        self.owner = self.tree.attr(home).uid

    def node(self, p: bytes) -> int:
        """The inode of a path the user may read; refused alike when it is outside their
        folder, hidden from them (itself or a folder on the way) or absent."""
        if not _inside(self.user, p):
            raise Forbidden("only your own folder can be read here")
        ino = 0
        for step in [*reversed(_parents(self.user.home, p)), p]:
            try:
                ino = self.tree.resolve(step)
            except PathNotInSnapshot:
                raise NotFound("no such file or folder in this snapshot") from None
            if not _visible(self.tree.attr(ino), self.owner):
                raise NotFound("no such file or folder in this snapshot")
        return ino

    def entry(self, name: bytes, path: bytes, ino: int) -> PortalEntry:
        a = self.tree.attr(ino)
        return PortalEntry(name=name.decode("utf-8", "replace"), path_hex=path.hex(),
                           type=_TYPE_NAMES.get(a.type, "other"), size=a.size,
                           mtime=datetime.fromtimestamp(a.mtime_ns / 1e9, tz=UTC))


def _path(path_hex: str, user: PortalUser) -> bytes:
    if not path_hex:
        return user.home
    try:
        return snapshot_files.parse_path(bytes.fromhex(path_hex[:8192]))
    except ValueError:
        raise Invalid("not a path") from None


def folder(ctx: ServerContext, user: PortalUser, snapshot: str, path_hex: str) -> PortalFolder:
    view = _View(ctx, user, snapshot)
    p = _path(path_hex, user)
    ino = view.node(p)
    if not view.tree.is_dir(ino):
        raise Invalid("not a folder")
    kids = [(n, k) for n, k in view.tree.listdir(ino)
            if _visible(view.tree.attr(k), view.owner)]
    rel = p[len(user.home):].lstrip(b"/")
    return PortalFolder(snapshot=view.sid, time=view.time,
                        path=rel.decode("utf-8", "replace"), path_hex=p.hex(),
                        entries=[view.entry(n, p + b"/" + n, k) for n, k in kids])


def search(ctx: ServerContext, user: PortalUser, snapshot: str, text: str) -> PortalFolder:
    """Files and folders in the user's folder whose name contains `text` (any case)."""
    view = _View(ctx, user, snapshot)
    needle = text.strip().lower().encode()
    found: list[PortalEntry] = []
    if needle:
        home = view.node(user.home)
        for visits, (rel, ino) in enumerate(view.tree.walk(home)):
            if visits >= SEARCH_VISITS or len(found) >= SEARCH_RESULTS:
                break
            name = rel.rpartition(b"/")[2]
            path = user.home + b"/" + rel
            if needle in name.lower() and _visible(view.tree.attr(ino), view.owner):
                try:
                    view.node(path)  # and every folder on the way
                except (NotFound, Forbidden):
                    continue
                found.append(view.entry(rel, path, ino))
    return PortalFolder(snapshot=view.sid, time=view.time, path="", path_hex="",
                        entries=found)


def _parents(home: bytes, path: bytes) -> list[bytes]:
    """The folders between `home` (excluded) and `path` (excluded)."""
    out, p = [], path.rpartition(b"/")[0]
    while p != home and p.startswith(home + b"/"):
        out.append(p)
        p = p.rpartition(b"/")[0]
    return out


def download(ctx: ServerContext, user: PortalUser, snapshot: str,
             path_hex: str) -> snapshot_files.Download:
    """One of the user's files, or one of their folders as a zip of what they may see in
    it (a hidden folder leaves out all it holds)."""
    view = _View(ctx, user, snapshot)
    p = _path(path_hex, user)
    ino = view.node(p)
    kind = view.tree.attr(ino).type
    if kind is EntryType.FILE:
        return snapshot_files.download(ctx, user.endpoint_id, view.sid, p, "raw",
                                       user.actor)
    if kind is not EntryType.DIR:
        raise Invalid("only files and folders can be downloaded here")

    def keep(rel: bytes, attr: Attr) -> bool:
        if user.home.startswith(rel + b"/"):
            return True  # a folder on the way to the user's own (its name only)
        return _inside(user, rel) and _visible(attr, view.owner)

    return snapshot_files.download(ctx, user.endpoint_id, view.sid, p, "zip", user.actor,
                                   keep=keep)
