"""benchmarks/gpu_check.sh: the one GPU check. The smoke run (every case on CPU, tiny configs) is what keeps the
script from rotting before a GPU is lent; the small tests pin its parts (ViT FLOPs, the peak table, budgets)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_score  # noqa: E402
import gpu_check  # noqa: E402


@pytest.mark.parametrize("name", ["ImageReward", "CLIP", "HPSv2"])
def test_vit_flops_from_the_config_equal_what_pytorch_counts(name):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from ImageReward.models.kernels import reference_kernels

    model = bench_score.build_model(True, "fp32") if name == "ImageReward" else bench_score.build_baseline(name, True)
    tower, shape = bench_score.vision_tower(model)
    pixels = torch.rand(3, 3, shape[0], shape[0])
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), reference_kernels(), \
            torch.no_grad():
        tower(pixels)
    assert counter.get_total_flops() == 3 * bench_score.vit_flops(*shape)


def test_vit_flops_of_imagereward_full_size():
    # ViT-L/16 at 224 px: 197 tokens, 24 blocks of width 1024, MLP 4096 (~123 GFLOP per image; the README's
    # "about 126 GFLOP per image" is the whole engine, text side included)
    flops = bench_score.vit_flops(224, 16, 1024, 24, 4096)
    per_block = 2 * 197 * (4 * 1024**2 + 2 * 1024 * 4096) + 4 * 197**2 * 1024
    assert flops == 2 * 196 * 3 * 256 * 1024 + 24 * per_block
    assert 120e9 < flops < 125e9


@pytest.mark.parametrize("device, peak", [("NVIDIA H100 80GB HBM3", 989.5), ("NVIDIA H100 PCIe", 756.0),
                                          ("NVIDIA H100 NVL", 835.0), ("NVIDIA H200", 989.5),
                                          ("NVIDIA H200 NVL", 835.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                          ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA GeForce RTX 4090", None),
                                          (None, None)])
def test_peak_table_picks_the_most_specific_entry(device, peak):
    tflops, source = gpu_check.peak_bf16(device)
    assert tflops == peak
    assert (source is None) == (peak is None)


def test_a_pending_case_is_skipped_with_why():
    env = gpu_check.child_env(smoke=True)
    missing = gpu_check.Case("x/missing", "", "other", ("benchmarks/bench_nothing.py", "--json", "{json}"),
                             ("benchmarks/bench_nothing.py", "--json", "{json}"), 10, pending="issue 0")
    assert gpu_check.unavailable(missing, True, env) == "not in this tree: benchmarks/bench_nothing.py missing (issue 0)"
    option = gpu_check.Case("x/option", "", "score", ("benchmarks/bench_score.py", "--no-such-option"),
                            ("benchmarks/bench_score.py", "--no-such-option", "--json", "{json}"), 10,
                            pending="issue 0", requires=("NoSuchScorer",))
    why = gpu_check.unavailable(option, True, env)
    assert why == "not in this tree: benchmarks/bench_score.py --help has no --no-such-option, NoSuchScorer (issue 0)"
    present = gpu_check.Case("x/present", "", "score", ("benchmarks/bench_score.py", "--json", "{json}"),
                             ("benchmarks/bench_score.py", "--quick", "--json", "{json}"), 10, pending="issue 0",
                             requires=("PickScore",))
    assert gpu_check.unavailable(present, True, env) is None


@pytest.mark.integration
def test_a_case_over_its_budget_is_stopped_with_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    script = ("import subprocess, sys, time; "
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
              f"open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(120)")
    case = gpu_check.Case("x/sleep", "", "other", ("-c", script), ("-c", script), 1.0)
    start = time.monotonic()
    record = gpu_check.run_case(case, True, 3.0, tmp_path, gpu_check.child_env(smoke=True))
    assert record["status"] == "over-budget"
    assert time.monotonic() - start < 30
    child = int(pid_file.read_text())
    for _ in range(50):  # orphaned, then reaped by init once killed
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the case's child process {child} outlived the case")


@pytest.mark.integration
def test_smoke_run_lists_every_case_with_a_status_and_numbers(tmp_path):
    """`bash benchmarks/gpu_check.sh --smoke` (about 3 minutes on 2 cores): every case of the table in the JSON,
    none failed, the ones that ran with their figures; the Markdown names every case."""
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke", "--out", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=1500,
                         env={**os.environ, "PYTHON": sys.executable})  # this interpreter, venv or not
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["mode"] == "smoke" and report["environment"]["torch"] == torch.__version__
    cases = {case["name"]: case for case in report["cases"]}
    assert list(cases) == [case.name for case in gpu_check.CASES]
    for case in gpu_check.CASES:
        entry = cases[case.name]
        assert entry["status"] in ("ran", "skipped", "over-budget"), (case.name, entry)
        if case.pending is None:
            assert entry["status"] != "skipped", (case.name, entry.get("why"))
        elif entry["status"] == "skipped":
            assert entry["why"].startswith("not in this tree: "), entry["why"]
        if entry["status"] != "ran":
            continue
        result = entry["result"]
        assert entry["command"].startswith("python benchmarks/") and entry["seconds"] > 0
        if case.kind == "score":
            for row in result["rows"]:
                assert row["pairs_per_s"] > 0
                # the ViT share: every ViT scorer's own path (HPSv3's Qwen2-VL tower is no square ViT: none)
                scorer = row["config"].split(":")[0]
                assert scorer.endswith("original") or scorer.startswith("HPSv3") or row["vit_tflop_per_s"] > 0
        elif case.kind == "refl":
            assert [row["config"] for row in result["rows"]] == gpu_check.expected_configs(case, True)
            assert all(row["s_per_update"] > 0 and row["loss_finite"] for row in result["rows"])
        elif case.kind == "dataset":
            assert result["images_per_s"] and all(value > 0 for value in result["images_per_s"].values())
    ran_kinds = {case.kind for case in gpu_check.CASES if cases[case.name]["status"] == "ran"}
    assert {"score", "refl", "dataset"} <= ran_kinds
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert all(name in markdown for name in cases)
    ratio = next(line for line in markdown.splitlines() if "| batched-bf16:1x4 |" in line).split("|")[4]
    assert ratio.strip().endswith("x")  # beside the original code path, in the same case
