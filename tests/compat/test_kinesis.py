"""Kinesis Data Streams through boto3 and the AWS CLI against a real 3-node
cluster (replication factor 3, fsync on, SigV4 verified)."""

import base64
import hashlib
import json
import math
import os
import socket
import ssl
import subprocess
import threading
import time

import boto3
import botocore.exceptions
import pytest

from conftest import (
    ACCESS_KEY,
    ACCOUNT,
    OTHER_ACCESS_KEY,
    OTHER_ACCOUNT,
    OTHER_SECRET_KEY,
    REGION,
    SECRET_KEY,
    client_for,
    create_and_wait,
    read_shard,
    start_cluster,
    with_issued_ms,
)

MAX_HASH = 2**128 - 1


def error_code(excinfo):
    return excinfo.value.response["Error"]["Code"]


def shard_for_key(shards, hash_key):
    for s in shards:
        r = s["HashKeyRange"]
        if int(r["StartingHashKey"]) <= hash_key <= int(r["EndingHashKey"]):
            return s["ShardId"]
    raise AssertionError(f"no shard holds {hash_key}")


def test_stream_lifecycle(kinesis, stream_name):
    kinesis.create_stream(StreamName=stream_name, ShardCount=3)
    kinesis.get_waiter("stream_exists").wait(StreamName=stream_name, WaiterConfig={"Delay": 0.2})
    d = kinesis.describe_stream(StreamName=stream_name)["StreamDescription"]
    assert d["StreamStatus"] == "ACTIVE"
    assert d["StreamARN"] == f"arn:aws:kinesis:{REGION}:{ACCOUNT}:stream/{stream_name}"
    assert d["RetentionPeriodHours"] == 24
    assert [s["ShardId"] for s in d["Shards"]] == [
        "shardId-000000000000",
        "shardId-000000000001",
        "shardId-000000000002",
    ]
    # The shards cover the hash-key space without gaps.
    ranges = [(int(s["HashKeyRange"]["StartingHashKey"]), int(s["HashKeyRange"]["EndingHashKey"])) for s in d["Shards"]]
    assert ranges[0][0] == 0 and ranges[-1][1] == MAX_HASH
    assert all(a[1] + 1 == b[0] for a, b in zip(ranges, ranges[1:]))

    page = kinesis.describe_stream(StreamName=stream_name, Limit=2)["StreamDescription"]
    assert len(page["Shards"]) == 2 and page["HasMoreShards"]
    rest = kinesis.describe_stream(StreamName=stream_name, ExclusiveStartShardId=page["Shards"][-1]["ShardId"])
    assert [s["ShardId"] for s in rest["StreamDescription"]["Shards"]] == ["shardId-000000000002"]

    summary = kinesis.describe_stream_summary(StreamARN=d["StreamARN"])["StreamDescriptionSummary"]
    assert summary["OpenShardCount"] == 3
    assert summary["StreamModeDetails"]["StreamMode"] == "PROVISIONED"

    with pytest.raises(botocore.exceptions.ClientError) as e:
        kinesis.create_stream(StreamName=stream_name, ShardCount=1)
    assert error_code(e) == "ResourceInUseException"

    kinesis.delete_stream(StreamName=stream_name)
    kinesis.get_waiter("stream_not_exists").wait(StreamName=stream_name, WaiterConfig={"Delay": 0.2})
    with pytest.raises(botocore.exceptions.ClientError) as e:
        kinesis.describe_stream(StreamName=stream_name)
    assert error_code(e) == "ResourceNotFoundException"


def test_list_streams_pages(kinesis, stream_name):
    names = [f"{stream_name}-{k}" for k in range(3)]
    for n in names:
        create_and_wait(kinesis, n)
    seen = []
    out = kinesis.list_streams(Limit=1)
    while True:
        seen.extend(out["StreamNames"])
        assert len(out["StreamSummaries"]) == len(out["StreamNames"])
        if not out["HasMoreStreams"]:
            break
        out = kinesis.list_streams(Limit=1, NextToken=out["NextToken"])
    assert all(n in seen for n in names)
    assert seen == sorted(seen)
    paginated = [n for page in kinesis.get_paginator("list_streams").paginate() for n in page["StreamNames"]]
    assert paginated == seen


def test_stream_names_are_per_account(kinesis, stream_name):
    other = client_for(kinesis.meta.endpoint_url, OTHER_ACCESS_KEY, OTHER_SECRET_KEY)
    create_and_wait(kinesis, stream_name)
    with pytest.raises(botocore.exceptions.ClientError) as e:
        other.describe_stream_summary(StreamName=stream_name)
    assert error_code(e) == "ResourceNotFoundException"
    assert OTHER_ACCOUNT in e.value.response["Error"]["Message"]
    # The same name in another account is another stream.
    create_and_wait(other, stream_name, shards=2)
    d = other.describe_stream_summary(StreamName=stream_name)["StreamDescriptionSummary"]
    assert d["StreamARN"] == f"arn:aws:kinesis:{REGION}:{OTHER_ACCOUNT}:stream/{stream_name}"
    assert d["OpenShardCount"] == 2 and d["StreamName"] == stream_name
    assert kinesis.describe_stream_summary(StreamName=stream_name)["StreamDescriptionSummary"]["OpenShardCount"] == 1
    kinesis.put_record(StreamName=stream_name, PartitionKey="k", Data=b"mine")
    other.put_record(StreamName=stream_name, PartitionKey="k", Data=b"theirs")
    assert [r["Data"] for r in read_shard(kinesis, stream_name, "shardId-000000000000")] == [b"mine"]
    theirs = [r["Data"] for s in ("shardId-000000000000", "shardId-000000000001")
              for r in read_shard(other, stream_name, s)]
    assert theirs == [b"theirs"]
    assert stream_name in kinesis.list_streams()["StreamNames"]
    assert other.list_streams()["StreamNames"] == [stream_name]
    # Another account's ARN, iterator or paging token opens nothing.
    mine_arn = f"arn:aws:kinesis:{REGION}:{ACCOUNT}:stream/{stream_name}"
    with pytest.raises(botocore.exceptions.ClientError) as e:
        other.describe_stream_summary(StreamARN=mine_arn)
    assert error_code(e) == "AccessDeniedException"
    it = kinesis.get_shard_iterator(StreamName=stream_name, ShardId="shardId-000000000000",
                                    ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
    with pytest.raises(botocore.exceptions.ClientError) as e:
        other.get_records(ShardIterator=it)
    assert error_code(e) == "InvalidArgumentException"
    other.delete_stream(StreamName=stream_name)
    other.get_waiter("stream_not_exists").wait(StreamName=stream_name, WaiterConfig={"Delay": 0.2})
    assert kinesis.describe_stream_summary(StreamName=stream_name)["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE"
    kinesis.delete_stream(StreamName=stream_name)


def test_put_records_from_any_node_read_back_in_per_key_order(clients, stream_name):
    writer, other, reader = clients
    create_and_wait(writer, stream_name, shards=4)
    sent = {}
    for batch in range(4):
        entries = []
        for k in range(500):
            key = f"user-{k % 37}"
            value = f"{batch}:{k}".encode()
            sent.setdefault(key, []).append(value)
            entries.append({"PartitionKey": key, "Data": value})
        client = writer if batch % 2 == 0 else other
        out = client.put_records(StreamName=stream_name, Records=entries)
        assert out["FailedRecordCount"] == 0
        assert len(out["Records"]) == 500
        assert all("SequenceNumber" in r and "ShardId" in r for r in out["Records"])

    shards = reader.list_shards(StreamName=stream_name)["Shards"]
    received = {}
    total = 0
    for s in shards:
        records = read_shard(reader, stream_name, s["ShardId"])
        seqs = [int(r["SequenceNumber"]) for r in records]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        for r in records:
            # Routing: the record's key hashes into the shard that holds it.
            h = int.from_bytes(hashlib.md5(r["PartitionKey"].encode()).digest(), "big")
            assert shard_for_key(shards, h) == s["ShardId"]
            received.setdefault(r["PartitionKey"], []).append(r["Data"])
        total += len(records)
    assert total == 2000
    assert received == sent
    # Iterators and paging tokens are signed with the cluster's key: what
    # one node issued, another accepts.
    it = writer.get_shard_iterator(StreamName=stream_name, ShardId=shards[0]["ShardId"], ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
    assert reader.get_records(ShardIterator=it)["Records"]
    page = other.list_shards(StreamName=stream_name, MaxResults=1)
    rest = reader.list_shards(NextToken=page["NextToken"])["Shards"]
    assert [s["ShardId"] for s in page["Shards"] + rest] == [s["ShardId"] for s in shards]


def test_explicit_hash_key_routes_across_the_whole_range(kinesis, stream_name):
    create_and_wait(kinesis, stream_name, shards=4)
    shards = kinesis.list_shards(StreamName=stream_name)["Shards"]
    probes = [0, 1, 2**126, 2**127 - 1, 2**127, 3 * 2**126 + 5, MAX_HASH]
    for h in probes:
        out = kinesis.put_record(
            StreamName=stream_name, PartitionKey="same-key", ExplicitHashKey=str(h), Data=b"x"
        )
        assert out["ShardId"] == shard_for_key(shards, h), h


def test_sequence_number_for_ordering(kinesis, stream_name):
    create_and_wait(kinesis, stream_name, shards=2)
    previous = None
    seqs = []
    for k in range(20):
        kwargs = {"SequenceNumberForOrdering": previous} if previous else {}
        out = kinesis.put_record(StreamName=stream_name, PartitionKey="k", Data=str(k).encode(), **kwargs)
        previous = out["SequenceNumber"]
        seqs.append(int(previous))
    assert seqs == sorted(seqs) and len(set(seqs)) == 20


def test_all_iterator_types(kinesis, stream_name):
    create_and_wait(kinesis, stream_name)
    shard = "shardId-000000000000"
    first = [kinesis.put_record(StreamName=stream_name, PartitionKey="k", Data=f"a{k}".encode()) for k in range(5)]
    records = read_shard(kinesis, stream_name, shard)
    assert [r["Data"] for r in records] == [f"a{k}".encode() for k in range(5)]
    assert [r["SequenceNumber"] for r in records] == [o["SequenceNumber"] for o in first]

    at = read_shard(kinesis, stream_name, shard, "AT_SEQUENCE_NUMBER", StartingSequenceNumber=first[2]["SequenceNumber"])
    assert [r["Data"] for r in at] == [b"a2", b"a3", b"a4"]
    after = read_shard(kinesis, stream_name, shard, "AFTER_SEQUENCE_NUMBER", StartingSequenceNumber=first[2]["SequenceNumber"])
    assert [r["Data"] for r in after] == [b"a3", b"a4"]

    latest = kinesis.get_shard_iterator(StreamName=stream_name, ShardId=shard, ShardIteratorType="LATEST")["ShardIterator"]
    out = kinesis.get_records(ShardIterator=latest)
    assert out["Records"] == [] and out["MillisBehindLatest"] == 0
    kinesis.put_record(StreamName=stream_name, PartitionKey="k", Data=b"after-latest")
    out = kinesis.get_records(ShardIterator=latest)
    assert [r["Data"] for r in out["Records"]] == [b"after-latest"]

    # AT_TIMESTAMP: a timestamp after every record so far, before one more.
    # boto3 sends whole seconds, so the boundary is the next full second.
    arrival = out["Records"][-1]["ApproximateArrivalTimestamp"]
    boundary = math.floor(arrival.timestamp()) + 1
    while time.time() < boundary + 0.05:
        time.sleep(0.01)
    kinesis.put_record(StreamName=stream_name, PartitionKey="k", Data=b"b0")
    by_time = read_shard(kinesis, stream_name, shard, "AT_TIMESTAMP", Timestamp=boundary)
    assert [r["Data"] for r in by_time] == [b"b0"]
    everything = read_shard(kinesis, stream_name, shard, "AT_TIMESTAMP", Timestamp=0)
    assert len(everything) == 7


def test_get_records_limit_and_millis_behind(kinesis, stream_name):
    create_and_wait(kinesis, stream_name)
    kinesis.put_records(StreamName=stream_name, Records=[{"PartitionKey": "k", "Data": b"x" * 100} for _ in range(50)])
    time.sleep(0.2)
    it = kinesis.get_shard_iterator(StreamName=stream_name, ShardId="shardId-000000000000", ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
    out = kinesis.get_records(ShardIterator=it, Limit=10)
    assert len(out["Records"]) == 10
    # Real milliseconds behind the tip, not a record count.
    assert out["MillisBehindLatest"] >= 100
    out = kinesis.get_records(ShardIterator=out["NextShardIterator"], Limit=10000)
    assert len(out["Records"]) == 40
    assert out["MillisBehindLatest"] == 0


@pytest.mark.own_cluster
def test_expired_iterator(binary, workdir, stream_name):
    nodes = start_cluster(binary, os.path.join(workdir, "short-iterators"), 1, extra="iterator_validity_secs = 1\nreplication_factor = 1")
    try:
        client = client_for(nodes[0].endpoint)
        create_and_wait(client, stream_name)
        it = client.get_shard_iterator(StreamName=stream_name, ShardId="shardId-000000000000", ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        client.get_records(ShardIterator=it)
        # Iterators are signed: one whose issue time was moved (to keep it
        # from expiring) is refused as forged, even by a second or by a day.
        now_ms = int(time.time() * 1000)
        for issued in (now_ms + 1_000, now_ms + 86_400_000):
            with pytest.raises(botocore.exceptions.ClientError) as e:
                client.get_records(ShardIterator=with_issued_ms(it, issued))
            assert error_code(e) == "InvalidArgumentException"
        time.sleep(1.5)
        with pytest.raises(botocore.exceptions.ClientError) as e:
            client.get_records(ShardIterator=it)
        assert error_code(e) == "ExpiredIteratorException"
    finally:
        for n in nodes:
            n.stop()


@pytest.mark.own_cluster
def test_shard_throughput_limits(binary, workdir, stream_name):
    limits = "replication_factor = 1\nshard_write_records_per_sec = 100\nshard_read_calls_per_sec = 2"
    nodes = start_cluster(binary, os.path.join(workdir, "limits"), 1, extra=limits)
    try:
        client = client_for(nodes[0].endpoint)
        create_and_wait(client, stream_name)
        # The first call may overdraw the bucket; the next ones are refused
        # per record until a second's worth of budget is back.
        first = client.put_records(StreamName=stream_name, Records=[{"PartitionKey": "k", "Data": b"x"}] * 300)
        assert first["FailedRecordCount"] == 0
        second = client.put_records(StreamName=stream_name, Records=[{"PartitionKey": "k", "Data": b"x"}] * 10)
        assert second["FailedRecordCount"] == 10
        assert {r["ErrorCode"] for r in second["Records"]} == {"ProvisionedThroughputExceededException"}
        no_retry = client_for(nodes[0].endpoint, attempts=1)
        with pytest.raises(botocore.exceptions.ClientError) as e:
            no_retry.put_record(StreamName=stream_name, PartitionKey="k", Data=b"x")
        assert error_code(e) == "ProvisionedThroughputExceededException"
        # The budget comes back.
        deadline = time.monotonic() + 10
        while True:
            out = client.put_records(StreamName=stream_name, Records=[{"PartitionKey": "k", "Data": b"y"}])
            if out["FailedRecordCount"] == 0:
                break
            assert time.monotonic() < deadline
            time.sleep(0.2)
        it = no_retry.get_shard_iterator(StreamName=stream_name, ShardId="shardId-000000000000", ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        throttled = 0
        for _ in range(10):
            try:
                no_retry.get_records(ShardIterator=it)
            except botocore.exceptions.ClientError as err:
                assert err.response["Error"]["Code"] == "ProvisionedThroughputExceededException"
                throttled += 1
        assert throttled >= 3
    finally:
        for n in nodes:
            n.stop()


def test_bad_input_gets_aws_errors(raw_kinesis, kinesis, stream_name):
    create_and_wait(kinesis, stream_name)
    cases = [
        (lambda: raw_kinesis.describe_stream(StreamName="no-such-stream"), "ResourceNotFoundException"),
        (lambda: raw_kinesis.put_record(StreamName="no-such-stream", PartitionKey="k", Data=b"x"), "ResourceNotFoundException"),
        (lambda: raw_kinesis.put_record(StreamName=stream_name, PartitionKey="", Data=b"x"), "ValidationException"),
        (lambda: raw_kinesis.put_record(StreamName=stream_name, PartitionKey="k" * 257, Data=b"x"), "ValidationException"),
        (lambda: raw_kinesis.put_record(StreamName=stream_name, PartitionKey="k", Data=b"x", ExplicitHashKey=str(2**128)), "InvalidArgumentException"),
        (lambda: raw_kinesis.put_record(StreamName=stream_name, PartitionKey="k", Data=b"x" * (1024 * 1024)), "ValidationException"),
        (lambda: raw_kinesis.put_records(StreamName=stream_name, Records=[{"PartitionKey": "k", "Data": b"x"}] * 501), "ValidationException"),
        (lambda: raw_kinesis.create_stream(StreamName="bad name!", ShardCount=1), "ValidationException"),
        (lambda: raw_kinesis.create_stream(StreamName=stream_name + "-x", ShardCount=100000), "LimitExceededException"),
        (lambda: raw_kinesis.get_records(ShardIterator="bm90LWFuLWl0ZXJhdG9y"), "InvalidArgumentException"),
        (lambda: raw_kinesis.get_shard_iterator(StreamName=stream_name, ShardId="shardId-000000000009", ShardIteratorType="LATEST"), "ResourceNotFoundException"),
        (lambda: raw_kinesis.get_shard_iterator(StreamName=stream_name, ShardId="shardId-000000000000", ShardIteratorType="AT_SEQUENCE_NUMBER"), "InvalidArgumentException"),
        (lambda: raw_kinesis.get_shard_iterator(StreamName=stream_name, ShardId="shardId-000000000000", ShardIteratorType="SIDEWAYS"), "ValidationException"),
        (lambda: raw_kinesis.increase_stream_retention_period(StreamName=stream_name, RetentionPeriodHours=10), "InvalidArgumentException"),
    ]
    for call, expected in cases:
        with pytest.raises(botocore.exceptions.ClientError) as e:
            call()
        assert error_code(e) == expected, (expected, e.value.response)
        assert e.value.response["Error"]["Message"]
        assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    # A malformed entry fails the whole call: nothing of it is stored.
    with pytest.raises(botocore.exceptions.ClientError) as e:
        raw_kinesis.put_records(StreamName=stream_name, Records=[{"PartitionKey": "k", "Data": b"good"}, {"PartitionKey": "", "Data": b"bad"}])
    assert error_code(e) == "ValidationException"
    assert read_shard(kinesis, stream_name, "shardId-000000000000") == []
    # The oversize record's neighbour: exactly 1 MiB including the key is accepted.
    kinesis.put_record(StreamName=stream_name, PartitionKey="k", Data=b"x" * (1024 * 1024 - 1))


def test_signatures_are_verified(cluster, stream_name):
    good = client_for(cluster[0].endpoint)
    create_and_wait(good, stream_name)
    wrong_secret = client_for(cluster[0].endpoint, secret_key="not-the-secret")
    with pytest.raises(botocore.exceptions.ClientError) as e:
        wrong_secret.describe_stream(StreamName=stream_name)
    assert error_code(e) == "InvalidSignatureException"
    unknown = client_for(cluster[0].endpoint, access_key="AKIDUNKNOWN")
    with pytest.raises(botocore.exceptions.ClientError) as e:
        unknown.put_record(StreamName=stream_name, PartitionKey="k", Data=b"x")
    assert error_code(e) == "UnrecognizedClientException"
    assert read_shard(good, stream_name, "shardId-000000000000") == []


def test_retention_tags_monitoring_encryption_mode(kinesis, stream_name):
    create_and_wait(kinesis, stream_name, Tags={"team": "payments"})
    arn = kinesis.describe_stream_summary(StreamName=stream_name)["StreamDescriptionSummary"]["StreamARN"]

    kinesis.increase_stream_retention_period(StreamName=stream_name, RetentionPeriodHours=48)
    assert kinesis.describe_stream_summary(StreamName=stream_name)["StreamDescriptionSummary"]["RetentionPeriodHours"] == 48
    with pytest.raises(botocore.exceptions.ClientError) as e:
        kinesis.decrease_stream_retention_period(StreamName=stream_name, RetentionPeriodHours=72)
    assert error_code(e) == "InvalidArgumentException"
    kinesis.decrease_stream_retention_period(StreamName=stream_name, RetentionPeriodHours=24)

    kinesis.add_tags_to_stream(StreamName=stream_name, Tags={"env": "prod", "tier": "1"})
    tags = kinesis.list_tags_for_stream(StreamName=stream_name)
    assert tags["Tags"] == [{"Key": "env", "Value": "prod"}, {"Key": "team", "Value": "payments"}, {"Key": "tier", "Value": "1"}]
    assert not tags["HasMoreTags"]
    page = kinesis.list_tags_for_stream(StreamName=stream_name, Limit=1, ExclusiveStartTagKey="env")
    assert page["Tags"] == [{"Key": "team", "Value": "payments"}] and page["HasMoreTags"]
    kinesis.remove_tags_from_stream(StreamName=stream_name, TagKeys=["tier"])
    kinesis.tag_resource(ResourceARN=arn, Tags={"owner": "ops"})
    kinesis.untag_resource(ResourceARN=arn, TagKeys=["env"])
    assert kinesis.list_tags_for_resource(ResourceARN=arn)["Tags"] == [
        {"Key": "owner", "Value": "ops"},
        {"Key": "team", "Value": "payments"},
    ]

    out = kinesis.enable_enhanced_monitoring(StreamName=stream_name, ShardLevelMetrics=["IncomingBytes", "OutgoingRecords"])
    assert out["CurrentShardLevelMetrics"] == [] and sorted(out["DesiredShardLevelMetrics"]) == ["IncomingBytes", "OutgoingRecords"]
    out = kinesis.disable_enhanced_monitoring(StreamName=stream_name, ShardLevelMetrics=["IncomingBytes"])
    assert out["DesiredShardLevelMetrics"] == ["OutgoingRecords"]

    kinesis.start_stream_encryption(StreamName=stream_name, EncryptionType="KMS", KeyId="alias/aws/kinesis")
    d = kinesis.describe_stream(StreamName=stream_name)["StreamDescription"]
    assert d["EncryptionType"] == "KMS" and d["KeyId"] == "alias/aws/kinesis"
    kinesis.stop_stream_encryption(StreamName=stream_name, EncryptionType="KMS", KeyId="alias/aws/kinesis")
    assert kinesis.describe_stream(StreamName=stream_name)["StreamDescription"]["EncryptionType"] == "NONE"

    kinesis.update_stream_mode(StreamARN=arn, StreamModeDetails={"StreamMode": "ON_DEMAND"})
    assert kinesis.describe_stream_summary(StreamName=stream_name)["StreamDescriptionSummary"]["StreamModeDetails"]["StreamMode"] == "ON_DEMAND"
    limits = kinesis.describe_limits()
    assert limits["OnDemandStreamCount"] >= 1 and limits["OpenShardCount"] >= 1

    policy = json.dumps({"Version": "2012-10-17", "Statement": []})
    kinesis.put_resource_policy(ResourceARN=arn, Policy=policy)
    assert json.loads(kinesis.get_resource_policy(ResourceARN=arn)["Policy"]) == json.loads(policy)
    kinesis.delete_resource_policy(ResourceARN=arn)
    big = json.dumps({"Version": "2012-10-17", "Statement": [], "Id": "x" * 20480})
    with pytest.raises(botocore.exceptions.ClientError) as e:
        kinesis.put_resource_policy(ResourceARN=arn, Policy=big)
    assert error_code(e) == "LimitExceededException"


def test_max_record_size_can_be_raised(kinesis, stream_name):
    create_and_wait(kinesis, stream_name)
    arn = kinesis.describe_stream_summary(StreamName=stream_name)["StreamDescriptionSummary"]["StreamARN"]
    big = os.urandom(3 * 1024 * 1024)
    with pytest.raises(botocore.exceptions.ClientError) as e:
        kinesis.put_record(StreamName=stream_name, PartitionKey="k", Data=big)
    assert error_code(e) == "ValidationException"
    kinesis.update_max_record_size(StreamARN=arn, MaxRecordSizeInKiB=4096)
    assert kinesis.describe_stream_summary(StreamName=stream_name)["StreamDescriptionSummary"]["MaxRecordSizeInKiB"] == 4096
    kinesis.put_record(StreamName=stream_name, PartitionKey="k", Data=big)
    records = read_shard(kinesis, stream_name, "shardId-000000000000")
    assert [r["Data"] for r in records] == [big]


def test_on_demand_create_and_list_shards_filters(kinesis, stream_name):
    kinesis.create_stream(StreamName=stream_name, StreamModeDetails={"StreamMode": "ON_DEMAND"})
    kinesis.get_waiter("stream_exists").wait(StreamName=stream_name, WaiterConfig={"Delay": 0.2})
    shards = kinesis.list_shards(StreamName=stream_name)["Shards"]
    assert len(shards) == 4
    page = kinesis.list_shards(StreamName=stream_name, MaxResults=3)
    assert len(page["Shards"]) == 3
    rest = kinesis.list_shards(NextToken=page["NextToken"])
    assert [s["ShardId"] for s in rest["Shards"]] == ["shardId-000000000003"]
    after = kinesis.list_shards(StreamName=stream_name, ShardFilter={"Type": "AFTER_SHARD_ID", "ShardId": "shardId-000000000001"})
    assert [s["ShardId"] for s in after["Shards"]] == ["shardId-000000000002", "shardId-000000000003"]
    latest = kinesis.list_shards(StreamName=stream_name, ShardFilter={"Type": "AT_LATEST"})
    assert len(latest["Shards"]) == 4
    with pytest.raises(botocore.exceptions.ClientError) as e:
        kinesis.list_shards(StreamName=stream_name, NextToken=page["NextToken"])
    assert error_code(e) == "InvalidArgumentException"


def test_concurrent_producers_lose_nothing(clients, stream_name):
    create_and_wait(clients[0], stream_name, shards=3)
    errors = []

    def produce(client, worker):
        try:
            for b in range(10):
                entries = [{"PartitionKey": f"w{worker}-{k % 5}", "Data": f"{worker}:{b}:{k}".encode()} for k in range(100)]
                out = client.put_records(StreamName=stream_name, Records=entries)
                assert out["FailedRecordCount"] == 0, out
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=produce, args=(clients[w % 3], w)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    values = set()
    for s in clients[2].list_shards(StreamName=stream_name)["Shards"]:
        values.update(r["Data"] for r in read_shard(clients[2], stream_name, s["ShardId"]))
    assert len(values) == 6 * 10 * 100


def aws_cli(cluster, *args):
    env = dict(
        os.environ,
        AWS_ACCESS_KEY_ID=ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=SECRET_KEY,
        AWS_DEFAULT_REGION=REGION,
        AWS_PAGER="",
    )
    out = subprocess.run(
        ["aws", "--endpoint-url", cluster[2].endpoint, "--output", "json", "kinesis", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout) if out.stdout.strip() else None


def test_aws_cli(cluster, stream_name, tmp_path):
    aws_cli(cluster, "create-stream", "--stream-name", stream_name, "--shard-count", "2")
    aws_cli(cluster, "wait", "stream-exists", "--stream-name", stream_name)
    payload = tmp_path / "payload.bin"
    payload.write_bytes(b"from the cli")
    put = aws_cli(
        cluster, "put-record", "--stream-name", stream_name, "--partition-key", "cli",
        "--data", f"fileb://{payload}",
    )
    it = aws_cli(
        cluster, "get-shard-iterator", "--stream-name", stream_name, "--shard-id", put["ShardId"],
        "--shard-iterator-type", "AT_SEQUENCE_NUMBER", "--starting-sequence-number", put["SequenceNumber"],
    )["ShardIterator"]
    records = aws_cli(cluster, "get-records", "--shard-iterator", it)["Records"]
    assert base64.b64decode(records[0]["Data"]) == b"from the cli"
    names = aws_cli(cluster, "list-streams")["StreamNames"]
    assert stream_name in names
    aws_cli(cluster, "delete-stream", "--stream-name", stream_name)


def wait_active(client, stream):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = client.describe_stream_summary(StreamName=stream)["StreamDescriptionSummary"]["StreamStatus"]
        if status == "ACTIVE":
            return
        assert status == "UPDATING", status
        time.sleep(0.1)
    raise AssertionError(f"{stream} did not become ACTIVE again")


def read_lineage(client, stream):
    """Reads every shard, each only after its parents, the way KCL does;
    returns the records in that order."""
    shards = {s["ShardId"]: s for s in client.list_shards(StreamName=stream)["Shards"]}
    done, order = set(), []

    def parents(s):
        return {p for p in (s.get("ParentShardId"), s.get("AdjacentParentShardId")) if p and p in shards}

    while len(done) < len(shards):
        ready = [sid for sid, s in sorted(shards.items()) if sid not in done and parents(s) <= done]
        assert ready, f"no shard is ready: {shards.keys() - done}"
        for sid in ready:
            closed = "EndingSequenceNumber" in shards[sid]["SequenceNumberRange"]
            it = client.get_shard_iterator(StreamName=stream, ShardId=sid, ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
            while it:
                out = client.get_records(ShardIterator=it)
                order.extend(out["Records"])
                it = out.get("NextShardIterator")
                if not closed and not out["Records"] and out["MillisBehindLatest"] == 0:
                    break
                if it is None:
                    assert closed and "ChildShards" in out
            done.add(sid)
    return order


def test_split_then_merge_under_concurrent_puts(cluster, kinesis, stream_name):
    create_and_wait(kinesis, stream_name, shards=1)
    stop = threading.Event()
    acked = {}
    errors = []

    def produce(worker):
        client = client_for(cluster[worker % 3].endpoint)
        keys = [f"w{worker}-k{k}" for k in range(5)]
        n = 0
        try:
            while not stop.is_set() or n < 20:
                key = keys[n % len(keys)]
                value = f"{key}:{n}"
                client.put_record(StreamName=stream_name, PartitionKey=key, Data=value.encode())
                acked.setdefault(key, []).append(value)
                n += 1
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=produce, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        kinesis.split_shard(StreamName=stream_name, ShardToSplit="shardId-000000000000", NewStartingHashKey=str(2**127))
        wait_active(kinesis, stream_name)
        shards = kinesis.list_shards(StreamName=stream_name)["Shards"]
        assert [s["ShardId"] for s in shards] == ["shardId-000000000000", "shardId-000000000001", "shardId-000000000002"]
        assert "EndingSequenceNumber" in shards[0]["SequenceNumberRange"]
        assert shards[1]["ParentShardId"] == "shardId-000000000000"
        assert int(shards[1]["HashKeyRange"]["EndingHashKey"]) == 2**127 - 1
        assert int(shards[2]["HashKeyRange"]["StartingHashKey"]) == 2**127
        time.sleep(0.5)
        kinesis.merge_shards(StreamName=stream_name, ShardToMerge="shardId-000000000001", AdjacentShardToMerge="shardId-000000000002")
        wait_active(kinesis, stream_name)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors

    shards = kinesis.list_shards(StreamName=stream_name)["Shards"]
    merged = shards[-1]
    assert merged["ShardId"] == "shardId-000000000003"
    assert (merged["ParentShardId"], merged["AdjacentParentShardId"]) == ("shardId-000000000001", "shardId-000000000002")
    assert len(kinesis.list_shards(StreamName=stream_name, ShardFilter={"Type": "AT_LATEST"})["Shards"]) == 1

    records = read_lineage(kinesis, stream_name)
    seen = {}
    for r in records:
        value = r["Data"].decode()
        seen.setdefault(r["PartitionKey"], []).append(value)
    # Every acknowledged record exactly once, in per-key put order.
    assert seen == acked
    # Children's sequence numbers are above their parents'.
    by_shard = {}
    for r in records:
        seq = int(r["SequenceNumber"])
        by_shard.setdefault(f"shardId-{(seq >> 64) & 0xFFFFFFFF:012d}", []).append(seq)
    for s in shards:
        for parent in (s.get("ParentShardId"), s.get("AdjacentParentShardId")):
            if parent in by_shard and s["ShardId"] in by_shard:
                assert min(by_shard[s["ShardId"]]) > max(by_shard[parent])
    # The first and the last shard certainly got records; the middle ones
    # only if a put reached them in the short time they were open.
    assert {"shardId-000000000000", "shardId-000000000003"} <= by_shard.keys()


def test_update_shard_count_and_reshard_errors(kinesis, stream_name):
    create_and_wait(kinesis, stream_name, shards=2)
    with pytest.raises(botocore.exceptions.ClientError) as e:
        kinesis.split_shard(StreamName=stream_name, ShardToSplit="shardId-000000000001", NewStartingHashKey="5")
    assert error_code(e) == "InvalidArgumentException"
    with pytest.raises(botocore.exceptions.ClientError) as e:
        kinesis.update_shard_count(StreamName=stream_name, TargetShardCount=5, ScalingType="UNIFORM_SCALING")
    assert error_code(e) == "LimitExceededException"

    out = kinesis.update_shard_count(StreamName=stream_name, TargetShardCount=4, ScalingType="UNIFORM_SCALING")
    assert (out["CurrentShardCount"], out["TargetShardCount"]) == (2, 4)
    wait_active(kinesis, stream_name)
    open_shards = kinesis.list_shards(StreamName=stream_name, ShardFilter={"Type": "AT_LATEST"})["Shards"]
    assert len(open_shards) == 4
    kinesis.update_shard_count(StreamName=stream_name, TargetShardCount=3, ScalingType="UNIFORM_SCALING")
    wait_active(kinesis, stream_name)
    open_shards = kinesis.list_shards(StreamName=stream_name, ShardFilter={"Type": "AT_LATEST"})["Shards"]
    assert len(open_shards) == 3
    ranges = sorted((int(s["HashKeyRange"]["StartingHashKey"]), int(s["HashKeyRange"]["EndingHashKey"])) for s in open_shards)
    assert ranges[0][0] == 0 and ranges[-1][1] == MAX_HASH
    assert all(a[1] + 1 == b[0] for a, b in zip(ranges, ranges[1:]))

    with pytest.raises(botocore.exceptions.ClientError) as e:
        kinesis.merge_shards(StreamName=stream_name, ShardToMerge=open_shards[0]["ShardId"], AdjacentShardToMerge="shardId-000000000000")
    assert error_code(e) == "InvalidArgumentException"
    out = kinesis.put_records(StreamName=stream_name, Records=[{"PartitionKey": str(k), "Data": b"x"} for k in range(100)])
    assert out["FailedRecordCount"] == 0
    assert {r["ShardId"] for r in out["Records"]} == {s["ShardId"] for s in open_shards}


def test_enhanced_fan_out(cluster, kinesis, stream_name):
    create_and_wait(kinesis, stream_name, shards=1)
    arn = kinesis.describe_stream_summary(StreamName=stream_name)["StreamDescriptionSummary"]["StreamARN"]
    consumer = kinesis.register_stream_consumer(StreamARN=arn, ConsumerName="reader")["Consumer"]
    assert consumer["ConsumerStatus"] == "ACTIVE"
    assert consumer["ConsumerARN"].startswith(arn + "/consumer/reader:")
    with pytest.raises(botocore.exceptions.ClientError) as e:
        kinesis.register_stream_consumer(StreamARN=arn, ConsumerName="reader")
    assert error_code(e) == "ResourceInUseException"
    described = kinesis.describe_stream_consumer(ConsumerARN=consumer["ConsumerARN"])["ConsumerDescription"]
    assert described["StreamARN"] == arn and described["ConsumerName"] == "reader"
    assert [c["ConsumerName"] for c in kinesis.list_stream_consumers(StreamARN=arn)["Consumers"]] == ["reader"]
    assert kinesis.describe_stream_summary(StreamName=stream_name)["StreamDescriptionSummary"]["ConsumerCount"] == 1

    before = kinesis.put_record(StreamName=stream_name, PartitionKey="k", Data=b"before")
    # Other nodes learn of the consumer from their copy of the cluster map,
    # a moment later: wait as an AWS client waits for ACTIVE.
    for node in cluster[1:]:
        other = client_for(node.endpoint)
        deadline = time.monotonic() + 30
        while True:
            try:
                other.describe_stream_consumer(ConsumerARN=consumer["ConsumerARN"])
                break
            except botocore.exceptions.ClientError as err:
                assert err.response["Error"]["Code"] == "ResourceNotFoundException"
                assert time.monotonic() < deadline, "the consumer never reached the other nodes"
                time.sleep(0.05)
    # Two subscribers on different nodes: from the start and from LATEST.
    from_start = client_for(cluster[1].endpoint).subscribe_to_shard(
        ConsumerARN=consumer["ConsumerARN"], ShardId="shardId-000000000000", StartingPosition={"Type": "TRIM_HORIZON"}
    )["EventStream"]
    latest = client_for(cluster[2].endpoint).subscribe_to_shard(
        ConsumerARN=consumer["ConsumerARN"], ShardId="shardId-000000000000", StartingPosition={"Type": "LATEST"}
    )["EventStream"]
    sent = [f"after-{k}".encode() for k in range(30)]
    for data in sent:
        kinesis.put_record(StreamName=stream_name, PartitionKey="k", Data=data)

    def collect(events, want):
        got, continuation = [], None
        deadline = time.monotonic() + 30
        for event in events:
            assert "SubscribeToShardEvent" in event, event
            e = event["SubscribeToShardEvent"]
            got.extend(r["Data"] for r in e["Records"])
            continuation = e["ContinuationSequenceNumber"]
            if len(got) >= want or time.monotonic() > deadline:
                break
        events.close()
        return got, continuation

    got, continuation = collect(from_start, 31)
    assert got == [b"before"] + sent
    got, _ = collect(latest, 30)
    assert got == sent
    # Resuming after the continuation number delivers what follows it.
    kinesis.put_record(StreamName=stream_name, PartitionKey="k", Data=b"resumed")
    resumed = kinesis.subscribe_to_shard(
        ConsumerARN=consumer["ConsumerARN"],
        ShardId="shardId-000000000000",
        StartingPosition={"Type": "AFTER_SEQUENCE_NUMBER", "SequenceNumber": continuation},
    )["EventStream"]
    got, _ = collect(resumed, 1)
    assert got == [b"resumed"]
    assert int(continuation) >= int(before["SequenceNumber"])

    with pytest.raises(botocore.exceptions.ClientError) as e:
        kinesis.delete_stream(StreamName=stream_name)
    assert error_code(e) == "ResourceInUseException"
    kinesis.deregister_stream_consumer(ConsumerARN=consumer["ConsumerARN"])
    with pytest.raises(botocore.exceptions.ClientError) as e:
        kinesis.subscribe_to_shard(ConsumerARN=consumer["ConsumerARN"], ShardId="shardId-000000000000", StartingPosition={"Type": "LATEST"})
    assert error_code(e) == "ResourceNotFoundException"
    kinesis.delete_stream(StreamName=stream_name)


def test_a_consumer_has_one_subscription_per_shard(kinesis, stream_name):
    """As AWS: a second SubscribeToShard of a consumer and shard within 5 s of
    the first is refused; a later one takes over and the first stream ends
    with ResourceInUseException. A subscription whose reader went away
    frees the slot at once, not 5 s after it started."""
    create_and_wait(kinesis, stream_name, shards=1)
    arn = kinesis.describe_stream_summary(StreamName=stream_name)["StreamDescriptionSummary"]["StreamARN"]
    consumer = kinesis.register_stream_consumer(StreamARN=arn, ConsumerName="single")["Consumer"]
    sub = dict(ConsumerARN=consumer["ConsumerARN"], ShardId="shardId-000000000000", StartingPosition={"Type": "LATEST"})
    first = kinesis.subscribe_to_shard(**sub)["EventStream"]
    with pytest.raises(botocore.exceptions.ClientError) as e:
        kinesis.subscribe_to_shard(**sub)
    assert error_code(e) == "ResourceInUseException"
    deadline = time.monotonic() + 30
    while True:
        try:
            second_started = time.monotonic()
            second = kinesis.subscribe_to_shard(**sub)["EventStream"]
            break
        except botocore.exceptions.ClientError as err:
            assert err.response["Error"]["Code"] == "ResourceInUseException", err
            assert time.monotonic() < deadline, "no takeover 5 s after the first subscription"
            time.sleep(0.2)
    with pytest.raises(botocore.exceptions.ClientError) as e:
        for _ in first:
            pass
    assert error_code(e) == "ResourceInUseException"
    second.close()
    # The server notices the closed connection and frees the slot: a new
    # subscription is taken well before the 5 s after which it could take
    # over a live one.
    while True:
        try:
            third = kinesis.subscribe_to_shard(**sub)["EventStream"]
            break
        except botocore.exceptions.ClientError as err:
            assert err.response["Error"]["Code"] == "ResourceInUseException", err
            assert time.monotonic() < second_started + 4, "a closed subscription kept its slot"
            time.sleep(0.05)
    third.close()
    kinesis.deregister_stream_consumer(ConsumerARN=consumer["ConsumerARN"])
    kinesis.delete_stream(StreamName=stream_name, EnforceConsumerDeletion=True)


@pytest.mark.parametrize("protocol", ["aws-json", "grpc"])
def test_bench_smoke(binary, cluster, stream_name, protocol):
    """`kinesin bench produce` keeps working against a signed cluster."""
    if protocol == "aws-json":
        endpoints = ",".join(f"127.0.0.1:{n.api_port}" for n in cluster)
    else:
        endpoints = ",".join(f"127.0.0.1:{n.grpc_port}" for n in cluster)
    out = subprocess.run(
        [binary, "bench", "produce", "--protocol", protocol, "--endpoints", endpoints,
         "--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY, "--stream", stream_name,
         "--shards", "2", "--batch", "50", "--concurrency", "4", "--duration-secs", "4", "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["records"] > 0 and result["errors"] == 0, result
    assert result["batch_latency_ms"]["p50"] > 0


def test_bench_e2e_and_consume_smoke(binary, cluster, stream_name):
    """`kinesin bench e2e` sees every record it put with every consumer, and
    `kinesin bench consume` reads them back."""
    endpoints = ",".join(f"127.0.0.1:{n.api_port}" for n in cluster)
    creds = ["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY, "--stream", stream_name]
    out = subprocess.run(
        [binary, "bench", "e2e", "--endpoints", endpoints, *creds, "--shards", "1", "--consumers", "2",
         "--rate", "100", "--duration-secs", "2", "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    e2e = json.loads(out.stdout)
    assert e2e["put"] > 0 and e2e["put_failed"] == 0, e2e
    assert e2e["seen_per_consumer"] == [e2e["put"]] * 2, e2e
    assert 0 < e2e["latency_ms"]["p50"] <= e2e["latency_ms"]["max"] < 10_000
    out = subprocess.run(
        [binary, "bench", "consume", "--endpoints", endpoints, *creds, "--consumers", "2", "--duration-secs", "30",
         "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    consumed = json.loads(out.stdout)
    assert [c["records"] for c in consumed["consumers"]] == [e2e["put"]] * 2, consumed


@pytest.mark.own_cluster
def test_tls_with_http2_by_alpn(binary, workdir, stream_name, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    extra = f'replication_factor = 1\ntls_cert_file = "{cert}"\ntls_key_file = "{key}"\napi_header_timeout_ms = 2000\napi_idle_timeout_ms = 2000'
    nodes = start_cluster(binary, os.path.join(workdir, "tls"), 1, extra=extra)
    try:
        endpoint = f"https://127.0.0.1:{nodes[0].api_port}"
        client = boto3.client(
            "kinesis", endpoint_url=endpoint, region_name=REGION, verify=str(cert),
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
        )
        create_and_wait(client, stream_name)
        client.put_record(StreamName=stream_name, PartitionKey="k", Data=b"over tls")
        records = read_shard(client, stream_name, "shardId-000000000000")
        assert [r["Data"] for r in records] == [b"over tls"]
        # HTTP/2 is negotiated by ALPN (the Java SDK needs it for SubscribeToShard).
        def curl(*args):
            out = subprocess.run(
                ["curl", "-s", "--cacert", str(cert), "--http2", "-w", "\n%{http_version} %{http_code}",
                 "-X", "POST", "-H", "X-Amz-Target: Kinesis_20131202.ListStreams",
                 "-H", "Content-Type: application/x-amz-json-1.1", "-d", "{}", *args, endpoint + "/"],
                capture_output=True, text=True, timeout=30,
            )
            assert out.returncode == 0, out
            body, _, status = out.stdout.rpartition("\n")
            return json.loads(body), status
        signed, status = curl("--aws-sigv4", f"aws:amz:{REGION}:kinesis", "--user", f"{ACCESS_KEY}:{SECRET_KEY}")
        assert status == "2 200" and stream_name in signed["StreamNames"], (signed, status)
        # An unsigned request is refused before its body is read; over HTTP/2
        # the client still gets the error, not a reset stream.
        for _ in range(20):
            refused, status = curl()
            assert status.startswith("2 4") and refused["__type"] == "MissingAuthenticationTokenException", refused
        # Plain HTTP is not served on a TLS port.
        with pytest.raises(Exception):
            client_for(f"http://127.0.0.1:{nodes[0].api_port}").list_streams()
        # A client that completes the handshake and then sends nothing, or
        # stops inside the HTTP/2 preface, is closed after the header
        # timeout (2 s here) instead of holding a connection for good.
        context = ssl.create_default_context(cafile=str(cert))
        for opening in (b"", b"PRI * HTTP/2.0", b"PRI * HTTP/2.0\r\n"):
            with socket.create_connection(("127.0.0.1", nodes[0].api_port), timeout=20) as raw:
                with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                    tls.sendall(opening)
                    started = time.monotonic()
                    try:
                        ended = tls.recv(1)
                    except (ConnectionError, ssl.SSLError):
                        ended = b""
                    assert ended == b"" and time.monotonic() - started < 10, (opening, time.monotonic() - started)
        # An HTTP/2 connection that makes no request gets a GOAWAY and is
        # closed after the idle timeout (2 s here); before, it stayed open
        # for as long as its client answered the server's pings, as this
        # one does (the graceful shutdown's own PING too: the server closes
        # once it is answered).
        h2 = ssl.create_default_context(cafile=str(cert))
        h2.set_alpn_protocols(["h2"])
        with socket.create_connection(("127.0.0.1", nodes[0].api_port), timeout=20) as raw:
            with h2.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                assert tls.selected_alpn_protocol() == "h2"
                frame = lambda kind, flags, payload=b"": (
                    len(payload).to_bytes(3, "big") + bytes([kind, flags]) + bytes(4) + payload)
                tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(0x4, 0))
                started, pending, frame_types = time.monotonic(), b"", []
                while chunk := tls.recv(65536):
                    pending += chunk
                    while len(pending) >= 9 and len(pending) >= 9 + int.from_bytes(pending[:3], "big"):
                        size, kind, flags = int.from_bytes(pending[:3], "big"), pending[3], pending[4]
                        payload, pending = pending[9:9 + size], pending[9 + size:]
                        frame_types.append(kind)
                        if kind == 0x4 and not flags & 1:
                            tls.sendall(frame(0x4, 1))
                        elif kind == 0x6 and not flags & 1:
                            tls.sendall(frame(0x6, 1, payload))
                elapsed = time.monotonic() - started
                assert 0x7 in frame_types and elapsed < 10, (frame_types, elapsed)
    finally:
        for n in nodes:
            n.stop()


def scrape(node):
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{node.admin_port}/metrics", timeout=10) as r:
        return r.read().decode()


def sample(text, name, **labels):
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def test_metrics_move_under_load(cluster, stream_name):
    node = cluster[0]
    client = client_for(node.endpoint)
    create_and_wait(client, stream_name)
    before = scrape(node)
    for _ in range(5):
        client.put_records(StreamName=stream_name, Records=[{"PartitionKey": "k", "Data": b"x"}] * 20)
    with pytest.raises(botocore.exceptions.ClientError):
        client.describe_stream(StreamName="no-such-stream-for-metrics")
    after = scrape(node)
    assert 'kinesin_build_info{version="' in after
    # Real histograms with buckets, labelled by service, operation and outcome.
    bucket = "kinesin_api_request_duration_seconds_count"
    assert sample(after, bucket, service="kinesis", op="PutRecords", outcome="ok") - sample(before, bucket, service="kinesis", op="PutRecords", outcome="ok") == 5
    assert 'kinesin_api_request_duration_seconds_bucket{service="kinesis",op="PutRecords",outcome="ok",le="' in after
    errors = "kinesin_api_errors_total"
    assert sample(after, errors, op="DescribeStream", code="ResourceNotFoundException") >= 1
    incoming = "kinesin_stream_incoming_records_total"
    # Counted on the node that routed the put (this one).
    assert sample(after, incoming, stream=stream_name) - sample(before, incoming, stream=stream_name) == 100
    assert "kinesin_raft_groups" in after and "kinesin_storage_fsync_duration_seconds_bucket" in after
