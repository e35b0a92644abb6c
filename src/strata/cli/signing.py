"""`strata signing …`: set signed layers up, see where they stand, rotate a key, renew the
expiry; and what the layer commands use to sign as part of their work (`--keys DIR`).
Thin: the work is in strata.signing.publisher."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from strata.errors import StrataError

from .admin_args import JSON, SERVER, TOKEN_FILE, client
from .output import console, err_console, print_json

if TYPE_CHECKING:
    from strata.signing.publisher import Publisher

API = "/api/v1/admin"
KEYS = typer.Option(None, "--keys", envvar="STRATA_SIGNING_KEYS",
                    help="The signing keys directory `strata signing init` made (or set "
                    "STRATA_SIGNING_KEYS).")
PASSPHRASE_FILE = typer.Option(None, "--passphrase-file",
                               envvar="STRATA_SIGNING_PASSPHRASE_FILE",
                               help="File holding the keys' passphrase (else it is asked).")
WARN_DAYS = 7

signing_app = typer.Typer(help="Signed layers: keys and metadata (see docs/security.md).",
                          no_args_is_help=True)


class HttpAdminApi:
    """The admin API for strata.signing.publisher, over the CLI's admin client (the
    signing routes carry TUF metadata and free-form facts, not the typed models)."""

    def __init__(self, server: str | None, token_file: Path | None):
        self.api = client(server, token_file)

    def get(self, path: str) -> Any:  # noqa: ANN401
        return self.api.call("GET", API + path)

    def post(self, path: str, body: dict) -> Any:  # noqa: ANN401
        return self.api.call("POST", API + path, body)

    def get_bytes(self, path: str) -> bytes:
        import httpx

        from strata.signing.trust import MetadataMissing
        from strata.transport import describe_transport_error

        server = self.api.server
        try:
            resp = httpx.get(server + API + path, timeout=60, verify=self.api.verify,
                             headers={"Authorization": f"Bearer {self.api.token}"})
        except httpx.TransportError as exc:
            raise StrataError(describe_transport_error(server, exc)) from None
        if resp.status_code == 404:
            raise MetadataMissing(path)
        if resp.status_code != 200:
            raise StrataError(f"server refused ({resp.status_code}): {resp.text[:200]}")
        return resp.content


def read_passphrase(passphrase_file: Path | None, *, confirm: bool = False) -> bytes:
    if passphrase_file is not None:
        try:
            text = passphrase_file.read_text()
        except OSError as exc:
            raise StrataError(f"cannot read passphrase file {passphrase_file}: "
                              f"{exc.strerror}") from None
        return text.rstrip("\r\n").encode()
    if not sys.stdin.isatty():
        raise StrataError("the signing keys need their passphrase: give --passphrase-file "
                          "(or set STRATA_SIGNING_PASSPHRASE_FILE)")
    import getpass

    first = getpass.getpass("Passphrase for the signing keys: ")
    if confirm and getpass.getpass("Again: ") != first:
        raise StrataError("the two passphrases differ")
    return first.encode()


def open_publisher(server: str | None, token_file: Path | None, keys: Path,
                   passphrase_file: Path | None) -> Publisher:
    """A publisher with its targets key open (a wrong passphrase stops the command before
    it changes anything) and the server's metadata verified from the pinned root."""
    from strata.signing.publisher import Keys, Publisher

    if not keys.is_dir():
        raise StrataError(f"signing keys directory {keys} does not exist")
    pub = Publisher(HttpAdminApi(server, token_file),
                    Keys(keys.resolve(), read_passphrase(passphrase_file)))
    pub.unlock()
    pub.trusted()
    return pub


def publisher_for(server: str | None, token_file: Path | None, keys: Path | None,
                  passphrase_file: Path | None, *, required: bool) -> Publisher | None:
    """For a command that signs what it does: a publisher when keys are given. Without
    them, a command whose result agents would refuse unsigned (`required`) stops here
    with what to do, on a server where signing is set up."""
    if keys is not None:
        return open_publisher(server, token_file, keys, passphrase_file)
    if required and HttpAdminApi(server, token_file).get("/signing").get("initialized"):
        raise StrataError("agents accept only signed layers and assignments: give --keys DIR "
                          "(the image manager's signing keys) or set STRATA_SIGNING_KEYS")
    return None


def signable_refs(pub: Publisher, server: str | None, token_file: Path | None,
                  fields: dict[str, Any]) -> dict[str, Any]:
    """Before an assignment: the layers it names as NAME:VERSION (a numeric id from `layer
    list` is looked up: signatures name layers), each of them signed. A layer the server
    does not know is left to the server to report, in its own words."""
    catalog = pub.trusted().catalog

    def signed(ref: str) -> str:
        if ref in catalog.layers:
            return ref
        known = client(server, token_file).layer(ref).ref  # the server's "no layer" if none
        if known in catalog.layers:
            return known
        raise StrataError(f"layer {known} is not signed: sign it first (`strata layer sign "
                          f"{known} --keys DIR`)")

    return {k: (signed(v) if isinstance(v, str) else [signed(r) for r in v]
                if isinstance(v, list) else v) for k, v in fields.items()}


def signed_after(what: str, sign: Any) -> int:  # noqa: ANN401
    """Sign what the server just recorded; when that fails, say that it is recorded but
    not signed (agents refuse it until it is) and how to finish."""
    try:
        return int(sign())
    except StrataError as exc:
        raise StrataError(f"{what} is recorded on the server but not signed, so agents "
                          f"will refuse it: {exc}") from None


# -- commands ---------------------------------------------------------------------------------

@signing_app.command("init")
def init(keys: Path = typer.Option(..., "--keys", help="New directory for the keys (keep "
                                   "it off the server)."),
         passphrase_file: Path | None = PASSPHRASE_FILE, server: str | None = SERVER,
         admin_token_file: Path | None = TOKEN_FILE, json: bool = JSON) -> None:
    """Set signed layers up: make the root and targets keys (encrypted, 0600), the first
    metadata, upload it, and print the root's fingerprint for agents to check."""
    from strata.signing.publisher import Keys, initialize

    passphrase = read_passphrase(passphrase_file, confirm=True)
    out = initialize(HttpAdminApi(server, admin_token_file), Keys(keys.resolve(), passphrase))
    if json:
        print_json(out)
        return
    console.print(f"signing is set up. Root fingerprint:\n  {out['fingerprint']}\n"
                  f"keys in {out['keys']}: move root.key offline (only `strata signing "
                  "rotate` and renewing the root need it); targets.key signs layers and "
                  "assignments.\nAgents enrolled from now on pin this root; give them "
                  "`--root-fingerprint` to check it.", highlight=False)


@signing_app.command("status")
def status(keys: Path | None = KEYS, passphrase_file: Path | None = PASSPHRASE_FILE,
           server: str | None = SERVER, admin_token_file: Path | None = TOKEN_FILE,
           json: bool = JSON) -> None:
    """What the server publishes: versions, expiry dates, unsigned layers. With --keys,
    the metadata is also verified here from the root pinned at init."""
    doc: dict = HttpAdminApi(server, admin_token_file).get("/signing")
    if keys is not None and doc.get("initialized"):
        from strata.signing.publisher import Keys, Publisher

        trusted = Publisher(HttpAdminApi(server, admin_token_file), Keys(keys, b"")).trusted()
        doc["verified"] = {"root_version": trusted.root.version,
                           "targets_version": trusted.targets.version,
                           "targets_expires": trusted.targets.expires.isoformat()}
    if json:
        print_json(doc)
        return
    if not doc.get("initialized"):
        console.print("signing is not set up: run `strata signing init --keys DIR`")
        return
    from datetime import UTC, datetime

    console.print(f"root fingerprint: {doc['fingerprint']} (version "
                  f"{doc['root_version']}, expires {doc['root_expires'][:10]})", highlight=False)
    if doc.get("problem"):
        err_console.print(f"warning: {doc['problem']}", highlight=False)
        raise typer.Exit(1)
    console.print(f"targets version {doc['targets_version']}, expires "
                  f"{doc['targets_expires'][:10]}; {len(doc['layers'])} signed layer(s), "
                  f"{len(doc['assignments'])} signed assignment scope(s)", highlight=False)
    if doc.get("verified"):
        console.print("verified here from the pinned root: targets version "
                      f"{doc['verified']['targets_version']}", highlight=False)
    left = datetime.fromisoformat(doc["targets_expires"]) - datetime.now(UTC)
    if left.days < WARN_DAYS:
        err_console.print(f"warning: the targets metadata expires in {left.days} day(s): "
                          "agents then refuse every layer; run `strata signing refresh "
                          "--keys DIR`", highlight=False)
    if doc.get("unsigned_layers"):
        console.print(f"unsigned layers (agents refuse them): "
                      f"{', '.join(doc['unsigned_layers'])}", highlight=False)


@signing_app.command("rotate")
def rotate(role: str = typer.Option(..., "--role", help="root, targets or online"),
           keys: Path = typer.Option(..., "--keys", envvar="STRATA_SIGNING_KEYS",
                                     help="The keys directory (root.key must be in it)."),
           passphrase_file: Path | None = PASSPHRASE_FILE, server: str | None = SERVER,
           admin_token_file: Path | None = TOKEN_FILE, json: bool = JSON) -> None:
    """Replace a role's key: `targets` (the image manager's), `root` (the offline key), or
    `online` (the server's, after a server compromise). Signed by the root key; agents
    follow on their own at their next check-in."""
    if role not in ("root", "targets", "online"):
        raise StrataError("--role must be root, targets or online")
    out = open_publisher(server, admin_token_file, keys, passphrase_file).rotate(role)
    if json:
        print_json(out)
        return
    console.print(f"{role} key replaced: new key {out['key']}", highlight=False)
    if role == "root":
        console.print(f"new root fingerprint: {out['fingerprint']}", highlight=False)


@signing_app.command("refresh")
def refresh(keys: Path = KEYS, passphrase_file: Path | None = PASSPHRASE_FILE,
            server: str | None = SERVER, admin_token_file: Path | None = TOKEN_FILE,
            json: bool = JSON) -> None:
    """Push the expiry out: new targets metadata (agents refuse everything once it
    expires), and a new root version too when the root expires within 90 days."""
    if keys is None:
        raise StrataError("give --keys DIR (or set STRATA_SIGNING_KEYS)")
    out = open_publisher(server, admin_token_file, keys, passphrase_file).renew()
    if json:
        print_json(out)
        return
    console.print(f"targets metadata renewed (version {out['targets_version']})",
                  highlight=False)
    if isinstance(out.get("root"), str):
        err_console.print(f"warning: the root {out['root']}", highlight=False)
    elif out.get("root_version"):
        console.print(f"root renewed (version {out['root_version']})", highlight=False)
