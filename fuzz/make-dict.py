"""Writes fuzz/dicts/request_dispatch.dict, libFuzzer's dictionary for the
request_dispatch target, from the AWS service models that ship with botocore:
every operation's X-Amz-Target and query Action, every member name (as a
JSON key and as a form key) and every enum value of Kinesis, SQS and
Firehose. Run it with a Python that has botocore (scripts/compat.sh's venv):

    $CARGO_TARGET_DIR/compat-venv/bin/python fuzz/make-dict.py
"""

import os

import botocore
from botocore.loaders import Loader

SERVICES = ("kinesis", "sqs", "firehose")
# libFuzzer ignores a dictionary word longer than this.
MAX_WORD = 64
# Values that no model spells out but requests carry.
EXTRA = [
    "\n--\n",
    "http://h/000000000000/",
    "arn:aws:sqs:us-east-1:000000000000:",
    "arn:aws:kinesis:us-east-1:000000000000:stream/",
    "arn:aws:firehose:us-east-1:000000000000:deliverystream/",
    "arn:aws:s3:::",
    "Attribute.1.Name=",
    "Attribute.1.Value=",
    "MessageAttribute.1.Name=",
    "MessageAttribute.1.Value.DataType=",
    "MessageAttribute.1.Value.StringValue=",
    "SendMessageBatchRequestEntry.1.Id=",
    "DeleteMessageBatchRequestEntry.1.ReceiptHandle=",
    ".fifo",
]


def escape(word):
    out = []
    for b in word.encode():
        c = chr(b)
        if c in '"\\':
            out.append("\\" + c)
        elif 0x20 <= b < 0x7F:
            out.append(c)
        else:
            out.append(f"\\x{b:02X}")
    return '"' + "".join(out) + '"'


def main():
    loader = Loader()
    words = []
    for service in SERVICES:
        model = loader.load_service_model(service, "service-2")
        prefix = model["metadata"].get("targetPrefix")
        for op in model["operations"]:
            words.append(f"{prefix}.{op}")
            if service == "sqs":
                words.append(f"Action={op}")
        for shape in model["shapes"].values():
            for member in shape.get("members", {}):
                words += [f'"{member}":', f"{member}="]
            words += shape.get("enum", [])
    words += EXTRA
    seen, lines = set(), []
    for w in words:
        if w not in seen and len(w.encode()) <= MAX_WORD:
            seen.add(w)
            lines.append(escape(w))
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dicts", "request_dispatch.dict")
    with open(path, "w") as f:
        f.write(f"# Made by fuzz/make-dict.py from botocore {botocore.__version__}'s models.\n")
        f.write("\n".join(lines) + "\n")
    print(f"{path}: {len(lines)} words")


main()
