"""How a FIFO queue's receive slows with a backlog waiting behind a message
group whose first message is in flight (before the group index, every
receive walked every message of the queue). Against a running
`kinesin dev`: python3 bench/sqs-fifo-backlog.py [ENDPOINT]"""
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import boto3
from botocore.config import Config

ENDPOINT = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:7450"


def client():
    return boto3.client("sqs", endpoint_url=ENDPOINT, region_name="us-east-1", aws_access_key_id="x",
                        aws_secret_access_key="y", config=Config(max_pool_connections=20))


cl = client()
url = cl.create_queue(QueueName=f"fifo-scan-{uuid.uuid4().hex[:8]}.fifo",
                      Attributes={"FifoQueue": "true", "VisibilityTimeout": "3600"})["QueueUrl"]


def send(group, batches):
    k = client()
    for _ in range(batches):
        k.send_message_batch(QueueUrl=url, Entries=[
            {"Id": str(j), "MessageBody": "x" * 100, "MessageGroupId": group, "MessageDeduplicationId": uuid.uuid4().hex}
            for j in range(10)])


def measure(label):
    """1,000 messages in 100 other groups, then received 10 at a time and
    deleted: the time per receive."""
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda g: send(f"g{g}", 1), range(100)))
    k = client()
    got = calls = 0
    t = time.monotonic()
    while got < 1000:
        msgs = k.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", [])
        calls += 1
        got += len(msgs)
        if msgs:
            k.delete_message_batch(QueueUrl=url, Entries=[
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(msgs)])
    dt = time.monotonic() - t
    print(f"{label}: {calls} receives (+ deletes) of up to 10 in {dt:.2f} s = {1000 * dt / calls:.2f} ms each", flush=True)


measure("no backlog")
# The stuck group: its first message is received and stays in flight for
# an hour; everything sent to it after waits behind.
send("stuck", 1)
assert cl.receive_message(QueueUrl=url, MaxNumberOfMessages=1).get("Messages")
waiting = 9
for target in (20_000, 60_000):
    per = (target - waiting) // 10 // 8
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda _: send("stuck", per), range(8)))
    waiting += per * 80
    measure(f"{waiting} waiting behind a message in flight")
