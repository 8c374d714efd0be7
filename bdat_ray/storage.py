"""Where a sweep keeps its results (``--storage``): a local or shared directory, or any URI
that Ray Tune accepts as ``storage_path`` — ``s3://``, ``gs://``, ``file://``, anything
`pyarrow.fs.FileSystem.from_uri` resolves. Files are read and written through pyarrow.fs,
the file-system layer Ray Tune itself uses (``ray/train/_internal/storage.py``), so the
sweep's own files (``sweep.json``, ``space.yaml``) land where Tune's do.

A *location* is a plain string: an absolute local path, or a URI. S3-compatible endpoints
(MinIO, moto) and credentials come from the usual AWS variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ...), which Ray's trial processes inherit too; a URI carries none.
"""

from __future__ import annotations

import os
from pathlib import Path

from bdat_ray.config import ConfigError


def resolve(text: str) -> str:
    """``--storage`` -> a location. Local paths become absolute (trials run elsewhere);
    ``file://`` URIs become local paths; other URIs must name a file system pyarrow knows."""
    if "://" not in text:
        return str(Path(text).expanduser().resolve())
    if text.startswith("file://"):
        return str(Path(text.removeprefix("file://")).expanduser().resolve())
    if "?" in text:
        raise ConfigError(
            "--storage",
            "put endpoint and credentials in AWS_ENDPOINT_URL / AWS_* variables, not in the "
            f"URI; got {text}",
        )
    _file_system(text)
    return text.rstrip("/")


def is_remote(location: str) -> bool:
    """True for object storage (and any other non-local file system)."""
    return "://" in location


def join(location: str, *names: str) -> str:
    if is_remote(location):
        return "/".join([location.rstrip("/"), *names])
    return os.path.join(location, *names)


def _file_system(location: str):
    """(pyarrow file system, path inside it); a ConfigError on a scheme pyarrow cannot open."""
    import pyarrow
    import pyarrow.fs

    if not is_remote(location):
        return pyarrow.fs.LocalFileSystem(), location
    try:
        return pyarrow.fs.FileSystem.from_uri(location)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowNotImplementedError, OSError) as err:
        raise ConfigError(
            "--storage", f"not a file system Ray Tune can write to: {location} ({err})"
        ) from None


def exists(location: str) -> bool:
    import pyarrow.fs

    fs, path = _file_system(location)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def make_new_dir(location: str) -> bool:
    """Create the folder ``location`` (and its parents); False if it already exists."""
    if not is_remote(location):
        try:
            Path(location).mkdir(parents=True)  # atomic: two drivers never share a folder
            return True
        except FileExistsError:
            return False
    if exists(location):
        return False
    fs, path = _file_system(location)
    fs.create_dir(path, recursive=True)
    return True


def subdirs(location: str) -> list[str]:
    """The locations of the folders directly inside ``location`` (none if it is absent)."""
    import pyarrow.fs

    fs, path = _file_system(location)
    if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    return sorted(
        join(location, info.base_name)
        for info in infos
        if info.type == pyarrow.fs.FileType.Directory
    )


def read_text(location: str) -> str:
    fs, path = _file_system(location)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def write_text(location: str, text: str) -> None:
    fs, path = _file_system(location)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def size(location: str) -> int:
    """Bytes in the file at ``location``; -1 when there is none."""
    import pyarrow.fs

    fs, path = _file_system(location)
    info = fs.get_file_info(path)
    return info.size if info.type == pyarrow.fs.FileType.File else -1


def upload(local: Path, location: str) -> None:
    fs, path = _file_system(location)
    with local.open("rb") as src, fs.open_output_stream(path) as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)


def download(location: str, local: Path) -> None:
    fs, path = _file_system(location)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(local.name + ".part")
    with fs.open_input_stream(path) as src, tmp.open("wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    os.replace(tmp, local)
