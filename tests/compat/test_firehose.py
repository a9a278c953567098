"""Firehose with boto3: delivery streams on the 3-node cluster, delivering
to a real S3 protocol server (moto's, started by the `s3_endpoint`
fixture); objects are read back with boto3's S3 client and decompressed."""

import base64
import datetime
import gzip
import io
import json
import os
import re
import signal
import struct
import time
import urllib.request
import uuid
import zipfile

import boto3
import cramjam
import pyarrow.parquet
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from conftest import ACCESS_KEY, ACCOUNT, REGION, SECRET_KEY, s3_client, sole_group_leader, start_cluster, wait_until

ROLE = f"arn:aws:iam::{ACCOUNT}:role/firehose"


def firehose_for(endpoint, validate=True):
    return boto3.client(
        "firehose",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=Config(parameter_validation=validate, retries={"mode": "standard", "total_max_attempts": 6}),
    )


@pytest.fixture(scope="module")
def firehoses(cluster):
    return [firehose_for(n.endpoint) for n in cluster]


@pytest.fixture
def bucket(s3_endpoint):
    name = f"fh-{uuid.uuid4().hex[:12]}"
    s3_client(s3_endpoint).create_bucket(Bucket=name)
    return name


def destination(bucket, size_mib=1, interval_s=0, **extra):
    return {
        "RoleARN": ROLE,
        "BucketARN": f"arn:aws:s3:::{bucket}",
        "BufferingHints": {"SizeInMBs": size_mib, "IntervalInSeconds": interval_s},
        **extra,
    }


def objects(s3, bucket, count, timeout=60):
    """Waits until the bucket holds `count` objects; returns {key: bytes}."""
    found = {}

    def enough():
        listed = s3.list_objects_v2(Bucket=bucket).get("Contents", [])
        for o in listed:
            if o["Key"] not in found:
                found[o["Key"]] = s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
        assert len(found) >= count, f"{len(found)} of {count} objects"
        return True

    wait_until(f"{count} objects in {bucket}", enough, timeout=timeout)
    return found


def objects_written(node, name):
    """The node's count of objects written for the caller's delivery stream."""
    with urllib.request.urlopen(f"http://127.0.0.1:{node.admin_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    series = f'kinesin_firehose_objects_written_total{{delivery_stream="{ACCOUNT}/{name}"}} '
    return sum(int(float(line[len(series):])) for line in text.splitlines() if line.startswith(series))


def hadoop_snappy(data):
    out, at = b"", 0
    while at < len(data):
        raw, size = struct.unpack(">II", data[at : at + 8])
        block = bytes(cramjam.snappy.decompress_raw(data[at + 8 : at + 8 + size]))
        assert len(block) == raw
        out += block
        at += 8 + size
    return out


def unzip(data):
    """The one entry of a ZIP object."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        [entry] = z.namelist()
        return z.read(entry)


def test_delivery_stream_lifecycle_and_errors(firehoses, bucket):
    a, b, c = firehoses
    name = f"lifecycle-{uuid.uuid4().hex[:8]}"
    config = {
        "DeliveryStreamName": name,
        "S3DestinationConfiguration": destination(bucket, size_mib=2, interval_s=60, CompressionFormat="GZIP"),
        "Tags": [{"Key": "team", "Value": "data"}],
    }
    arn = a.create_delivery_stream(**config)["DeliveryStreamARN"]
    assert arn == f"arn:aws:firehose:{REGION}:{ACCOUNT}:deliverystream/{name}"
    # The same create again (an SDK retry whose first answer was lost)
    # succeeds; another configuration under the name is refused below.
    assert b.create_delivery_stream(**config)["DeliveryStreamARN"] == arn
    d = b.describe_delivery_stream(DeliveryStreamName=name)["DeliveryStreamDescription"]
    assert (d["DeliveryStreamStatus"], d["DeliveryStreamType"], d["VersionId"]) == ("ACTIVE", "DirectPut", "1")
    s3 = d["Destinations"][0]["S3DestinationDescription"]
    assert s3["BufferingHints"] == {"SizeInMBs": 2, "IntervalInSeconds": 60}
    assert (s3["CompressionFormat"], s3["BucketARN"]) == ("GZIP", f"arn:aws:s3:::{bucket}")
    assert name in c.list_delivery_streams(Limit=10000)["DeliveryStreamNames"]

    def error(call, **kwargs):
        with pytest.raises(ClientError) as e:
            call(**kwargs)
        return e.value.response["Error"]["Code"], e.value.response["ResponseMetadata"]["HTTPStatusCode"]

    assert error(a.create_delivery_stream, DeliveryStreamName=name,
                 S3DestinationConfiguration=destination(bucket)) == ("ResourceInUseException", 400)
    assert error(b.describe_delivery_stream, DeliveryStreamName="nope")[0] == "ResourceNotFoundException"
    assert error(c.put_record, DeliveryStreamName="nope", Record={"Data": b"x"})[0] == "ResourceNotFoundException"
    for bad in [
        {"ExtendedS3DestinationConfiguration": destination(bucket, size_mib=64, **parquet_conversion(table="nope"))},
        {"ExtendedS3DestinationConfiguration": destination(bucket, S3BackupMode="Enabled")},
        {"S3DestinationConfiguration": destination(
            bucket, EncryptionConfiguration={"KMSEncryptionConfig": {"AWSKMSKeyARN": "arn:aws:kms:us-east-1:1:key/k"}})},
        {"S3DestinationConfiguration": destination(bucket, Prefix="!{timestamp:yyyy}/")},
        {"S3DestinationConfiguration": destination(bucket, Prefix="!{nope:x}/", ErrorOutputPrefix="e/")},
        {"ExtendedS3DestinationConfiguration": destination(
            bucket, DynamicPartitioningConfiguration={"Enabled": True})},
        {"HttpEndpointDestinationConfiguration": {
            "EndpointConfiguration": {"Url": "https://x"}, "S3Configuration": destination(bucket)}},
    ]:
        assert error(a.create_delivery_stream, DeliveryStreamName="bad-" + name, **bad) == (
            "InvalidArgumentException", 400), bad
    raw = firehose_for(a.meta.endpoint_url, validate=False)
    assert error(raw.create_delivery_stream, DeliveryStreamName="bad-" + name,
                 S3DestinationConfiguration=destination(bucket, size_mib=0))[0] == "ValidationException"
    assert error(raw.put_record_batch, DeliveryStreamName=name, Records=[])[0] == "ValidationException"
    assert error(raw.put_record, DeliveryStreamName=name, Record={"Data": b"x" * 1_024_001})[0] == (
        "ValidationException")

    # UpdateDestination checks the version and keeps what it does not name.
    assert error(a.update_destination, DeliveryStreamName=name, CurrentDeliveryStreamVersionId="7",
                 DestinationId=d["Destinations"][0]["DestinationId"],
                 S3DestinationUpdate={"Prefix": "p/"})[0] == "ConcurrentModificationException"
    a.update_destination(DeliveryStreamName=name, CurrentDeliveryStreamVersionId="1",
                         DestinationId=d["Destinations"][0]["DestinationId"],
                         S3DestinationUpdate={"Prefix": "p/"})
    d = c.describe_delivery_stream(DeliveryStreamName=name)["DeliveryStreamDescription"]
    s3 = d["Destinations"][0]["S3DestinationDescription"]
    assert (d["VersionId"], s3["Prefix"], s3["CompressionFormat"]) == ("2", "p/", "GZIP")

    b.tag_delivery_stream(DeliveryStreamName=name, Tags=[{"Key": "env", "Value": "test"}])
    b.untag_delivery_stream(DeliveryStreamName=name, TagKeys=["team"])
    tags = c.list_tags_for_delivery_stream(DeliveryStreamName=name)
    assert (tags["Tags"], tags["HasMoreTags"]) == ([{"Key": "env", "Value": "test"}], False)
    a.start_delivery_stream_encryption(DeliveryStreamName=name)
    d = b.describe_delivery_stream(DeliveryStreamName=name)["DeliveryStreamDescription"]
    assert d["DeliveryStreamEncryptionConfiguration"]["Status"] == "ENABLED"
    a.stop_delivery_stream_encryption(DeliveryStreamName=name)

    c.delete_delivery_stream(DeliveryStreamName=name)
    # The node that deleted it has applied the deletion when it answers;
    # another node answers from its own metadata replica, which may lag.
    assert name not in c.list_delivery_streams(Limit=10000)["DeliveryStreamNames"]
    assert error(c.describe_delivery_stream, DeliveryStreamName=name)[0] == "ResourceNotFoundException"

    def gone_from_a_and_b():
        if name in a.list_delivery_streams(Limit=10000)["DeliveryStreamNames"]:
            return False
        try:
            b.describe_delivery_stream(DeliveryStreamName=name)
        except b.exceptions.ResourceNotFoundException:
            return True
        return False

    wait_until("the other nodes to see the deletion", gone_from_a_and_b, timeout=10)


@pytest.mark.parametrize(
    "compression,extension",
    [("UNCOMPRESSED", ""), ("GZIP", ".gz"), ("ZIP", ".zip"), ("Snappy", ".snappy"), ("HADOOP_SNAPPY", ".hsnappy")],
)
def test_records_become_objects_in_every_compression(firehoses, bucket, s3_endpoint, compression, extension):
    name = f"deliver-{compression.lower()}-{uuid.uuid4().hex[:6]}"
    firehoses[0].create_delivery_stream(
        DeliveryStreamName=name,
        ExtendedS3DestinationConfiguration=destination(
            bucket, interval_s=1, CompressionFormat=compression,
            ProcessingConfiguration={"Enabled": True, "Processors": [{"Type": "AppendDelimiterToRecord"}]},
        ),
    )
    sent = []
    for k in range(3):
        batch = [f'{{"n": {k * 100 + i}}}'.encode() for i in range(100)]
        out = firehoses[k % 3].put_record_batch(DeliveryStreamName=name, Records=[{"Data": d} for d in batch])
        assert out["FailedPutCount"] == 0 and len(out["RequestResponses"]) == 100
        sent += batch
    record_id = firehoses[1].put_record(DeliveryStreamName=name, Record={"Data": b'{"n": 300}'})["RecordId"]
    assert record_id
    sent.append(b'{"n": 300}')

    s3 = s3_client(s3_endpoint)
    key_pattern = re.compile(
        r"^\d{4}/\d{2}/\d{2}/\d{2}/" + re.escape(name)
        + r"-1-\d{4}-\d{2}-\d{2}-\d{2}-\d{2}-\d{2}-[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}" + re.escape(extension) + "$"
    )
    decode = {
        "UNCOMPRESSED": lambda b: b,
        "GZIP": gzip.decompress,
        "ZIP": unzip,
        "Snappy": lambda b: bytes(cramjam.snappy.decompress(b)),
        "HADOOP_SNAPPY": hadoop_snappy,
    }[compression]
    delivered = []

    def all_delivered():
        found = objects(s3, bucket, 1)
        delivered.clear()
        for key in sorted(found):
            assert key_pattern.match(key), key
            delivered.extend(decode(found[key]).splitlines())
        assert len(delivered) >= len(sent), f"{len(delivered)} of {len(sent)} records"
        return True

    wait_until("every record delivered", all_delivered, timeout=60)
    # Each record exactly once, in the order it was put.
    assert delivered == sent
    firehoses[2].delete_delivery_stream(DeliveryStreamName=name)


def test_a_full_buffer_is_delivered_before_its_interval_and_prefixes_are_evaluated(firehoses, bucket, s3_endpoint):
    name = f"size-{uuid.uuid4().hex[:8]}"
    firehoses[1].create_delivery_stream(
        DeliveryStreamName=name,
        ExtendedS3DestinationConfiguration=destination(
            bucket, size_mib=1, interval_s=900,
            Prefix="year=!{timestamp:yyyy}/id=!{firehose:random-string}/",
            ErrorOutputPrefix="errors/!{firehose:error-output-type}/",
        ),
    )
    record = os.urandom(100_000)
    for k in range(25):
        firehoses[k % 3].put_record(DeliveryStreamName=name, Record={"Data": record})
    # 2.5 MB in 1 MiB buffers: two objects well before the 900 s interval;
    # the remaining half buffer waits.
    found = objects(s3_client(s3_endpoint), bucket, 2, timeout=60)
    year = time.strftime("%Y", time.gmtime())
    for key, body in found.items():
        assert key.startswith(f"year={year}/id="), key
        assert re.match(r"^year=\d{4}/id=[0-9a-f]{11}/" + re.escape(name) + "-1-", key), key
        assert len(body) % len(record) == 0 and len(body) <= 1 << 20
    assert sum(len(b) for b in found.values()) == 20 * len(record)
    firehoses[0].delete_delivery_stream(DeliveryStreamName=name)


def parquet_conversion(table="events", **parquet):
    return {"DataFormatConversionConfiguration": {
        "SchemaConfiguration": {"RoleARN": ROLE, "DatabaseName": "analytics", "TableName": table},
        "InputFormatConfiguration": {"Deserializer": {"OpenXJsonSerDe": {"ColumnToJsonKeyMappings": {"name": "user name"}}}},
        "OutputFormatConfiguration": {"Serializer": {"ParquetSerDe": parquet}},
    }}


def test_json_records_become_parquet_and_the_rest_go_to_the_error_prefix(firehoses, bucket, s3_endpoint):
    name = f"parquet-{uuid.uuid4().hex[:8]}"
    prefixes = {"Prefix": "events/", "ErrorOutputPrefix": "errors/!{firehose:error-output-type}/"}
    for bad, why in [
        (destination(bucket, size_mib=64, CompressionFormat="GZIP", **parquet_conversion()), "compressed"),
        (destination(bucket, size_mib=5, **parquet_conversion()), "buffer below 64 MiB"),
        (destination(bucket, size_mib=64, **parquet_conversion(table="nope")), "no such table"),
        (destination(bucket, size_mib=64, **{"DataFormatConversionConfiguration": {
            **parquet_conversion()["DataFormatConversionConfiguration"],
            "OutputFormatConfiguration": {"Serializer": {"OrcSerDe": {}}}}}), "ORC"),
    ]:
        with pytest.raises(ClientError) as e:
            firehoses[0].create_delivery_stream(DeliveryStreamName=name, ExtendedS3DestinationConfiguration=bad)
        assert e.value.response["Error"]["Code"] == "InvalidArgumentException", why
    firehoses[0].create_delivery_stream(
        DeliveryStreamName=name,
        ExtendedS3DestinationConfiguration=destination(
            bucket, size_mib=64, interval_s=1, **prefixes, **parquet_conversion(Compression="GZIP")),
    )
    d = firehoses[1].describe_delivery_stream(DeliveryStreamName=name)["DeliveryStreamDescription"]
    conversion = d["Destinations"][0]["ExtendedS3DestinationDescription"]["DataFormatConversionConfiguration"]
    assert conversion["Enabled"] is True
    assert conversion["OutputFormatConfiguration"]["Serializer"]["ParquetSerDe"]["Compression"] == "GZIP"
    assert conversion["SchemaConfiguration"]["TableName"] == "events"
    # Turned off and on by an update naming only Enabled, its details stay.
    for version, enabled in (("1", False), ("2", True)):
        firehoses[1].update_destination(
            DeliveryStreamName=name, CurrentDeliveryStreamVersionId=version, DestinationId="destinationId-000000000001",
            ExtendedS3DestinationUpdate={"DataFormatConversionConfiguration": {"Enabled": enabled}})
        d = firehoses[2].describe_delivery_stream(DeliveryStreamName=name)["DeliveryStreamDescription"]
        described = d["Destinations"][0]["ExtendedS3DestinationDescription"]["DataFormatConversionConfiguration"]
        assert described == {**conversion, "Enabled": enabled}

    records = [
        b'{"ID": 1, "user name": "ann", "at": "2026-12-01T13:04:05.678Z", "tags": ["a", "b"], "geo": {"lat": 1.5, "lon": 2.5}}',
        b'{"id": 2, "name": "bob", "extra": 1}{"id": 3}',
        b"not json",
        b'{"id": "three", "name": "carl"}',
    ]
    firehoses[2].put_record_batch(DeliveryStreamName=name, Records=[{"Data": r} for r in records])
    found = objects(s3_client(s3_endpoint), bucket, 2)
    [parquet_key] = [k for k in found if k.startswith("events/")]
    [error_key] = [k for k in found if k.startswith("errors/")]
    assert re.match(r"^events/\d{4}/\d{2}/\d{2}/\d{2}/" + re.escape(name) + r"-3-.*\.parquet$", parquet_key), parquet_key
    assert error_key.startswith("errors/format-conversion-failed/" + name + "-3-"), error_key

    table = pyarrow.parquet.read_table(io.BytesIO(found[parquet_key]))
    assert table.column_names == ["id", "name", "at", "tags", "geo"]
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == [1, 2, 3]
    assert rows[0]["name"] == "ann" and rows[1]["name"] == "bob" and rows[2]["name"] is None
    assert rows[0]["at"] == datetime.datetime(2026, 12, 1, 13, 4, 5, 678000)
    assert rows[0]["tags"] == ["a", "b"] and rows[0]["geo"] == {"lat": 1.5, "lon": 2.5}
    failures = [json.loads(line) for line in found[error_key].splitlines()]
    assert [base64.b64decode(f["rawData"]) for f in failures] == records[2:]
    assert {f["errorCode"] for f in failures} == {"DataFormatConversion.MalformedData"}
    firehoses[0].delete_delivery_stream(DeliveryStreamName=name)


def partitioning(query, *processors):
    return {
        "DynamicPartitioningConfiguration": {"Enabled": True},
        "ProcessingConfiguration": {"Enabled": True, "Processors": [
            {"Type": "MetadataExtraction", "Parameters": [
                {"ParameterName": "MetadataExtractionQuery", "ParameterValue": query},
                {"ParameterName": "JsonParsingEngine", "ParameterValue": "JQ-1.6"},
            ]},
            *processors,
        ]},
    }


def test_dynamic_partitioning_writes_an_object_per_key_and_failures_to_the_error_prefix(firehoses, bucket, s3_endpoint):
    name = f"partitioned-{uuid.uuid4().hex[:8]}"
    keyed = {"Prefix": "customer=!{partitionKeyFromQuery:customer}/", "ErrorOutputPrefix": "errors/!{firehose:error-output-type}/"}
    for size, bad in [
        (64, {**keyed, **partitioning("{customer: .customer")}),  # does not parse
        (64, {"Prefix": "static/", "ErrorOutputPrefix": "e/", **partitioning("{customer: .customer}")}),
        (64, {**keyed, "DynamicPartitioningConfiguration": {"Enabled": True}}),
        (63, {**keyed, **partitioning("{customer: .customer}")}),  # AWS's least buffer: 64 MiB
    ]:
        with pytest.raises(ClientError) as e:
            firehoses[0].create_delivery_stream(
                DeliveryStreamName=name, ExtendedS3DestinationConfiguration=destination(bucket, size_mib=size, **bad))
        assert e.value.response["Error"]["Code"] == "InvalidArgumentException", bad
    firehoses[0].create_delivery_stream(
        DeliveryStreamName=name,
        ExtendedS3DestinationConfiguration=destination(
            bucket, size_mib=64, interval_s=1, **keyed,
            **partitioning("{customer: .customer}", {"Type": "AppendDelimiterToRecord"}),
        ),
    )
    d = firehoses[1].describe_delivery_stream(DeliveryStreamName=name)["DeliveryStreamDescription"]
    assert d["Destinations"][0]["ExtendedS3DestinationDescription"]["DynamicPartitioningConfiguration"] == {"Enabled": True}
    records = [json.dumps({"customer": c, "n": i}).encode() for i, c in enumerate("abacbca")]
    records.append(b"not json")
    firehoses[2].put_record_batch(DeliveryStreamName=name, Records=[{"Data": r} for r in records])
    found = objects(s3_client(s3_endpoint), bucket, 4)
    by_prefix = {}
    for key, body in found.items():
        by_prefix.setdefault(key.rsplit("/", 1)[0], []).extend(body.splitlines())
    assert sorted(by_prefix) == ["customer=a", "customer=b", "customer=c", "errors/processing-failed"]
    for customer in "abc":
        lines = [json.loads(line) for line in by_prefix[f"customer={customer}"]]
        assert [r["n"] for r in lines] == [i for i, c in enumerate("abacbca") if c == customer]
    [failure] = [json.loads(line) for line in by_prefix["errors/processing-failed"]]
    assert base64.b64decode(failure["rawData"]) == b"not json"
    firehoses[0].delete_delivery_stream(DeliveryStreamName=name)


@pytest.mark.own_cluster
def test_a_leader_kill_delivers_every_record_exactly_once(binary, workdir, s3_endpoint):
    nodes = start_cluster(
        binary, os.path.join(workdir, "firehose-failover"), 3, extra=f's3_endpoint = "{s3_endpoint}"'
    )
    try:
        s3 = s3_client(s3_endpoint)
        bucket = f"fh-failover-{uuid.uuid4().hex[:8]}"
        s3.create_bucket(Bucket=bucket)
        clients = [firehose_for(n.endpoint) for n in nodes]
        clients[0].create_delivery_stream(
            DeliveryStreamName="failover",
            S3DestinationConfiguration=destination(bucket, interval_s=1),
        )
        wait_until("the delivery stream's leader", lambda: sole_group_leader(nodes) is not None)
        leader = sole_group_leader(nodes)
        survivors = [c for n, c in zip(nodes, clients) if n is not leader]
        sent = []
        for k in range(20):
            batch = [f"r{k * 50 + i};".encode() for i in range(50)]
            clients[k % 3].put_record_batch(DeliveryStreamName="failover", Records=[{"Data": d} for d in batch])
            sent += batch
            if k == 10:
                # Killed while batches are being sealed and uploaded.
                leader.proc.send_signal(signal.SIGKILL)
                leader.proc.wait()
                clients = [survivors[0], survivors[1], survivors[0]]
        delivered = []

        def all_delivered():
            found = objects(s3, bucket, 1)
            delivered.clear()
            for body in found.values():
                delivered.extend(x + b";" for x in body.split(b";") if x)
            assert len(delivered) >= len(sent), f"{len(delivered)} of {len(sent)} records"
            return True

        wait_until("every record delivered", all_delivered, timeout=90)
        assert sorted(delivered) == sorted(sent), "a record was lost or delivered twice"
    finally:
        for n in nodes:
            n.stop()


def test_a_kinesis_stream_source_is_delivered_across_a_split_parents_first(cluster, firehoses, bucket, s3_endpoint):
    kinesis = boto3.client(
        "kinesis", endpoint_url=cluster[0].endpoint, region_name=REGION,
        aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
    )
    source = f"fh-source-{uuid.uuid4().hex[:8]}"
    kinesis.create_stream(StreamName=source, ShardCount=1)
    kinesis.get_waiter("stream_exists").wait(StreamName=source, WaiterConfig={"Delay": 0.2, "MaxAttempts": 100})
    arn = kinesis.describe_stream_summary(StreamName=source)["StreamDescriptionSummary"]["StreamARN"]
    # Records from before the delivery stream are not delivered (AWS starts at LATEST).
    kinesis.put_records(StreamName=source, Records=[{"PartitionKey": "k", "Data": b"early"}] * 5)
    time.sleep(0.01)
    name = f"from-kinesis-{uuid.uuid4().hex[:6]}"
    firehoses[1].create_delivery_stream(
        DeliveryStreamName=name,
        DeliveryStreamType="KinesisStreamAsSource",
        KinesisStreamSourceConfiguration={"KinesisStreamARN": arn, "RoleARN": ROLE},
        ExtendedS3DestinationConfiguration=destination(
            bucket, interval_s=1,
            ProcessingConfiguration={"Enabled": True, "Processors": [{"Type": "AppendDelimiterToRecord"}]},
        ),
    )
    d = firehoses[2].describe_delivery_stream(DeliveryStreamName=name)["DeliveryStreamDescription"]
    assert d["DeliveryStreamType"] == "KinesisStreamAsSource"
    assert d["Source"]["KinesisStreamSourceDescription"]["KinesisStreamARN"] == arn
    assert name in firehoses[0].list_delivery_streams(DeliveryStreamType="KinesisStreamAsSource")["DeliveryStreamNames"]
    assert name not in firehoses[0].list_delivery_streams(DeliveryStreamType="DirectPut")["DeliveryStreamNames"]
    with pytest.raises(ClientError) as e:
        firehoses[0].put_record(DeliveryStreamName=name, Record={"Data": b"x"})
    assert e.value.response["Error"]["Code"] == "InvalidArgumentException"

    parents = [f"p{i}".encode() for i in range(60)]
    for i in range(0, 60, 20):
        kinesis.put_records(StreamName=source, Records=[{"PartitionKey": str(j), "Data": r} for j, r in enumerate(parents[i:i + 20])])
    shard = kinesis.list_shards(StreamName=source)["Shards"][0]
    kinesis.split_shard(StreamName=source, ShardToSplit=shard["ShardId"], NewStartingHashKey=str(2**127))
    wait_until("the split", lambda: kinesis.describe_stream_summary(StreamName=source)["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE")
    children = [f"c{i}".encode() for i in range(60)]
    kinesis.put_records(StreamName=source, Records=[{"PartitionKey": str(j), "Data": r} for j, r in enumerate(children)])

    s3 = s3_client(s3_endpoint)
    found = {}

    def all_delivered():
        found.update(objects(s3, bucket, 1))
        count = sum(len(b.splitlines()) for b in found.values())
        assert count >= 120, f"{count} of 120 records"
        return True

    wait_until("every record delivered", all_delivered, timeout=60)
    delivered = [line for body in found.values() for line in body.splitlines()]
    assert sorted(delivered) == sorted(parents + children), "lost, duplicated or early records"
    # Children are read only once their parent is delivered to its end: no
    # object holds both, and the parent's records keep their order.
    for body in found.values():
        kinds = {line[:1] for line in body.splitlines()}
        assert len(kinds) == 1, body
    parent_lines = [line for key in sorted(found) for line in found[key].splitlines() if line.startswith(b"p")]
    assert parent_lines == parents
    firehoses[0].delete_delivery_stream(DeliveryStreamName=name)
    kinesis.delete_stream(StreamName=source)


@pytest.mark.own_cluster
def test_a_leader_killed_between_upload_and_commit_rewrites_the_same_object(binary, workdir, s3_endpoint):
    # Every delivery waits 5 s between writing a batch's object and
    # committing it: the leader is killed in that window.
    os.environ["KINESIN_CHAOS_COMMIT_DELAY_MS"] = "5000"
    try:
        nodes = start_cluster(
            binary, os.path.join(workdir, "firehose-commit-window"), 3, extra=f's3_endpoint = "{s3_endpoint}"'
        )
    finally:
        del os.environ["KINESIN_CHAOS_COMMIT_DELAY_MS"]
    try:
        s3 = s3_client(s3_endpoint)
        bucket = f"fh-window-{uuid.uuid4().hex[:8]}"
        s3.create_bucket(Bucket=bucket)
        clients = [firehose_for(n.endpoint) for n in nodes]
        clients[0].create_delivery_stream(DeliveryStreamName="window", S3DestinationConfiguration=destination(bucket))
        first = [f"a{i};".encode() for i in range(100)]
        clients[1].put_record_batch(DeliveryStreamName="window", Records=[{"Data": d} for d in first])
        [(key, body)] = objects(s3, bucket, 1).items()
        leader = sole_group_leader(nodes)
        leader.proc.send_signal(signal.SIGKILL)
        leader.proc.wait()
        survivors = [c for n, c in zip(nodes, clients) if n is not leader]
        # The new leader finds the batch sealed, not committed: it writes
        # the same object again, then commits, and only then delivers more.
        second = [f"b{i};".encode() for i in range(100)]
        survivors[0].put_record_batch(DeliveryStreamName="window", Records=[{"Data": d} for d in second])
        found = objects(s3, bucket, 2, timeout=90)
        assert len(found) == 2 and found[key] == body
        # Two objects exist and the survivors wrote two: the first batch's
        # object again, then the second's.
        wait_until("the survivors' object counts", lambda: sum(objects_written(n, "window") for n in nodes if n is not leader) == 2)
        delivered = sorted(x + b";" for b in found.values() for x in b.split(b";") if x)
        assert delivered == sorted(first + second)
    finally:
        for n in nodes:
            n.stop()
