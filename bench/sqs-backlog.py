"""How a standard queue's receive slows with messages in flight ahead of the
visible ones (receives scan the queue's index from the front). Against a
running `kinesin dev --nodes 3`: python3 bench/sqs-backlog.py"""
import boto3, time, sys
from concurrent.futures import ThreadPoolExecutor
from botocore.config import Config
def c(): return boto3.client("sqs", endpoint_url="http://127.0.0.1:7450", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y", config=Config(max_pool_connections=20))
cl = c()
url = cl.create_queue(QueueName="scan", Attributes={"VisibilityTimeout": "3600"})["QueueUrl"]
def send(n):
    k = c()
    for i in range(n):
        k.send_message_batch(QueueUrl=url, Entries=[{"Id": str(j), "MessageBody": "x" * 100} for j in range(10)])
def recv(n):
    k = c(); got = 0
    while got < n:
        got += len(k.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", []))
def measure(label):
    send(100)  # 1000 new visible messages
    k = c(); t = time.monotonic(); got = 0; calls = 0
    while got < 1000:
        got += len(k.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", [])); calls += 1
    dt = time.monotonic() - t
    print(f"{label}: {calls} receives of 10 in {dt:.2f} s = {1000*dt/calls:.2f} ms each", flush=True)
measure("0 in flight")
inflight = 0
for target in (20000, 60000):
    per = (target - inflight) // 10 // 8
    with ThreadPoolExecutor(8) as ex: list(ex.map(send, [per] * 8))
    with ThreadPoolExecutor(8) as ex: list(ex.map(recv, [per * 10] * 8))
    inflight = target
    measure(f"{inflight} in flight ahead")
