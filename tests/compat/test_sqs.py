"""SQS through boto3 (awsJson1_0) and hand-made awsQuery requests, on the
session's three-node cluster, each scenario spread over different nodes."""

import base64
import hashlib
import json
import os
import signal
import struct
import subprocess
import threading
import time
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from conftest import (ACCESS_KEY, ACCOUNT, OTHER_ACCESS_KEY, OTHER_ACCOUNT, OTHER_SECRET_KEY, REGION, SECRET_KEY,
                      sole_group_leader, sqs_for, start_cluster, wait_until)

XMLNS = "{http://queue.amazonaws.com/doc/2012-11-05/}"


@pytest.fixture(scope="session")
def sqs(cluster):
    """One client per node."""
    return [sqs_for(n.endpoint) for n in cluster]


_count = [0]


@pytest.fixture
def queue_name(request):
    _count[0] += 1
    return f"{request.node.name.replace('_', '-')[:60]}-{_count[0]}"


def path(url):
    """A queue URL names the node that answered; the path is the queue."""
    return url.split("/", 3)[3]


def error_code(excinfo):
    return excinfo.value.response["Error"]["Code"]


def attributes_md5(attributes):
    """MD5OfMessageAttributes as the AWS SDKs compute it to check answers."""
    buf = b""
    for name in sorted(attributes):
        value = attributes[name]
        for part in (name.encode(), value["DataType"].encode()):
            buf += struct.pack("!I", len(part)) + part
        if "StringValue" in value:
            data = value["StringValue"].encode()
            buf += b"\x01" + struct.pack("!I", len(data)) + data
        else:
            data = value["BinaryValue"]
            buf += b"\x02" + struct.pack("!I", len(data)) + data
    return hashlib.md5(buf).hexdigest()


def test_queue_lifecycle_through_every_node(sqs, queue_name):
    a, b, c = sqs
    url = a.create_queue(QueueName=queue_name, Attributes={"VisibilityTimeout": "5"}, tags={"team": "x"})["QueueUrl"]
    assert url.endswith(f"/{ACCOUNT}/{queue_name}")
    # The same attributes again: the same queue. Others: QueueNameExists.
    again = b.create_queue(QueueName=queue_name, Attributes={"VisibilityTimeout": "5"})["QueueUrl"]
    assert again.startswith(b.meta.endpoint_url) and path(again) == path(url)
    with pytest.raises(b.exceptions.QueueNameExists):
        b.create_queue(QueueName=queue_name, Attributes={"VisibilityTimeout": "6"})
    assert path(b.get_queue_url(QueueName=queue_name)["QueueUrl"]) == path(url)
    assert [path(u) for u in c.list_queues(QueueNamePrefix=queue_name)["QueueUrls"]] == [path(url)]
    attrs = c.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert attrs["VisibilityTimeout"] == "5"
    assert attrs["MessageRetentionPeriod"] == "345600"
    assert attrs["QueueArn"] == f"arn:aws:sqs:{REGION}:{ACCOUNT}:{queue_name}"
    assert attrs["ApproximateNumberOfMessages"] == "0"
    a.set_queue_attributes(QueueUrl=url, Attributes={"DelaySeconds": "3", "ReceiveMessageWaitTimeSeconds": "1"})
    got = b.get_queue_attributes(QueueUrl=url, AttributeNames=["DelaySeconds"])["Attributes"]
    assert got == {"DelaySeconds": "3"}
    with pytest.raises(a.exceptions.InvalidAttributeValue):
        a.set_queue_attributes(QueueUrl=url, Attributes={"VisibilityTimeout": "43201"})
    with pytest.raises(a.exceptions.InvalidAttributeName):
        a.set_queue_attributes(QueueUrl=url, Attributes={"NoSuchAttribute": "1"})
    assert c.list_queue_tags(QueueUrl=url)["Tags"] == {"team": "x"}
    a.tag_queue(QueueUrl=url, Tags={"env": "test"})
    b.untag_queue(QueueUrl=url, TagKeys=["team"])
    assert c.list_queue_tags(QueueUrl=url)["Tags"] == {"env": "test"}
    c.delete_queue(QueueUrl=url)
    # The node that deleted it has applied the deletion when it answers.
    with pytest.raises(c.exceptions.QueueDoesNotExist) as e:
        c.get_queue_url(QueueName=queue_name)
    assert error_code(e) == "AWS.SimpleQueueService.NonExistentQueue"
    # Another node refuses once it has applied the deletion, which a busy
    # machine can delay past the next call (AWS: calls made while a queue is
    # being deleted, up to 60 s, may succeed).

    def send_refused():
        try:
            b.send_message(QueueUrl=url, MessageBody="x")
        except b.exceptions.QueueDoesNotExist:
            return True
        return False

    wait_until("node 2 to refuse a send to the deleted queue", send_refused, timeout=10)
    with pytest.raises(Exception) as e:
        a.create_queue(QueueName="bad name!")
    assert error_code(e) == "InvalidParameterValue"


def test_list_queues_pages(sqs, queue_name):
    a = sqs[0]
    urls = [a.create_queue(QueueName=f"{queue_name}-{i}")["QueueUrl"] for i in range(3)]
    first = a.list_queues(QueueNamePrefix=queue_name, MaxResults=2)
    assert first["QueueUrls"] == urls[:2]
    rest = a.list_queues(QueueNamePrefix=queue_name, MaxResults=2, NextToken=first["NextToken"])
    assert rest["QueueUrls"] == urls[2:] and "NextToken" not in rest
    for u in urls:
        a.delete_queue(QueueUrl=u)


def test_messages_are_sent_received_hidden_and_deleted_across_nodes(sqs, queue_name):
    a, b, c = sqs
    url = a.create_queue(QueueName=queue_name, Attributes={"VisibilityTimeout": "1"})["QueueUrl"]
    attributes = {
        "kind": {"DataType": "String", "StringValue": "greeting"},
        "n": {"DataType": "Number", "StringValue": "42"},
        "raw": {"DataType": "Binary", "BinaryValue": b"\x00\x01"},
    }
    sent = a.send_message(QueueUrl=url, MessageBody="héllo", MessageAttributes=attributes)
    assert sent["MD5OfMessageBody"] == hashlib.md5("héllo".encode()).hexdigest()
    assert sent["MD5OfMessageAttributes"] == attributes_md5(attributes)
    got = b.receive_message(QueueUrl=url, AttributeNames=["All"], MessageAttributeNames=["All"])["Messages"]
    assert len(got) == 1
    m = got[0]
    assert (m["MessageId"], m["Body"]) == (sent["MessageId"], "héllo")
    assert m["MessageAttributes"] == attributes
    assert m["MD5OfMessageAttributes"] == attributes_md5(attributes)
    assert m["Attributes"]["ApproximateReceiveCount"] == "1"
    assert m["Attributes"]["SenderId"] == ACCOUNT
    # Hidden while in flight, back once the timeout passed, with a new
    # receipt and a higher count.
    assert "Messages" not in c.receive_message(QueueUrl=url)
    again = c.receive_message(QueueUrl=url, WaitTimeSeconds=5, AttributeNames=["ApproximateReceiveCount"])["Messages"][0]
    assert again["MessageId"] == m["MessageId"]
    assert again["Attributes"]["ApproximateReceiveCount"] == "2"
    assert again["ReceiptHandle"] != m["ReceiptHandle"]
    # Keep it in flight longer, then delete it with the current receipt.
    a.change_message_visibility(QueueUrl=url, ReceiptHandle=again["ReceiptHandle"], VisibilityTimeout=60)
    time.sleep(1.2)
    assert "Messages" not in b.receive_message(QueueUrl=url)
    attrs = b.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert attrs["ApproximateNumberOfMessagesNotVisible"] == "1"
    a.delete_message(QueueUrl=url, ReceiptHandle=again["ReceiptHandle"])
    assert "Messages" not in c.receive_message(QueueUrl=url, WaitTimeSeconds=2)
    with pytest.raises(a.exceptions.ReceiptHandleIsInvalid):
        a.delete_message(QueueUrl=url, ReceiptHandle="not-a-receipt")
    with pytest.raises(Exception) as e:
        a.send_message(QueueUrl=url, MessageBody="x" * (1024 * 1024 + 1))
    assert error_code(e) == "InvalidParameterValue"
    with pytest.raises(a.exceptions.InvalidMessageContents):
        a.send_message(QueueUrl=url, MessageBody="bad \x01 char")
    # The queue's own limit, checked by the queue.
    a.set_queue_attributes(QueueUrl=url, Attributes={"MaximumMessageSize": "1024"})
    with pytest.raises(Exception) as e:
        b.send_message(QueueUrl=url, MessageBody="y" * 1025)
    assert error_code(e) == "InvalidParameterValue"
    out = c.send_message_batch(QueueUrl=url, Entries=[{"Id": "small", "MessageBody": "s"}, {"Id": "big", "MessageBody": "y" * 1025}])
    assert [e["Id"] for e in out["Successful"]] == ["small"]
    assert [(f["Id"], f["Code"]) for f in out["Failed"]] == [("big", "InvalidParameterValue")]
    a.delete_queue(QueueUrl=url)


def test_a_long_poll_returns_as_soon_as_a_message_is_sent(sqs, queue_name):
    a, b, _ = sqs
    url = a.create_queue(QueueName=queue_name)["QueueUrl"]
    result = {}

    def poll():
        started = time.monotonic()
        result["messages"] = b.receive_message(QueueUrl=url, WaitTimeSeconds=15).get("Messages", [])
        result["took"] = time.monotonic() - started

    t = threading.Thread(target=poll)
    t.start()
    time.sleep(1.0)
    a.send_message(QueueUrl=url, MessageBody="wake")
    t.join(timeout=20)
    assert [m["Body"] for m in result["messages"]] == ["wake"]
    assert result["took"] < 6, result
    # An empty queue holds a long poll for its whole wait.
    started = time.monotonic()
    assert "Messages" not in b.receive_message(QueueUrl=url, WaitTimeSeconds=2)
    assert time.monotonic() - started >= 1.9
    # Without WaitTimeSeconds the queue's ReceiveMessageWaitTimeSeconds
    # applies; WaitTimeSeconds=0 overrides it.
    a.set_queue_attributes(QueueUrl=url, Attributes={"ReceiveMessageWaitTimeSeconds": "2"})
    started = time.monotonic()
    assert "Messages" not in b.receive_message(QueueUrl=url)
    assert time.monotonic() - started >= 1.9
    started = time.monotonic()
    assert "Messages" not in b.receive_message(QueueUrl=url, WaitTimeSeconds=0)
    assert time.monotonic() - started < 1.5
    a.send_message(QueueUrl=url, MessageBody="now")
    assert [m["Body"] for m in b.receive_message(QueueUrl=url)["Messages"]] == ["now"]
    a.delete_queue(QueueUrl=url)


def receipt_partition(handle):
    """The group a receipt handle names (bytes 1 to 9 of its base64)."""
    raw = base64.urlsafe_b64decode(handle + "=" * (-len(handle) % 4))
    return struct.unpack("!Q", raw[1:9])[0]


def test_a_partitioned_queue_spreads_sends_and_receives_from_every_partition(sqs, queue_name):
    a, b, c = sqs
    with pytest.raises(Exception) as e:
        a.create_queue(QueueName=f"{queue_name}.fifo", Attributes={"FifoQueue": "true"},
                       tags={"kinesin:partitions": "2"})
    assert error_code(e) == "InvalidParameterValue"
    with pytest.raises(Exception) as e:
        a.create_queue(QueueName=queue_name, tags={"kinesin:partitions": "17"})
    assert error_code(e) == "InvalidParameterValue"
    url = a.create_queue(QueueName=queue_name, tags={"kinesin:partitions": "3"})["QueueUrl"]
    assert a.list_queues(QueueNamePrefix=queue_name)["QueueUrls"] == [url]
    # Every partition takes a new visibility timeout: each one's messages
    # come back after 2 s, not the default 30.
    a.set_queue_attributes(QueueUrl=url, Attributes={"VisibilityTimeout": "2"})
    for i in range(30):
        b.send_message(QueueUrl=url, MessageBody=f"m{i}")
    counts = c.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert counts["ApproximateNumberOfMessages"] == "30"

    def receive_all():
        got, deadline = {}, time.monotonic() + 30
        while len(got) < 30 and time.monotonic() < deadline:
            for m in c.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", []):
                got[m["Body"]] = m
        assert sorted(got) == sorted(f"m{i}" for i in range(30))
        return list(got.values())

    got = receive_all()
    assert len({receipt_partition(m["ReceiptHandle"]) for m in got}) == 3
    wait_until("every partition's messages to come back", lambda: a.get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])["Attributes"]["ApproximateNumberOfMessages"] == "30",
        timeout=20)
    a.set_queue_attributes(QueueUrl=url, Attributes={"VisibilityTimeout": "60"})
    got = receive_all()
    counts = a.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert (counts["ApproximateNumberOfMessages"], counts["ApproximateNumberOfMessagesNotVisible"]) == ("0", "30")
    for i in range(0, 30, 10):
        out = a.delete_message_batch(QueueUrl=url, Entries=[
            {"Id": str(k), "ReceiptHandle": m["ReceiptHandle"]} for k, m in enumerate(got[i:i + 10])])
        assert len(out["Successful"]) == 10 and not out.get("Failed"), out
    counts = b.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert counts["ApproximateNumberOfMessagesNotVisible"] == "0"
    # A long poll waits on every partition: whichever a send reaches wakes
    # it well within one 3 s round of waiting at a single partition.
    for i in range(6):
        result = {}

        def poll():
            result["messages"] = b.receive_message(QueueUrl=url, WaitTimeSeconds=15).get("Messages", [])
            result["done"] = time.monotonic()

        t = threading.Thread(target=poll)
        t.start()
        time.sleep(0.5)
        sent_at = time.monotonic()
        a.send_message(QueueUrl=url, MessageBody=f"wake{i}")
        t.join(timeout=20)
        assert [m["Body"] for m in result["messages"]] == [f"wake{i}"]
        assert result["done"] - sent_at < 2.5, result
        a.delete_message(QueueUrl=url, ReceiptHandle=result["messages"][0]["ReceiptHandle"])
    # A purge empties every partition.
    for i in range(3):
        a.send_message_batch(QueueUrl=url, Entries=[{"Id": str(k), "MessageBody": "p"} for k in range(10)])
    a.purge_queue(QueueUrl=url)
    counts = c.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])["Attributes"]
    assert counts["ApproximateNumberOfMessages"] == "0"
    # Deleting the queue deletes its partitions: the same name makes a new
    # queue of one partition.
    a.delete_queue(QueueUrl=url)
    url = a.create_queue(QueueName=queue_name)["QueueUrl"]
    for k in range(10):
        a.send_message(QueueUrl=url, MessageBody=f"n{k}")
    again = a.receive_message(QueueUrl=url, MaxNumberOfMessages=10)["Messages"]
    assert len(again) == 10 and len({receipt_partition(m["ReceiptHandle"]) for m in again}) == 1
    a.delete_queue(QueueUrl=url)


def test_batches_report_failures_per_entry(sqs, queue_name):
    a, b, c = sqs
    url = a.create_queue(QueueName=queue_name)["QueueUrl"]
    out = a.send_message_batch(
        QueueUrl=url,
        Entries=[{"Id": f"e{i}", "MessageBody": f"m{i}"} for i in range(9)] + [{"Id": "bad", "MessageBody": "\x02"}],
    )
    assert sorted(e["Id"] for e in out["Successful"]) == sorted(f"e{i}" for i in range(9))
    assert [(f["Id"], f["Code"], f["SenderFault"]) for f in out["Failed"]] == [("bad", "InvalidMessageContents", True)]
    with pytest.raises(a.exceptions.BatchEntryIdsNotDistinct):
        a.send_message_batch(QueueUrl=url, Entries=[{"Id": "x", "MessageBody": "1"}, {"Id": "x", "MessageBody": "2"}])
    with pytest.raises(a.exceptions.TooManyEntriesInBatchRequest):
        a.send_message_batch(QueueUrl=url, Entries=[{"Id": f"x{i}", "MessageBody": "1"} for i in range(11)])
    with pytest.raises(a.exceptions.EmptyBatchRequest):
        a.send_message_batch(QueueUrl=url, Entries=[])
    with pytest.raises(a.exceptions.BatchRequestTooLong):
        a.send_message_batch(QueueUrl=url, Entries=[{"Id": f"x{i}", "MessageBody": "y" * 200_000} for i in range(6)])
    received = []
    deadline = time.monotonic() + 20
    while len(received) < 9 and time.monotonic() < deadline:
        received += b.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", [])
    assert sorted(m["Body"] for m in received) == sorted(f"m{i}" for i in range(9))
    entries = [{"Id": f"d{i}", "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(received)]
    out = c.delete_message_batch(QueueUrl=url, Entries=entries + [{"Id": "junk", "ReceiptHandle": "junk"}])
    assert len(out["Successful"]) == 9
    assert [(f["Id"], f["Code"]) for f in out["Failed"]] == [("junk", "ReceiptHandleIsInvalid")]
    attrs = a.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert attrs["ApproximateNumberOfMessages"] == attrs["ApproximateNumberOfMessagesNotVisible"] == "0"
    a.delete_queue(QueueUrl=url)


def test_fifo_order_group_lock_and_deduplication(sqs, queue_name):
    a, b, c = sqs
    name = queue_name[:70] + ".fifo"
    url = a.create_queue(QueueName=name, Attributes={"FifoQueue": "true", "ContentBasedDeduplication": "true"})["QueueUrl"]
    seqs = [b.send_message(QueueUrl=url, MessageBody=f"a{i}", MessageGroupId="a")["SequenceNumber"] for i in range(3)]
    assert seqs == sorted(seqs, key=int)
    b.send_message(QueueUrl=url, MessageBody="b0", MessageGroupId="b")
    # A repeated body within five minutes is a duplicate (content-based).
    dup = c.send_message(QueueUrl=url, MessageBody="a0", MessageGroupId="a")
    assert dup["SequenceNumber"] == seqs[0]
    first = c.receive_message(QueueUrl=url, MaxNumberOfMessages=2)["Messages"]
    assert [m["Body"] for m in first] == ["a0", "a1"]
    # Group a is locked while a0 and a1 are in flight.
    second = a.receive_message(QueueUrl=url, MaxNumberOfMessages=10)["Messages"]
    assert [m["Body"] for m in second] == ["b0"]
    for m in first:
        a.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
    assert [m["Body"] for m in b.receive_message(QueueUrl=url, MaxNumberOfMessages=10)["Messages"]] == ["a2"]
    with pytest.raises(Exception) as e:
        a.send_message(QueueUrl=url, MessageBody="x")
    assert error_code(e) == "MissingParameter"
    with pytest.raises(Exception) as e:
        a.send_message(QueueUrl=url, MessageBody="x", MessageGroupId="a", DelaySeconds=5)
    assert error_code(e) == "InvalidParameterValue"
    a.purge_queue(QueueUrl=url)
    with pytest.raises(a.exceptions.PurgeQueueInProgress):
        b.purge_queue(QueueUrl=url)
    a.delete_queue(QueueUrl=url)


def test_a_message_received_too_often_moves_to_the_dead_letter_queue(sqs, queue_name):
    a, b, c = sqs
    dlq = a.create_queue(QueueName=f"{queue_name}-dlq")["QueueUrl"]
    dlq_arn = a.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    # The target must exist, be of the same type and not be the queue itself.
    for target in (dlq_arn + "-missing", dlq_arn[:-len("-dlq")] + ".fifo"):
        with pytest.raises(a.exceptions.InvalidAttributeValue):
            a.create_queue(QueueName=queue_name, Attributes={
                "RedrivePolicy": json.dumps({"deadLetterTargetArn": target, "maxReceiveCount": 2})})
    policy = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": 2})
    src = a.create_queue(QueueName=queue_name, Attributes={"RedrivePolicy": policy})["QueueUrl"]
    sent = b.send_message(QueueUrl=src, MessageBody="poison", MessageAttributes={"k": {"DataType": "String", "StringValue": "v"}})
    for count in ("1", "2"):
        m = c.receive_message(QueueUrl=src, VisibilityTimeout=0, WaitTimeSeconds=5, AttributeNames=["All"])["Messages"][0]
        assert m["Attributes"]["ApproximateReceiveCount"] == count
    first_sent = m["Attributes"]["SentTimestamp"]
    # The third receive finds a dead letter, which the queue's leader moves.
    assert "Messages" not in a.receive_message(QueueUrl=src)
    moved = b.receive_message(QueueUrl=dlq, WaitTimeSeconds=10, AttributeNames=["All"], MessageAttributeNames=["All"])["Messages"]
    assert [(x["MessageId"], x["Body"]) for x in moved] == [(sent["MessageId"], "poison")]
    assert moved[0]["Attributes"]["SentTimestamp"] == first_sent
    assert moved[0]["MessageAttributes"] == {"k": {"DataType": "String", "StringValue": "v"}}
    sources = c.list_dead_letter_source_queues(QueueUrl=dlq)["queueUrls"]
    assert [path(u) for u in sources] == [path(src)]
    wait_until("the source to drop its dead letter", lambda: a.get_queue_attributes(
        QueueUrl=src, AttributeNames=["All"])["Attributes"]["ApproximateNumberOfMessages"] == "0", timeout=10)
    a.delete_queue(QueueUrl=src)
    a.delete_queue(QueueUrl=dlq)


@pytest.mark.slow
def test_dead_letter_retention_counts_from_the_first_send_or_on_fifo_from_the_move(sqs, queue_name):
    """As on AWS: a standard dead-letter queue's retention counts from the
    message's first send time, also for a dead letter moved in behind
    messages sent after it, and the queue's leader drops it with no other
    request to the queue; a FIFO dead-letter queue's counts from the move
    (SentTimestamp stays the first send time)."""
    a, b, c = sqs
    dlq = a.create_queue(QueueName=f"{queue_name}-dlq", Attributes={"MessageRetentionPeriod": "60"})["QueueUrl"]
    fifo_dlq = a.create_queue(QueueName=f"{queue_name}-dlq.fifo", Attributes={
        "FifoQueue": "true", "MessageRetentionPeriod": "60"})["QueueUrl"]
    sources = []
    for url, name, fifo in ((dlq, queue_name, {}), (fifo_dlq, f"{queue_name}.fifo", {"FifoQueue": "true"})):
        arn = a.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        policy = json.dumps({"deadLetterTargetArn": arn, "maxReceiveCount": 1})
        sources.append(a.create_queue(QueueName=name, Attributes={"RedrivePolicy": policy, **fifo})["QueueUrl"])
    src, fifo_src = sources
    b.send_message(QueueUrl=src, MessageBody="old")
    b.send_message(QueueUrl=fifo_src, MessageBody="old", MessageGroupId="g", MessageDeduplicationId="d")
    sent = {}
    for url in sources:
        first = c.receive_message(QueueUrl=url, VisibilityTimeout=0, WaitTimeSeconds=5,
                                  AttributeNames=["All"])["Messages"]
        sent[url] = int(first[0]["Attributes"]["SentTimestamp"])
    # Retention is a matter of time: ten seconds between the first send
    # times and the moves (or the young message) are the window in which
    # only the first send time is past it.
    time.sleep(10)
    b.send_message(QueueUrl=dlq, MessageBody="young")
    fifo_moved = time.time()
    for url in sources:
        assert "Messages" not in c.receive_message(QueueUrl=url)

    def count(url):
        attributes = a.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
        return int(attributes["ApproximateNumberOfMessages"])

    wait_until("the dead letters to move in", lambda: count(dlq) == 2 and count(fifo_dlq) == 1, timeout=10)
    # Past its first send time's retention (a receive applies retention),
    # within its move's.
    wait_until("the FIFO dead letter's first send time to pass retention",
               lambda: time.time() > sent[fifo_src] / 1000 + 61, timeout=60)
    kept = c.receive_message(QueueUrl=fifo_dlq, VisibilityTimeout=0, AttributeNames=["All"]).get("Messages", [])
    assert time.time() < fifo_moved + 60, "the receive came after the move's retention too"
    assert [(m["Body"], int(m["Attributes"]["SentTimestamp"])) for m in kept] == [("old", sent[fifo_src])]
    wait_until("the old dead letter to expire", lambda: count(dlq) == 1,
               timeout=max(1.0, sent[src] / 1000 + 60 + 8 - time.time()))
    left = c.receive_message(QueueUrl=dlq, MaxNumberOfMessages=10)["Messages"]
    assert [m["Body"] for m in left] == ["young"]
    for url in sources + [dlq, fifo_dlq]:
        a.delete_queue(QueueUrl=url)


def test_a_redrive_allow_policy_decides_which_queues_use_a_dead_letter_queue(sqs, queue_name):
    a, b, _ = sqs
    allowed_arn = f"arn:aws:sqs:{REGION}:{ACCOUNT}:{queue_name}-ok"
    for bad in ('{"redrivePermission":"some"}', '{"redrivePermission":"byQueue"}',
                '{"redrivePermission":"allowAll","sourceQueueArns":["arn:aws:sqs:x:y:z"]}'):
        with pytest.raises(a.exceptions.InvalidAttributeValue):
            a.create_queue(QueueName=f"{queue_name}-dlq", Attributes={"RedriveAllowPolicy": bad})
    allow = json.dumps({"redrivePermission": "byQueue", "sourceQueueArns": [allowed_arn]})
    dlq = a.create_queue(QueueName=f"{queue_name}-dlq", Attributes={"RedriveAllowPolicy": allow})["QueueUrl"]
    dlq_arn = b.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    policy = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": 3})
    with pytest.raises(b.exceptions.InvalidAttributeValue) as e:
        b.create_queue(QueueName=f"{queue_name}-no", Attributes={"RedrivePolicy": policy})
    assert "RedriveAllowPolicy" in str(e.value)
    ok = b.create_queue(QueueName=f"{queue_name}-ok", Attributes={"RedrivePolicy": policy})["QueueUrl"]
    a.set_queue_attributes(QueueUrl=dlq, Attributes={"RedriveAllowPolicy": '{"redrivePermission":"denyAll"}'})
    with pytest.raises(b.exceptions.InvalidAttributeValue):
        b.set_queue_attributes(QueueUrl=ok, Attributes={"RedrivePolicy": policy})
    for url in (ok, dlq):
        a.delete_queue(QueueUrl=url)


def test_a_move_task_takes_dead_letters_back_to_their_source_or_elsewhere(sqs, cluster, queue_name):
    a, b, c = sqs
    dlq = a.create_queue(QueueName=f"{queue_name}-dlq")["QueueUrl"]
    other = a.create_queue(QueueName=f"{queue_name}-other")["QueueUrl"]
    dlq_arn, other_arn = (a.get_queue_attributes(QueueUrl=u, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
                          for u in (dlq, other))
    policy = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": 1})
    src = a.create_queue(QueueName=queue_name, Attributes={"RedrivePolicy": policy})["QueueUrl"]
    src_arn = a.get_queue_attributes(QueueUrl=src, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    ids = {b.send_message(QueueUrl=src, MessageBody=f"m{i}")["MessageId"] for i in range(4)}
    got, deadline = 0, time.monotonic() + 20
    while got < 4 and time.monotonic() < deadline:
        got += len(c.receive_message(QueueUrl=src, MaxNumberOfMessages=10, VisibilityTimeout=0).get("Messages", []))
    assert got == 4
    # The next receive finds four dead letters, which move to the DLQ.
    assert "Messages" not in a.receive_message(QueueUrl=src, MaxNumberOfMessages=10)
    wait_until("the dead letters to reach the DLQ", lambda: b.get_queue_attributes(
        QueueUrl=dlq, AttributeNames=["ApproximateNumberOfMessages"])["Attributes"]["ApproximateNumberOfMessages"] == "4",
        timeout=15)

    with pytest.raises(a.exceptions.UnsupportedOperation):
        a.start_message_move_task(SourceArn=src_arn)
    with pytest.raises(a.exceptions.ResourceNotFoundException):
        a.start_message_move_task(SourceArn=dlq_arn + "-missing")
    with pytest.raises(a.exceptions.ResourceNotFoundException):
        a.start_message_move_task(SourceArn=dlq_arn, DestinationArn=other_arn + "-missing")
    # One message a second to another queue, cancelled at once.
    first = a.start_message_move_task(SourceArn=dlq_arn, DestinationArn=other_arn, MaxNumberOfMessagesPerSecond=1)
    with pytest.raises(b.exceptions.UnsupportedOperation):
        b.start_message_move_task(SourceArn=dlq_arn)
    moved_first = c.cancel_message_move_task(TaskHandle=first["TaskHandle"])["ApproximateNumberOfMessagesMoved"]
    with pytest.raises(a.exceptions.ResourceNotFoundException):
        a.cancel_message_move_task(TaskHandle=first["TaskHandle"])
    # Then the rest back to where they came from.
    b.start_message_move_task(SourceArn=dlq_arn)
    wait_until("the move task to end", lambda: c.list_message_move_tasks(
        SourceArn=dlq_arn)["Results"][0]["Status"] != "RUNNING", timeout=20)
    tasks = c.list_message_move_tasks(SourceArn=dlq_arn, MaxResults=10)["Results"]
    assert [t["Status"] for t in tasks] == ["COMPLETED", "CANCELLED"]
    assert "TaskHandle" not in tasks[0] and "DestinationArn" not in tasks[0]
    assert tasks[1]["DestinationArn"] == other_arn and tasks[1]["MaxNumberOfMessagesPerSecond"] == 1
    moved_later = 4 - tasks[1]["ApproximateNumberOfMessagesMoved"]
    assert tasks[0]["ApproximateNumberOfMessagesMoved"] == moved_later
    # The second task may start while the first's last copy is between its
    # copy and its drop, and then counts that message too.
    assert moved_later <= tasks[0]["ApproximateNumberOfMessagesToMove"] <= moved_later + 1
    back = []
    for url, count in ((src, moved_later), (other, 4 - moved_later)):
        deadline = time.monotonic() + 20
        got = []
        while len(got) < count and time.monotonic() < deadline:
            got += a.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=2).get("Messages", [])
        assert len(got) == count, url
        back += [m["MessageId"] for m in got]
    assert sorted(back) == sorted(ids), "every message moved once, with its id"
    assert moved_first <= tasks[1]["ApproximateNumberOfMessagesMoved"]
    status, doc = query(cluster[1].endpoint, {"Action": "ListMessageMoveTasks", "SourceArn": dlq_arn, "MaxResults": "10"})
    assert status == 200, ET.tostring(doc)
    assert [r.find(f"{XMLNS}Status").text for r in doc.iter(f"{XMLNS}Results")] == ["COMPLETED", "CANCELLED"]
    for url in (src, dlq, other):
        a.delete_queue(QueueUrl=url)


def test_a_receive_request_attempt_id_repeats_a_fifo_receive(sqs, queue_name):
    a, b, _ = sqs
    url = a.create_queue(QueueName=queue_name[:70] + ".fifo", Attributes={
        "FifoQueue": "true", "ContentBasedDeduplication": "true"})["QueueUrl"]
    for body in ("x", "y"):
        a.send_message(QueueUrl=url, MessageBody=body, MessageGroupId="g")
    first = a.receive_message(QueueUrl=url, MaxNumberOfMessages=10, ReceiveRequestAttemptId="try-1")["Messages"]
    again = b.receive_message(QueueUrl=url, MaxNumberOfMessages=10, ReceiveRequestAttemptId="try-1")["Messages"]
    assert [m["Body"] for m in first] == ["x", "y"]
    assert [m["ReceiptHandle"] for m in again] == [m["ReceiptHandle"] for m in first]
    assert "Messages" not in b.receive_message(QueueUrl=url, MaxNumberOfMessages=10)
    b.delete_message(QueueUrl=url, ReceiptHandle=first[0]["ReceiptHandle"])
    # A message of the receive changed: the id no longer repeats it.
    assert "Messages" not in a.receive_message(QueueUrl=url, MaxNumberOfMessages=10, ReceiveRequestAttemptId="try-1")
    with pytest.raises(Exception) as e:
        a.receive_message(QueueUrl=url, ReceiveRequestAttemptId="no spaces")
    assert error_code(e) == "InvalidParameterValue"
    a.delete_queue(QueueUrl=url)


def test_permissions_share_a_queue_with_another_account(sqs, cluster, queue_name):
    a, b, _ = sqs
    them = sqs_for(cluster[2].endpoint, access_key=OTHER_ACCESS_KEY, secret_key=OTHER_SECRET_KEY)
    url = a.create_queue(QueueName=queue_name)["QueueUrl"]
    # Not shared: another account is refused, and cannot learn the URL.
    with pytest.raises(Exception) as e:
        them.send_message(QueueUrl=url, MessageBody="x")
    assert error_code(e) == "AccessDenied"
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    with pytest.raises(them.exceptions.QueueDoesNotExist):
        them.get_queue_url(QueueName=queue_name, QueueOwnerAWSAccountId=ACCOUNT)

    a.add_permission(QueueUrl=url, Label="send", AWSAccountIds=[OTHER_ACCOUNT], Actions=["SendMessage", "GetQueueUrl"])
    with pytest.raises(Exception) as e:
        b.add_permission(QueueUrl=url, Label="send", AWSAccountIds=[OTHER_ACCOUNT], Actions=["ReceiveMessage"])
    assert error_code(e) == "InvalidParameterValue"
    for bad in ({"Label": "bad label", "Actions": ["SendMessage"]}, {"Label": "x", "Actions": ["DeleteQueue"]},
                {"Label": "x", "Actions": ["SendMessage"], "AWSAccountIds": ["12"]}):
        with pytest.raises(Exception) as e:
            a.add_permission(**{"QueueUrl": url, "AWSAccountIds": [OTHER_ACCOUNT], **bad})
        assert error_code(e) == "InvalidParameterValue", bad
    policy = json.loads(b.get_queue_attributes(QueueUrl=url, AttributeNames=["Policy"])["Attributes"]["Policy"])
    assert [s["Sid"] for s in policy["Statement"]] == ["send"]
    assert policy["Statement"][0]["Principal"] == {"AWS": f"arn:aws:iam::{OTHER_ACCOUNT}:root"}

    assert path(them.get_queue_url(QueueName=queue_name, QueueOwnerAWSAccountId=ACCOUNT)["QueueUrl"]) == path(url)
    sent = them.send_message(QueueUrl=url, MessageBody="from them")
    them.send_message_batch(QueueUrl=url, Entries=[{"Id": "1", "MessageBody": "batch"}])
    with pytest.raises(Exception) as e:
        them.receive_message(QueueUrl=url)
    assert error_code(e) == "AccessDenied"
    for owner_only in (lambda: them.purge_queue(QueueUrl=url),
                       lambda: them.add_permission(QueueUrl=url, Label="mine", AWSAccountIds=[OTHER_ACCOUNT],
                                                   Actions=["*"]),
                       lambda: them.set_queue_attributes(QueueUrl=url, Attributes={"DelaySeconds": "1"})):
        with pytest.raises(Exception) as e:
            owner_only()
        assert error_code(e) == "AccessDenied"
    got = a.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=5, AttributeNames=["SenderId"])["Messages"]
    assert sent["MessageId"] in [m["MessageId"] for m in got]

    # A statement written by hand: any account may receive; a Deny wins.
    hand = {"Version": "2012-10-17", "Statement": [
        {"Sid": "all", "Effect": "Allow", "Principal": "*", "Action": "sqs:ReceiveMessage", "Resource": "*"},
        {"Sid": "no", "Effect": "Deny", "Principal": {"AWS": "*"}, "Action": "sqs:Send*", "Resource": "*"}]}
    a.set_queue_attributes(QueueUrl=url, Attributes={"Policy": json.dumps(hand)})
    them.receive_message(QueueUrl=url)
    with pytest.raises(Exception) as e:
        them.send_message(QueueUrl=url, MessageBody="x")
    assert error_code(e) == "AccessDenied"
    a.remove_permission(QueueUrl=url, Label="all")
    a.remove_permission(QueueUrl=url, Label="no")
    assert "Policy" not in a.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    with pytest.raises(Exception) as e:
        a.remove_permission(QueueUrl=url, Label="no")
    assert error_code(e) == "InvalidParameterValue"
    a.delete_queue(QueueUrl=url)


def query(endpoint, params):
    """A signed awsQuery request; returns (status, parsed XML)."""
    body = "&".join(f"{k}={urllib.parse.quote(str(v), safe='')}" for k, v in params.items())
    request = AWSRequest(
        method="POST",
        url=endpoint + "/",
        data=body,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), "sqs", REGION).add_auth(request)
    prepared = request.prepare()
    r = urllib.request.Request(prepared.url, data=body.encode(), headers=dict(prepared.headers), method="POST")
    try:
        with urllib.request.urlopen(r, timeout=30) as resp:
            return resp.status, ET.fromstring(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, ET.fromstring(e.read())


def test_the_query_protocol_answers_in_xml(cluster, queue_name):
    a, b = cluster[0].endpoint, cluster[1].endpoint
    status, doc = query(a, {
        "Action": "CreateQueue", "Version": "2012-11-05", "QueueName": queue_name,
        "Attribute.1.Name": "VisibilityTimeout", "Attribute.1.Value": "9",
        "Tag.1.Key": "k", "Tag.1.Value": "v",
    })
    assert status == 200, ET.tostring(doc)
    url = doc.find(f"{XMLNS}CreateQueueResult/{XMLNS}QueueUrl").text
    status, doc = query(b, {
        "Action": "SendMessage", "QueueUrl": url, "MessageBody": "via query",
        "MessageAttribute.1.Name": "n", "MessageAttribute.1.Value.DataType": "Number",
        "MessageAttribute.1.Value.StringValue": "7",
    })
    assert status == 200
    md5 = doc.find(f"{XMLNS}SendMessageResult/{XMLNS}MD5OfMessageAttributes").text
    assert md5 == attributes_md5({"n": {"DataType": "Number", "StringValue": "7"}})
    status, doc = query(a, {
        "Action": "ReceiveMessage", "QueueUrl": url, "AttributeName.1": "All",
        "MessageAttributeName.1": "All", "WaitTimeSeconds": "5",
    })
    message = doc.find(f"{XMLNS}ReceiveMessageResult/{XMLNS}Message")
    assert message.find(f"{XMLNS}Body").text == "via query"
    attrs = {x.find(f"{XMLNS}Name").text: x.find(f"{XMLNS}Value").text for x in message.findall(f"{XMLNS}Attribute")}
    assert attrs["ApproximateReceiveCount"] == "1"
    ma = message.find(f"{XMLNS}MessageAttribute")
    assert ma.find(f"{XMLNS}Name").text == "n"
    assert ma.find(f"{XMLNS}Value/{XMLNS}StringValue").text == "7"
    status, doc = query(b, {"Action": "GetQueueAttributes", "QueueUrl": url, "AttributeName.1": "VisibilityTimeout"})
    got = {x.find(f"{XMLNS}Name").text: x.find(f"{XMLNS}Value").text for x in doc.iter(f"{XMLNS}Attribute")}
    assert got == {"VisibilityTimeout": "9"}
    status, doc = query(b, {"Action": "ListQueueTags", "QueueUrl": url})
    assert [(t.find(f"{XMLNS}Key").text, t.find(f"{XMLNS}Value").text) for t in doc.iter(f"{XMLNS}Tag")] == [("k", "v")]
    status, doc = query(a, {
        "Action": "DeleteMessageBatch", "QueueUrl": url,
        "DeleteMessageBatchRequestEntry.1.Id": "one",
        "DeleteMessageBatchRequestEntry.1.ReceiptHandle": message.find(f"{XMLNS}ReceiptHandle").text,
    })
    assert [e.find(f"{XMLNS}Id").text for e in doc.iter(f"{XMLNS}DeleteMessageBatchResultEntry")] == ["one"]
    status, doc = query(a, {"Action": "GetQueueUrl", "QueueName": queue_name + "-missing"})
    assert status == 400
    assert doc.find(f"{XMLNS}Error/{XMLNS}Code").text == "AWS.SimpleQueueService.NonExistentQueue"
    assert doc.find(f"{XMLNS}Error/{XMLNS}Type").text == "Sender"
    query(a, {"Action": "DeleteQueue", "QueueUrl": url})


def test_bench_sqs_smoke(binary, cluster, queue_name):
    """`kinesin bench sqs` against a signed cluster: it sends, drains what it
    sent, times send -> receive and its receive + delete loop, and runs
    sends and receives at once, without errors."""
    endpoints = ",".join(f"127.0.0.1:{n.api_port}" for n in cluster)
    out = subprocess.run(
        [binary, "bench", "sqs", "--endpoints", endpoints, "--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY,
         "--queue", queue_name, "--clients", "2", "--duration-secs", "2", "--latency-rate", "20", "--json"],
        capture_output=True, text=True, timeout=180,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["errors"] == 0 and result["sent"] > 0, result
    assert result["received_and_deleted"] == result["sent"], result
    assert 0 < result["receive_delete_loop_p50_ms"] <= result["receive_delete_loop_p99_ms"], result
    assert result["latency_samples"] > 0 and 0 < result["send_to_receive_p50_ms"] < 1000, result
    assert result["mixed_send_messages_per_sec"] > 0, result


@pytest.mark.own_cluster
def test_a_leader_kill_loses_no_message_and_revives_no_deleted_one(binary, workdir):
    nodes = start_cluster(binary, os.path.join(workdir, "sqs-failover"), 3)
    try:
        clients = [sqs_for(n.endpoint) for n in nodes]
        url = clients[0].create_queue(QueueName="failover", Attributes={"VisibilityTimeout": "60"})["QueueUrl"]
        for i in range(5):
            clients[i % 3].send_message_batch(
                QueueUrl=url, Entries=[{"Id": str(j), "MessageBody": f"m{i * 10 + j}"} for j in range(10)]
            )
        # Take and delete ten, take ten more and leave them in flight.
        deleted = clients[1].receive_message(QueueUrl=url, MaxNumberOfMessages=10)["Messages"]
        clients[1].delete_message_batch(
            QueueUrl=url, Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(deleted)]
        )
        in_flight = clients[2].receive_message(QueueUrl=url, MaxNumberOfMessages=10)["Messages"]
        wait_until("the queue's leader", lambda: sole_group_leader(nodes) is not None)
        leader = sole_group_leader(nodes)
        leader.proc.send_signal(signal.SIGKILL)
        leader.proc.wait()
        survivors = [sqs_for(n.endpoint) for n in nodes if n is not leader]
        seen = []
        deadline = time.monotonic() + 60
        while len(seen) < 30 and time.monotonic() < deadline:
            got = survivors[len(seen) % 2].receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
            seen += [m["Body"] for m in got.get("Messages", [])]
        gone = {m["Body"] for m in deleted} | {m["Body"] for m in in_flight}
        expected = {f"m{i}" for i in range(50)} - gone
        assert sorted(seen) == sorted(expected)
        attrs = survivors[0].get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
        assert attrs["ApproximateNumberOfMessagesNotVisible"] == "40"
    finally:
        for n in nodes:
            n.stop()


@pytest.mark.own_cluster
def test_a_partition_whose_replica_is_down_slows_no_send_or_receive(binary, workdir, queue_name):
    # One replica per group: killing a node takes its partitions' only
    # replica, while the metadata group keeps two of its three voters.
    nodes = start_cluster(binary, os.path.join(workdir, "sqs-partition-down"), 3, extra="replication_factor = 1")
    try:
        client = sqs_for(nodes[0].endpoint, attempts=1)
        url = client.create_queue(QueueName=queue_name, tags={"kinesin:partitions": "3"})["QueueUrl"]

        def hosted():
            """The names of the queue's groups on each node, once each has a leader."""
            views = {n.node_id: n.cluster_view()["groups"] for n in nodes}
            groups = {n: {g["name"] for g in v if g["name"] != "metadata" and g["leader"]} for n, v in views.items()}
            return groups if sum(len(g) for g in groups.values()) == 3 else None

        wait_until("the three partitions led", hosted)
        groups = hosted()
        # Not the node of partition 0 (the group named without "#k"): it
        # holds the queue's settings, without which no call can answer.
        victim = next((n for n in nodes[1:] if groups[n.node_id] and all("#" in g for g in groups[n.node_id])), None)
        assert victim is not None, f"no node but the first holds only partitions 1 and 2: {groups}"
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait()
        wait_until("node 1 to count the victim as down", lambda: next(
            n for n in nodes[0].cluster_view()["nodes"] if n["id"] == victim.node_id)["down"])
        # Every send goes to a partition that answers: none waits out the
        # router's 10 s retry budget or fails (the client does not retry).
        started = time.monotonic()
        for i in range(15):
            client.send_message(QueueUrl=url, MessageBody=f"m{i}")
        assert time.monotonic() - started < 8, time.monotonic() - started
        got, slowest = set(), 0.0
        deadline = time.monotonic() + 30
        while len(got) < 15 and time.monotonic() < deadline:
            started = time.monotonic()
            out = client.receive_message(QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=60)
            slowest = max(slowest, time.monotonic() - started)
            got |= {m["Body"] for m in out.get("Messages", [])}
        assert got == {f"m{i}" for i in range(15)}
        assert slowest < 3, slowest
        # The counts leave the lost partition out (it holds none of these
        # messages) instead of failing.
        started = time.monotonic()
        counts = client.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
        assert time.monotonic() - started < 3, time.monotonic() - started
        assert counts["ApproximateNumberOfMessagesNotVisible"] == "15", counts
        # A long poll of an empty queue ends with its wait, not the budget.
        started = time.monotonic()
        assert "Messages" not in client.receive_message(QueueUrl=url, WaitTimeSeconds=2)
        assert time.monotonic() - started < 5, time.monotonic() - started
    finally:
        for n in nodes:
            n.stop()
