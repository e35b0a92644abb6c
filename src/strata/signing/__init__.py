"""Signed layers: layer metadata and assignments signed with keys the server does not hold
(TUF roles via python-tuf), verified by the agent before it downloads or applies anything.

Modules: `keys` (key files on disk), `catalog` (what the signed targets say), `policy`
(what an agent accepts: a pure function), `metadata` (building and signing metadata),
`repository` (the server's copy), `trust` (verifying with python-tuf's client),
`publisher` (the image manager's side: init, sign, rotate). See docs/security.md.
"""

from strata.errors import StrataError
from strata.import_costs import securesystemslib_signer_without_boto3

securesystemslib_signer_without_boto3()  # before python-tuf loads it (0.3 s less per start)

PINNED_ROOT = "pinned-root.json"  # the root an agent trusts, in its trust directory


class SigningError(StrataError):
    """Signing cannot go on (keys, passphrase, metadata the server refused)."""


class LayerRefused(StrataError):
    """The agent will not download or apply this: it is unsigned, forged, stale or older
    than what it has. Reported to the server; the endpoint keeps what it has."""

    exit_code = 1
