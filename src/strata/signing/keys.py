"""Signing keys on disk, read back as python-tuf signers (Ed25519).

The keys people hold (root, targets) are encrypted with their passphrase the way the
store wraps its master key (store/crypto.py: scrypt, then AES-256-GCM): a stolen file
costs an attacker a real passphrase search. The server's online key signs unattended, so
its file is a plain PKCS#8 PEM; like every key file it is mode 0600.
"""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner, Key

from strata.errors import CorruptData, WrongPassphrase
from strata.signing import SigningError
from strata.store.backend import atomic_write
from strata.store.crypto import unwrap_secret, wrap_secret

ROOT_KEY = "root.key"  # the offline root key: kept off the server, used to rotate keys
TARGETS_KEY = "targets.key"  # the image manager's key: signs layers and assignments
MIN_PASSPHRASE = 8
_PURPOSE = b"strata-signing-key"
_RAW = (serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
        serialization.NoEncryption())


def generate() -> CryptoSigner:
    return CryptoSigner(Ed25519PrivateKey.generate())


def save_private(path: Path, signer: CryptoSigner, passphrase: bytes | None, *,
                 replace: bool = False) -> None:
    """Write the private key (0600, atomically); never over an existing key unless told."""
    if path.exists() and not replace:
        raise SigningError(f"{path} already exists: refusing to overwrite a signing key")
    key = serialization.load_pem_private_key(signer.private_bytes, None)  # sslib: plain PEM
    if passphrase is None:
        data = signer.private_bytes
    else:
        if len(passphrase) < MIN_PASSPHRASE:
            raise SigningError(f"the passphrase must have at least {MIN_PASSPHRASE} "
                               "characters")
        doc = {"type": "strata-signing-key", "scheme": "ed25519",
               "keyid": signer.public_key.keyid,
               **wrap_secret(key.private_bytes(*_RAW), passphrase.decode(), _PURPOSE)}
        data = json.dumps(doc, indent=1).encode()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(path, data)


def load_private(path: Path, passphrase: bytes | None) -> CryptoSigner:
    """The signer in `path`; a wrong passphrase or a damaged file is one clear error."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SigningError(f"no signing key {path}") from None
    except OSError as exc:
        raise SigningError(f"cannot read signing key {path}: {exc.strerror}") from None
    if data.startswith(b"-----BEGIN"):
        try:
            return CryptoSigner(serialization.load_pem_private_key(data, None))
        except (ValueError, TypeError) as exc:
            raise SigningError(f"{path} is not a usable signing key ({exc})") from None
    if not passphrase:
        raise SigningError(f"{path} is encrypted: its passphrase is needed")
    try:
        doc = json.loads(data)
        seed = unwrap_secret(doc, passphrase.decode(errors="replace"), _PURPOSE)
        return CryptoSigner(Ed25519PrivateKey.from_private_bytes(seed))
    except WrongPassphrase:
        raise SigningError(f"cannot open signing key {path}: wrong passphrase") from None
    except (ValueError, CorruptData, AttributeError):
        raise SigningError(f"{path} is not a Strata signing key file") from None


def fingerprint(key: Key) -> str:
    """What people compare by eye or paste: the key's TUF key id (SHA-256 of its public
    part in canonical JSON)."""
    return key.keyid
