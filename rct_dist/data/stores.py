"""Where a split's files live: a local folder, or a bucket/URL prefix read through fsspec.

`data.root` (and `make-shards --out`) may be a local path or `s3://bucket/prefix`, `gs://bucket/prefix`,
`http(s)://host/path`. This module is the one place that tells them apart (`is_remote`, `join`) and
the one place that talks to object storage: whole objects are downloaded (large ones as parallel
ranged parts), never read sample by sample, because object stores answer each GET in tens of
milliseconds and limit requests per prefix (a shard is the unit that reaches GB/s per node).

Why fsspec: one API over S3 (s3fs, on botocore), GCS (gcsfs, on google-auth) and HTTP (aiohttp), each
taking credentials from its ecosystem's standard sources and nothing else: for S3 the AWS environment
variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_ENDPOINT_URL`,
`AWS_DEFAULT_REGION`), `AWS_PROFILE` and the shared config files, instance and container roles; for
GCS application default credentials. Nothing of the kind is ever read from a run's config or written
to its logs. The client packages are optional extras: `pip install 'rct-dist[s3]'` (or `[gcs]`,
`[http]`).

Errors: a missing object or bucket and a refused request fail at once with one line naming the
object; timeouts, dropped connections and 5xx answers are retried with exponential backoff
(`retries` times) before failing with the same kind of line.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

REMOTE_SCHEMES = {"s3": "s3", "gs": "gcs", "gcs": "gcs", "http": "http", "https": "http"}
EXTRAS = {"s3": ("s3fs", "s3"), "gcs": ("gcsfs", "gcs"), "http": ("aiohttp", "http")}
PART_BYTES = 64 << 20  # objects larger than this download as parallel ranged parts
PART_THREADS = 8


class StoreError(OSError):
    """An object could not be read or written; the message is one line naming it and what to do."""


class MissingObject(StoreError, FileNotFoundError):
    """404: the object or the bucket does not exist."""


class AccessDenied(StoreError, PermissionError):
    """401/403: the credentials are missing, wrong, or lack the permission."""


def scheme_of(location: str | os.PathLike) -> str | None:
    """'s3', 'gcs' or 'http' for a remote location, None for a local path; an unknown URL scheme is an error."""
    text = str(location)
    head, sep, _ = text.partition("://")
    if not sep:
        if text.startswith(("pipe:", "s3:/", "gs:/", "http:/", "https:/")):
            raise ValueError(f"{text!r}: not a location rct-dist reads (a local path, or s3://, gs://, http(s):// "
                             "URLs; `pipe:` commands are not supported: the loader reads whole shards by name)")
        return None
    if head.lower() not in REMOTE_SCHEMES:
        raise ValueError(f"{text!r}: unsupported URL scheme {head!r}; use a local path or one of "
                         f"{', '.join(sorted(s + '://' for s in REMOTE_SCHEMES))}")
    return REMOTE_SCHEMES[head.lower()]


def is_remote(location: str | os.PathLike) -> bool:
    return scheme_of(location) is not None


def join(root: str | os.PathLike, *parts: str) -> str:
    """`root/part/...` for a local path (as Path joins) or a URL (slashes, never Path: it would fold `//`)."""
    if not is_remote(root):
        return str(Path(root).joinpath(*parts))
    return "/".join([str(root).rstrip("/"), *(p.strip("/") for p in parts if p)])


def _client(scheme: str) -> Any:
    """fsspec's filesystem for a scheme, or an error naming the extra to install."""
    module, extra = EXTRAS[scheme]
    try:
        import fsspec
        __import__(module)
    except ImportError as exn:
        raise ImportError(f"reading {scheme} locations needs the {module} package: pip install 'rct-dist[{extra}]' "
                          f"({exn})") from None
    options: dict[str, Any] = {}
    if scheme == "s3":
        # botocore reads AWS_ENDPOINT_URL itself only in recent versions; pass it explicitly so an S3-compatible
        # server (MinIO, SeaweedFS, Ceph, R2) works with every supported s3fs.
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["endpoint_url"] = endpoint
    return fsspec.filesystem(scheme if scheme != "http" else "https", skip_instance_cache=False, **options)


def _status(exn: BaseException) -> int | None:
    for attr in ("status", "code", "status_code"):
        value = getattr(exn, attr, None)
        if isinstance(value, int):
            return value
    response = getattr(exn, "response", None)
    if isinstance(response, dict):
        value = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return value if isinstance(value, int) else None
    return None


def classify(exn: BaseException, url: str) -> StoreError | None:
    """A permanent failure as a one-line StoreError, or None when the error is worth retrying."""
    status = _status(exn)
    if type(exn).__name__ in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
        return AccessDenied(f"{url}: no credentials found ({type(exn).__name__}): set AWS_ACCESS_KEY_ID and "
                            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run where an instance role provides them")
    if isinstance(exn, FileNotFoundError) or status == 404:
        return MissingObject(f"{url}: not found (404): check the bucket and the path (data.root)")
    if isinstance(exn, PermissionError) or status in (401, 403):
        return AccessDenied(f"{url}: access denied ({status or 403}): check the credentials (for S3 the AWS_* "
                            "environment variables, AWS_PROFILE or the instance role) and the object's permissions")
    if status is not None and 400 <= status < 500 and status not in (408, 429):
        return StoreError(f"{url}: refused with HTTP {status}: {str(exn).splitlines()[0] if str(exn) else ''}")
    return None  # timeouts, dropped connections, 408/429/5xx: transient


def retrying(what: Callable[[], T], url: str, retries: int, backoff: float = 0.5, cap: float = 8.0) -> T:
    """`what()`, retried on transient errors with exponential backoff, at most `retries` more times."""
    for attempt in range(retries + 1):
        try:
            return what()
        except (StoreError, ImportError):  # a missing client package is not a network problem
            raise
        except Exception as exn:  # noqa: BLE001 - each client library raises its own kinds; classify decides
            permanent = classify(exn, url)
            if permanent is not None:
                raise permanent from None
            if attempt == retries:
                raise StoreError(f"{url}: still failing after {retries + 1} attempts ({type(exn).__name__}: "
                                 f"{str(exn).splitlines()[0] if str(exn) else 'no message'}); is the server "
                                 "reachable? (data.retries sets the attempts)") from None
            delay = min(cap, backoff * 2 ** attempt)
            log.warning("%s: %s (%s); retry %d of %d in %.1f s", url, type(exn).__name__, exn, attempt + 1,
                        retries, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


@dataclass
class RemoteStore:
    """A URL prefix in object storage (or on an HTTP server): list, read, download and upload objects."""

    url: str
    retries: int = 5

    def __post_init__(self) -> None:
        scheme = scheme_of(self.url)
        if scheme is None:
            raise ValueError(f"{self.url!r} is a local path, not a URL")
        self.scheme, self.url = scheme, self.url.rstrip("/")
        self._fs = None

    @property
    def fs(self) -> Any:
        if self._fs is None:
            self._fs = _client(self.scheme)
        return self._fs

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fs": None}  # a client never crosses a fork or a pickle: made again there

    def object_url(self, name: str) -> str:
        return join(self.url, name)

    def missing_bucket(self) -> str | None:
        """The bucket's name when it does not exist (S3, GCS), else None."""
        if self.scheme == "http":
            return None
        bucket = self.url.split("://", 1)[1].split("/", 1)[0]
        try:
            return None if self.fs.exists(bucket) else bucket
        except Exception:  # noqa: BLE001 - cannot tell: the caller's own error stands
            return None

    def read(self, name: str) -> bytes:
        url = self.object_url(name)
        return retrying(lambda: self.fs.cat_file(url), url, self.retries)

    def size(self, name: str) -> int:
        url = self.object_url(name)
        return int(retrying(lambda: self.fs.info(url)["size"], url, self.retries))

    def exists(self, name: str) -> bool:
        try:
            self.size(name)
            return True
        except MissingObject:
            return False

    def list(self) -> dict[str, int]:
        """Names and sizes of the objects directly under the prefix (an HTTP server: its directory listing)."""
        def listing() -> dict[str, int]:
            entries = self.fs.ls(self.url, detail=True)
            return {str(e["name"]).rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0) for e in entries
                    if e.get("type", "file") == "file"}
        return retrying(listing, self.url, self.retries)

    def download(self, name: str, target: Path, size: int | None = None) -> int:
        """Write the object to `target` (which must not be its final name: the caller checks and renames it).
        Objects over PART_BYTES come as parallel ranged parts. Returns the bytes written."""
        url = self.object_url(name)
        if size is None:
            size = self.size(name)
        if size <= PART_BYTES:
            data = retrying(lambda: self.fs.cat_file(url), url, self.retries)
            target.write_bytes(data)
            return len(data)
        parts = [(start, min(size, start + PART_BYTES)) for start in range(0, size, PART_BYTES)]
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            def part(span: tuple[int, int]) -> int:
                data = retrying(lambda: self.fs.cat_file(url, start=span[0], end=span[1]), url, self.retries)
                os.pwrite(fd, data, span[0])
                return len(data)
            with ThreadPoolExecutor(min(PART_THREADS, len(parts))) as pool:
                return sum(pool.map(part, parts))
        finally:
            os.close(fd)

    def upload(self, source: Path, name: str) -> None:
        url = self.object_url(name)
        retrying(lambda: self.fs.put_file(str(source), url), url, self.retries)

    def write(self, name: str, data: bytes) -> None:
        url = self.object_url(name)
        retrying(lambda: self.fs.pipe_file(url, data), url, self.retries)
