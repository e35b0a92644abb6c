"""What the admin API accepts as names, shared by the server (which enforces it) and the
CLI (which checks first, for a clear message). Plain constants: the CLI imports this at
start-up, so nothing heavy belongs here."""

from __future__ import annotations

LAYER_KINDS = ("base", "driver", "app")  # captured by IT; the user's layers are found
OS_FAMILIES = ("linux", "windows")
LAYER_NAME = r"^[A-Za-z0-9._+-]{1,128}$"
LAYER_VERSION = r"^[A-Za-z0-9._+~-]{1,64}$"
COLLECTION_NAME = r"^[A-Za-z0-9._-]{1,128}$"
