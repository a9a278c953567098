"""`kinesin-nats-bench` (the NATS JetStream side of bench/compare) keeps
working: it publishes to a real nats-server with JetStream and reports in the
same JSON shape as `kinesin bench produce`."""

import json
import os
import subprocess
import urllib.request

import pytest

from conftest import free_port, wait_until


@pytest.fixture
def nats_server(tmp_path):
    port, http = free_port(), free_port()
    proc = subprocess.Popen(
        ["nats-server", "-a", "127.0.0.1", "-p", str(port), "-m", str(http), "-js", "-sd", str(tmp_path / "js")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_until("nats-server ready",
                   lambda: urllib.request.urlopen(f"http://127.0.0.1:{http}/healthz", timeout=2).status == 200)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_nats_bench_smoke(nats_server):
    binary = os.environ.get("KINESIN_NATS_BENCH")
    assert binary and os.path.exists(binary), "KINESIN_NATS_BENCH must name the built kinesin-nats-bench"
    out = subprocess.run(
        [binary, "--servers", nats_server, "--replicas", "1", "--stream", "smoke", "--batch", "50",
         "--concurrency", "2", "--duration-secs", "2", "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["records"] > 0 and result["errors"] == 0, result
    assert 0 < result["batch_latency_ms"]["p50"] <= result["batch_latency_ms"]["max"]


def test_nats_bench_e2e_smoke(nats_server):
    """The e2e workload (fan-out/end-to-end rows of bench/compare): every
    reader sees every acknowledged message, with a due-to-seen latency."""
    binary = os.environ.get("KINESIN_NATS_BENCH")
    assert binary and os.path.exists(binary), "KINESIN_NATS_BENCH must name the built kinesin-nats-bench"
    out = subprocess.run(
        [binary, "--workload", "e2e", "--servers", nats_server, "--replicas", "1", "--stream", "e2e",
         "--consumers", "2", "--subjects", "2", "--rate", "100", "--duration-secs", "2", "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["put"] > 0 and result["put_failed"] == 0, result
    assert result["seen_per_consumer"] == [result["put"]] * 2, result
    assert 0 < result["latency_ms"]["p50"] <= result["latency_ms"]["max"]
