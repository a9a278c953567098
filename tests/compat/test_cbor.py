"""The CBOR protocol as the Java SDK v2 speaks it (application/x-amz-cbor-1.1,
timestamps as tag 1 with integer epoch milliseconds), signed with SigV4."""

import struct
import time
import urllib.error
import urllib.request

import cbor2
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from conftest import ACCESS_KEY, REGION, SECRET_KEY, create_and_wait


class Tag:
    def __init__(self, tag, value):
        self.tag, self.value = tag, value


def decode(raw):
    """A small CBOR reader that keeps tags as they are: cbor2 reads tag 1 as
    RFC 8949 seconds and cannot hold the SDK's milliseconds."""

    def item(pos):
        head = raw[pos]
        major, info = head >> 5, head & 31
        pos += 1
        if major == 7:
            if info in (20, 21):
                return info == 21, pos
            if info == 22:
                return None, pos
            if info == 27:
                return struct.unpack(">d", raw[pos:pos + 8])[0], pos + 8
            if info == 26:
                return struct.unpack(">f", raw[pos:pos + 4])[0], pos + 4
            raise ValueError(f"unsupported simple value {info}")
        if info < 24:
            arg = info
        elif info in (24, 25, 26, 27):
            size = 1 << (info - 24)
            arg = int.from_bytes(raw[pos:pos + size], "big")
            pos += size
        elif info == 31:
            arg = None
        else:
            raise ValueError(f"unsupported length {info}")
        if major == 0:
            return arg, pos
        if major == 1:
            return -1 - arg, pos
        if major in (2, 3):
            data = raw[pos:pos + arg]
            return (bytes(data) if major == 2 else data.decode()), pos + arg
        if major == 4:
            out = []
            for _ in range(arg):
                v, pos = item(pos)
                out.append(v)
            return out, pos
        if major == 5:
            out = {}
            for _ in range(arg):
                k, pos = item(pos)
                v, pos = item(pos)
                out[k] = v
            return out, pos
        v, pos = item(pos)
        return Tag(arg, v), pos

    value, end = item(0)
    assert end == len(raw)
    return value


def call(endpoint, operation, body):
    data = cbor2.dumps(body)
    req = AWSRequest(
        method="POST",
        url=endpoint + "/",
        data=data,
        headers={
            "Content-Type": "application/x-amz-cbor-1.1",
            "X-Amz-Target": f"Kinesis_20131202.{operation}",
        },
    )
    SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), "kinesis", REGION).add_auth(req)
    http = urllib.request.Request(endpoint + "/", data=data, headers=dict(req.headers.items()), method="POST")
    try:
        with urllib.request.urlopen(http, timeout=30) as r:
            assert r.headers["Content-Type"] == "application/x-amz-cbor-1.1"
            raw = r.read()
            return r.status, raw, decode(raw)
    except urllib.error.HTTPError as e:
        raw = e.read()
        return e.code, raw, decode(raw)


def test_cbor_put_and_read_at_a_millisecond_timestamp(cluster, kinesis, stream_name):
    create_and_wait(kinesis, stream_name)
    endpoint = cluster[0].endpoint
    shard = "shardId-000000000000"
    status, _, out = call(endpoint, "PutRecord", {"StreamName": stream_name, "PartitionKey": "k", "Data": b"\x00first"})
    assert status == 200, out
    # Millisecond precision matters here: the boundary lies within one second.
    time.sleep(0.02)
    boundary_ms = int(time.time() * 1000)
    time.sleep(0.02)
    status, _, out = call(endpoint, "PutRecord", {"StreamName": stream_name, "PartitionKey": "k", "Data": b"\x00second"})
    assert status == 200, out

    status, _, out = call(
        endpoint,
        "GetShardIterator",
        {
            "StreamName": stream_name,
            "ShardId": shard,
            "ShardIteratorType": "AT_TIMESTAMP",
            "Timestamp": cbor2.CBORTag(1, boundary_ms),
        },
    )
    assert status == 200, out
    status, raw, out = call(endpoint, "GetRecords", {"ShardIterator": out["ShardIterator"]})
    assert status == 200, out
    assert [r["Data"] for r in out["Records"]] == [b"\x00second"]
    # Tag 1 holding an integer of epoch milliseconds, just after the boundary.
    arrival = out["Records"][0]["ApproximateArrivalTimestamp"]
    assert isinstance(arrival, Tag) and arrival.tag == 1 and isinstance(arrival.value, int)
    assert boundary_ms <= arrival.value < boundary_ms + 30_000


def test_cbor_errors_are_cbor(cluster):
    status, _, out = call(cluster[0].endpoint, "DescribeStream", {"StreamName": "no-such-stream"})
    assert status == 400
    assert out["__type"] == "ResourceNotFoundException"
    assert "no-such-stream" in out["message"]
