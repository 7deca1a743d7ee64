"""A real ``kill -9`` of ``imagereward score-dataset`` (twice), then a rerun: every row exactly once, same scores.

Also: the same command under ``accelerate launch`` with two CPU processes shards and merges.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ImageReward.scoring.writers import parts_dir, read_journal, read_output

pytestmark = pytest.mark.integration  # end-to-end runs: minutes on 2 cores (CI runs them)

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
ROWS = 240


@pytest.fixture
def dataset(tmp_path, tiny_model):
    """A saved tiny model and a JSONL of ROWS distinct (prompt, image) pairs over 24 image files."""
    tiny_model.save_pretrained(tmp_path / "model")
    (tmp_path / "imgs").mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (36, 44, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    rows = [{"id": f"k{i}", "prompt": f"prompt number {i}", "image": f"imgs/{i % 24}.png"} for i in range(ROWS)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path, rows


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    return env


def _command(folder: Path, output: Path) -> list[str]:
    return [sys.executable, "-m", "ImageReward.cli", "score-dataset", str(folder / "pairs.jsonl"), "-o", str(output),
            "--model", str(folder / "model"), "--batch-size", "2", "--num-workers", "1", "--no-progress"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _run_and_kill(command: list[str], output: Path, at_least: int) -> int:
    """Start ``command``, SIGKILL it once ``output`` has ``at_least`` lines; returns the lines seen then."""
    process = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while _lines(output) < at_least:
            assert process.poll() is None, f"finished before the kill: {process.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "no progress within 120 s"
            time.sleep(0.005)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    return _lines(output)


def test_kill_9_twice_then_rerun_gives_every_row_exactly_once(dataset):
    folder, rows = dataset
    output = folder / "scores.jsonl"
    first = _run_and_kill(_command(folder, output), output, 30)
    assert 30 <= first < ROWS
    second = _run_and_kill(_command(folder, output), output, first + 30)
    assert second < ROWS
    done = subprocess.run(_command(folder, output), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["resumed"] >= second - 2 and summary["resumed"] + summary["scored"] == ROWS

    got = read_output(output)
    ids = [r["id"] for r in got]
    assert len(ids) == len(set(ids)) == ROWS and ids == [r["id"] for r in rows]  # no duplicate, none missing
    assert all(r["error"] is None for r in got)
    import ImageReward as RM

    model = RM.load(str(folder / "model"), device="cpu")
    reference = model.score_batch([r["prompt"] for r in rows], [str(folder / r["image"]) for r in rows],
                                  batch_size=24)
    torch.testing.assert_close(torch.tensor([r["score"] for r in got]), reference, atol=1e-5, rtol=0)


@pytest.mark.skipif(shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None,
                    reason="accelerate is not installed")
def test_accelerate_launch_two_processes_shard_and_merge(dataset):
    folder, rows = dataset
    output = folder / "scores.parquet"
    pytest.importorskip("pyarrow")
    launcher = str(Path(sys.executable).parent / "accelerate")
    command = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", str(_free_port()), "-m", "ImageReward.cli", "score-dataset",
               str(folder / "pairs.jsonl"), "-o", str(output), "--model", str(folder / "model"), "--limit", "60",
               "--num-workers", "0", "--batch-size", "8", "--no-progress"]
    # a previous, killed single-process run left 10 rows in a journal: they must not be scored again
    import ImageReward as RM
    from ImageReward.scoring.runner import DistributedContext, score_dataset

    score_dataset(RM.load(str(folder / "model"), device="cpu"), folder / "pairs.jsonl", folder / "first.jsonl",
                  limit=10, model_name=str(folder / "model"), progress=False, context=DistributedContext())
    parts_dir(output).mkdir()
    shutil.copy(folder / "first.jsonl", parts_dir(output) / "rank-00000-of-00001.jsonl")
    run = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and summary["total_rows"] == 60 and summary["resumed"] == 5
    got = read_output(output)
    assert [r["id"] for r in got] == [r["id"] for r in rows[:60]] and not parts_dir(output).exists()
    first = {r["id"]: r["score"] for r in read_journal(folder / "first.jsonl")}
    assert {r["id"]: r["score"] for r in got[:10]} == pytest.approx(first, abs=1e-6)
