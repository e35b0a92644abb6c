"""End users set their own file portal password from their endpoint, through the agent's
credential (`strata agent portal-password`): the account is always on the calling
endpoint, its folder must be user data there (never a system path, never another
endpoint's), and an account of the same name on another endpoint is not touched."""

from __future__ import annotations

from sqlalchemy import delete, select

from strata.errors import Conflict, Invalid
from strata.layers.rules import PathClass
from strata.model.users import PortalPasswordRequest, PortalPasswordSet
from strata.server.catalog.models import Endpoint, PortalAccount, PortalSession
from strata.server.context import ServerContext
from strata.server.passwords import hash_password
from strata.server.rate_limit import RateLimiter
from strata.server.services import audit, snapshot_files
from strata.server.services.facts import endpoint_family
from strata.server.services.layers import rules_for
from strata.server.services.portal import _default_home

# Each change hashes a password (scrypt, 32 MiB, ~0.3 s): a few in a row, then one a
# minute per endpoint, so that no endpoint can keep the server hashing.
CHANGES = RateLimiter(rate=1 / 60, burst=5)


def set_own_password(ctx: ServerContext, ep: Endpoint,
                     req: PortalPasswordRequest) -> PortalPasswordSet:
    CHANGES.take(ep.id, 1, "portal password changes")
    with ctx.session() as db:
        rules = rules_for(ctx, db, endpoint_family(ep))
    home = snapshot_files.parse_path(req.home or _default_home(ep, req.name))
    if not home or rules.classify(home, True) is not PathClass.USER_DATA:
        raise Invalid(f"folder {home.decode(errors='replace')!r} is not user data on this "
                      "endpoint: a portal account shows a user's own files only")
    hashed = hash_password(req.password)
    with ctx.write() as db:
        acc = db.scalar(select(PortalAccount).where(PortalAccount.name == req.name))
        created = acc is None
        if acc is None:
            acc = PortalAccount(name=req.name, endpoint_id=ep.id, home=home.decode(),
                                password_hash=hashed)
            db.add(acc)
        elif acc.endpoint_id != ep.id:
            raise Conflict(f"portal account name {req.name!r} is taken: the help desk can "
                           "tell you which name to use")
        else:
            if req.home:
                acc.home = home.decode()
            acc.password_hash = hashed
            acc.failed_logins, acc.locked_until = 0, None
            # A new password ends every session opened with the old one.
            db.execute(delete(PortalSession).where(PortalSession.account_id == acc.id))
        result = PortalPasswordSet(name=acc.name, home=acc.home, created=created)
    audit.record(ctx, f"endpoint:{ep.id}", "set-portal-password", req.name, home=result.home,
                 created=created)
    return result
