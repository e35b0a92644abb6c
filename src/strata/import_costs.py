"""Third-party imports that would load a big optional dependency Strata never uses there.

httpcore imports trio whenever it is installed (pyfuse3 brings it), for async clients
running under trio; securesystemslib's signer package imports boto3 (installed for S3
stores) for its AWS KMS signer. Strata makes neither kind of use, and the two imports were
0.1 s and 0.3 s of CPU at the start of every command that talks to a server, verifies or
signs layers. Each is imported here with the dependency hidden for that moment only: a
mount still loads trio, an S3 store still loads boto3.
"""

from __future__ import annotations

import importlib
import sys


def _import_without(module: str, hidden: str) -> None:
    if module in sys.modules or hidden in sys.modules:
        return  # already paid for
    sys.modules[hidden] = None  # type: ignore[assignment]  # `import hidden` fails meanwhile
    try:
        importlib.import_module(module)
    finally:
        del sys.modules[hidden]


def httpcore_without_trio() -> None:
    _import_without("httpcore", "trio")


def securesystemslib_signer_without_boto3() -> None:
    _import_without("securesystemslib.signer", "boto3")
