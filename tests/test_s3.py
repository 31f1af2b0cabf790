"""The smoke run with storage.root on S3: moto's real S3 server on loopback, s3fs as on AWS."""

import json

import pytest
import s3fs
import yaml

from raypipe.config import S3Config
from raypipe.storage import RunPaths
from tests.conftest import raypipe

KEY_ID, SECRET = "AKIARAYPIPETEST", "sEcReT-raypipe-do-not-log"


@pytest.fixture(scope="module")
def s3_run(s3_endpoint):
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, key=KEY_ID, secret=SECRET)
    fs.mkdir("raypipe-test")
    done = raypipe(
        "run", "--smoke-test",
        "--set", "storage.root=s3://raypipe-test/runs",
        "--set", f"storage.s3.endpoint_url={s3_endpoint}",
        "--set", f"storage.s3.access_key_id={KEY_ID}",
        "--set", f"storage.s3.secret_access_key={SECRET}",
        "--set", "train.precision=bf16",
        env={"AWS_DEFAULT_REGION": "us-east-1"},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    uri = done.stdout.strip().splitlines()[-1]
    return uri, done, fs


def test_run_lands_on_s3_whole(s3_run, s3_endpoint):
    uri, _, fs = s3_run
    assert uri.startswith("s3://raypipe-test/runs/digits-")
    key = uri.removeprefix("s3://")
    report = json.loads(fs.cat_file(f"{key}/report.json"))
    assert report["train"]["epochs"] == 4 and report["train"]["checkpoint"].startswith(uri + "/checkpoints/")
    assert report["train"]["precision"] == "bf16"
    assert [v["name"] for v in report["variants"]] == ["fp32", "int8", "pruned", "pruned-int8"]
    assert all(v["uri"].startswith(uri) for v in report["variants"])
    # The finetune after pruning ran on Ray Train with its checkpoints on S3, like training's.
    assert fs.glob(f"{key}/compress/pruned-*/checkpoints/checkpoint_*/checkpoint.pt")
    assert report["variants"][2]["recipe"][1]["finetune"]["checkpoint"].startswith(uri + "/compress/pruned-")
    assert fs.glob(f"{key}/data/train/*.parquet") and fs.glob(f"{key}/checkpoints/checkpoint_*/checkpoint.pt")
    paths = RunPaths.open(uri, S3Config(endpoint_url=s3_endpoint, access_key_id=KEY_ID, secret_access_key=SECRET))
    manifest = paths.read_json("MANIFEST.json")
    assert "models/int8/model.onnx" in manifest["files"] and "report.json" in manifest["files"]
    assert paths.verify() == []


def test_secrets_never_logged_nor_written(s3_run):
    uri, done, fs = s3_run
    key = uri.removeprefix("s3://")
    assert SECRET not in done.stdout + done.stderr and KEY_ID not in done.stdout + done.stderr
    objects = fs.find(key)
    assert len(objects) > 10
    for obj in objects:  # every object of the run, checkpoints and shards included
        blob = fs.cat_file(obj)
        assert SECRET.encode() not in blob and KEY_ID.encode() not in blob, obj
    assert "endpoint_url" in yaml.safe_load(fs.cat_file(f"{key}/config.yaml"))["storage"]["s3"]


def test_runs_lists_sealed_and_incomplete_runs_on_s3(s3_run, s3_endpoint):
    uri, _, fs = s3_run
    run_id = uri.rsplit("/", 1)[1]
    # A run that died after training: its config, data and train.json, no report, no manifest.
    unfinished = "raypipe-test/runs/digits-20991231-235959-abcdef"
    for rel in ("config.yaml", "train.json", "data/stats.json"):
        fs.pipe(f"{unfinished}/{rel}", fs.cat(f"raypipe-test/runs/{run_id}/{rel}"))
    env = {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET,
           "AWS_DEFAULT_REGION": "us-east-1"}
    done = raypipe("runs", "s3://raypipe-test/runs", "--json", env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)
    assert [r["id"] for r in listed] == ["digits-20991231-235959-abcdef", run_id]  # newest first
    assert listed[0]["state"] == "incomplete: trained" and listed[0]["promoted"] is None
    promoted = json.loads(fs.cat_file(f"raypipe-test/runs/{run_id}/report.json"))["promoted"]
    assert listed[1]["state"] == "sealed" and listed[1]["promoted"] == promoted and listed[1]["uri"] == uri
    assert listed[1]["best_val_accuracy"] > 0.5 and listed[1]["promoted_size_bytes"] > 0
    assert SECRET not in done.stdout + done.stderr
