"""End-to-end: scripts/test.sh and scripts/test-benchmark.sh offline on a tiny saved ImageReward and
generated images; rerun from the score cache; typed failures for missing data and unknown models."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ImageReward as RM
from ImageReward.commands.eval import main_benchmark, main_preference
from ImageReward.models.blip import BLIPConfig
from ImageReward.scorer import Scorer

pytestmark = pytest.mark.integration  # end-to-end runs: minutes on 2 cores (CI runs them)

REPO = Path(__file__).resolve().parents[1]


def original_acc(rankings, rewards):
    """The original test.py `acc`, transcribed (pooled; human ties skipped; model ties wrong)."""
    tol = true = 0
    for base, item in zip(rankings, rewards):
        for i in range(len(base)):
            for j in range(i + 1, len(base)):
                if base[i] != base[j]:
                    tol += 1
                    true += (item[i] > item[j]) if base[i] < base[j] else (item[i] < item[j])
    return true / tol


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny ImageReward saved with save_pretrained, a 4-prompt test set, and 2 benchmark 'generators'."""
    root = tmp_path_factory.mktemp("eval_world")
    torch.manual_seed(0)
    model = RM.ImageReward(BLIPConfig.tiny()).eval()
    with torch.no_grad():  # spread the rewards so that ranks are well separated
        for layer in model.mlp.layers:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0.0, 2.0 / layer.in_features ** 0.5)
    model.save_pretrained(root / "tiny_ir")
    rng = np.random.default_rng(0)

    def image(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (36, 44, 3), dtype=np.uint8)).save(path)

    rankings = [[1, 2, 3, 4], [2, 1, 1, 3, 5], [1, 1, 2], [3, 2, 1, 4]]
    items = []
    for p, ranking in enumerate(rankings):
        generations = [f"part-{p:06d}/images/0001/{k}.png" for k in range(len(ranking))]
        for g in generations:
            image(root / "data" / "test_images" / g)
        items.append({"id": f"{p:06d}-0001", "prompt": f"a picture of thing {p}", "generations": generations,
                      "ranking": ranking})
    (root / "data" / "test.json").write_text(json.dumps(items))
    prompts = [{"id": f"b{p}", "prompt": f"benchmark prompt {p}"} for p in range(3)]
    (root / "benchmark").mkdir()
    (root / "benchmark" / "benchmark-prompts.json").write_text(json.dumps(prompts))
    for generator in ("genA", "genB"):
        for prompt in prompts:
            for k in range(2):
                image(root / "benchmark" / "generations" / generator / f"{prompt['id']}_{k}.png")
    return root


def _run(script, *args):
    env = dict(os.environ, PYTHON=sys.executable, HF_HUB_OFFLINE="1", IR_TEST_THREADS="1")
    done = subprocess.run(["bash", str(REPO / "scripts" / script), *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_preference_script_end_to_end(world):
    out = world / "out"
    stdout = _run("test.sh", "--model_type", world / "tiny_ir", "--source_path", world / "data" / "test.json",
                  "--img_prefix", world / "data" / "test_images", "--target_dir", out,
                  "--rm_path", world / "ckpt", "--bootstrap", "200")
    assert "4 prompts, 16 images, 23 pairs (2 human ties skipped)" in stdout
    source = json.loads((world / "data" / "test.json").read_text())
    written = json.loads((out / "test_tiny_ir.json").read_text(encoding="utf-8"))
    assert [w["id"] for w in written] == [s["id"] for s in source]
    assert set(written[0]) == {"id", "prompt", "ranking", "rewards"}
    # rewards are the model's own scores; ranking is the 1-based rank of each image (1 = highest reward)
    model = RM.load(str(world / "tiny_ir"), device="cpu")
    for entry, record in zip(source, written):
        direct = model.score(entry["prompt"], [str(world / "data" / "test_images" / g) for g in entry["generations"]])
        assert record["rewards"] == pytest.approx(direct, rel=1e-5, abs=1e-5)
        order = sorted(range(len(direct)), key=lambda i: -record["rewards"][i])
        assert [order.index(i) + 1 for i in range(len(direct))] == record["ranking"]
    accuracy = original_acc([s["ranking"] for s in source], [w["rewards"] for w in written])
    assert f"         tiny_ir Test Acc: {100 * accuracy:.2f}%" in stdout.splitlines()
    row = next(line for line in stdout.splitlines() if line.startswith("| tiny_ir |"))
    assert row.split("|")[2].strip().startswith(f"{100 * accuracy:.2f} [")
    summary = json.loads((out / "eval_summary.json").read_text())
    assert summary["dataset"]["strict_pairs"] == 23 == summary["results"][0]["strict_pairs"]
    assert summary["results"][0]["metrics"]["original"]["value"] == pytest.approx(accuracy)
    report = (out / "report.html").read_text(encoding="utf-8")
    assert "<svg" in report and report.count("<img ") == 16
    # prompt 1 (ranking [2, 1, 1, 3, 5]): images shown in human order 1, 2, 0, 3, 4
    shown = re.findall(r"part-000001/images/0001/(\d)\.png'>", report)
    assert shown == ["1", "2", "0", "3", "4"]
    assert (world / "ckpt").is_dir()  # --rm_path is created, as the original did


def test_rerun_is_served_from_the_cache(world, monkeypatch, capsys):
    out = world / "out"
    if not (out / "score_cache.sqlite").is_file():
        pytest.skip("needs the cache written by test_preference_script_end_to_end")
    before = json.loads((out / "test_tiny_ir.json").read_text())

    def no_scoring(*args, **kwargs):
        raise AssertionError("a rerun must not score anything")

    monkeypatch.setattr(Scorer, "score_batch", no_scoring)
    code = main_preference(["--model_type", str(world / "tiny_ir"), "--source_path", str(world / "data" / "test.json"),
                            "--img_prefix", str(world / "data" / "test_images"), "--target_dir", str(out),
                            "--bootstrap", "0", "--no-report", "--device", "cpu"])
    assert code == 0
    assert json.loads((out / "test_tiny_ir.json").read_text()) == before
    assert "tiny_ir Test Acc:" in capsys.readouterr().out


def test_benchmark_script_end_to_end(world):
    results = world / "bench_results"
    stdout = _run("test-benchmark.sh", "--prompts_path", world / "benchmark" / "benchmark-prompts.json",
                  "--img_dir", world / "benchmark" / "generations", "--result_dir", results,
                  "--model", "genA, genB", "--benchmark", world / "tiny_ir", "--human-ranking", "genA=1,genB=2",
                  "--no-download")
    totals = json.loads((results / "tiny_ir-benchmark-results.json").read_text())
    assert list(totals) == ["genA", "genB"]
    model = RM.load(str(world / "tiny_ir"), device="cpu")
    prompts = json.loads((world / "benchmark" / "benchmark-prompts.json").read_text())
    for generator in ("genA", "genB"):
        rows = json.loads((results / "tiny_ir" / f"tiny_ir-benchmark-{generator}-result.json").read_text())
        means = []
        for prompt, row in zip(prompts, rows):
            paths = [str(world / "benchmark" / "generations" / generator / f"{prompt['id']}_{k}.png") for k in range(2)]
            direct = model.score(prompt["prompt"], paths)
            assert row["rewards"] == pytest.approx(direct, rel=1e-5, abs=1e-5)
            assert row["mean_score"] == pytest.approx(float(np.mean(direct)), rel=1e-5, abs=1e-5)
            means.append(float(np.mean(direct)))
        assert totals[generator] == pytest.approx(float(np.mean(means)), rel=1e-5, abs=1e-5)
        assert f"| {generator} | {totals[generator]:.4f} |" in stdout
    expected_rho = 1.0 if totals["genA"] > totals["genB"] else -1.0
    assert re.search(rf"\| Spearman rho \|  \| {expected_rho:.2f} \|", stdout), stdout


def test_missing_data_and_unknown_models_fail_cleanly(world, tmp_path, capsys):
    # a fresh clone, offline: the default generators are missing and cannot be downloaded
    code = main_benchmark(["--prompts_path", str(world / "benchmark" / "benchmark-prompts.json"),
                           "--img_dir", str(tmp_path / "generations"), "--result_dir", str(tmp_path / "r")])
    assert code == 1  # a failed download is a failure, not a usage error
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err
    code = main_preference(["--model_type", "NoSuchScorer", "--source_path", str(world / "data" / "test.json"),
                            "--img_prefix", str(world / "data" / "test_images"), "--target_dir", str(tmp_path / "o"),
                            "--no-cache"])
    assert code == 2
    assert "NoSuchScorer" in capsys.readouterr().err


def test_eval_preference_on_imagerewarddb_split(world, tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    import zipfile

    root = tmp_path / "ImageRewardDB"
    (root / "images" / "test").mkdir(parents=True)
    source = json.loads((world / "data" / "test.json").read_text())
    rows = {"image_path": [], "prompt_id": [], "prompt": [], "rank": []}
    with zipfile.ZipFile(root / "images" / "test" / "test_1.zip", "w") as zf:
        for entry in source:
            for k, (generation, rank) in enumerate(zip(entry["generations"], entry["ranking"])):
                name = f"{entry['id']}_{k}.png"
                zf.write(world / "data" / "test_images" / generation, f"test_1/{name}")
                rows["image_path"].append(f"images/test/test_1/{name}")
                rows["prompt_id"].append(entry["id"])
                rows["prompt"].append(entry["prompt"])
                rows["rank"].append(rank)
    pq.write_table(pa.table(rows), root / "metadata-test.parquet")
    out = tmp_path / "out"
    code = main_preference(["--model_type", str(world / "tiny_ir"), "--imagerewarddb-split", "test",
                            "--imagerewarddb-root", str(root), "--no-download", "--target_dir", str(out),
                            "--bootstrap", "0", "--device", "cpu"])
    assert code == 0
    stdout = capsys.readouterr().out
    assert "4 prompts, 16 images, 23 pairs (2 human ties skipped)" in stdout
    written = json.loads((out / "test_tiny_ir.json").read_text())
    accuracy = original_acc([s["ranking"] for s in source], [w["rewards"] for w in written])
    assert f"tiny_ir Test Acc: {100 * accuracy:.2f}%" in stdout
    assert "ImageRewardDB test" in (out / "report.html").read_text(encoding="utf-8")
