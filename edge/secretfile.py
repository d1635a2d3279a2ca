"""Secret files the gate reads: the gallery key, the MQTT password and TLS client key.

Each comes from a path in the config or, when that is unset, from systemd's credential directory
(LoadCredential=), as the installed unit hands the gallery key over. A secret file must be
owner-only, as `edge keygen` writes keys (0600) and systemd hands credentials over (0400): one
that its group or others may read or write is refused, naming the file, before a byte of it is
used."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import FacegateError
from .imageio import read_refusal, read_regular_file


def credential_path(path: str | Path | None, credential: str, what: str, field: str,
                    error: type[FacegateError]) -> Path:
    """`path`, or the credential systemd handed over under that name when `path` is None."""
    if path is not None:
        return Path(path)
    cred = os.environ.get("CREDENTIALS_DIRECTORY")
    if not cred:
        raise error(None, f"no {what}: set {field} or run under systemd with LoadCredential={credential}")
    return Path(cred) / credential


def read_secret(path: Path, what: str, limit: int, error: type[FacegateError]) -> bytes:
    """The bytes of the owner-only regular file at `path` (symbolic links followed: a credential
    directory or a certificate store may hold links), at most `limit` of them."""
    try:
        return read_regular_file(path, limit, owner_only=True)
    except OSError as e:
        raise error(path, read_refusal(e, what, limit)) from None
