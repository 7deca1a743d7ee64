"""One GPU check over the project's benchmarks: every speed and memory figure the README promises for GPUs.

Run it through ``bash benchmarks/gpu_check.sh`` (which sets the import path and does the setup; see its header).
Each case is one run of an existing benchmark with arguments (``bench_score.py``, ``bench_refl.py``,
``bench_score_dataset.py``, and the benchmarks other work adds), in its own process group, with a time budget: a
case over its budget is stopped and recorded as ``over-budget`` (with whatever it finished), and the rest still
run. The whole run also has a total budget (``--total-budget``, default 470 s): a case that would start with less
than 30 s of it left is skipped. Weights are random, built from configs: nothing is downloaded.

    bash benchmarks/gpu_check.sh                          # the GPU run: benchmarks/results/gpu_check.{md,json}
    bash benchmarks/gpu_check.sh --smoke --out /tmp/gc    # every case on CPU with tiny configs (minutes)
    bash benchmarks/gpu_check.sh --list                   # the cases, and which are not in this tree yet
    bash benchmarks/gpu_check.sh --cases 'score/*,refl/flux*'   # a subset (fnmatch patterns)
    python benchmarks/gpu_check.py --readme benchmarks/results/gpu_check.json   # README-ready tables

A case's status is ``ran``, ``over-budget`` (stopped at its budget), ``failed`` (non-zero exit, or a config that
gave no row: the reason is recorded) or ``skipped`` (with why: the benchmark or an option it needs is not in this
tree yet, not selected, or the total budget is spent). Cases for work not yet merged are in the table already
(``pending=``): they are detected at run time from their benchmark's ``--help`` (every option the command uses, and
the ``requires`` strings, must appear there), so wiring one in is editing its row, if anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fnmatch
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results"
FULL_TOTAL_BUDGET_S = 470  # under 8 minutes with the environment probe and the reports
SMOKE_TOTAL_BUDGET_S = 900  # a guard only: the smoke run takes about 3 minutes on 2 shared cores
MIN_CASE_S = 30  # a case is not started with less of the total budget left

# Dense bf16 tensor-core peak, TFLOP/s, by device name (first match wins; more specific names first). NVIDIA's
# datasheets give the figures "with sparsity"; the dense rate is half of it.
PEAK_BF16_TFLOPS: list[tuple[tuple[str, ...], float, str]] = [
    (("H100", "PCIe"), 756.0, "NVIDIA H100 Tensor Core GPU datasheet: BF16 1,513 TFLOPS with sparsity (H100 PCIe)"),
    (("H100", "NVL"), 835.0, "NVIDIA H100 Tensor Core GPU datasheet: BF16 1,671 TFLOPS with sparsity (H100 NVL)"),
    (("H100",), 989.5, "NVIDIA H100 Tensor Core GPU datasheet: BF16 1,979 TFLOPS with sparsity (H100 SXM)"),
    (("H200", "NVL"), 835.0, "NVIDIA H200 Tensor Core GPU datasheet: BF16 1,671 TFLOPS with sparsity (H200 NVL)"),
    (("H200",), 989.5, "NVIDIA H200 Tensor Core GPU datasheet: BF16 1,979 TFLOPS with sparsity (H200 SXM)"),
    (("A100",), 312.0, "NVIDIA A100 Tensor Core GPU datasheet: BF16 312 TFLOPS dense (624 with sparsity)"),
]

# Goals from issue 27 (the first GPU measurement sets the baseline).
GOAL_IMAGEREWARD_SPEEDUP = 20.0  # ImageReward bf16, batch 64, vs the original code path on the same GPU
GOAL_VIT_PEAK_SHARE = 0.5  # of the bf16 peak, in the ViT
GOAL_FLUX_GB = 80.0  # FLUX.1-dev LoRA K = 1 fits an 80 GB GPU (peak allocated; 80 GB = 74.5 GiB)


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark run. ``full`` / ``smoke`` are the arguments after ``python``; ``{json}`` becomes the file the
    benchmark writes its result to and ``{work}`` the run's scratch folder. ``kind`` picks the table its figures go
    in (score, refl, dataset, other). ``pending`` names the work that brings it (then availability is detected:
    the script must exist and its ``--help`` must show every option the command uses and each ``requires``)."""

    name: str
    what: str
    kind: str
    full: tuple[str, ...]
    smoke: tuple[str, ...]
    budget_s: float
    smoke_budget_s: float = 120.0
    pending: str | None = None
    requires: tuple[str, ...] = ()
    cleanup: tuple[str, ...] = ()  # folders under {work} removed after this case (real-size bases: disk space)

    def argv(self, smoke: bool) -> tuple[str, ...]:
        return self.smoke if smoke else self.full


def _score(name: str, what: str, full: list[str], smoke: list[str], budget: float, **kw) -> Case:
    common = ("--repeats", "2", "--json", "{json}")
    return Case(f"score/{name}", what, "score",
                ("benchmarks/bench_score.py", "--device", "cuda", "--configs", *full, *common),
                ("benchmarks/bench_score.py", "--quick", "--in-process", "--device", "cpu", "--configs", *smoke,
                 *common), budget, **kw)


def _refl(name: str, what: str, full: str, smoke: str, budget: float, extra: tuple[str, ...] = (), **kw) -> Case:
    common = ("--steps", "1", "--workdir", "{work}/refl", "--json", "{json}", *extra)
    return Case(f"refl/{name}", what, "refl",
                ("benchmarks/bench_refl.py", "--size", "real", "--device", "cuda", "--configs", full, *common),
                ("benchmarks/bench_refl.py", "--size", "tiny", "--device", "cpu", "--configs", smoke, *common),
                budget, **kw)


def _dataset(name: str, what: str, extra: tuple[str, ...], budget: float, **kw) -> Case:
    return Case(f"score-dataset/{name}", what, "dataset",
                ("benchmarks/bench_score_dataset.py", "--size", "full", "--images", "1024", "--batch-size", "64",
                 "--workers", "8", "--device", "cuda", "--dtype", "bf16", *extra, "--json", "{json}"),
                ("benchmarks/bench_score_dataset.py", "--size", "tiny", "--images", "8", "--batch-size", "4",
                 "--workers", "0", "--device", "cpu", "--dtype", "bf16", *extra, "--json", "{json}"),
                budget, **kw)


# In running order: the goals first, then the rest, then the cases of work not yet merged.
CASES: list[Case] = [
    _score("ImageReward", "ImageReward (BLIP ViT-L/16 + BERT), batch 64, fp32 / bf16 beside the original code path",
           ["original:1x64", "batched-fp32:1x64", "batched-bf16:1x64"],
           ["original:1x4", "batched-fp32:1x4", "batched-bf16:1x4"], 75),
    _refl("flux-lora-k1", "FLUX.1-dev LoRA r16, 512 px, bf16 + gradient checkpointing, K = 1 (builds the base)",
          "flux:lora16:bf16:ckpt", "flux:lora4:bf16:ckpt", 120),
    _refl("flux-lora-k4", "FLUX.1-dev LoRA r16, 512 px, bf16 + gradient checkpointing, K = 4",
          "flux:lora16:bf16:ckpt:k4", "flux:lora4:bf16:ckpt:k4", 75, cleanup=("refl/flux-real",)),
    _refl("sdxl-lora", "SDXL LoRA r4, 1024 px, bf16 + gradient checkpointing",
          "sdxl:lora4:bf16:ckpt", "sdxl:lora4:bf16:ckpt", 60, cleanup=("refl/sdxl-real",)),
    _refl("sd3.5-medium-lora", "SD3.5-medium LoRA r16, 512 px, bf16 + gradient checkpointing",
          "sd3:lora16:bf16:ckpt", "sd3:lora4:bf16:ckpt", 50),
    _refl("sd1.5-lora", "SD1.5 LoRA r4, 512 px, bf16 + gradient checkpointing",
          "sd1:lora4:bf16:ckpt", "sd1:lora4:bf16:ckpt", 35, cleanup=("refl/sd1-real",)),
    _dataset("ImageReward-bf16", "score-dataset (journaled, 8 DataLoader workers) on one GPU, ImageReward bf16, "
             "1024 JPEGs", (), 45),
    _score("HPSv2.1", "HPSv2.1 (ViT-H-14; HPSv2 is the same architecture), batch 64, fp32 / bf16; the original "
           "(hpsv2.score: checkpoint re-read per pair) at 1x8, compared per pair",
           ["HPSv2-original:1x8", "HPSv2-fp32:1x64", "HPSv2-bf16:1x64"],
           ["HPSv2-original:1x2", "HPSv2-fp32:1x4", "HPSv2-bf16:1x4"], 60),
    _score("PickScore", "PickScore (ViT-H-14), batch 64, fp32 / bf16 beside its model-card code",
           ["PickScore-original:1x64", "PickScore-fp32:1x64", "PickScore-bf16:1x64"],
           ["PickScore-original:1x4", "PickScore-fp32:1x4", "PickScore-bf16:1x4"], 45),
    _score("CLIP", "CLIP ViT-L/14, batch 64, fp32 / bf16 (no original path in bench_score.py)",
           ["CLIP-fp32:1x64", "CLIP-bf16:1x64"], ["CLIP-fp32:1x4", "CLIP-bf16:1x4"], 25),
    _score("BLIP", "BLIP ITC (ViT-L/16), batch 64, fp32 / bf16 (no original path in bench_score.py)",
           ["BLIP-fp32:1x64", "BLIP-bf16:1x64"], ["BLIP-fp32:1x4", "BLIP-bf16:1x4"], 25),
    _score("Aesthetic", "Aesthetic (CLIP ViT-L/14 + MLP), batch 64, fp32 / bf16 (no original path in bench_score.py)",
           ["Aesthetic-fp32:1x64", "Aesthetic-bf16:1x64"], ["Aesthetic-fp32:1x4", "Aesthetic-bf16:1x4"], 25),
    # --- the reward server, online RL, Ray and HPSv3 (issues 23-26) ---
    Case("serve/ImageReward-bf16-32-clients", "reward server (bf16) beside the field's Flask + gunicorn pattern, 32 "
         "concurrent single-image clients and 8-image requests (issue 23)", "other",
         ("benchmarks/bench_serve.py", "--device", "cuda", "--dtype", "bf16", "--workers", "1", "--configs", "32x1",
          "1x8", "--images", "128", "--json", "{json}"),
         ("benchmarks/bench_serve.py", "--quick", "--device", "cpu", "--configs", "32x1", "--images", "32",
          "--json", "{json}"),
         60),
    _refl("grpo-sd3.5-medium-lora", "online RL: one GRPO update, SD3.5-medium LoRA r16, 512 px, group 8 (issue 24)",
          "sd3:lora16:bf16:ckpt:grpo:g8", "sd3:lora4:bf16:ckpt:grpo", 90,
          cleanup=("refl/sd3-real",)),
    _dataset("ray-ImageReward-bf16", "score-dataset --engine ray on one GPU, ImageReward bf16 (issue 25)",
             ("--ray",), 60),
    Case("score/HPSv3", "HPSv3 (Qwen2-VL-7B) real size, bf16, batch 8 and 32 (issue 26)", "score",
         ("benchmarks/bench_score.py", "--device", "cuda", "--configs", "HPSv3-bf16:1x8", "HPSv3-bf16:1x32",
          "--repeats", "2", "--json", "{json}"),
         ("benchmarks/bench_score.py", "--quick", "--in-process", "--device", "cpu", "--configs", "HPSv3-bf16:1x2",
          "--repeats", "2", "--json", "{json}"),
         90),
]


# ---------------------------------------------------------------------------------------------------- environment

ENV_PROBE = r"""
import json, platform, importlib.metadata as md
import torch
info = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(), "cpu_threads": torch.get_num_threads()}
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    info.update(device_name=props.name, device_memory_gib=props.total_memory / 2**30,
                multiprocessors=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                device_count=torch.cuda.device_count())
packages = {}
for name in ("transformers", "diffusers", "accelerate", "peft", "huggingface_hub", "safetensors", "numpy", "Pillow",
             "image-reward"):
    try:
        packages[name] = md.version(name)
    except md.PackageNotFoundError:
        packages[name] = None
info["packages"] = packages
print(json.dumps(info))
"""


def probe_environment(env: dict[str, str]) -> dict:
    """Versions and the device, from a short subprocess (this process never holds a CUDA context)."""
    info: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "python_executable": sys.executable, "cpu_count": os.cpu_count()}
    try:
        probe = subprocess.run([sys.executable, "-c", ENV_PROBE], capture_output=True, text=True, env=env, cwd=ROOT,
                               timeout=120)
        info.update(json.loads(probe.stdout.strip().splitlines()[-1]))
    except (subprocess.SubprocessError, IndexError, json.JSONDecodeError) as error:
        info["probe_error"] = str(error)
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True)
        if smi.returncode == 0 and smi.stdout.strip():
            name, driver, memory = (part.strip() for part in smi.stdout.strip().splitlines()[0].split(",")[:3])
            info.update(nvidia_smi_name=name, driver=driver, nvidia_smi_memory=memory)
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True)
    info["git_commit"] = git.stdout.strip() if git.returncode == 0 else None  # a copied tree may have no .git
    info["git_dirty"] = bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
    return info


def peak_bf16(device_name: str | None) -> tuple[float | None, str | None]:
    """Dense bf16 peak TFLOP/s of ``device_name`` and its source, from :data:`PEAK_BF16_TFLOPS`; ``(None,
    None)`` for a device not in the table (the CPU included)."""
    for parts, tflops, source in PEAK_BF16_TFLOPS:
        if device_name and all(part.lower() in device_name.lower() for part in parts):
            return tflops, source
    return None, None


# ------------------------------------------------------------------------------------------------------- running

def child_env(smoke: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the smoke run is a CPU run, also on a machine with a GPU
    return env


_HELP: dict[str, str] = {}


def unavailable(case: Case, smoke: bool, env: dict[str, str]) -> str | None:
    """Why ``case`` cannot run in this tree (None if it can): for a pending case, its script is missing or its
    ``--help`` lacks an option the command uses or a ``requires`` string."""
    if case.pending is None:
        return None
    argv = case.argv(smoke)
    script = argv[0]
    if not (ROOT / script).is_file():
        return f"not in this tree: {script} missing ({case.pending})"
    if script not in _HELP:
        try:
            shown = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, env=env,
                                   cwd=ROOT, timeout=120)
            _HELP[script] = shown.stdout + shown.stderr
        except subprocess.TimeoutExpired:
            _HELP[script] = ""
    wanted = [a for a in argv[1:] if a.startswith("--")] + list(case.requires)
    missing = [w for w in dict.fromkeys(wanted) if w not in _HELP[script]]
    if missing:
        return f"not in this tree: {script} --help has no {', '.join(missing)} ({case.pending})"
    return None


def stop(process: subprocess.Popen) -> None:
    """SIGTERM the case's process group (the benchmark and its workers), SIGKILL it 10 s later."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.strip().splitlines()[-lines:])


def run_case(case: Case, smoke: bool, budget: float, work: Path, env: dict[str, str]) -> dict:
    slug = case.name.replace("/", "-")
    result_path = work / f"{slug}.json"
    result_path.unlink(missing_ok=True)
    argv = [a.replace("{json}", str(result_path)).replace("{work}", str(work)) for a in case.argv(smoke)]
    command = [sys.executable, *argv]
    record = {"command": shlex.join(["python", *argv]), "argv": command, "budget_s": round(budget, 1)}
    stdout, stderr = work / f"{slug}.stdout", work / f"{slug}.stderr"
    start = time.monotonic()
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True)
        try:
            returncode = process.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            stop(process)
            returncode = None
    record["seconds"] = round(time.monotonic() - start, 1)
    try:
        result = json.loads(result_path.read_text()) if result_path.is_file() else None
    except json.JSONDecodeError:  # stopped while writing it
        result = None
    record["result"] = result
    problems = check_result(case, smoke, result)
    if returncode is None:
        record["status"], record["why"] = "over-budget", f"stopped after its {budget:.0f} s budget"
    elif returncode != 0:
        record["status"], record["why"] = "failed", "; ".join([f"exit {returncode}", *problems])
    elif result is None or problems:
        record["status"], record["why"] = "failed", "; ".join(problems) or "no result file"
    else:
        record["status"] = "ran"
    if record["status"] != "ran":
        record["stderr_tail"] = tail(stderr)
        record["stdout_tail"] = tail(stdout, 5)
    return record


def expected_configs(case: Case, smoke: bool) -> list[str]:
    argv = case.argv(smoke)
    if "--configs" not in argv:
        return []
    start = argv.index("--configs") + 1
    end = next((i for i in range(start, len(argv)) if argv[i].startswith("--")), len(argv))
    return list(argv[start:end])


def check_result(case: Case, smoke: bool, result: dict | None) -> list[str]:
    """What is missing from a result: a config without a row, a row with an error."""
    if not isinstance(result, dict):
        return []
    problems = []
    rows = {row.get("config"): row for row in result.get("rows", [])}
    for config in expected_configs(case, smoke):
        if config not in rows:
            problems.append(f"{config}: no row")
        elif "error" in rows[config]:
            problems.append(f"{config}: {rows[config]['error']}")
    return problems


def run(args: argparse.Namespace) -> dict:
    env = child_env(args.smoke)
    environment = probe_environment(env)
    peak, source = peak_bf16(environment.get("device_name")) if not args.smoke else (None, None)
    report = {"mode": "smoke" if args.smoke else "full", "environment": environment,
              "peak_bf16_tflops": peak, "peak_source": source, "total_budget_s": args.total_budget, "cases": []}
    patterns = [p.strip() for p in args.cases.split(",")] if args.cases else None
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    try:
        for case in CASES:
            entry = {"name": case.name, "what": case.what, "kind": case.kind, "pending": case.pending,
                     "command": shlex.join(["python", *case.argv(args.smoke)])}
            left = args.total_budget - (time.monotonic() - start)
            why = unavailable(case, args.smoke, env)
            if why is None and patterns and not any(fnmatch.fnmatch(case.name, p) for p in patterns):
                why = f"not selected (--cases {args.cases})"
            if why is None and left < MIN_CASE_S:
                why = f"the total budget ({args.total_budget:.0f} s) is spent"
            if why is not None:
                entry.update(status="skipped", why=why)
            else:
                budget = min(case.smoke_budget_s if args.smoke else case.budget_s, left)
                print(f"[gpu_check] {case.name}: running (budget {budget:.0f} s)", file=sys.stderr, flush=True)
                entry.update(run_case(case, args.smoke, budget, work, env))
            print(f"[gpu_check] {case.name}: {entry['status']}" + (f" ({entry['why']})" if entry.get("why") else "")
                  + (f", {entry['seconds']} s" if "seconds" in entry else ""), file=sys.stderr, flush=True)
            report["cases"].append(entry)
            for folder in case.cleanup:
                shutil.rmtree(work / folder, ignore_errors=True)
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    report["total_seconds"] = round(time.monotonic() - start, 1)
    return report


# ------------------------------------------------------------------------------------------------------- figures

def _num(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:,.0f}"


def results(report: dict, kind: str) -> list[tuple[str, dict]]:
    """(case name, result) of every case of ``kind`` that left a result (ran, or over budget part-way)."""
    return [(case["name"], case["result"]) for case in report["cases"]
            if case["kind"] == kind and isinstance(case.get("result"), dict)]


def score_rows(report: dict) -> list[list[str]]:
    """One line per scoring config: pairs/s, ratio to the original code path (``bench_score.vs_original``; the
    original's config is named where its shape differs), peak GPU memory, ViT rate and share of the device's bf16
    peak (bf16 rows)."""
    peak = report.get("peak_bf16_tflops")
    lines = []
    for name, result in results(report, "score"):
        for row in result.get("rows", []):
            mode, shape = row["config"].split(":")
            ratio = "–"
            if row.get("vs_original") is not None:  # bench_score.vs_original
                ratio = f"{row['vs_original']:.1f}x"
                if row.get("vs_original_config") and not row["vs_original_config"].endswith(f":{shape}"):
                    ratio += f" (per pair, vs {row['vs_original_config']})"
            share = "–"
            if peak and row.get("vit_tflop_per_s") is not None and mode.endswith("bf16"):
                share = f"{100 * row['vit_tflop_per_s'] / peak:.0f}%"
            lines.append([name, row["config"], _num(row["pairs_per_s"]), ratio,
                          _num(row.get("peak_cuda_mib"), 4) if row.get("peak_cuda_mib") is not None else "–",
                          _num(row.get("vit_tflop_per_s")), share])
    return lines


def refl_rows(report: dict) -> list[list[str]]:
    lines = []
    for name, result in results(report, "refl"):
        for row in result.get("rows", []):
            if "error" in row:
                lines.append([name, row["config"], f"error: {row['error']}", "", "", ""])
            else:
                lines.append([name, row["config"], f"{row['s_per_update']:.3g}", _num(row.get("peak_cuda_gib")),
                              f"{row['trainable']:,}", str(row["loss_finite"])])
    return lines


def dataset_rows(report: dict) -> list[list[str]]:
    return [[name, key, f"{value:.3g} {'s' if key.startswith('resume') else 'images/s'}"]
            for name, result in results(report, "dataset") for key, value in result.get("images_per_s", {}).items()]


def other_rows(report: dict) -> list[list[str]]:
    return [[name, json.dumps(result, sort_keys=True)[:400]] for name, result in results(report, "other")]


def table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in lines]
    return "\n".join(out)


def _rows(report: dict, name: str) -> list[dict]:
    case = next((c for c in report["cases"] if c["name"] == name), None)
    result = (case or {}).get("result")
    return result.get("rows", []) if isinstance(result, dict) else []


def goals(report: dict) -> list[str]:
    """The issue's goals, each met / NOT met / not measured."""
    out = []
    bf16 = next((r for r in _rows(report, "score/ImageReward") if r["config"] == "batched-bf16:1x64"), None)
    speedup = (bf16 or {}).get("vs_original")
    if speedup is not None:
        out.append(f"ImageReward bf16 batch 64 >= {GOAL_IMAGEREWARD_SPEEDUP:g}x the original: {speedup:.1f}x, "
                   + ("met" if speedup >= GOAL_IMAGEREWARD_SPEEDUP else "NOT met"))
    else:
        out.append("ImageReward bf16 batch 64 vs the original: not measured")
    peak = report.get("peak_bf16_tflops")
    if bf16 and peak and bf16.get("vit_tflop_per_s") is not None:
        share = bf16["vit_tflop_per_s"] / peak
        out.append(f"ImageReward ViT >= {100 * GOAL_VIT_PEAK_SHARE:.0f}% of the bf16 peak: {100 * share:.0f}%, "
                   + ("met" if share >= GOAL_VIT_PEAK_SHARE else "NOT met"))
    else:
        out.append("ImageReward ViT share of the bf16 peak: not measured (no GPU, or a GPU not in the peak table)")
    flux = next((r for r in _rows(report, "refl/flux-lora-k1") if "error" not in r), None)
    if flux and flux.get("peak_cuda_gib") is not None:
        out.append(f"FLUX.1-dev LoRA K = 1 fits 80 GB: peak {flux['peak_cuda_gib']:.1f} GiB allocated, "
                   + ("met" if flux["peak_cuda_gib"] * 2**30 < GOAL_FLUX_GB * 1e9 else "NOT met"))
    else:
        out.append("FLUX.1-dev LoRA K = 1 fits 80 GB: not measured (no GPU memory figure)")
    return out


def provenance(report: dict) -> str:
    env = report["environment"]
    device = env.get("device_name") or ("CPU" if not env.get("cuda_available") else "?")
    return (f"{report['mode']} run, {env.get('date')}, {device}, driver {env.get('driver') or '–'}, "
            f"torch {env.get('torch')} (CUDA {env.get('cuda') or '–'}, cuDNN {env.get('cudnn') or '–'}), "
            f"commit {(env.get('git_commit') or 'unknown')[:12]}; `bash benchmarks/gpu_check.sh"
            f"{' --smoke' if report['mode'] == 'smoke' else ''}`")


def figure_tables(report: dict) -> str:
    """The figures as README-ready Markdown tables, each under the run's provenance."""
    peak = report.get("peak_bf16_tflops")
    parts = [f"Measured by `bash benchmarks/gpu_check.sh`: {provenance(report)}.", ""]
    parts += ["Scoring (random weights, 512 px PNGs, 1 prompt x N images; ViT alone at the batch of distinct "
              f"images; share of the dense bf16 peak {peak:g} TFLOP/s):" if peak else
              "Scoring (random weights, 512 px PNGs, 1 prompt x N images; ViT alone at the batch of distinct images):",
              "", table(["case", "config", "pairs/s", "vs original", "peak GPU MiB", "ViT TFLOP/s",
                         "ViT % of bf16 peak"], score_rows(report)), ""]
    parts += ["ReFL, one optimizer step (median of the timed updates after a warm-up; batch 1 at real size; 40-step "
              "rollout):", "",
              table(["case", "config", "s/update", "peak GPU GiB", "trainable params", "loss finite"],
                    refl_rows(report)), ""]
    parts += ["score-dataset:", "", table(["case", "measure", "value"], dataset_rows(report)), ""]
    others = other_rows(report)
    if others:
        parts += ["Other cases (raw results):", "", table(["case", "result"], others), ""]
    return "\n".join(parts)


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = ["# GPU check", "", provenance(report), ""]
    if report["mode"] == "smoke":
        lines += ["Smoke run: every case on the CPU with tiny models (the configs below say which); it checks that "
                  "the script works, its figures say nothing about speed.", ""]
    lines += ["| | |", "|---|---|"]
    for key in ("date", "device_name", "driver", "device_memory_gib", "capability", "torch", "cuda", "cudnn", "python",
                "platform", "cpu_count", "git_commit", "git_dirty", "python_executable"):
        lines.append(f"| {key} | {env.get(key, '–')} |")
    lines.append(f"| packages | {', '.join(f'{k} {v}' for k, v in env.get('packages', {}).items())} |")
    if report.get("peak_bf16_tflops"):
        lines.append(f"| bf16 peak | {report['peak_bf16_tflops']:g} TFLOP/s dense ({report['peak_source']}) |")
    lines.append(f"| total | {report['total_seconds']} s (budget {report['total_budget_s']:.0f} s) |")
    lines += ["", "## Goals", ""] + [f"- {goal}" for goal in goals(report)]
    lines += ["", "## Cases", "", table(["case", "what", "status", "seconds / budget", "why"],
                                        [[c["name"], c["what"], c["status"],
                                          f"{c['seconds']} / {c['budget_s']:.0f}" if "seconds" in c else "–",
                                          c.get("why", "")] for c in report["cases"]])]
    lines += ["", "## Figures", "", figure_tables(report)]
    lines += ["## Commands", "", "Each figure above comes from its case's command (run from the repository root; "
              f"`python` is `{env.get('python_executable')}`; environment PYTHONPATH=<repo>, HF_HUB_OFFLINE=1"
              + (", CUDA_VISIBLE_DEVICES=''" if report["mode"] == "smoke" else "") + "):", ""]
    lines += [f"- `{c['name']}`: `{c['command']}`" for c in report["cases"]]
    failures = [c for c in report["cases"] if c["status"] in ("failed", "over-budget") and c.get("stderr_tail")]
    if failures:
        lines += ["", "## Failures", ""]
        for case in failures:
            lines += [f"### {case['name']} ({case['status']}: {case.get('why', '')})", "", "```",
                      case["stderr_tail"], "```", ""]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="every case on CPU with tiny configs")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder for gpu_check.md and gpu_check.json")
    parser.add_argument("--cases", default=None, help="comma-separated fnmatch patterns of case names to run")
    parser.add_argument("--total-budget", type=float, default=None,
                        help=f"seconds for all cases (default {FULL_TOTAL_BUDGET_S}; --smoke {SMOKE_TOTAL_BUDGET_S})")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed at the end)")
    parser.add_argument("--keep-work", action="store_true", help="keep the scratch folder (bases, raw outputs)")
    parser.add_argument("--list", action="store_true", help="list the cases and whether this tree has them")
    parser.add_argument("--readme", metavar="JSON", help="print README-ready tables from a gpu_check.json")
    args = parser.parse_args()
    if args.readme:
        print(figure_tables(json.loads(Path(args.readme).read_text())))
        return 0
    if args.list:
        env = child_env(args.smoke)
        for case in CASES:
            why = unavailable(case, args.smoke, env)
            print(f"{case.name:36} {case.budget_s:5.0f} s  {why or 'available'}\n    {case.what}")
        return 0
    if args.total_budget is None:
        args.total_budget = SMOKE_TOTAL_BUDGET_S if args.smoke else FULL_TOTAL_BUDGET_S
    report = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    print(f"[gpu_check] wrote {out / 'gpu_check.md'} and {out / 'gpu_check.json'} in {report['total_seconds']} s",
          file=sys.stderr)
    return 1 if any(c["status"] == "failed" for c in report["cases"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
