"""The receive latency tail behind a large visible backlog: N messages
(100 B, batches of 10, 8 senders) queued, then one client receives up to
10 and deletes them for DUR seconds; prints p50, p99, p99.9, max and the
receives over 20 ms. Against a fresh `kinesin dev --nodes 3`:
python3 bench/sqs-backlog-tail.py 1000000 30"""
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import boto3
from botocore.config import Config

N, DUR = int(sys.argv[1]), float(sys.argv[2])


def client():
    return boto3.client("sqs", endpoint_url="http://127.0.0.1:7450", region_name="us-east-1",
                        aws_access_key_id="x", aws_secret_access_key="y",
                        config=Config(max_pool_connections=20))


url = client().create_queue(QueueName="backlog")["QueueUrl"]


def send(batches):
    k = client()
    for _ in range(batches):
        k.send_message_batch(QueueUrl=url, Entries=[{"Id": str(j), "MessageBody": "x" * 100} for j in range(10)])


started = time.monotonic()
with ThreadPoolExecutor(8) as ex:
    list(ex.map(send, [N // 80] * 8))
print(f"sent {N} in {time.monotonic() - started:.0f} s", flush=True)
k, lat, end = client(), [], time.monotonic() + DUR
while time.monotonic() < end:
    t0 = time.monotonic()
    got = k.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", [])
    lat.append((time.monotonic() - t0) * 1000)
    if got:
        k.delete_message_batch(QueueUrl=url, Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                                                      for i, m in enumerate(got)])
lat.sort()
slow = sum(1 for x in lat if x > 20)
print(f"{len(lat)} receives: p50 {lat[len(lat) // 2]:.2f} ms, p99 {lat[int(len(lat) * 0.99)]:.2f} ms, "
      f"p99.9 {lat[int(len(lat) * 0.999)]:.2f} ms, max {lat[-1]:.2f} ms, {slow} over 20 ms", flush=True)
