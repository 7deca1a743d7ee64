"""``score_dataset``: score every (prompt, image) of a dataset into a resumable JSONL/Parquet file.

Decoding and preprocessing run in DataLoader workers (``num_workers``) while the main process hands each batch
to the one batch engine (:func:`ImageReward.engine.score_pixels`): within a batch each distinct image is
encoded once (and ImageReward reuses its cross-attention work across its pairs). Any scorer works, a weighted
mix included. Under
``accelerate launch`` every process scores the rows with ``index % world_size == rank`` into its own journal
and the main process merges them at the end.

>>> import ImageReward as RM
>>> from ImageReward.scoring import score_dataset
>>> summary = score_dataset(RM.load("ImageReward-v1.0"), "prompts.jsonl", "scores.jsonl")  # doctest: +SKIP
>>> summary["scored"], summary["errors"]                                                    # doctest: +SKIP
(998, 2)
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ..engine import dedupe, preprocess_configs, preprocess_image, score_pixels, stack_pixels
from ..errors import ImageRewardError, InvalidInputError
from ..preprocess import PreprocessConfig
from .datasets import Record, load_record_image, read_records
from .writers import (Journal, check_run_settings, done_ids, journal_path, merge_outputs, output_format, parts_dir,
                      read_output, remove_outputs, write_run_settings)

__all__ = ["score_dataset", "DistributedContext", "distributed_context", "decode_record"]

logger = logging.getLogger(__name__)


@dataclass
class DistributedContext:
    """Which shard this process scores. ``state`` is accelerate's ``PartialState`` when launched by it."""

    rank: int = 0
    world_size: int = 1
    state: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.state is not None and self.world_size > 1:
            self.state.wait_for_everyone()

    @property
    def device(self) -> torch.device | None:
        return None if self.state is None else self.state.device


def distributed_context() -> DistributedContext:
    """accelerate's process index and count when started by ``accelerate launch`` (or torchrun) with more
    than one process; otherwise a single process. accelerate is imported only in that case."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    from accelerate import PartialState

    # without a GPU, accelerate only forms a process group (gloo) when asked for the CPU explicitly
    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    if state.num_processes != world_size:
        raise RuntimeError(f"WORLD_SIZE={world_size} but accelerate formed a group of {state.num_processes} "
                           "process(es); every process would score everything. Check the launcher configuration.")
    return DistributedContext(state.process_index, state.num_processes, state)


class _RecordImages(torch.utils.data.Dataset):
    """Runs in DataLoader workers: record -> ``(position, pixels or None, error or None)``."""

    def __init__(self, records: Sequence[Record], configs: Sequence[PreprocessConfig], timeout: float,
                 exif_transpose: bool = True) -> None:
        self.records = records
        self.configs = tuple(configs)
        self.timeout = timeout
        self.exif_transpose = exif_transpose

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, position: int) -> tuple[int, torch.Tensor | None, str | None]:
        return (position, *decode_record(self.records[position], self.configs, self.timeout, self.exif_transpose))


def decode_record(record: Record, configs: Sequence[PreprocessConfig], timeout: float = 10.0,
                  exif_transpose: bool = True) -> tuple[Any, str | None]:
    """``(pixels, None)`` or ``(None, error)`` for one record: the image decoded by
    :func:`~.datasets.load_record_image` and preprocessed by :func:`ImageReward.engine.preprocess_image` (in a
    DataLoader worker, or a Ray task of :mod:`.ray_engine`). Never raises: a bad image is its row's error."""
    if record.error:
        return None, record.error
    try:
        image = load_record_image(record, timeout=timeout, exif_transpose=exif_transpose)
        return preprocess_image(image, configs), None
    except ImageRewardError as err:
        return None, str(err)
    except Exception as err:  # noqa: BLE001 - one bad image must not stop the run
        return None, f"row {record.index} ({record.image}): {type(err).__name__}: {err}"


def _collate(items: list) -> list:
    return items


def _row(record: Record, score: float | None, error: str | None, model: str) -> dict[str, Any]:
    return {"index": record.index, "id": record.id, "prompt": record.prompt, "image": record.image,
            "score": score, "error": error, "model": model}


def _image_key(record: Record) -> Any:
    return record.source if isinstance(record.source, (str, bytes)) else (record.source, record.id)


def _score_batch(scorer: Any, batch: list, records: Sequence[Record], model: str) -> list[dict[str, Any]]:
    """Rows for one DataLoader batch, in batch order, through the one batch engine (distinct images are
    encoded once). A typed error of the scorer is pinned on the row(s) at fault, never raised."""
    rows: dict[int, dict[str, Any]] = {}
    good = []
    for position, pixels, error in batch:
        if pixels is None:
            rows[position] = _row(records[position], None, error, model)
        else:
            good.append((position, pixels))
    if good:
        first, image_index = dedupe([_image_key(records[position]) for position, _ in good])
        prompts = [records[position].prompt for position, _ in good]
        try:
            pixels_in = stack_pixels([good[k][1] for k in first])
            scores = score_pixels(scorer, prompts, pixels_in, image_index).tolist()
            for (position, _), score in zip(good, scores):
                rows[position] = _row(records[position], float(score), None, model)
        except ImageRewardError as err:  # bad input for the scorer (not a crash): find the row(s) at fault
            if len(good) == 1:
                position = good[0][0]
                rows[position] = _row(records[position], None, f"row {records[position].index}: {err}", model)
            else:
                for position, pixels in good:
                    rows[position] = _score_batch(scorer, [(position, pixels, None)], records, model)[0]
    return [rows[position] for position, _, _ in batch]


def score_dataset(
    scorer: Any,
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    prompt: str | None = None,
    prompt_column: str | None = None,
    image_column: str | None = None,
    id_column: str | None = None,
    split: str | None = None,
    revision: str | None = None,
    batch_size: int | None = None,
    num_workers: int = 0,
    timeout: float = 10.0,
    overwrite: bool = False,
    limit: int | None = None,
    html: str | os.PathLike | None = None,
    html_per_prompt: int = 4,
    model_name: str | None = None,
    progress: bool = True,
    context: DistributedContext | None = None,
    encoding: str | None = None,
    scorer_id: str | None = None,
) -> dict[str, Any]:
    """Score ``source`` (folder, table or ``hf://datasets/...``, see :func:`read_records`) into ``output``
    (``.jsonl`` or ``.parquet``), resuming a previous run into the same ``output``.

    Each row: ``index, id, prompt, image, score, error, model``; a row that could not be scored has
    ``score = None`` and the reason in ``error``. Returns a summary (counts, seconds, images/s, paths).
    ``context`` defaults to :func:`distributed_context` (shards under ``accelerate launch``). ``encoding``:
    the text encoding of ``source`` when not UTF-8 (see :func:`ImageReward.textio.read_text`).

    Rows that ended in an error are retried by a rerun into the same ``output`` (each id appears once).
    A rerun resumes only with the same scorer and the settings that change scores (``OUT.run.json`` records
    them: ``scorer_id``, the EXIF orientation choice, ``prompt`` and ``prompt_column``); otherwise it raises
    :class:`InvalidInputError` naming what changed. ``scorer_id``: the scorer's weights identity
    (:func:`ImageReward.identity.scorer_identity` of the name it was loaded from; default: that of ``model_name``
    when the resolver reads it, else ``model_name`` or the scorer's name). A prompt-free scorer
    (``uses_prompt = False``) needs no prompt. Rows that failed are summarised in a warning (and in
    ``summary["error_examples"]``).
    Bad arguments, a folder or a file in the way of ``output``, and mistakes in the whole input (see
    :func:`~ImageReward.scoring.datasets.read_records`) raise :class:`InvalidInputError` before any row.
    """
    _check_arguments(output, batch_size=batch_size, num_workers=num_workers, timeout=timeout, limit=limit,
                     html=html, html_per_prompt=html_per_prompt, encoding=encoding)
    if not os.fspath(source).startswith("hf:") and Path(output).resolve() == Path(source).resolve():
        raise InvalidInputError(f"output {os.fspath(output)!r} is the input itself; name another file")
    started = time.perf_counter()
    context = context or distributed_context()
    output = Path(output)
    output_format(output)
    model = model_name or getattr(scorer, "name", type(scorer).__name__)
    marker = _done_marker(output, context.rank, context.world_size)
    if overwrite and context.is_main:
        remove_outputs(output)
    if marker.exists():
        marker.unlink()  # left by an earlier run: this run has not finished yet
    context.barrier()  # nobody starts before the output is cleared and stale markers are gone
    records = read_records(source, prompt=prompt, prompt_column=prompt_column, image_column=image_column,
                           id_column=id_column, split=split, revision=revision, encoding=encoding,
                           prompt_free=not getattr(scorer, "uses_prompt", True))
    if limit is not None:
        records = records[:limit]
    output.parent.mkdir(parents=True, exist_ok=True)
    settings = {"scorer": scorer_id or _identity(model_name, scorer) or model,
                "exif_transpose": bool(getattr(scorer, "exif_transpose", True)),
                "prompt": prompt, "prompt_column": prompt_column}
    known = check_run_settings(output, settings)  # before any row: refuse to mix two scorers' scores
    if context.is_main:
        write_run_settings(output, settings)
    # a torn last line is not done: it is scored again; rows of an output without recorded settings (an older
    # version) must at least name the same model
    done = done_ids(output, model=None if known else model)
    journal = Journal(journal_path(output, context.rank, context.world_size))  # cuts that torn tail first
    mine = [r for r in records if r.index % context.world_size == context.rank]
    pending = [r for r in mine if r.id not in done]
    logger.info("rank %d/%d: %d rows, %d already done, %d to score", context.rank, context.world_size,
                len(mine), len(mine) - len(pending), len(pending))

    batch_size = batch_size or getattr(scorer, "default_batch_size", 8)
    loader = torch.utils.data.DataLoader(
        _RecordImages(pending, preprocess_configs(scorer), timeout, getattr(scorer, "exif_transpose", True)),
        batch_size=batch_size, shuffle=False,
        num_workers=num_workers, collate_fn=_collate, pin_memory=scorer.device.type == "cuda",
        persistent_workers=False, prefetch_factor=4 if num_workers > 0 else None,
    )
    scored = errors = 0
    bar = tqdm(total=len(pending), desc=f"scoring {Path(os.fspath(source)).name or source}", unit="img",
               disable=not (progress and context.is_main), dynamic_ncols=True)
    try:
        for batch in loader:
            rows = _score_batch(scorer, batch, pending, model)
            journal.append(rows)
            batch_errors = sum(row["error"] is not None for row in rows)
            errors += batch_errors
            scored += len(rows) - batch_errors
            bar.update(len(rows))
            if errors:
                bar.set_postfix(errors=errors, refresh=False)
    finally:
        bar.close()
        journal.close()
    seconds = time.perf_counter() - started
    if context.world_size > 1:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{scored} {errors}\n")
        if context.is_main:  # poll files, not a collective: shards may finish hours apart after a resume
            _wait_for_markers(output, context.world_size)
    summary: dict[str, Any] = {
        "output": str(output), "rank": context.rank, "world_size": context.world_size, "rows": len(records),
        "resumed": len(mine) - len(pending), "scored": scored, "errors": errors, "seconds": seconds,
        "images_per_s": (scored + errors) / seconds if seconds > 0 else 0.0,
    }
    if context.is_main:
        merge_outputs(output)
        final = read_output(output)
        failed = [row for row in final if row.get("error") is not None]
        summary.update(total_rows=len(final), total_errors=len(failed),
                       error_examples=[f"{row.get('image') or row.get('id')}: {row['error']}" for row in failed[:3]])
        if failed:
            logger.warning("%d of %d rows of %s failed (no score; the reason is in each row's 'error', a rerun "
                           "retries them), e.g. %s", len(failed), len(final), output, summary["error_examples"][0])
        if len(final) != len(records):
            logger.warning("%s has %d rows for %d input records", output, len(final), len(records))
        if html is not None:
            from .gallery import write_gallery

            summary["html"] = str(write_gallery(final, html, records=records, per_prompt=html_per_prompt,
                                                timeout=timeout, title=f"{model} on {os.fspath(source)}"))
    return summary


def _identity(model_name: str | None, scorer: Any) -> str | None:
    """:func:`~ImageReward.identity.scorer_identity` of ``model_name`` when the resolver can read it (a registered
    name, a local checkpoint, a mix) at the scorer's image precision; None otherwise."""
    from ..identity import scorer_identity

    if not model_name:
        return None
    try:
        return scorer_identity(model_name, str(getattr(scorer, "input_dtype", "float32")).removeprefix("torch."))
    except (ImageRewardError, OSError, ValueError):
        return None


def _check_arguments(output: str | os.PathLike, *, batch_size: Any, num_workers: Any, timeout: Any, limit: Any,
                     html: Any, html_per_prompt: Any, encoding: Any) -> None:
    """The argument checks of :func:`score_dataset` (typed errors naming the argument)."""
    from ..textio import check_encoding
    from ..validation import check_float, check_non_negative_int, check_optional_int, check_positive_int
    from .writers import check_output_path

    check_output_path(output)
    output_format(output)
    check_optional_int("batch_size", batch_size)
    check_non_negative_int("num_workers", num_workers)
    check_float("timeout", timeout, minimum=0.0, strict_minimum=True)
    check_optional_int("limit", limit)
    check_positive_int("html_per_prompt", html_per_prompt)
    check_encoding(encoding)
    if html is not None:
        check_output_path(html, "html")


def _done_marker(output: Path, rank: int, world_size: int) -> Path:
    return parts_dir(output) / f"rank-{rank:05d}-of-{world_size:05d}.done"


def _wait_for_markers(output: Path, world_size: int, poll: float = 0.5) -> None:
    """Block until every process of the group has written its done marker (logged once a minute)."""
    last_log = time.monotonic()
    while True:
        missing = [rank for rank in range(world_size) if not _done_marker(output, rank, world_size).exists()]
        if not missing:
            return
        if time.monotonic() - last_log > 60:
            logger.warning("waiting for process(es) %s to finish their shards before merging", missing)
            last_log = time.monotonic()
        time.sleep(poll)
