"""``score-dataset --engine ray`` on a real local Ray cluster of two raylets (1 CPU each, every process on
127.0.0.1, started and stopped here by ``ray.cluster_utils.Cluster``): every row scored exactly once and equal to
the single-process engine; losing the second raylet mid-run; killing the driver and rerunning."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from ImageReward.errors import InvalidInputError
from ImageReward.scoring.datasets import read_records
from ImageReward.scoring.ray_engine import score_dataset_ray, shard_output_path
from ImageReward.scoring.runner import DistributedContext, score_dataset
from ImageReward.scoring.writers import read_output
from shard_data import write_shards

# read when Ray is imported: every Ray process (and the drivers started below) binds to 127.0.0.1 only
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ray = pytest.importorskip("ray")
pytest.importorskip("webdataset")
pytestmark = pytest.mark.integration
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
# small fractions: after the second raylet is gone, the first still fits both actors and a decode task
RAY_ARGS = dict(actors=2, actor_cpus=0.25, decode_cpus=0.5, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def cluster():
    """Two raylets on 127.0.0.1 (head + one worker node), 1 CPU each; the driver (this process) connects."""
    from ray.cluster_utils import Cluster

    local = dict(num_cpus=1, object_store_memory=150 * 1024 * 1024)
    cluster = Cluster(initialize_head=True, head_node_args={**local, "include_dashboard": False})
    try:
        worker = cluster.add_node(**local)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        nodes = [node for node in ray.nodes() if node["Alive"]]
        assert len(nodes) == 2 and {node["NodeManagerAddress"] for node in nodes} == {"127.0.0.1"}
        yield cluster, worker
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny ImageReward of ``tests/conftest.py``'s ``tiny_model``, saved for the actors to load."""
    import ImageReward as RM
    from ImageReward.models.blip import BLIPConfig

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model")
    RM.ImageReward(BLIPConfig.tiny()).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory, model_dir):
    """12 shards x 8 samples, and their single-process scores ``{id: row}`` (the kill tests' reference)."""
    folder = tmp_path_factory.mktemp("many")
    write_shards(folder / "wds", shards=12, per_shard=8)
    return folder / "wds", _single_process(model_dir, folder / "wds", folder / "single.jsonl")


def _rows(folder: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(folder).to_pylist() if folder.is_dir() else []


def _single_process(model_dir: Path, shards: Path, out: Path) -> dict[str, dict]:
    import ImageReward as RM

    model = RM.load(str(model_dir), device="cpu")
    score_dataset(model, shards, out, batch_size=4, progress=False, context=DistributedContext())
    return {row["id"]: row for row in read_output(out)}


def test_two_raylets_score_every_row_once_equal_to_single_process(cluster, model_dir, tmp_path):
    shards = tmp_path / "wds"
    write_shards(shards, shards=4, per_shard=6, broken=True)
    out = tmp_path / "scores"
    summary = score_dataset_ray(str(model_dir), shards, out, **RAY_ARGS)
    assert summary["shards"] == 4 and summary["rows"] == 24 and summary["errors"] == 4
    assert sorted(p.name for p in out.iterdir()) == [f"shard-{s:05d}.parquet" for s in range(4)]
    got = _rows(out)
    ids = [row["id"] for row in got]
    assert len(ids) == len(set(ids)) == 24 and set(ids) == {r.id for r in read_records(shards)}
    reference = _single_process(model_dir, shards, tmp_path / "single.jsonl")
    for row in got:
        expected = reference[row["id"]]
        assert (row["prompt"], row["image"], row["error"] is None) == (
            expected["prompt"], expected["image"], expected["error"] is None), row["id"]
        if row["error"] is None:  # the same decoding, preprocessing and batch engine: the same float32
            assert row["score"] == expected["score"], row["id"]
    errors = {row["id"]: row["error"] for row in got if row["error"]}
    assert "cannot decode" in errors["shard-00000.tar/000000002"] and "cut short" in errors["shard-00003.tar/000030005"]

    again = score_dataset_ray(str(model_dir), shards, out, **RAY_ARGS)  # nothing left: no Ray work
    assert again["shards_resumed"] == 4 and again["rows"] == 0 and again["total_rows"] == 24
    with pytest.raises(InvalidInputError, match="other settings"):
        score_dataset_ray("ImageReward-v1.0", shards, out, model_name="another", **RAY_ARGS)


def _wait_for_files(folder: Path, count: int, deadline: float, alive=lambda: True) -> int:
    while time.monotonic() < deadline and alive():
        found = len(list(folder.glob("*.parquet"))) if folder.is_dir() else 0
        if found >= count:
            return found
        time.sleep(0.02)
    return len(list(folder.glob("*.parquet"))) if folder.is_dir() else 0


def _command(model_dir: Path, shards: Path, out: Path, address: str) -> list[str]:
    return [sys.executable, "-m", "ImageReward.cli", "score-dataset", str(shards), "-o", str(out), "--engine", "ray",
            "--address", address, "--model", str(model_dir), "--batch-size", "4", "--ray-actors", "2",
            "--ray-actor-cpus", "0.25", "--ray-decode-cpus", "0.5", "--no-progress"]


def test_killing_the_driver_then_rerunning_resumes(cluster, model_dir, many_shards, tmp_path):
    head, _ = cluster
    shards, reference = many_shards
    out = tmp_path / "scores"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    command = _command(model_dir, shards, out, head.address)
    driver = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        found = _wait_for_files(out, 2, time.monotonic() + 180, alive=lambda: driver.poll() is None)
        assert driver.poll() is None, f"the driver ended before the kill: {driver.stderr.read().decode()[-2000:]}"
        os.kill(driver.pid, signal.SIGKILL)
    finally:
        driver.wait(timeout=60)
    written = len(list(out.glob("*.parquet")))
    assert found >= 2 and written < 12, f"{written} of 12 shards written before the kill"
    # the rerun (here, in this process: the same function the CLI calls) skips the shards already written
    summary = score_dataset_ray(str(model_dir), shards, out, **RAY_ARGS)
    assert summary["shards_resumed"] == written and summary["total_rows"] == 96
    assert summary["rows"] == 96 - summary["rows_resumed"]
    got = _rows(out)
    ids = [row["id"] for row in got]
    assert len(ids) == len(set(ids)) == 96 and all(row["error"] is None for row in got)
    assert all(row["score"] == reference[row["id"]]["score"] for row in got)


def test_losing_the_second_raylet_mid_run_still_scores_every_row_once(cluster, model_dir, many_shards, tmp_path):
    head, worker = cluster
    shards, reference = many_shards
    out = tmp_path / "scores"
    result: dict = {}

    def run() -> None:
        try:
            result["summary"] = score_dataset_ray(str(model_dir), shards, out, **RAY_ARGS)
        except BaseException as err:  # noqa: BLE001 - reported by the test below
            result["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    found = _wait_for_files(out, 1, time.monotonic() + 180, alive=thread.is_alive)
    head.remove_node(worker, allow_graceful=False)  # SIGKILL the second raylet and its workers
    assert found < 12, "every shard finished before the raylet was killed"
    thread.join(timeout=300)
    assert not thread.is_alive(), "the run did not finish within 300 s after losing a node"
    assert "error" not in result, result.get("error")
    assert result["summary"]["rows"] == 96
    got = _rows(out)
    ids = [row["id"] for row in got]
    assert len(ids) == len(set(ids)) == 96 and all(row["error"] is None for row in got)
    assert all(row["score"] == reference[row["id"]]["score"] for row in got)
    assert shard_output_path(out, "shard-00011.tar").is_file()


def test_a_served_reward_scores_shards_on_ray_like_the_local_model(cluster, model_dir, tmp_path):
    """``--engine ray`` with ``http://...`` (a real ``imagereward serve`` process on 127.0.0.1): the actors send
    the decoded pixels to the server, which scores them with the same engine: equal to the single-process run on
    the local weights (within the remote protocol's 1e-5)."""
    pytest.importorskip("fastapi")
    from serving_helpers import ServerProcess

    shards = tmp_path / "wds"
    write_shards(shards, shards=2, per_shard=4, broken=True)
    server = ServerProcess(["--model", f"tiny={model_dir}"], tmp_path / "server.log")
    try:
        out = tmp_path / "scores"
        summary = score_dataset_ray(f"{server.url}/score/tiny", shards, out, **RAY_ARGS)
    finally:
        server.stop()
    reference = _single_process(model_dir, shards, tmp_path / "single.jsonl")
    got = _rows(out)
    assert summary["rows"] == len(got) == len(reference) == 7  # the last shard is cut short: 3 of its 4 samples
    assert {row["id"] for row in got} == set(reference) and sum(row["error"] is None for row in got) == 4
    for row in got:
        expected = reference[row["id"]]
        assert (row["error"] is None) == (expected["error"] is None), row["id"]
        if row["error"] is None:
            assert abs(row["score"] - expected["score"]) <= 1e-5, row["id"]
