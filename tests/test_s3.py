"""data_prep against a real S3 server (SeaweedFS, started on a free loopback port, signatures enforced): S3
sources in both layouts, S3 outputs, multipart shards, verify finding a corrupted object, signed requests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from data_prep.embedded import write_imagefolder, write_synset_tars
from servers import run_prep

pytestmark = [pytest.mark.s3, pytest.mark.slow]

ARGS = ["--max-samples", 200, "--holdout-per-class", 5]
MULTIPART_THRESHOLD = 8 * 1024 * 1024  # boto3's TransferConfig default


@pytest.fixture(scope="module")
def tars(tmp_path_factory) -> Path:
    return write_synset_tars(tmp_path_factory.mktemp("s3src") / "tars")


def shard_files(root: Path) -> dict[str, bytes]:
    """Every train/ and val/ .tar and .idx file under root, by relative path."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for split in ("train", "val")
        for p in sorted((root / split).glob("*"))
        if p.suffix in (".tar", ".idx")
    }


def assert_same_shard_set(from_s3: Path, local: Path, s3_source: str, local_source: str) -> None:
    """Same shard and index bytes, same synsets.txt, same manifest except options.source."""
    s3_files, local_files = shard_files(from_s3), shard_files(local)
    assert sorted(s3_files) == sorted(local_files)
    assert any(n.startswith("train/") for n in s3_files) and any(n.startswith("val/") for n in s3_files)
    assert {n.rsplit(".", 1)[1] for n in s3_files} == {"tar", "idx"}
    different = [n for n in local_files if s3_files[n] != local_files[n]]
    assert not different, f"shard files differ between the S3 and the local run: {different}"
    assert (from_s3 / "synsets.txt").read_bytes() == (local / "synsets.txt").read_bytes()
    s3_manifest = json.loads((from_s3 / "manifest.json").read_text())
    local_manifest = json.loads((local / "manifest.json").read_text())
    assert s3_manifest["options"].pop("source") == s3_source
    assert local_manifest["options"].pop("source") == local_source
    assert s3_manifest == local_manifest


def test_synset_tars_on_s3_shard_to_the_same_bytes_as_locally(s3_server, tars, tmp_path):
    bucket = s3_server.create_bucket()
    assert s3_server.upload_dir(tars, bucket, "raw/tars") == 10
    source, out = f"s3://{bucket}/raw/tars", f"s3://{bucket}/shards/digits"
    env = s3_server.subprocess_env()
    proc = run_prep("shard", "--source", source, "--out", out, *ARGS, "--workers", 2, env=env)
    summary = json.loads(proc.stdout)
    assert summary["manifest"] == f"{out}/manifest.json"
    assert summary["images_written"] == 1797 and summary["images_rejected"] == 0

    local = tmp_path / "local"
    run_prep("shard", "--source", tars, "--out", local, *ARGS)
    fetched = s3_server.download_prefix(bucket, "shards/digits", tmp_path / "from_s3")
    assert "_prep/listing.npz" in fetched  # the listing is cached in the output on S3 too
    assert_same_shard_set(tmp_path / "from_s3", local, source, str(tars))
    manifest = json.loads((local / "manifest.json").read_text())
    assert manifest["options"]["source_format"] == "synset-tars"
    assert sum(t["samples"] for t in manifest["totals"].values()) == 1797

    proc = run_prep("verify", out, "--workers", 2, env=env, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1797 samples: OK" in proc.stdout


def test_an_imagefolder_on_s3_shards_and_verifies(s3_server, tmp_path):
    folder = write_imagefolder(tmp_path / "folder")
    bucket = s3_server.create_bucket()
    assert s3_server.upload_dir(folder, bucket, "imagefolder") == 1797
    source, out = f"s3://{bucket}/imagefolder", f"s3://{bucket}/shards"
    env = s3_server.subprocess_env()
    run_prep(
        "shard",
        "--source",
        source,
        "--out",
        out,
        "--max-samples",
        300,
        "--holdout-per-class",
        3,
        "--workers",
        2,
        env=env,
    )
    proc = run_prep("verify", out, env=env, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1797 samples: OK" in proc.stdout

    local = tmp_path / "local"
    run_prep("shard", "--source", folder, "--out", local, "--max-samples", 300, "--holdout-per-class", 3)
    s3_server.download_prefix(bucket, "shards", tmp_path / "from_s3")
    assert_same_shard_set(tmp_path / "from_s3", local, source, str(folder))
    manifest = json.loads((local / "manifest.json").read_text())
    assert manifest["options"]["source_format"] == "imagefolder"
    assert manifest["totals"]["val"]["samples"] == 30


def test_a_shard_over_the_multipart_threshold_round_trips(s3_server, tmp_path):
    big = write_synset_tars(tmp_path / "big", size=256)
    bucket = s3_server.create_bucket()
    out = f"s3://{bucket}/big"
    env = s3_server.subprocess_env()
    run_prep("shard", "--source", big, "--out", out, "--max-samples", 0, env=env)
    manifest = json.loads(s3_server.client().get_object(Bucket=bucket, Key="big/manifest.json")["Body"].read())
    assert [s["name"] for s in manifest["shards"]] == ["train/shard-000000.tar"]
    entry = manifest["shards"][0]
    assert entry["samples"] == 1797 and entry["bytes"] > MULTIPART_THRESHOLD

    head = s3_server.client().head_object(Bucket=bucket, Key="big/train/shard-000000.tar")
    assert head["ContentLength"] == entry["bytes"]
    parts = head["ETag"].strip('"').rpartition("-")[2]
    assert "-" in head["ETag"] and int(parts) >= 2, f"not a multipart upload: ETag {head['ETag']}"
    data = s3_server.client().get_object(Bucket=bucket, Key="big/train/shard-000000.tar")["Body"].read()
    assert hashlib.sha256(data).hexdigest() == entry["sha256"]

    proc = run_prep("verify", out, "--workers", 2, env=env, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 shards, 1797 samples: OK" in proc.stdout


def test_verify_names_a_corrupted_shard_object(s3_server, tars, tmp_path):
    bucket = s3_server.create_bucket()
    out = f"s3://{bucket}/shards"
    env = s3_server.subprocess_env()
    run_prep("shard", "--source", tars, "--out", out, "--max-samples", 400, env=env)
    assert run_prep("verify", out, env=env, check=False).returncode == 0

    client = s3_server.client()
    key, name = "shards/train/shard-000001.tar", "train/shard-000001.tar"
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0xFF
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))

    proc = run_prep("verify", out, env=env, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"{name}: sha256 differs from the manifest" in proc.stdout
    problems = proc.stdout.strip().splitlines()[:-1]
    assert problems and all(line.startswith(name) for line in problems), proc.stdout
    assert proc.stdout.strip().splitlines()[-1].endswith(f"FAILED: {len(problems)} problem(s)")


def test_requests_are_really_signed(s3_server, tmp_path):
    from botocore import UNSIGNED
    from botocore.exceptions import ClientError

    bucket = s3_server.create_bucket()
    s3_server.client().put_object(Bucket=bucket, Key="a/object", Body=b"payload")
    assert s3_server.client().get_object(Bucket=bucket, Key="a/object")["Body"].read() == b"payload"

    wrong = s3_server.client(secret_key="not-" + s3_server.secret_key)
    for call in (
        wrong.list_buckets,
        lambda: wrong.get_object(Bucket=bucket, Key="a/object"),
        lambda: wrong.put_object(Bucket=bucket, Key="a/other", Body=b"x"),
    ):
        with pytest.raises(ClientError) as err:
            call()
        assert err.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    unknown = s3_server.client(access_key="NOSUCHKEY0000000")
    with pytest.raises(ClientError) as err:
        unknown.list_objects_v2(Bucket=bucket)
    assert err.value.response["Error"]["Code"] in ("InvalidAccessKeyId", "AccessDenied")
    anonymous = s3_server.client(signature_version=UNSIGNED)
    with pytest.raises(ClientError) as err:
        anonymous.get_object(Bucket=bucket, Key="a/object")
    assert err.value.response["Error"]["Code"] == "AccessDenied"
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == ["a/object"]  # the refused put left nothing

    # and data_prep itself fails, without writing, when its key is wrong
    env = s3_server.subprocess_env(AWS_SECRET_ACCESS_KEY="wrong-secret")
    proc = run_prep("shard", "--source", f"s3://{bucket}/a", "--out", tmp_path / "out", env=env, check=False)
    assert proc.returncode != 0
    assert "SignatureDoesNotMatch" in proc.stderr or "403" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_rerun_on_s3_resumes_only_what_is_missing(s3_server, tars, tmp_path):
    """Two of three tasks done, and one of their shards lost with its record: the rerun writes just those."""
    bucket = s3_server.create_bucket()
    out = f"s3://{bucket}/resume"
    env = s3_server.subprocess_env()
    for task in (0, 1):
        run_prep("shard", "--source", tars, "--out", out, *ARGS, "--task-index", task, "--num-tasks", 3, env=env)
    client = s3_server.client()
    client.delete_object(Bucket=bucket, Key="resume/train/shard-000003.tar")
    client.delete_object(Bucket=bucket, Key="resume/_prep/done/train-000003.json")
    assert run_prep("finalize", out, env=env, check=False).returncode == 2
    proc = run_prep("shard", "--source", tars, "--out", out, *ARGS, env=env)
    summary = json.loads(proc.stdout)
    assert summary["shards_written"] == 1 + 3 and summary["manifest"] == f"{out}/manifest.json"  # 3 of task 2
    local = tmp_path / "local"
    run_prep("shard", "--source", tars, "--out", local, *ARGS)
    s3_server.download_prefix(bucket, "resume", tmp_path / "from_s3")
    assert_same_shard_set(tmp_path / "from_s3", local, str(tars), str(tars))


def test_read_many_keeps_a_bounded_number_of_requests_in_flight(s3_server, monkeypatch):
    """Prep reads a shard's images with read_many: it takes requests only as the caller consumes answers, so a
    shard of 1,000 big images is never held whole (it queued every request of a shard at once before)."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    from data_prep.shardset.store import open_store

    bucket = s3_server.create_bucket()
    client = s3_server.client()
    for i in range(40):
        client.put_object(Bucket=bucket, Key=f"src/{i:03d}.bin", Body=bytes([i]) * 1000)
    store = open_store(f"s3://{bucket}/src")
    taken = []

    def requests():
        for i in range(40):
            taken.append(i)
            yield f"{i:03d}.bin", 0, None

    answers = store.read_many(requests(), threads=4)
    first = next(answers)
    assert first == bytes([0]) * 1000 and len(taken) <= 8  # 2 x threads ahead, not all 40
    rest = list(answers)
    assert [a[:1] for a in rest] == [bytes([i]) for i in range(1, 40)] and len(taken) == 40
