"""A command's start does not load the big optional dependencies it never uses (boto3 for
securesystemslib's AWS signer, trio for httpcore's async clients), and both stay
importable for the code that does use them (an S3 store, a mount)."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
import strata.import_costs as costs
costs.httpcore_without_trio()
import httpx, strata.signing.trust, strata.agent.client
httpx.Client().close()  # httpx loads httpcore with its first client
print("trio" in sys.modules, "boto3" in sys.modules)
import trio, boto3
from securesystemslib.signer import AWSSigner
print(trio.__name__, boto3.__name__)
"""


def test_signing_and_http_clients_start_without_boto3_and_trio():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["False False", "trio boto3"], out.stdout
