"""Fixtures: real Kinesin node processes started from the built binary.

KINESIN_BIN names the binary (scripts/compat.sh sets it). Every process a
fixture starts is stopped by PID at the end of the session.
"""

import base64
import errno
import fcntl
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request

import boto3
import pytest
from botocore.config import Config

ACCESS_KEY = "AKIDKINESINCOMPAT"
SECRET_KEY = "compat-secret-key"
ACCOUNT = "123456789012"
# A second account: names are per account.
OTHER_ACCESS_KEY = "AKIDKINESINOTHER"
OTHER_SECRET_KEY = "other-secret-key"
OTHER_ACCOUNT = "210987654321"
REGION = "us-east-1"
# The compat cluster's internal port speaks mutual TLS with the test CA. The
# CLI (and `kinesin bench`) the tests run find the same certificates in the
# environment, as they do in a pod of a TLS cluster.
TLS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "internal-tls")
INTERNAL_TLS = {
    "KINESIN_INTERNAL_TLS_CA": os.path.join(TLS_DIR, "ca.crt"),
    "KINESIN_INTERNAL_TLS_CERT": os.path.join(TLS_DIR, "node.crt"),
    "KINESIN_INTERNAL_TLS_KEY": os.path.join(TLS_DIR, "node.key"),
}
os.environ.update(INTERNAL_TLS)


# Lock files of the ports this session picked, held until it ends.
_PORT_LOCKS = []


def free_port():
    """A port for a server to bind later, reserved for the rest of this
    session. It is picked below the kernel's ephemeral range, which every
    outgoing connection on the host draws from (and above the fixed ports of
    bench/), and its lock file in the temp directory (the user's own) is
    locked (flock) so that no other test process of this user, here or in
    the Rust process tests, picks it too."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_low = int(f.read().split()[0])
    # A host whose ephemeral range leaves no room below it gets the kernel's
    # pick (port 0), locked all the same.
    below = (20000, ephemeral_low) if ephemeral_low > 22000 else (0, 1)
    locks = os.path.join(tempfile.gettempdir(), f"kinesin-test-ports-{os.getuid()}")
    os.makedirs(locks, exist_ok=True)
    for _ in range(1000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", random.randrange(*below)))
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    raise
                continue
            port = s.getsockname()[1]
        lock = open(os.path.join(locks, str(port)), "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        _PORT_LOCKS.append(lock)
        return port
    raise AssertionError(f"no free port in {below} in 1000 picks")


def wait_until(what, condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except Exception as e:  # the condition may fail until it holds
            last = e
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last error: {last})")


class Node:
    def __init__(self, binary, root, node_id, seed=None, extra=""):
        self.binary, self.node_id = binary, node_id
        self.api_port, self.grpc_port, self.admin_port = free_port(), free_port(), free_port()
        self.data_dir = os.path.join(root, f"node{node_id}")
        self.config_path = os.path.join(root, f"node{node_id}.toml")
        seeds = f'seeds = ["127.0.0.1:{seed.grpc_port}"]' if seed else ""
        with open(self.config_path, "w") as f:
            f.write(
                f"""node_id = {node_id}
data_dir = "{self.data_dir}"
listen_api = "127.0.0.1:{self.api_port}"
listen_grpc = "127.0.0.1:{self.grpc_port}"
listen_admin = "127.0.0.1:{self.admin_port}"
{seeds}
shard_heartbeat_ms = 200
shard_election_min_ms = 1000
shard_election_max_ms = 2000
home_account = "{ACCOUNT}"
internal_tls_ca_file = "{INTERNAL_TLS['KINESIN_INTERNAL_TLS_CA']}"
internal_tls_cert_file = "{INTERNAL_TLS['KINESIN_INTERNAL_TLS_CERT']}"
internal_tls_key_file = "{INTERNAL_TLS['KINESIN_INTERNAL_TLS_KEY']}"
{extra}
[[credentials]]
access_key_id = "{ACCESS_KEY}"
secret_access_key = "{SECRET_KEY}"
account_id = "{ACCOUNT}"

[[credentials]]
access_key_id = "{OTHER_ACCESS_KEY}"
secret_access_key = "{OTHER_SECRET_KEY}"
account_id = "{OTHER_ACCOUNT}"
"""
            )
        self.log_path = os.path.join(root, f"node{node_id}.log")
        self.log = open(self.log_path, "w")
        self.start()

    def start(self):
        self.proc = subprocess.Popen(
            [self.binary, "server", "--config", self.config_path],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def restart(self):
        """Stops the node (SIGTERM) and starts it again on its data and ports."""
        self.stop()
        self.log = open(self.log_path, "a")
        self.start()

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self.api_port}"

    def cluster_view(self):
        """The node's `/admin/cluster` answer: nodes, streams, its groups."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/admin/cluster", timeout=5) as r:
            return json.load(r)

    def ready(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"node {self.node_id} exited; see {self.log_path}")
        url = f"http://127.0.0.1:{self.admin_port}/health/ready"
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def start_cluster(binary, root, count, extra=""):
    os.makedirs(root, exist_ok=True)
    nodes = [Node(binary, root, 1, extra=extra)]
    wait_until("node 1 ready", nodes[0].ready)
    for k in range(2, count + 1):
        nodes.append(Node(binary, root, k, seed=nodes[0], extra=extra))
    for n in nodes:
        wait_until(f"node {n.node_id} ready", n.ready)
    return nodes


@pytest.fixture(scope="session")
def binary():
    path = os.environ.get("KINESIN_BIN")
    if not path or not os.path.exists(path):
        pytest.fail("KINESIN_BIN must name a built kinesin binary (run scripts/compat.sh)")
    return path


@pytest.fixture(scope="session")
def workdir():
    root = tempfile.mkdtemp(prefix="kinesin-compat-")
    yield root
    if os.environ.get("KINESIN_KEEP_COMPAT_DIR") is None:
        shutil.rmtree(root, ignore_errors=True)


# Degraded mode (scripts/compat.sh runs the API tests a second time so):
# KINESIN_COMPAT_KILL=<id> kills that node of the session's cluster with
# SIGKILL once it is up, and every test talks to the two survivors. Tests
# that start clusters of their own are marked `own_cluster` and skipped then.
KILL = os.environ.get("KINESIN_COMPAT_KILL")


def pytest_configure(config):
    config.addinivalue_line("markers", "own_cluster: starts nodes of its own (skipped in the degraded run)")
    config.addinivalue_line("markers", "slow: waits a minute or more for time to pass (skipped in the degraded run)")


@pytest.fixture(scope="session")
def s3_endpoint(workdir):
    """A real S3 protocol server (moto's) for Firehose deliveries; the nodes
    sign their requests with the standard AWS variables set here."""
    port = free_port()
    log = open(os.path.join(workdir, "moto.log"), "w")
    proc = subprocess.Popen(
        ["moto_server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    endpoint = f"http://127.0.0.1:{port}"

    def up():
        if proc.poll() is not None:
            raise RuntimeError("moto_server exited; see moto.log")
        with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2) as r:
            return r.status == 200

    wait_until("the S3 server", up)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "s3-test-key")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "s3-test-secret")
    yield endpoint
    proc.terminate()
    proc.wait()
    log.close()


def s3_client(endpoint):
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"],
    )


def sole_group_leader(nodes):
    """The node leading the only group besides the metadata group."""
    for n in nodes:
        for g in n.cluster_view()["groups"]:
            if g["group"] != 0 and g.get("role") == "leader":
                return n
    return None


# The Glue table Firehose's JSON → Parquet tests name, as `aws glue
# create-table` takes it.
GLUE_TABLES = [{"DatabaseName": "analytics", "TableInput": {"Name": "events", "StorageDescriptor": {"Columns": [
    {"Name": "id", "Type": "bigint"},
    {"Name": "name", "Type": "string"},
    {"Name": "at", "Type": "timestamp"},
    {"Name": "tags", "Type": "array<string>"},
    {"Name": "geo", "Type": "struct<lat:double,lon:double>"},
]}}}]


@pytest.fixture(scope="session")
def cluster(binary, workdir, s3_endpoint):
    """Three nodes, replication factor 3, fsync on, SigV4 verified, Firehose
    delivering to `s3_endpoint`. In the degraded run one is killed, and its
    place in the list goes to a survivor, so that tests spreading work over
    the nodes use the survivors."""
    # The controller must not re-place the dead node's replicas during the
    # run: the degraded run is about a cluster that lives with a node down.
    tables = os.path.join(workdir, "glue-tables.json")
    with open(tables, "w") as f:
        json.dump(GLUE_TABLES, f)
    extra = f's3_endpoint = "{s3_endpoint}"\nglue_tables_file = "{tables}"\n'
    if KILL:
        extra += "repair_after_secs = 3600"
    nodes = start_cluster(binary, os.path.join(workdir, "cluster"), 3, extra=extra)
    view = nodes
    if KILL:
        # Kill only once the metadata group has its three voters and no
        # membership change under way: stopped during joint consensus, a
        # node can take the quorum of the old configuration with it.
        wait_until("three settled metadata voters", lambda: meta_settled(nodes[0]))
        dead = nodes[int(KILL) - 1]
        dead.proc.send_signal(signal.SIGKILL)
        dead.proc.wait()
        survivors = [n for n in nodes if n is not dead]
        view = [n if n is not dead else survivors[0] for n in nodes]
        wait_until(f"the survivors to work without node {KILL}", lambda: _probe(survivors), timeout=60)
    yield view
    for n in nodes:
        n.stop()


def meta_settled(node):
    """The metadata group has three voters and no membership change under way."""
    group = next(g for g in node.cluster_view()["groups"] if g["group"] == 0)
    return len(group["voters"]) == 3 and not group["joint_membership"]


def _probe(nodes):
    """A stream can be created, written and read through every node."""
    name = f"degraded-probe-{time.monotonic_ns()}"
    client = client_for(nodes[0].endpoint, attempts=1)
    create_and_wait(client, name, shards=2)
    for n in nodes:
        c = client_for(n.endpoint, attempts=1)
        c.put_record(StreamName=name, PartitionKey="k", Data=b"x")
    client.delete_stream(StreamName=name)
    return True


def sqs_for(endpoint, attempts=6, access_key=ACCESS_KEY, secret_key=SECRET_KEY):
    return boto3.client(
        "sqs",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=Config(retries={"mode": "standard", "total_max_attempts": attempts}, read_timeout=40),
    )


def client_for(endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY, validate=True, attempts=6):
    return boto3.client(
        "kinesis",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=Config(
            parameter_validation=validate,
            retries={"mode": "standard", "total_max_attempts": attempts},
            read_timeout=30,
        ),
    )


@pytest.fixture(scope="session")
def kinesis(cluster):
    return client_for(cluster[0].endpoint)


@pytest.fixture(scope="session")
def clients(cluster):
    """One client per node: any node must answer any request."""
    return [client_for(n.endpoint) for n in cluster]


@pytest.fixture(scope="session")
def raw_kinesis(cluster):
    """A client that skips botocore's own parameter validation, so that the
    server's validation is what answers."""
    return client_for(cluster[1].endpoint, validate=False)


_counter = [0]


@pytest.fixture
def stream_name(request):
    _counter[0] += 1
    # Names are at most 80 characters (a queue's limit) with the counter.
    base = request.node.name.replace("[", "-").replace("]", "").replace("_", "-")[:74]
    return f"{base}-{_counter[0]}"


def create_and_wait(client, name, shards=1, **kwargs):
    client.create_stream(StreamName=name, ShardCount=shards, **kwargs)
    client.get_waiter("stream_exists").wait(
        StreamName=name, WaiterConfig={"Delay": 0.2, "MaxAttempts": 100}
    )


def read_shard(client, stream, shard_id, iterator_type="TRIM_HORIZON", until=None, timeout=30, **kwargs):
    """Reads a shard from `iterator_type` until `until(records)` holds or the
    shard is drained; returns the records."""
    it = client.get_shard_iterator(
        StreamName=stream, ShardId=shard_id, ShardIteratorType=iterator_type, **kwargs
    )["ShardIterator"]
    records = []
    deadline = time.monotonic() + timeout
    while it and time.monotonic() < deadline:
        out = client.get_records(ShardIterator=it, Limit=10000)
        records.extend(out["Records"])
        it = out.get("NextShardIterator")
        if until is None:
            if not out["Records"] and out["MillisBehindLatest"] == 0:
                break
        elif until(records):
            break
        elif not out["Records"]:
            time.sleep(0.1)
    return records


def with_issued_ms(iterator, issued_ms):
    """The iterator with another issue time, as a client would forge it: the
    token's last field is a varint; a signed token (first byte 2) ends with
    a 16-byte tag after it, which the forger keeps (without the key, it
    cannot make a new one)."""
    raw = base64.b64decode(iterator)
    body, tag = (raw[:-16], raw[-16:]) if raw[0] == 2 else (raw, b"")
    start = len(body) - 1
    while start > 0 and body[start - 1] & 0x80:
        start -= 1
    varint = bytearray()
    while True:
        byte, issued_ms = issued_ms & 0x7F, issued_ms >> 7
        varint.append(byte | (0x80 if issued_ms else 0))
        if not issued_ms:
            break
    return base64.b64encode(body[:start] + bytes(varint) + tag).decode()
