"""Signing keys on disk: Ed25519 private keys as PKCS#8 PEM, encrypted with a passphrase
for the keys people hold (root, targets) and plain for the server's online key (it signs
unattended; its file is mode 0600 in the data directory). Read back as python-tuf signers.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from strata.signing import SigningError
from strata.store.backend import atomic_write

if TYPE_CHECKING:
    from securesystemslib.signer import CryptoSigner, Key

ROOT_KEY = "root.key"  # the offline root key: kept off the server, used to rotate keys
TARGETS_KEY = "targets.key"  # the image manager's key: signs layers and assignments
MIN_PASSPHRASE = 8


def generate() -> CryptoSigner:
    from securesystemslib.signer import CryptoSigner

    return CryptoSigner.generate_ed25519()


def save_private(path: Path, signer: CryptoSigner, passphrase: bytes | None, *,
                 replace: bool = False) -> None:
    """Write the private key (0600, atomically); never over an existing key unless told."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    if path.exists() and not replace:
        raise SigningError(f"{path} already exists: refusing to overwrite a signing key")
    if passphrase is not None and len(passphrase) < MIN_PASSPHRASE:
        raise SigningError(f"the passphrase must have at least {MIN_PASSPHRASE} characters")
    encryption = serialization.BestAvailableEncryption(passphrase) if passphrase \
        else serialization.NoEncryption()
    key = load_pem_private_key(signer.private_bytes, None)  # sslib gives only plain PEM
    pem = key.private_bytes(
        encoding=serialization.Encoding.PEM, format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=encryption)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(path, pem)


def load_private(path: Path, passphrase: bytes | None) -> CryptoSigner:
    """The signer in `path`; a wrong passphrase or a damaged file is one clear error."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from securesystemslib.signer import CryptoSigner

    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        raise SigningError(f"no signing key {path}") from None
    except OSError as exc:
        raise SigningError(f"cannot read signing key {path}: {exc.strerror}") from None
    try:
        key = load_pem_private_key(pem, passphrase or None)
    except TypeError:  # encrypted but no passphrase given, or the other way round
        raise SigningError(f"{path} is encrypted: a passphrase is needed" if not passphrase
                           else f"{path} is not encrypted: give no passphrase") from None
    except ValueError:
        raise SigningError(f"cannot open signing key {path}: wrong passphrase, or not a "
                           "key file") from None
    try:
        return CryptoSigner(key)
    except ValueError as exc:
        raise SigningError(f"{path} is not an Ed25519 signing key ({exc})") from None


def fingerprint(key: Key) -> str:
    """What people compare by eye or paste: the key's TUF key id (SHA-256 of its public
    part in canonical JSON)."""
    return key.keyid
