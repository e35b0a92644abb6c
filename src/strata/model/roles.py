"""IT staff roles and what each may do, following Mirage's split of the console: help desk,
image manager, protection manager, administrator. Every admin route needs one permission;
a role is the set of permissions it grants. Shared by the server (which enforces it) and
the CLI (which checks `--role` first); plain constants, cheap to import."""

from __future__ import annotations

from enum import StrEnum


class Permission(StrEnum):
    VIEW = "view"  # endpoints, snapshots, inventory, compliance, transactions, tasks, storage
    REVERT = "revert"  # an endpoint's system back to one of its snapshots
    RESTORE = "restore"  # a CVD's files or whole system onto an endpoint
    ENDPOINTS = "endpoints"  # approve, revoke, tag endpoints
    LAYERS = "layers"  # capture, list, diff, delete layers; layer rules; signing
    COLLECTIONS = "collections"
    ASSIGN = "assign"
    MIGRATE = "migrate"
    PROVISION = "provision"
    PROTECTION = "protection"  # upload, retention and bandwidth policies
    PRUNE = "prune"  # retention and garbage collection runs
    TOKENS = "tokens"  # enrollment tokens
    USERS = "users"  # IT staff accounts and their API tokens
    AUDIT = "audit"  # the audit log
    SERVER = "server"  # whatever else configures the server itself: administrators only


ROLES: dict[str, frozenset[Permission]] = {
    "help-desk": frozenset({Permission.VIEW, Permission.REVERT, Permission.RESTORE}),
    "image-manager": frozenset({Permission.VIEW, Permission.LAYERS, Permission.COLLECTIONS,
                                Permission.ASSIGN, Permission.MIGRATE,
                                Permission.PROVISION}),
    "protection-manager": frozenset({Permission.VIEW, Permission.PROTECTION,
                                     Permission.PRUNE}),
    "administrator": frozenset(Permission),
}
ROLE_NAMES = tuple(ROLES)
# The policy kinds each permission covers (PUT/GET /policies/{kind}).
POLICY_PERMISSION: dict[str, Permission] = {
    "upload": Permission.PROTECTION, "retention": Permission.PROTECTION,
    "bandwidth": Permission.PROTECTION, "layers": Permission.LAYERS,
    "reflectors": Permission.PROTECTION,  # where branches download from: the WAN, as bandwidth
}
USER_NAME = r"^[a-z][a-z0-9._-]{0,63}$"  # lower case: "Alice" and "alice" are one person


def may(role: str, permission: Permission) -> bool:
    return permission in ROLES.get(role, frozenset())
