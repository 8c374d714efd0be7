"""Checks before anything starts: places a command will write, the MLflow store it will
write to, and the one rule for secrets in URIs.

A command that trains for an hour and then cannot save its result has lost the hour (the
table CLI used to train every cell and then fail on ``--out``), and a sweep that learns
about an unwritable or unreachable MLflow store only after Ray started leaves a folder and
a traceback behind. So every CLI calls these first; each problem is a `ConfigError` naming
the option (exit 2, one line). Nothing here creates a file or a folder: a probe file is
created and removed at once where only trying tells (root ignores permission bits, and a
read-only mount or an immutable folder says no only when asked).

No mlflow import: the URI checks read the path or ask the server's ``/health`` endpoint.
"""

from __future__ import annotations

import re
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from bdat_ray.options import ConfigError

#: Tracking-store schemes MLflow 3 accepts besides its file store (refused separately).
TRACKING_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")
SQLITE_MAGIC = b"SQLite format 3\x00"
#: Seconds and attempts when asking a tracking server whether it is up.
HEALTH_TIMEOUT_S = 5
HEALTH_ATTEMPTS = 2
_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^\s/:@]*):[^\s/@]*@", re.I)


def mask_secrets(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` in it masked."""
    return _USERINFO.sub(r"\g<scheme>\g<user>:***@", text)


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """(``uri`` without ``user:password@``, user, password)."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri, None, None
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc)), parts.username, parts.password


def _probe_folder(key: str, folder: Path, wanted: Path) -> None:
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".bdat_ray_probe_"):
            pass
    except OSError as err:
        why = err.strerror or type(err).__name__
        raise ConfigError(key, f"cannot write into {folder} ({why}); needed for {wanted}") from None


def writable_dir(key: str, path: str | Path) -> Path:
    """``path`` is a folder this process can write into, or one it can create (its nearest
    existing ancestor is a writable folder). Nothing is created."""
    folder = Path(path).expanduser().absolute()
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == folder else f"cannot be made: {existing} is a file"
        raise ConfigError(key, f"{folder} {where}, not a folder")
    _probe_folder(key, existing, folder)
    return folder


def writable_file(key: str, path: str | Path) -> Path:
    """``path`` can be written as a file: not a folder, and its folder is writable."""
    file = Path(path).expanduser().absolute()
    if file.is_dir():
        raise ConfigError(key, f"{file} is a folder; give a file name")
    if file.exists():
        try:
            with file.open("ab"):
                pass
        except OSError as err:
            raise ConfigError(key, f"cannot write {file} ({err.strerror})") from None
    writable_dir(key, file.parent)
    return file


def check_tracking_uri(key: str, uri: str, *, reach: bool) -> None:
    """The MLflow store at ``uri`` can take runs: a known scheme; for sqlite, a database
    file (or a new one in a writable folder), never a folder; with ``reach``, a tracking
    server that answers ``/health`` within `HEALTH_TIMEOUT_S` seconds."""
    parts = urlsplit(uri)
    scheme = parts.scheme.lower().split("+")[0]  # postgresql+psycopg2://
    if scheme not in TRACKING_SCHEMES:
        raise ConfigError(
            key,
            f"unknown tracking store scheme {parts.scheme + ':' if parts.scheme else '(none)'}; "
            f"use sqlite:///PATH.db, http(s)://HOST:PORT or {', '.join(TRACKING_SCHEMES[3:])}; "
            f"got {mask_secrets(uri)}",
        )
    if scheme == "sqlite":
        _check_sqlite(key, uri)
    elif scheme in ("http", "https") and reach:
        _check_server(key, uri)


def _check_sqlite(key: str, uri: str) -> None:
    path = uri.split(":///", 1)[1] if ":///" in uri else ""
    if not path or path.startswith(":memory:"):
        raise ConfigError(key, f"needs a database file, sqlite:///PATH.db; got {uri}")
    db = Path(path)
    if db.is_dir():
        raise ConfigError(key, f"{db} is a folder, not an SQLite database file")
    if db.exists():
        try:
            with db.open("rb") as f:
                head = f.read(len(SQLITE_MAGIC))
            with db.open("ab"):
                pass
        except OSError as err:
            raise ConfigError(key, f"cannot write the store {db} ({err.strerror})") from None
        if head and head != SQLITE_MAGIC:
            raise ConfigError(key, f"{db} is not an SQLite database")
    elif not db.parent.is_dir():
        raise ConfigError(key, f"the folder of {db} does not exist")
    _probe_folder(key, db.parent, db)  # SQLite writes its journal beside the database


def _check_server(key: str, uri: str) -> None:
    base, _, _ = split_credentials(uri)
    url = base.rstrip("/") + "/health"
    reason = ""
    for _ in range(HEALTH_ATTEMPTS):
        try:
            with urllib.request.urlopen(url, timeout=HEALTH_TIMEOUT_S):
                return
        except urllib.error.HTTPError:
            return  # it answered: a server (perhaps behind auth) is there
        except (OSError, ValueError) as err:
            reason = str(getattr(err, "reason", None) or err)
    raise ConfigError(
        key,
        f"no MLflow server answers at {mask_secrets(base)} ({reason}; {HEALTH_ATTEMPTS} tries of "
        f"{HEALTH_TIMEOUT_S} s); start it, or pass another --mlflow-uri",
    )
