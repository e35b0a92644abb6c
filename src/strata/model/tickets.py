"""Read tickets: what an endpoint may read through a branch reflector, signed by the server.

A ticket is `base64url(payload) "." base64url(Ed25519 signature of the payload)`, the
payload a small JSON document (`Ticket`). The server signs it at check-in; the reflector
checks it with the server's public key, learned when it enrolled, so it decides each
request alone (no round trip to the server per chunk) and cannot widen what it allows:
it can neither forge a ticket nor stretch one to another endpoint, reflector or snapshot.
Shared by the server (signing), the reflector (verifying) and the agent (reading the
expiry to renew in time).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path

from strata.errors import StrataError
from strata.model.ids import is_hex_id

VERSION = 1
MAX_TICKET = 16 << 10  # characters: a ticket names a few layers, never thousands
MAX_SNAPSHOTS = 64  # snapshot ids one ticket may name (an endpoint's layers, its restore)
MAX_DELTAS = 64  # delta ids one ticket may name (the groups of one delta request)
KEY_LEN = 32  # raw Ed25519 public key


class TicketRefused(StrataError):
    """A ticket that is malformed, forged, expired, or not for this reflector."""

    http_status = 403


@dataclass(frozen=True)
class Ticket:
    endpoint: str  # the endpoint it was issued to
    reflectors: tuple[str, ...]  # the reflectors that may honour it
    snapshots: frozenset[str]  # store snapshots (layers, CVD snapshots) it may read
    own_cvd: bool  # may also read the endpoint's own CVD snapshots (file restore)
    issued: int  # seconds since the epoch
    expires: int
    # File deltas it may fetch, by id (the BLAKE3 of the delta's body, hex): a delta
    # ticket, made for one delta request once the server checked that the endpoint holds
    # every old file (server/services/deltas.py); it names no snapshot.
    deltas: frozenset[str] = frozenset()

    def to_json(self) -> bytes:
        doc: dict[str, object] = {"v": VERSION, "e": self.endpoint, "r": list(self.reflectors),
                                  "s": sorted(self.snapshots), "c": self.own_cvd,
                                  "iat": self.issued, "exp": self.expires}
        if self.deltas:
            doc["d"] = sorted(self.deltas)
        return json.dumps(doc, separators=(",", ":")).encode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        raise TicketRefused("malformed ticket (not base64)") from None


def parse_ticket(text: str) -> tuple[Ticket, bytes, bytes]:
    """(ticket, signed bytes, signature) of a ticket's text, its shape checked but not its
    signature: for the agent, which only reads when it expires."""
    if len(text) > MAX_TICKET or text.count(".") != 1:
        raise TicketRefused("malformed ticket")
    body_text, sig_text = text.split(".")
    body, sig = _unb64(body_text), _unb64(sig_text)
    try:
        doc = json.loads(body)
        if not isinstance(doc, dict) or doc.get("v") != VERSION:
            raise ValueError("version")
        snaps = doc["s"]
        refs = doc["r"]
        if not (isinstance(snaps, list) and isinstance(refs, list)
                and len(snaps) <= MAX_SNAPSHOTS and len(refs) <= MAX_SNAPSHOTS):
            raise ValueError("lists")
        if not all(isinstance(s, str) and is_hex_id(s) for s in snaps):
            raise ValueError("snapshot ids")
        deltas = doc.get("d", [])
        if not (isinstance(deltas, list) and len(deltas) <= MAX_DELTAS
                and all(isinstance(d, str) and is_hex_id(d) for d in deltas)):
            raise ValueError("delta ids")
        if not all(isinstance(r, str) and 0 < len(r) <= 64 for r in refs):
            raise ValueError("reflector ids")
        endpoint, own, iat, exp = doc["e"], doc["c"], doc["iat"], doc["exp"]
        if not (isinstance(endpoint, str) and 0 < len(endpoint) <= 64
                and isinstance(own, bool) and type(iat) is int and type(exp) is int):
            raise ValueError("fields")
    except (ValueError, KeyError, TypeError):
        raise TicketRefused("malformed ticket") from None
    return Ticket(endpoint, tuple(refs), frozenset(snaps), own, iat, exp,
                  frozenset(deltas)), body, sig


class TicketSigner:
    """The server's ticket key: Ed25519, made on first use in a 0600 file of the data
    directory. Its public half goes to each reflector at enrollment."""

    def __init__(self, path: Path):
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        if not path.exists():
            key = Ed25519PrivateKey.generate()
            raw = key.private_bytes(serialization.Encoding.Raw,
                                    serialization.PrivateFormat.Raw,
                                    serialization.NoEncryption())
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(raw)
            tmp.chmod(0o600)
            tmp.replace(path)  # two servers starting at once: one key wins, both use it
        self._key = Ed25519PrivateKey.from_private_bytes(path.read_bytes())
        self.public_key = self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def sign(self, ticket: Ticket) -> str:
        body = ticket.to_json()
        return f"{_b64(body)}.{_b64(self._key.sign(body))}"


def verify_ticket(text: str, public_key: bytes, *, reflector: str, now: float) -> Ticket:
    """The ticket, if the server signed it, it names `reflector`, and it has not expired;
    TicketRefused otherwise (one line, naming why)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    ticket, body, sig = parse_ticket(text)
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(sig, body)
    except (InvalidSignature, ValueError):
        raise TicketRefused("ticket signature does not verify: not issued by this "
                            "reflector's server") from None
    if reflector not in ticket.reflectors:
        raise TicketRefused("ticket is not for this reflector")
    if ticket.expires <= now:
        raise TicketRefused("ticket has expired: the agent gets a new one from the server")
    return ticket
