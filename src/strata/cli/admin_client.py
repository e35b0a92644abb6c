"""The admin API as the CLI calls it: one method per operation, each returning the typed
model the server declares (model/admin.py), every failure one plain line (`StrataError`):
an unreachable server, a refusal with the server's reason, an answer of the wrong shape.

Imported only when a command runs (pydantic and httpx cost a fifth of a second), so that
`strata … --help` and the other commands start fast.
"""

from __future__ import annotations

import os
import ssl
import sys
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from pydantic import BaseModel, TypeAdapter, ValidationError

from strata.errors import StrataError
from strata.model.admin import (
    AdminTokenRotated,
    AssignRequest,
    AssignResult,
    AuditEntryInfo,
    CaptureConfig,
    CollectionInfo,
    CollectionRequest,
    ComplianceReport,
    Deleted,
    DryRunReport,
    DryRunRequest,
    EndpointDeleted,
    EndpointDetail,
    EndpointState,
    EndpointSummary,
    EndpointTags,
    LayerCaptureRequest,
    LayerDetail,
    LayerDetailWithFiles,
    LayerDiff,
    LayerInfo,
    MassProvisionRequest,
    MassRevertRequest,
    MigrateRequest,
    PolicyDocument,
    PolicyPlan,
    PolicyPlanRequest,
    ProvisionRequest,
    ProvisionResult,
    RestoreRequest,
    RestoreResult,
    RevertRequest,
    RevertResult,
    StoreFigures,
    TagsRequest,
    TaskInfo,
    TokenCreated,
    TokenInfo,
    TokenRequest,
    TransactionInfo,
)
from strata.model.reflector import ReflectorInfo
from strata.model.snapshot_files import SnapshotFolder
from strata.model.software import SoftwareReportPage, StorageReport
from strata.model.users import (
    Caller,
    PasswordRequest,
    PortalAccountInfo,
    PortalAccountRequest,
    RoleRequest,
    UserInfo,
    UserRequest,
    UserTokenCreated,
    UserTokenInfo,
    UserTokenRequest,
)
from strata.transport import (
    check_server_url,
    describe_transport_error,
    fetch_pinned_certificate,
    verify_setting,
)

from . import connection

API = "/api/v1/admin"
T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


def admin_token(token_file: Path | None) -> str:
    token = os.environ.get("STRATA_ADMIN_TOKEN")
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            raise StrataError(f"cannot read admin token file {token_file}: "
                              f"{exc.strerror}") from None
    if not token and sys.stdin.isatty():  # typed, never in argv where `ps` shows it
        import getpass

        token = getpass.getpass("Admin token: ").strip()
    if not token:
        raise StrataError("no admin token: pass --admin-token-file or set STRATA_ADMIN_TOKEN")
    return token


def error_detail(doc: object) -> str:
    """The reason in an error answer: FastAPI's `detail`, a string or a list of
    validation errors (shown as `field: message`, not as a Python repr)."""
    detail = doc.get("detail", doc) if isinstance(doc, dict) else doc
    if isinstance(detail, list):
        parts = []
        for err in detail:
            if not isinstance(err, dict):
                parts.append(str(err))
                continue
            loc = [str(x) for x in err.get("loc", []) if x not in ("body", "query", "path")]
            field = ".".join(loc)
            got = f" (got {err['input']!r})" if isinstance(err.get("input"), str | int) else ""
            parts.append(f"{field + ': ' if field else ''}{err.get('msg', err)}{got}")
        return "; ".join(parts)
    return str(detail)


def path_part(value: str, what: str) -> str:
    """One segment of an API path, from user input: never empty, and quoted so that a
    '/', '?', '#' or '..' reaches the server as text, not as a different URL."""
    if not value.strip():
        raise StrataError(f"{what} must not be empty")
    if "/" in value or not value.strip("."):
        raise StrataError(f"{what} {value!r} is not valid")
    return quote(value, safe="")


def snapshot_path(path: str) -> dict[str, str]:
    """A path in a snapshot as a query parameter: `path`, or `path_hex` for a name that is
    not UTF-8 (as the shell hands it over: bytes kept by surrogateescape)."""
    try:
        path.encode("utf-8")
        return {"path": path}
    except UnicodeEncodeError:
        return {"path_hex": os.fsencode(path).hex()}


def build(model: type[M], **fields: Any) -> M:
    """A request as the admin gave it, checked by the same rules the server applies;
    a violation is one line, like the server's refusal would be."""
    try:
        return model(**fields)
    except ValidationError as exc:
        raise StrataError(error_detail({"detail": exc.errors(include_url=False)})) from None


def as_json(value: object) -> object:
    """What `--json` prints: the API's own field names and shapes."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [as_json(v) for v in value]
    return value


def _if_match(revision: str | None) -> dict[str, str]:
    return {"If-Match": f'"{revision}"'} if revision else {}


class AdminClient:
    """The server and the admin token are checked at the first request, so that a
    command's own checks of its arguments come first."""

    def __init__(self, server: str | None, token_file: Path | None) -> None:
        self._server = server
        self._token_file = token_file
        self._verify: bool | ssl.SSLContext | None = None
        self._token: str | None = None

    @property
    def server(self) -> str:
        if not self._server:
            raise StrataError("no server: pass --server URL or set STRATA_SERVER")
        return check_server_url(self._server, insecure=connection.current.insecure)

    @property
    def verify(self) -> bool | ssl.SSLContext:
        """What to trust for the server's certificate (--ca-cert, --server-fingerprint)."""
        if self._verify is None:
            options = connection.current
            pem = fetch_pinned_certificate(self.server, options.server_fingerprint) \
                if options.server_fingerprint else ""
            self._verify = verify_setting(options.ca_cert, pinned_pem=pem)
        return self._verify

    @property
    def token(self) -> str:
        if self._token is None:  # once: it may be typed at a prompt
            self._token = admin_token(self._token_file)
        return self._token

    def call(self, method: str, path: str, body: object = None,
             params: dict[str, str] | None = None,
             headers: dict[str, str] | None = None) -> object:
        """One request; the JSON answer, or a `StrataError` saying why there is none."""
        import httpx

        server, token = self.server, self.token
        try:
            resp = httpx.request(method, server + path, json=body, params=params,
                                 timeout=60, verify=self.verify,
                                 headers={**(headers or {}),
                                          "Authorization": f"Bearer {token}"})
        except httpx.TransportError as exc:
            raise StrataError(describe_transport_error(server, exc)) from None
        try:
            doc = resp.json()
        except ValueError:
            doc = None
        if not 200 <= resp.status_code < 300:
            detail = error_detail(doc) if doc is not None else resp.text[:200].strip()
            raise StrataError(f"server refused ({resp.status_code}): "
                              f"{detail or resp.reason_phrase}")
        if doc is None:
            raise StrataError(f"{server} did not answer with JSON: is it a Strata server?")
        return doc

    def _typed(self, shape: type[T], method: str, path: str, body: BaseModel | None = None,
               params: dict[str, str] | None = None) -> T:
        doc = self.call(method, path, body.model_dump(mode="json") if body else None, params)
        try:
            return TypeAdapter(shape).validate_python(doc)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(x) for x in first["loc"])
            raise StrataError(f"{self.server} answered {method} {path} in an unexpected form "
                              f"({where}: {first['msg']}): is it the same Strata "
                              "version?") from None

    # -- credentials and endpoints ------------------------------------------------------------

    def create_token(self, req: TokenRequest) -> TokenCreated:
        return self._typed(TokenCreated, "POST", f"{API}/tokens", req)

    def tokens(self, all_tokens: bool = False) -> list[TokenInfo]:
        return self._typed(list[TokenInfo], "GET", f"{API}/tokens",
                           params={"all": str(all_tokens).lower()})

    def revoke_token(self, token_id: int) -> TokenInfo:
        return self._typed(TokenInfo, "POST", f"{API}/tokens/{int(token_id)}/revoke")

    def rotate_admin_token(self) -> AdminTokenRotated:
        return self._typed(AdminTokenRotated, "POST", f"{API}/admin-token/rotate")

    def endpoints(self, pending: bool = False) -> list[EndpointSummary]:
        return self._typed(list[EndpointSummary], "GET", f"{API}/endpoints",
                           params={"pending": str(pending).lower()})

    def endpoint(self, ref: str) -> EndpointDetail:
        return self._typed(EndpointDetail, "GET",
                           f"{API}/endpoints/{path_part(ref, 'endpoint id')}")

    def approve(self, ref: str) -> EndpointState:
        return self._typed(EndpointState, "POST",
                           f"{API}/endpoints/{path_part(ref, 'endpoint id')}/approve")

    def revoke(self, ref: str) -> EndpointState:
        return self._typed(EndpointState, "POST",
                           f"{API}/endpoints/{path_part(ref, 'endpoint id')}/revoke")

    def delete_endpoint(self, ref: str) -> EndpointDeleted:
        return self._typed(EndpointDeleted, "DELETE",
                           f"{API}/endpoints/{path_part(ref, 'endpoint id')}")

    def set_tags(self, ref: str, req: TagsRequest) -> EndpointTags:
        return self._typed(EndpointTags, "PUT",
                           f"{API}/endpoints/{path_part(ref, 'endpoint id')}/tags", req)

    def transactions(self, endpoint: str | None = None,
                     limit: int = 100) -> list[TransactionInfo]:
        params = {"limit": str(limit)}
        if endpoint:
            params["endpoint"] = endpoint
        return self._typed(list[TransactionInfo], "GET", f"{API}/transactions", params=params)

    def audit(self, limit: int = 100) -> list[AuditEntryInfo]:
        return self._typed(list[AuditEntryInfo], "GET", f"{API}/audit",
                           params={"limit": str(limit)})

    def stats(self) -> StoreFigures:
        return self._typed(StoreFigures, "GET", f"{API}/stats")

    # -- policies ----------------------------------------------------------------------------------

    def policy(self, kind: str) -> PolicyDocument:
        return self._typed(PolicyDocument, "GET",
                           f"{API}/policies/{path_part(kind, 'policy kind')}")

    def set_policy(self, kind: str, document: object,
                   revision: str | None = None) -> PolicyDocument:
        """Store `document`; with `revision`, only over that revision (else 409)."""
        doc = self.call("PUT", f"{API}/policies/{path_part(kind, 'policy kind')}", document,
                        headers=_if_match(revision))
        return TypeAdapter(PolicyDocument).validate_python(doc)

    def plan_policy(self, kind: str, req: PolicyPlanRequest) -> PolicyPlan:
        return self._typed(PolicyPlan, "POST",
                           f"{API}/policies/{path_part(kind, 'policy kind')}/plan", req)

    def reset_policy(self, kind: str, revision: str | None = None) -> PolicyDocument:
        doc = self.call("DELETE", f"{API}/policies/{path_part(kind, 'policy kind')}",
                        headers=_if_match(revision))
        return TypeAdapter(PolicyDocument).validate_python(doc)

    # -- layers ------------------------------------------------------------------------------------

    def capture_config(self, family: str) -> CaptureConfig:
        return self._typed(CaptureConfig, "GET", f"{API}/capture-config",
                           params={"os_family": family})

    def capture_layer(self, req: LayerCaptureRequest) -> LayerInfo:
        return self._typed(LayerInfo, "POST", f"{API}/layers", req)

    def layers(self, kind: str | None = None) -> list[LayerInfo]:
        return self._typed(list[LayerInfo], "GET", f"{API}/layers",
                           params={"kind": kind} if kind else None)

    def layer(self, ref: str, files: bool = False) -> LayerDetail:
        return self._typed(LayerDetailWithFiles | LayerDetail,  # type: ignore[arg-type]
                           "GET", f"{API}/layers/{path_part(ref, 'layer')}",
                           params={"files": "true"} if files else None)

    def diff_layers(self, a: str, b: str) -> LayerDiff:
        return self._typed(LayerDiff, "GET", f"{API}/layers/{path_part(a, 'layer')}/diff/"
                                             f"{path_part(b, 'layer')}")

    def delete_layer(self, ref: str) -> Deleted:
        return self._typed(Deleted, "DELETE", f"{API}/layers/{path_part(ref, 'layer')}")

    def dry_run(self, req: DryRunRequest) -> DryRunReport:
        return self._typed(DryRunReport, "POST", f"{API}/layers/dry-run", req)

    # -- collections and assignment ----------------------------------------------------------------

    def collections(self) -> list[CollectionInfo]:
        return self._typed(list[CollectionInfo], "GET", f"{API}/collections")

    def save_collection(self, req: CollectionRequest) -> CollectionInfo:
        return self._typed(CollectionInfo, "POST", f"{API}/collections", req)

    def delete_collection(self, name: str) -> Deleted:
        return self._typed(Deleted, "DELETE",
                           f"{API}/collections/{path_part(name, 'collection')}")

    def assign(self, req: AssignRequest) -> AssignResult:
        return self._typed(AssignResult, "POST", f"{API}/assign", req)

    def compliance(self, endpoint: str | None = None) -> ComplianceReport:
        if endpoint:
            path_part(endpoint, "endpoint id")  # the same checks as in a path
        return self._typed(ComplianceReport, "GET", f"{API}/compliance",
                           params={"endpoint": endpoint} if endpoint else None)

    # -- operations --------------------------------------------------------------------------------

    def revert(self, ref: str, req: RevertRequest) -> RevertResult:
        return self._typed(RevertResult, "POST",
                           f"{API}/endpoints/{path_part(ref, 'endpoint id')}/revert", req)

    def restore(self, ref: str, req: RestoreRequest) -> RestoreResult:
        return self._typed(RestoreResult, "POST",
                           f"{API}/endpoints/{path_part(ref, 'endpoint id')}/restore", req)

    def provision(self, ref: str, req: ProvisionRequest) -> ProvisionResult:
        return self._typed(ProvisionResult, "POST",
                           f"{API}/endpoints/{path_part(ref, 'endpoint id')}/provision", req)

    def migrate(self, req: MigrateRequest) -> TaskInfo:
        return self._typed(TaskInfo, "POST", f"{API}/migrate", req)

    def tasks(self) -> list[TaskInfo]:
        return self._typed(list[TaskInfo], "GET", f"{API}/tasks")

    def task(self, task_id: int) -> TaskInfo:
        return self._typed(TaskInfo, "GET", f"{API}/tasks/{task_id}")

    def revert_task(self, req: MassRevertRequest) -> TaskInfo:
        return self._typed(TaskInfo, "POST", f"{API}/tasks/revert", req)

    def provision_task(self, req: MassProvisionRequest) -> TaskInfo:
        return self._typed(TaskInfo, "POST", f"{API}/tasks/provision", req)

    def cancel_task(self, task_id: int) -> TaskInfo:
        return self._typed(TaskInfo, "POST", f"{API}/tasks/{task_id}/cancel")

    def retry_task(self, task_id: int) -> TaskInfo:
        return self._typed(TaskInfo, "POST", f"{API}/tasks/{task_id}/retry")

    # -- reports -----------------------------------------------------------------------------------

    def software_report(self, package: str = "", endpoint: str = "") -> SoftwareReportPage:
        params = {k: v for k, v in (("package", package), ("endpoint", endpoint)) if v}
        return self._typed(SoftwareReportPage, "GET", f"{API}/reports/software",
                           params=params)

    def storage_report(self) -> StorageReport:
        return self._typed(StorageReport, "GET", f"{API}/reports/storage")

    # -- snapshot browsing (downloads and chunks: cli/snapshot_source.py) --------------------------

    def snapshot_files(self, ref: str, snapshot: str, path: str = "", offset: int = 0,
                       limit: int = 1000) -> SnapshotFolder:
        return self._typed(SnapshotFolder, "GET",
                           f"{API}/endpoints/{path_part(ref, 'endpoint id')}/snapshots/"
                           f"{path_part(snapshot or 'latest', 'snapshot')}/files",
                           params={**snapshot_path(path), "offset": str(offset),
                                   "limit": str(limit)})
    # -- users -------------------------------------------------------------------------------------

    def whoami(self) -> Caller:
        return self._typed(Caller, "GET", f"{API}/me")

    def create_user(self, req: UserRequest) -> UserInfo:
        return self._typed(UserInfo, "POST", f"{API}/users", req)

    def users(self) -> list[UserInfo]:
        return self._typed(list[UserInfo], "GET", f"{API}/users")

    def delete_user(self, name: str) -> Deleted:
        return self._typed(Deleted, "DELETE", f"{API}/users/{path_part(name, 'user name')}")

    def set_password(self, name: str, req: PasswordRequest) -> UserInfo:
        return self._typed(UserInfo, "PUT",
                           f"{API}/users/{path_part(name, 'user name')}/password", req)

    def set_role(self, name: str, req: RoleRequest) -> UserInfo:
        return self._typed(UserInfo, "PUT",
                           f"{API}/users/{path_part(name, 'user name')}/role", req)

    def create_user_token(self, name: str, req: UserTokenRequest) -> UserTokenCreated:
        return self._typed(UserTokenCreated, "POST",
                           f"{API}/users/{path_part(name, 'user name')}/tokens", req)

    def user_tokens(self, name: str) -> list[UserTokenInfo]:
        return self._typed(list[UserTokenInfo], "GET",
                           f"{API}/users/{path_part(name, 'user name')}/tokens")

    def revoke_user_token(self, name: str, token_id: int) -> UserTokenInfo:
        return self._typed(UserTokenInfo, "DELETE",
                           f"{API}/users/{path_part(name, 'user name')}/tokens/{token_id}")

    # -- file portal accounts ------------------------------------------------------------------

    def create_portal_account(self, endpoint: str,
                              req: PortalAccountRequest) -> PortalAccountInfo:
        return self._typed(PortalAccountInfo, "POST", f"{API}/endpoints/"
                           f"{path_part(endpoint, 'endpoint id')}/portal-accounts", req)

    def portal_accounts(self, endpoint: str = "") -> list[PortalAccountInfo]:
        return self._typed(list[PortalAccountInfo], "GET", f"{API}/portal-accounts",
                           params={"endpoint": endpoint} if endpoint else None)

    def delete_portal_account(self, name: str) -> Deleted:
        return self._typed(Deleted, "DELETE",
                           f"{API}/portal-accounts/{path_part(name, 'account name')}")

    # -- branch reflectors -------------------------------------------------------------------

    def reflectors(self) -> list[ReflectorInfo]:
        return self._typed(list[ReflectorInfo], "GET", f"{API}/reflectors")

    def reflector(self, ref: str) -> ReflectorInfo:
        return self._typed(ReflectorInfo, "GET",
                           f"{API}/reflectors/{path_part(ref, 'reflector id')}")

    def set_reflector(self, ref: str, action: str) -> ReflectorInfo:
        return self._typed(ReflectorInfo, "POST",
                           f"{API}/reflectors/{path_part(ref, 'reflector id')}/{action}")

    def export_layer(self, ref: str, target: Path) -> int:
        """Stream a layer's chunk bundle into `target` (written beside it, then renamed);
        the bytes written."""
        import httpx

        server, token = self.server, self.token
        url = f"{server}{API}/layers/{path_part(ref, 'layer')}/export"
        tmp = target.with_name(f".{target.name}.part")
        written = 0
        try:
            with httpx.stream("GET", url, timeout=300, verify=self.verify,
                              headers={"Authorization": f"Bearer {token}"}) as resp:
                if resp.status_code != 200:
                    resp.read()
                    try:
                        detail = error_detail(resp.json())
                    except ValueError:
                        detail = resp.text[:200]
                    raise StrataError(f"server refused ({resp.status_code}): {detail}")
                with open(tmp, "wb") as out:
                    for piece in resp.iter_bytes():
                        out.write(piece)
                        written += len(piece)
            tmp.replace(target)
        except httpx.TransportError as exc:
            raise StrataError(describe_transport_error(server, exc)) from None
        finally:
            tmp.unlink(missing_ok=True)
        return written
