"""For the benches: the project's real S3 server (scripts/start_s3_server.sh, `weed mini`) behind
scripts/latency_proxy.py, so that a loopback server answers as a remote one would (DELAY ms per request)."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def remote_s3(work: Path, delay_ms: float, cpus: set[int] | None = None):
    """Yields (client, env): a boto3 client straight to the server (for uploads) and the AWS_* environment that
    points boto3 at the proxy. With `cpus`, the server and the proxy run on those cores only (a remote server
    does not take the client's CPU). Both processes are stopped by PID on exit."""
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    import boto3
    from botocore.config import Config

    info_file = work / "s3.env"
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    subprocess.run(
        [str(REPO / "scripts/start_s3_server.sh"), str(work / "s3"), str(info_file)],
        env=base,
        check=True,
        capture_output=True,
        text=True,
        timeout=180,
        preexec_fn=pin,
    )
    proxy = None
    try:
        info = dict(line.split("=", 1) for line in info_file.read_text().splitlines() if "=" in line)
        proxy = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "scripts/latency_proxy.py"),
                "--target",
                info["ENDPOINT_URL"].split("://", 1)[1],
                "--delay-ms",
                str(delay_ms),
            ],
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=pin,
        )
        line = proxy.stdout.readline()
        if not line.startswith("PORT="):
            raise SystemExit(f"the latency proxy did not start (exit {proxy.poll()})")
        endpoint = f"http://127.0.0.1:{line.strip().split('=')[1]}"
        keys = {
            "AWS_ACCESS_KEY_ID": info["AWS_ACCESS_KEY_ID"],
            "AWS_SECRET_ACCESS_KEY": info["AWS_SECRET_ACCESS_KEY"],
            "AWS_DEFAULT_REGION": info["AWS_DEFAULT_REGION"],
        }
        env = {
            **base,
            **keys,
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ENDPOINT_URL_S3": endpoint,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }
        client = boto3.client(
            "s3",
            endpoint_url=info["ENDPOINT_URL"],
            region_name=keys["AWS_DEFAULT_REGION"],
            aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"],
            config=Config(max_pool_connections=32),
        )
        yield client, env
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait()
        subprocess.run([str(REPO / "scripts/stop_s3_server.sh"), str(info_file)], capture_output=True, timeout=60)


def upload_set(client, local: Path, bucket: str, prefix: str = "set") -> None:
    """A shard set's files (not its _prep bookkeeping) to s3://bucket/prefix, 32 PUTs in flight."""
    client.create_bucket(Bucket=bucket)
    files = [p for p in local.rglob("*") if p.is_file() and p.relative_to(local).parts[0] != "_prep"]
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda p: client.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(local)}"), files))
