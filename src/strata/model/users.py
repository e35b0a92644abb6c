"""Request and response schemas of the user routes of the admin API (IT staff accounts,
their personal API tokens, who is calling), shared by the server and the CLI."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from strata.model.admin import AdminModel
from strata.model.roles import USER_NAME

RoleName = Literal["administrator", "image-manager", "protection-manager", "help-desk"]
PASSWORD_MIN, PASSWORD_MAX = 12, 1024  # the upper bound bounds the work of one hash


class UserRequest(AdminModel):
    name: str = Field(pattern=USER_NAME)
    role: RoleName
    password: str = Field(min_length=PASSWORD_MIN, max_length=PASSWORD_MAX, repr=False)


class PasswordRequest(AdminModel):
    password: str = Field(min_length=PASSWORD_MIN, max_length=PASSWORD_MAX, repr=False)


class RoleRequest(AdminModel):
    role: RoleName


class UserTokenRequest(AdminModel):
    label: str = Field(default="", max_length=128)


class UserInfo(AdminModel):
    name: str
    role: RoleName
    created_at: datetime
    tokens: int  # personal API tokens not revoked


class UserTokenCreated(AdminModel):
    id: int
    user: str
    label: str
    token: str  # shown once: the server keeps only its hash


class UserTokenInfo(AdminModel):
    id: int
    label: str
    created_at: datetime
    last_used: datetime | None
    revoked: bool


class Caller(AdminModel):
    """Who a credential belongs to: a user, or `admin` (the break-glass admin.token)."""

    name: str
    role: RoleName
    permissions: list[str]


# -- the file portal's end users ---------------------------------------------------------------


class PortalAccountRequest(AdminModel):
    name: str = Field(pattern=USER_NAME)
    password: str = Field(min_length=PASSWORD_MIN, max_length=PASSWORD_MAX, repr=False)
    # The user's own folder in the endpoint's snapshots; "" is home/NAME on Linux and
    # Users/NAME on Windows.
    home: str = Field(default="", max_length=1024)


class PortalAccountInfo(AdminModel):
    name: str
    endpoint: str
    hostname: str
    home: str
    created_at: datetime


class PortalPasswordRequest(AdminModel):
    """POST /api/v1/agent/portal-password (`strata agent portal-password`): a user of the
    endpoint sets their own file portal password, through the endpoint's credential. The
    endpoint is the credential's; the folder must be user data on it."""

    name: str = Field(pattern=USER_NAME)
    password: str = Field(min_length=PASSWORD_MIN, max_length=PASSWORD_MAX, repr=False)
    home: str = Field(default="", max_length=1024)  # "": home/NAME, or Users/NAME


class PortalPasswordSet(AdminModel):
    name: str
    home: str
    created: bool  # a new account (else: the password of this endpoint's account changed)
