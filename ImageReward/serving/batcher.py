"""Dynamic batching across requests: the pairs of many concurrent requests go into one call of the batch engine.

Each request is decoded and preprocessed once, in a small thread pool (:meth:`DynamicBatcher.prepare`: every
image through the one image loader, :func:`ImageReward.image_io.load_image`, with its pixel count checked
from the header first), then queued as a :class:`Job`. One batch thread takes queued jobs until the batch holds
``max_batch_size`` pairs or the oldest has waited ``max_wait_ms``, stacks their pixels and scores them with
:func:`ImageReward.engine.score_pixels` (the engine behind ``Scorer.score_batch``). Only that thread calls the
model, and the model is warmed up (:meth:`DynamicBatcher.warm_up`) before the server says it is ready.

A bad image fails its own request before it is queued. When a batch of several requests fails, each request
is scored again on its own, so only the one at fault gets the error; a score that is NaN or infinite fails its
request and is never returned.

>>> batcher = DynamicBatcher(scorer, max_batch_size=32, max_wait_ms=5)   # doctest: +SKIP
>>> batcher.start(); scores = batcher.submit(batcher.prepare(request)).result()  # doctest: +SKIP
"""

from __future__ import annotations

import io
import logging
import queue
import threading
import time
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ..engine import preprocess_configs, preprocess_image, score_pixels, stack_pixels
from ..errors import ImageRewardError
from ..image_io import load_image
from .metrics import Metrics
from .protocol import Limits, ProtocolError, ScoreRequest, finite_scores

__all__ = ["Job", "DynamicBatcher"]

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """One request's pairs, ready for the model: ``pixels`` (one per pair: a ``[3, S, S]`` tensor, or a tuple
    for a mix) and ``prompts``. ``future`` receives the list of scores or the exception."""

    prompts: list[str]
    pixels: list[Any]
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.perf_counter)
    scores: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)


class DynamicBatcher:
    """Batches the jobs of concurrent requests for one scorer (see the module docstring).

    ``max_batch_size``: most pairs per model call (a larger request is scored in several calls);
    ``max_wait_ms``: longest time the first job of a batch waits for others; ``decode_workers``: threads that
    decode images; ``limits``: per-request limits (:class:`~ImageReward.serving.protocol.Limits`)."""

    def __init__(self, scorer: Any, *, name: str = "model", max_batch_size: int = 32, max_wait_ms: float = 5.0,
                 decode_workers: int = 4, limits: Limits | None = None, metrics: Metrics | None = None) -> None:
        self.scorer = scorer
        self.name = name
        self.max_batch_size = max(1, int(max_batch_size))
        self.max_wait_s = max(0.0, float(max_wait_ms)) / 1000.0
        self.limits = limits or Limits()
        self.metrics = metrics or Metrics()
        self.configs = preprocess_configs(scorer)
        self._queue: "queue.Queue[Job | None]" = queue.Queue()
        self._decoder = ThreadPoolExecutor(max(1, decode_workers), thread_name_prefix=f"decode-{name}")
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ request side (any thread)
    def prepare(self, request: ScoreRequest) -> Job:
        """Decode and preprocess a request's images (in the decode pool; call from any thread). Raises
        :class:`ProtocolError` naming the first image that is too large or cannot be read."""
        if request.pixels is not None:  # the pixel protocol: preprocessed already
            pixels = request.pixels
            rows = [tuple(group[i] for group in pixels) if isinstance(pixels, tuple) else pixels[i]
                    for i in request.image_index]
            return Job(request.prompts, rows)
        images = list(self._decoder.map(self._decode, range(len(request.images)), request.images))
        errors = [result for result in images if isinstance(result, ProtocolError)]
        if errors:
            raise errors[0]
        return Job(request.prompts, images)

    def _decode(self, index: int, data: bytes) -> Any:
        try:
            with Image.open(io.BytesIO(data)) as header:  # reads the header only: refuse bombs before decoding
                width, height = header.size
            if width * height > self.limits.max_pixels:
                return ProtocolError(f"image #{index} is {width}x{height} = {width * height} pixels; the limit is "
                                     f"{self.limits.max_pixels} (--max-pixels)", status=413)
            image = load_image(data, index=index, exif_transpose=getattr(self.scorer, "exif_transpose", True))
            return preprocess_image(image, self.configs)
        except Image.DecompressionBombError as err:  # beyond Pillow's own limit: refused from the header too
            return ProtocolError(f"image #{index}: {err}", status=413)
        except ImageRewardError as err:
            return ProtocolError(str(err), status=422)
        except (OSError, ValueError, SyntaxError) as err:
            return ProtocolError(f"image #{index} ({len(data)} bytes): cannot decode image ({err})", status=422)

    def submit(self, job: Job) -> Future:
        """Queue a prepared job; its ``future`` gets the scores (a list of floats, input order)."""
        if self._thread is None:
            raise RuntimeError("the batcher is not started")
        self._queue.put(job)
        return job.future

    # ------------------------------------------------------------------ model side (the batch thread)
    def warm_up(self) -> None:
        """Score one small batch before serving, so that nothing concurrent reaches a cold model (lazy
        imports, tokenizers, kernels). Raises what the model raises."""
        image = Image.new("RGB", (64, 48), (127, 90, 200))
        pixels = preprocess_image(image, self.configs)
        n = min(2, self.max_batch_size)
        finite_scores(score_pixels(self.scorer, ["warm-up"] * n, stack_pixels([pixels] * n), list(range(n))).tolist())

    @property
    def running(self) -> bool:
        """Whether the batch thread is serving."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "DynamicBatcher":
        """Start the batch thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"batcher-{self.name}", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish the jobs already queued, then stop the batch thread and the decode pool."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None
        self._decoder.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        pending: list[tuple[Job, int]] = []  # (job, first pair not yet scored)
        stopping = False
        while not (stopping and not pending):
            if not pending:
                job = self._queue.get()
                if job is None:
                    break
                pending.append((job, 0))
            deadline = pending[0][0].queued_at + self.max_wait_s
            while self._queued_pairs(pending) < self.max_batch_size and not stopping:
                timeout = deadline - time.perf_counter()
                try:
                    job = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                else:
                    pending.append((job, 0))
            pending = self._run_batch(pending)
        self._drain_on_exit()

    @staticmethod
    def _queued_pairs(pending: list[tuple[Job, int]]) -> int:
        return sum(len(job) - start for job, start in pending)

    def _run_batch(self, pending: list[tuple[Job, int]]) -> list[tuple[Job, int]]:
        """Score up to ``max_batch_size`` pairs from the front of ``pending``; return what is left."""
        parts: list[tuple[Job, int, int]] = []  # (job, start, stop)
        room = self.max_batch_size
        left: list[tuple[Job, int]] = []
        for job, start in pending:
            if job.future.done():  # timed out or cancelled meanwhile
                continue
            if room == 0:
                left.append((job, start))
                continue
            stop = min(len(job), start + room)
            parts.append((job, start, stop))
            room -= stop - start
            if stop < len(job):
                left.append((job, stop))
        if not parts:
            return left
        now = time.perf_counter()
        for job, start, _ in parts:
            if start == 0:
                self.metrics.observe("queue_wait_seconds", now - job.queued_at, model=self.name)
        try:
            scores = self._score(parts)
        except Exception as err:  # noqa: BLE001 - a failed batch must not take other requests down
            if len(parts) == 1:
                self._fail(parts[0][0], err)
                return [(job, start) for job, start in left if job is not parts[0][0]]
            logger.warning("a batch of %d requests failed (%s); scoring them one by one", len(parts), err)
            for part in parts:
                try:
                    self._deliver([part], self._score([part]))
                except Exception as single_err:  # noqa: BLE001
                    self._fail(part[0], single_err)
            failed = {id(part[0]) for part in parts if part[0].future.done()}
            return [(job, start) for job, start in left if id(job) not in failed]
        self._deliver(parts, scores)
        return left

    def _score(self, parts: list[tuple[Job, int, int]]) -> list[float]:
        prompts = [prompt for job, start, stop in parts for prompt in job.prompts[start:stop]]
        pixels = stack_pixels([row for job, start, stop in parts for row in job.pixels[start:stop]])
        started = time.perf_counter()
        scores = score_pixels(self.scorer, prompts, pixels, list(range(len(prompts)))).tolist()
        self.metrics.observe("batch_seconds", time.perf_counter() - started, model=self.name)
        self.metrics.observe("batch_size", len(prompts), model=self.name)
        return scores

    def _deliver(self, parts: list[tuple[Job, int, int]], scores: list[float]) -> None:
        offset = 0
        for job, start, stop in parts:
            chunk = scores[offset : offset + stop - start]
            offset += stop - start
            if not job.scores:
                job.scores = [0.0] * len(job)
            job.scores[start:stop] = chunk
            if stop == len(job):
                try:
                    values = finite_scores(job.scores)
                except FloatingPointError as err:
                    self._fail(job, err)
                    continue
                try:
                    job.future.set_result(values)
                except InvalidStateError:  # the request timed out or went away meanwhile
                    pass

    @staticmethod
    def _fail(job: Job, err: BaseException) -> None:
        try:
            job.future.set_exception(err)
        except InvalidStateError:
            pass

    def _drain_on_exit(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                self._fail(job, RuntimeError("the server is shutting down"))
