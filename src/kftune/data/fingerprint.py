"""A fingerprint of a run's data files, taken where the pipeline runs, for Kubeflow Pipelines' cache.

KFP reuses a task's outputs when its component and inputs are unchanged. The data is a path inside
`config`, so a nightly run over a file that changed in place would be served last night's dataset
(and every step after it). The pipeline's first task computes this fingerprint, with caching off,
and passes it to prepare_data, whose cache key then changes whenever the data does.

Local files (the volume) up to FULL_HASH_BYTES are hashed whole (sha256); larger ones, and
objects behind fsspec (s3://), are identified by size and modification time or the store's ETag.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from kftune.config import RunConfig

FULL_HASH_BYTES = 1 << 30
"""Files up to 1 GiB are hashed whole; beyond, size + mtime stands in (hashing them would take longer than it saves)."""


def file_fingerprint(path: str) -> str | None:
    """`sha256:<hex>`, `size-mtime:<size>-<mtime ns>` or `etag:<etag>-<size>`; None when nothing identifies the content."""
    if "://" not in path:
        local = Path(path)
        if not local.is_file():
            return None
        size = local.stat().st_size
        if size > FULL_HASH_BYTES:
            return f"size-mtime:{size}-{local.stat().st_mtime_ns}"
        digest = hashlib.sha256()
        with open(local, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return f"sha256:{digest.hexdigest()}"
    import fsspec

    try:
        filesystem, location = fsspec.core.url_to_fs(path)
        info = filesystem.info(location)
    except (ImportError, OSError, ValueError):  # no fsspec backend for the scheme, or the object is unreachable
        return None
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return f"etag:{str(etag).strip(chr(34))}-{info.get('size')}"
    modified = info.get("LastModified") or info.get("mtime") or info.get("last_modified")
    if modified is not None and info.get("size") is not None:
        return f"size-mtime:{info['size']}-{modified}"
    return None


def data_fingerprint(config: RunConfig) -> str | None:
    """One fingerprint over the training file and a separate test file; None when any of them has none."""
    paths = [config.data.path] + ([config.data.split.test] if isinstance(config.data.split.test, str) else [])
    parts = [file_fingerprint(path) for path in paths]
    if any(part is None for part in parts):
        return None
    if len(parts) == 1:
        return parts[0]
    return "sha256:" + hashlib.sha256("\n".join(parts).encode()).hexdigest()
