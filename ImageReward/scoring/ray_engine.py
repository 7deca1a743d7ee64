"""``score_dataset_ray``: score WebDataset / img2dataset shards on a Ray cluster, one Parquet file per shard.

The pipeline (Ray Data, streaming):

1. the driver lists the shards (:func:`~.shards.list_shards`) and drops those whose output file exists
   (resume: a shard's file is written whole, by an atomic rename, so existing means complete);
2. **decode** (CPU tasks, one per shard): :func:`~.shards.read_shard` lists the shard's samples, and each
   image is decoded and preprocessed by :func:`~.runner.decode_record`, the code the single-process engine
   runs in its DataLoader workers; the pixels travel as float32 bytes;
3. **score** (an actor pool, one scorer per actor: per GPU, or per N CPUs): each actor loads the scorer once
   through the one resolver (:func:`ImageReward.resolve.load_scorer`: names, mixes, local checkpoints, any
   served reward) and scores its batches with :func:`~.runner._score_batch`, the single-process engine's own
   batch step (:func:`ImageReward.engine.score_pixels`);
4. the driver collects the (small) score rows and, when a shard has all of its rows, writes
   ``OUT/SHARD.parquet`` (``.SHARD.parquet.tmp``, then ``os.replace``).

Ray retries a decode task that fails or whose node is lost, and restarts a lost actor; rows that arrive twice
are kept once (by ``id``). A killed driver loses only the shards it had not written; rerunning resumes.

>>> from ImageReward.scoring import score_dataset_ray
>>> summary = score_dataset_ray("ImageReward-v1.0", "laion/{00000..00999}.tar", "scores/",
...                             address="auto", actor_gpus=1)                          # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..engine import preprocess_configs
from ..errors import ImageRewardError, InvalidInputError
from .datasets import Record, with_prompt
from .runner import _score_batch, decode_record
from .shards import Shard, is_shard_input, list_shards, read_shard
from .writers import ROW_FIELDS, _write_parquet, check_run_settings, done_ids, settings_path, write_run_settings

__all__ = ["score_dataset_ray", "shard_output_path"]

logger = logging.getLogger(__name__)

_SHARD_COLUMNS = ("shard", "shard_rows")  # which shard a row belongs to, and how many rows that shard has


def shard_output_path(output: str | os.PathLike, shard_name: str) -> Path:
    """``OUT/SHARD.parquet`` for shard ``SHARD.tar`` (sub-folders of the shard name are kept)."""
    stem = shard_name[: -len(".tar")] if shard_name.endswith(".tar") else shard_name
    return Path(output) / f"{stem}.parquet"


def _write_shard(output: Path, shard_name: str, rows: list[dict[str, Any]]) -> Path:
    """Write one shard's rows (sorted by index) atomically: a hidden temporary file renamed over the target."""
    path = shard_output_path(output, shard_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")  # a leading dot: Parquet dataset readers skip it
    _write_parquet(sorted(rows, key=lambda row: (row["index"], row["id"])), tmp)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------- decode
def _decode_shard(batch: dict[str, Any], *, configs: tuple, prompt: str | None, prompt_free: bool, timeout: float,
                  exif_transpose: bool, rows_per_batch: int):
    """Ray Data UDF (a CPU task, one shard per call): yields Arrow tables of decoded rows, ``rows_per_batch`` at
    a time, so a large shard never sits in memory decoded."""
    import pyarrow as pa

    for name, path, metadata, stats in zip(batch["name"], batch["path"], batch["metadata"], batch["stats"]):
        shard = Shard(str(name), str(path), metadata or None, stats or None)
        try:
            records = read_shard(shard, need_prompt=prompt is None and not prompt_free)
        except ImageRewardError as err:  # not a tar at all: one error row stands for the shard
            records = [Record(0, shard.name, prompt, shard.name, None, str(err), shard.name)]
        records = with_prompt(records, prompt, prompt_free=prompt_free)
        for start in range(0, len(records), rows_per_batch):
            part = records[start : start + rows_per_batch]
            columns: dict[str, list] = {"index": [], "id": [], "prompt": [], "image": [], "error": [],
                                        "shard": [], "shard_rows": []}
            pixels: list[list] = [[] for _ in configs]
            for record in part:
                value, error = decode_record(record, configs, timeout, exif_transpose)
                for key, item in (("index", record.index), ("id", record.id), ("prompt", record.prompt),
                                  ("image", record.image), ("error", error), ("shard", shard.name),
                                  ("shard_rows", len(records))):
                    columns[key].append(item)
                tensors = (value,) if isinstance(value, torch.Tensor) else value
                for k in range(len(configs)):
                    pixels[k].append(None if tensors is None else tensors[k].numpy().tobytes())
            table = {**columns, **{f"pixels_{k}": pa.array(pixels[k], pa.large_binary()) for k in range(len(configs))}}
            yield pa.table(table)


# ---------------------------------------------------------------------------------------------- score
class _ScoreActor:
    """Ray Data actor: loads the scorer once (the one resolver), then scores Arrow batches of decoded rows."""

    def __init__(self, model: str, load_kwargs: dict[str, Any], model_name: str, exif_transpose: bool) -> None:
        from ..resolve import load_scorer

        self.scorer = load_scorer(model, **load_kwargs)
        for scorer in (self.scorer, *getattr(self.scorer, "scorers", ())):
            scorer.exif_transpose = exif_transpose
        self.configs = preprocess_configs(self.scorer)
        self.model_name = model_name

    def __call__(self, table: Any) -> Any:
        import pyarrow as pa

        rows = table.to_pylist()
        records, batch = [], []
        for position, row in enumerate(rows):
            records.append(Record(row["index"], row["id"], row["prompt"], row["image"], None, row["error"],
                                  row["shard"]))
            if row["error"] is not None:
                batch.append((position, None, row["error"]))
                continue
            parts = tuple(torch.from_numpy(np.frombuffer(row[f"pixels_{k}"], dtype=np.float32).copy())
                          .reshape(3, config.image_size, config.image_size) for k, config in enumerate(self.configs))
            batch.append((position, parts[0] if len(parts) == 1 else parts, None))
        scored = _score_batch(self.scorer, batch, records, self.model_name)
        for row, out in zip(rows, scored):
            out.update(shard=row["shard"], shard_rows=row["shard_rows"])
        schema = pa.schema([("index", pa.int64()), ("id", pa.string()), ("prompt", pa.string()),
                            ("image", pa.string()), ("score", pa.float32()), ("error", pa.string()),
                            ("model", pa.string()), ("shard", pa.string()), ("shard_rows", pa.int64())])
        return pa.Table.from_pylist(scored, schema=schema)


# ---------------------------------------------------------------------------------------------- driver
def _completed(output: Path, shards: list[Shard], model: str | None) -> tuple[list[Shard], int]:
    """Shards without an output file, and the rows the others hold. With ``model`` (no recorded settings: an
    older output), files written by another model raise :class:`InvalidInputError` (:func:`~.writers.done_ids`)."""
    pending, rows = [], 0
    for shard in shards:
        path = shard_output_path(output, shard.name)
        if path.is_file():
            if model is not None:
                done_ids(path, model=model)
            import pyarrow.parquet as pq

            rows += pq.ParquetFile(path).metadata.num_rows
        else:
            pending.append(shard)
    return pending, rows


def score_dataset_ray(
    model: str,
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    prompt: str | None = None,
    address: str | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = "float32",
    download_root: str | None = None,
    exif_transpose: bool = True,
    batch_size: int | None = None,
    actors: int | None = None,
    actor_cpus: float = 1.0,
    actor_gpus: float | None = None,
    decode_cpus: float = 1.0,
    timeout: float = 10.0,
    overwrite: bool = False,
    model_name: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score the WebDataset / img2dataset shards ``source`` (a ``.tar``, a glob, ``shard-{00000..00099}.tar``,
    or a folder of ``.tar`` files) with ``model`` on Ray, into the folder ``output``: one
    ``OUT/SHARD.parquet`` per shard, rows ``index`` (position in the shard), ``id`` (``SHARD/KEY``), ``prompt``,
    ``image``, ``score`` (float32, ``None`` on error), ``error``, ``model``.

    ``model``: anything :func:`ImageReward.load_scorer` takes (a name, a mix ``A:1,B:0.1``, a local
    checkpoint, a served reward); each actor loads it with ``device``/``dtype``/``download_root``.
    ``address``: ``None`` (``$RAY_ADDRESS``, else a Ray started for this call and stopped after it), ``"auto"``
    (the cluster this machine belongs to), or ``ray://HOST:10001``; an already initialised Ray is used as is.
    ``actors``: size of the scorer pool (default: the cluster's GPUs when ``actor_gpus``, else its CPUs less one
    decode task's, divided by ``actor_cpus``); ``actor_gpus`` defaults to 1 when the cluster has GPUs, else 0.
    ``decode_cpus``: the CPUs each decode task reserves. ``batch_size``: rows per actor call (default: the scorer's).

    Resumes into ``output``: shards whose file exists are skipped (delete a file to score that shard again;
    ``overwrite`` starts over), with the single-process engine's check that the weights and the settings that
    change scores are the same (``OUT.run.json``, :func:`~.writers.check_run_settings`). Shards, the output
    folder and ``model`` are checked before Ray starts; bad
    arguments raise :class:`InvalidInputError`. Returns a summary (shards, rows, scored, errors, images/s).
    """
    from ..validation import check_float, check_optional_int

    check_optional_int("batch_size", batch_size)
    check_optional_int("actors", actors)
    check_float("actor_cpus", actor_cpus, minimum=0.0)
    check_float("decode_cpus", decode_cpus, minimum=0.0)
    check_float("timeout", timeout, minimum=0.0, strict_minimum=True)
    if actor_gpus is not None:
        check_float("actor_gpus", actor_gpus, minimum=0.0)
    if not isinstance(model, str):
        raise InvalidInputError(f"the Ray engine loads the scorer in each actor: pass its name or path as a str, "
                                f"not a {type(model).__name__}")
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        raise InvalidInputError("prompt must be a non-empty str (every image is scored against it)")
    text = os.fspath(source)
    if not is_shard_input(text):
        raise InvalidInputError(f"--engine ray reads WebDataset / img2dataset tar shards (a .tar, a glob, a "
                                f"brace range or a folder of .tar files), not {text!r}; score folders, tables "
                                "and Hub datasets with the default engine")
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise InvalidInputError(f"output {os.fspath(output)!r}: with --engine ray, name a folder (one Parquet "
                                "file per shard is written into it)")
    started = time.perf_counter()
    shards = list_shards(text)
    if Path(text).is_dir() and output.resolve() == Path(text).resolve():
        raise InvalidInputError(f"output {os.fspath(output)!r} is the input folder; name another folder")
    model_name = model_name or model
    if overwrite:
        for shard in shards:
            shard_output_path(output, shard.name).unlink(missing_ok=True)
        settings_path(output).unlink(missing_ok=True)
    # resume only with the same weights and score-changing settings: the single-process engine's check and
    # record (OUT.run.json beside the folder), before any shard is skipped or scored
    settings = {"scorer": _identity(model, dtype) or model_name, "exif_transpose": bool(exif_transpose),
                "prompt": prompt, "prompt_column": None}
    known = check_run_settings(output, settings)
    pending, resumed_rows = _completed(output, shards, None if known else model_name)
    output.mkdir(parents=True, exist_ok=True)
    write_run_settings(output, settings)
    logger.info("%d shards, %d already scored (%d rows), %d to score", len(shards), len(shards) - len(pending),
                resumed_rows, len(pending))

    summary: dict[str, Any] = {"output": str(output), "engine": "ray", "shards": len(shards),
                               "shards_resumed": len(shards) - len(pending), "rows_resumed": resumed_rows,
                               "rows": 0, "scored": 0, "errors": 0}
    if pending:
        # the driver loads the scorer once on its CPU: a bad --model fails here, before the cluster does any
        # work, and the decode tasks learn the preprocessing (and so the pixels) the actors expect
        from ..resolve import load_scorer

        probe = load_scorer(model, device="cpu", dtype=dtype, download_root=download_root)
        configs = preprocess_configs(probe)
        prompt_free = not getattr(probe, "uses_prompt", True)
        batch_size = batch_size or getattr(probe, "default_batch_size", 8)
        del probe
        import ray

        started_here = not ray.is_initialized()
        if started_here:
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     **({} if (address or os.environ.get("RAY_ADDRESS")) else {"num_cpus": os.cpu_count()}))
        try:
            _run_pipeline(ray, pending, output, summary, model=model, model_name=model_name, prompt=prompt,
                          prompt_free=prompt_free, configs=configs, timeout=timeout, exif_transpose=exif_transpose,
                          batch_size=batch_size, actors=actors, actor_cpus=actor_cpus, actor_gpus=actor_gpus,
                          decode_cpus=decode_cpus,
                          load_kwargs={"device": device, "dtype": dtype, "download_root": download_root},
                          progress=progress)
        finally:
            if started_here:
                ray.shutdown()
    seconds = time.perf_counter() - started
    summary.update(seconds=seconds, images_per_s=summary["rows"] / seconds if seconds > 0 else 0.0,
                   total_rows=summary["rows"] + resumed_rows)
    return summary


def _run_pipeline(ray: Any, pending: list[Shard], output: Path, summary: dict[str, Any], *, model: str,
                  model_name: str, prompt: str | None, prompt_free: bool, configs: tuple, timeout: float,
                  exif_transpose: bool, batch_size: int, actors: int | None, actor_cpus: float,
                  actor_gpus: float | None,
                  decode_cpus: float, load_kwargs: dict[str, Any], progress: bool) -> None:
    """Build and drain the Ray Data pipeline for ``pending`` shards, writing each shard as it completes."""
    import ray.data

    resources = ray.cluster_resources()
    if actor_gpus is None:
        actor_gpus = 1.0 if resources.get("GPU", 0) > 0 else 0.0
    if actors is None:
        if actor_gpus > 0:
            actors = max(1, int(resources.get("GPU", 0) // actor_gpus))
        else:  # leave the CPUs of one decode task free, or the actors would hold every CPU and starve
            actors = max(1, int((resources.get("CPU", 1) - decode_cpus) // max(actor_cpus, 1e-9)))
    if actor_gpus > 0 and load_kwargs["device"] is None:
        load_kwargs = {**load_kwargs, "device": "cuda"}
    elif load_kwargs["device"] is None:
        load_kwargs = {**load_kwargs, "device": "cpu"}
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours below counts shards and rows
    items = [{"name": s.name, "path": str(Path(s.path).resolve()), "metadata": s.metadata or "",
              "stats": s.stats or ""} for s in pending]
    dataset = ray.data.from_items(items, override_num_blocks=len(items))
    decoded = dataset.map_batches(
        _decode_shard, batch_size=1, batch_format="numpy", num_cpus=decode_cpus,  # Ray Data retries tasks
        fn_kwargs={"configs": configs, "prompt": prompt, "prompt_free": prompt_free, "timeout": timeout,
                   "exif_transpose": exif_transpose, "rows_per_batch": batch_size})
    scored = decoded.map_batches(
        _ScoreActor, batch_size=batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=actor_cpus, num_gpus=actor_gpus,  # Ray Data restarts lost actors and retries their batches
        fn_constructor_kwargs={"model": model, "load_kwargs": load_kwargs, "model_name": model_name,
                               "exif_transpose": exif_transpose})
    logger.info("Ray: %d shards, %d scorer actor(s) x (%g CPU, %g GPU), decode tasks x %g CPU", len(pending),
                actors, actor_cpus, actor_gpus, decode_cpus)

    rows_of: dict[str, dict[str, dict[str, Any]]] = {s.name: {} for s in pending}
    expected: dict[str, int] = {}
    written: set[str] = set()
    started = time.perf_counter()
    bar = tqdm(total=len(pending), desc="scoring shards (ray)", unit="shard", disable=not progress,
               dynamic_ncols=True)
    try:
        for table in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in table.to_pylist():
                shard = row.pop("shard")
                expected[shard] = row.pop("shard_rows")
                if shard in written:  # a retried task's late duplicate
                    continue
                kept = rows_of[shard].get(row["id"])
                if kept is None or kept["error"] is not None:  # a duplicate is kept once, a scored row first
                    rows_of[shard][row["id"]] = {field: row[field] for field in ROW_FIELDS}
                if len(rows_of[shard]) == expected[shard]:
                    _finish_shard(output, shard, rows_of.pop(shard), summary)
                    written.add(shard)
                    _show(bar, summary, started)
        for shard in [shard for shard, rows in rows_of.items() if not rows and shard not in expected]:
            _finish_shard(output, shard, rows_of.pop(shard), summary)  # an empty tar: an empty file
            _show(bar, summary, started)
    finally:
        bar.close()
    if rows_of:
        raise RuntimeError(f"Ray returned only part of shard(s) {sorted(rows_of)[:5]}; rerun to resume")


def _identity(model: str, dtype: Any) -> str | None:
    """:func:`ImageReward.identity.scorer_identity` of ``model`` at ``dtype``, as the single-process engine keys
    a resume (None when the resolver cannot read the name, e.g. a served reward: then the name is the key)."""
    from ..identity import scorer_identity
    from ..validation import resolve_dtype

    try:
        return scorer_identity(model, str(resolve_dtype(dtype) or torch.float32).removeprefix("torch."))
    except (ImageRewardError, OSError, ValueError):
        return None


def _show(bar: Any, summary: dict[str, Any], started: float) -> None:
    bar.update(1)
    elapsed = time.perf_counter() - started
    bar.set_postfix(rows=summary["rows"], errors=summary["errors"],
                    img_s=f"{summary['rows'] / elapsed:.1f}" if elapsed > 0 else "-", refresh=False)


def _finish_shard(output: Path, shard: str, rows_by_id: dict[str, dict[str, Any]], summary: dict[str, Any]) -> None:
    rows = list(rows_by_id.values())
    path = _write_shard(output, shard, rows)
    errors = sum(row["error"] is not None for row in rows)
    summary["rows"] += len(rows)
    summary["errors"] += errors
    summary["scored"] += len(rows) - errors
    logger.info("wrote %s (%d rows, %d errors)", path, len(rows), errors)
