"""The main job end to end, smaller, against the real servers: shards on S3, an MLflow tracking server whose
artifacts live on S3, pretraining and fine-tuning on 2 ranks through the launch scripts, registration, and the
registered model pulled back by alias in a fresh process that predicts held-out images."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from servers import REPO, start_mlflow_server


@pytest.mark.slow
@pytest.mark.s3
def test_main_job_on_s3_with_a_tracking_server(s3_server, tmp_path):
    bucket = s3_server.create_bucket("e2e")
    server = start_mlflow_server(
        tmp_path / "mlflow",
        env={
            **s3_server.env,
            "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint_url,
            "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{bucket}/mlflow",
        },
    )
    try:
        env = {
            **s3_server.subprocess_env(),
            "MLFLOW_TRACKING_URI": server.uri,
            "PYTHON": sys.executable,
            "SWIN_MODEL_CACHE": str(tmp_path / "models"),
        }
        env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        # the README's command, from the user's own folder: the relative workdir is that folder's
        proc = subprocess.run(
            [
                "bash",
                str(REPO / "run_demo.sh"),
                "--workdir",
                "demo",
                "--shards-url",
                f"s3://{bucket}/data",
                "--pretrain-epochs",
                "3",
                "--finetune-epochs",
                "3",
                "--predict-images",
                "30",
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=1500,
        )
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
        out = proc.stdout
        keys = [
            o["Key"]
            for page in s3_server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])
        ]
        assert "data/shards/manifest.json" in keys and "data/shards_1k/manifest.json" in keys
        assert any(re.search(r"mlflow/.*/model/step_\d+/artifacts/model/model.safetensors$", k) for k in keys)
        assert f"tracking URI: {server.uri} (from MLFLOW_TRACKING_URI)" in out
        client = MlflowClient(server.uri)
        pretrained = client.get_model_version_by_alias("tiny_22k", "candidate")
        candidate = client.get_model_version_by_alias("tiny_22kto1k", "candidate")
        for version in (pretrained, candidate):  # whole schedules: not cut short
            assert client.get_run(version.run_id).info.status == "FINISHED"
            assert (
                "stopped_before_schedule_end" not in version.tags
                and version.tags["steps"] == version.tags["schedule_steps"]
            ), version.tags
        # the round trip: the candidate evaluated, promoted (no champion before), pulled back as the champion
        assert client.get_model_version_by_alias("tiny_22kto1k", "champion").version == candidate.version
        scored = re.search(
            r"models:/tiny_22kto1k/\d+ on s3://\S+ \(split val, (\d+) samples\): loss [\d.]+, "
            r"top-1 ([\d.]+)%",
            out,
        )
        assert scored and int(scored.group(1)) == 100, out[-3000:]  # 5 digits x 20 held out (the unseen synset: none)
        top1_tags = {
            k: v
            for k, v in client.get_model_version("tiny_22kto1k", candidate.version).tags.items()
            if k.startswith("eval.") and k.endswith(".val.top1")
        }
        assert len(top1_tags) == 1 and abs(float(*top1_tags.values()) - float(scored.group(2))) < 0.01, top1_tags
        assert (
            "names no version of tiny_22kto1k yet: the first promotion of champion" in out
            and "champion -> version" in out
        )
        assert "mlflow models serve -m models:/tiny_22kto1k@champion --env-manager local" in out
        accuracy = float(re.search(r"top-1 on 30 held-out images: ([\d.]+)%", out).group(1))
        assert accuracy > 100 / 6 + 10, out[-3000:]  # well above chance over the 6 classes
        for stage in ("[1/8]", "[4/8] pretrain", "[5/8] fine-tune", "[6/8] evaluate", "[7/8] pull", "[8/8] summary"):
            assert stage in out
        assert re.search(r"val top-1 [\d.]+% before .* [\d.]+% after", out)
        experiment = client.get_experiment(client.get_run(pretrained.run_id).info.experiment_id)
        assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's model-training view
        assert (
            f"MLflow UI:  {server.uri}/#/experiments/{experiment.experiment_id}?workflowType=machine_learning" in out
        ), out[-3000:]
    finally:
        server.stop()
    assert (tmp_path / "demo" / "runs" / "tiny_22kto1k" / "model" / "model.json").is_file()
    # the logs hold what a user needs: text without terminal codes, no library noise that does not apply here
    for log in ("pretrain.log", "finetune.log"):
        text = (tmp_path / "demo" / log).read_text()
        for noise in (
            "\x1b[",
            "Setting CUDA_VISIBLE_DEVICES",
            "FutureWarning",
            "Add type hints",
            "Downloading artifacts",
            "Loading checkpoint shards",
        ):
            assert noise not in text, (log, noise)
    assert "\x1b[" not in proc.stdout + proc.stderr
    assert not os.path.exists(tmp_path / "demo" / "shards")  # the shards went to S3 only


def test_a_relative_local_store_is_the_folder_the_demo_runs_from(tmp_path):
    """The demo's stages run in the repository, so a relative MLFLOW_TRACKING_URI is made absolute against the
    folder the demo was started from, and that absolute URI is what each stage's process is given; a server's URI
    stays as it is, and no URI means the runs folder's store (the one its training runs use)."""
    from pipeline.demo import stage_env, tracking_store

    mine = tracking_store(tmp_path / "runs", tmp_path, {"MLFLOW_TRACKING_URI": "sqlite:///mine/mlflow.db"})
    assert mine.uri == f"sqlite:///{tmp_path / 'mine' / 'mlflow.db'}"
    assert stage_env(mine)["MLFLOW_TRACKING_URI"] == mine.uri
    server = tracking_store(tmp_path / "runs", tmp_path, {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"})
    assert server.uri == "http://127.0.0.1:5000"
    local = tracking_store(tmp_path / "runs", tmp_path, {})
    assert local.uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow' / 'mlflow.db'}"
