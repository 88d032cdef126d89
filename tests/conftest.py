"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from object_store import RangeHTTPServer, SeaweedS3
from rct_dist.data import shards


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    """scikit-learn's digits as shards of 100 (train: 901 images of classes 0-4, test: 896 of 5-9)."""
    out = tmp_path_factory.mktemp("digits")
    shards.make_shards("digits", out, shard_size=100, workers=1)
    return out


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> SeaweedS3:
    """A real S3 server (SeaweedFS `weed mini`) on 127.0.0.1, started by the first test that asks for it
    and stopped at the end of the session. A missing `weed` binary fails the test (it never skips).
    Make a bucket per test (`s3_server.make_bucket(name)`); apply its credentials with `s3_env`."""
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed"))
    server.start()
    yield server
    server.close()


def _clear_s3fs_cache() -> None:
    # s3fs caches filesystem instances by their arguments, not by the environment they read: an
    # instance made under another test's variables would otherwise be handed back.
    s3fs = sys.modules.get("s3fs")
    if s3fs is not None:
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path_factory) -> SeaweedS3:
    """`s3_server` with the standard AWS variables pointing at it, for this test only. Every other AWS_*
    variable is removed, and the config and credentials files point at nothing, so a developer's own
    profile, credentials or endpoint are never used."""
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    nothing = tmp_path_factory.getbasetemp() / "no-aws-config"  # never created
    monkeypatch.setenv("AWS_CONFIG_FILE", str(nothing))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(nothing))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata probe for credentials
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    _clear_s3fs_cache()
    yield s3_server
    _clear_s3fs_cache()


@pytest.fixture
def http_server(tmp_path) -> RangeHTTPServer:
    """A RangeHTTPServer on 127.0.0.1 over the folder `http_server.root` (tmp_path / "www"), closed after
    the test. Write files there and fetch them from `http_server.url_for(relative path)`."""
    root = tmp_path / "www"
    root.mkdir()
    with RangeHTTPServer(root) as server:
        yield server


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A 2-node cluster of network namespaces on this machine, each node with its own address, host name
    (node0, node1) and sshd (tests/cluster.py); torn down after the module. Skipped only where namespaces
    cannot be made (not root, no `ip`); missing sshd/ssh/pdsh fail, since .ci/run installs them."""
    from cluster import NamespaceCluster, cannot_make_namespaces, missing_tools

    reason = cannot_make_namespaces()
    if reason:
        pytest.skip(reason)
    missing = missing_tools()
    if missing:
        pytest.fail(f"the namespace cluster needs {', '.join(missing)}: apt-get install them (.ci/run does)")
    with NamespaceCluster(tmp_path_factory.mktemp("cluster"), 2) as running:
        yield running


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A real SLURM on a 2-node namespace cluster (tests/slurm_cluster.py): one munged, slurmctld on node0, a
    slurmd per node (node0, node1, 2 CPUs each, partition `test`); commands through `slurm.run([...])` on
    node0 with SLURM_CONF set. Torn down after the module. Skipped only where namespaces cannot be made;
    missing munge/slurm packages fail, since .ci/run installs them."""
    from slurm_cluster import SlurmCluster, cannot_make_namespaces, missing_tools

    reason = cannot_make_namespaces()
    if reason:
        pytest.skip(reason)
    missing = missing_tools()
    if missing:
        pytest.fail(f"the SLURM test cluster needs {', '.join(missing)}: apt-get install them (.ci/run does)")
    with SlurmCluster(tmp_path_factory.mktemp("slurm"), 2) as running:
        yield running
