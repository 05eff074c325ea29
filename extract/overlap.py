"""python -m pytest tests/test_extract_overlap.py -q

Keeps the teacher busy: the next windows of records are encoded (chat template, tokenizer, image decode,
image processor) in worker processes while the teacher runs the current window, and shards are
compressed and written by a background thread.

Order is kept everywhere, so the cache is bit-identical to the serial path: windows come back in the
order they were read, and the one writer thread runs its jobs in the order they were submitted. With
`--encode-workers 0` both run inline in the calling thread (the serial path, through the same code).
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

import torch

from .encode import INTERNAL_ERROR, Rejected
from .preference import PreferenceEncoder
from .records import RawRecord

# fork, as torch's DataLoader workers start: in milliseconds, with the encoder inherited, and without re-running the
# caller's script (spawn would, unless it has an `if __name__ == "__main__"` guard). The children never touch CUDA.
START_METHOD = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
PREFETCH_PER_WORKER = 2  # windows queued per encoding process: one being encoded, one ready when the teacher asks
WRITES_IN_FLIGHT = 4  # writer jobs queued before the teacher waits for the writer: bounds records held in memory


def encode_window(encoder, items: list[tuple[RawRecord, object]]) -> list:
    """Per (raw record, KTO partner or None) item: its encoding, or Rejected (a bad record, or any exception
    on one record, recorded as internal_error so the run goes on)."""
    out = []
    for raw, partner in items:
        try:
            out.append(encoder.encode_pair(raw, partner) if isinstance(encoder, PreferenceEncoder) else encoder.encode(raw))
        except Rejected as r:
            out.append(r)
        except Exception as e:  # a bug or a library's surprise on one record: recorded, the run goes on
            out.append(Rejected(INTERNAL_ERROR, f"{type(e).__name__}: {e}"))
    return out


_WORKER_ENCODER = None  # set once in each encoding process


def _start_worker(encoder) -> None:
    global _WORKER_ENCODER
    torch.set_num_threads(1)  # one core per encoding process; the teacher's forward keeps the rest
    _WORKER_ENCODER = encoder


def _encode_in_worker(items: list) -> list:
    return encode_window(_WORKER_ENCODER, items)


class InlineExecutor(Executor):
    """Runs each job when it is submitted, in the calling thread."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as e:
            future.set_exception(e)
        return future


class Overlap:
    """`with Overlap(encoder, workers) as o:` then `for window, encoded in o.encoded(windows)` and `o.write(fn, *args)`.

    Each window is a tuple whose second element is its list of (raw, partner) items. workers = 0: serial."""

    def __init__(self, encoder, workers: int):
        self.encoder, self.workers = encoder, workers
        self._writes: deque[Future] = deque()

    def __enter__(self) -> Overlap:
        if self.workers == 0:
            self._pool = self._writer = InlineExecutor()
            self._submit = lambda items: self._pool.submit(encode_window, self.encoder, items)
        else:
            self._pool = ProcessPoolExecutor(self.workers, multiprocessing.get_context(START_METHOD),
                                             initializer=_start_worker, initargs=(self.encoder,))
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="shard-writer")  # one thread: jobs run in order
            self._submit = lambda items: self._pool.submit(_encode_in_worker, items)
        return self

    def encoded(self, windows: Iterable[tuple]) -> Iterator[tuple[tuple, list]]:
        """(window, its encoded items) in order, with up to PREFETCH_PER_WORKER x workers windows encoded ahead."""
        depth = max(1, PREFETCH_PER_WORKER * self.workers)
        pending: deque[tuple[tuple, Future]] = deque()
        for window in windows:
            pending.append((window, self._submit(window[1])))
            if len(pending) >= depth:
                window, future = pending.popleft()
                yield window, future.result()
        while pending:
            window, future = pending.popleft()
            yield window, future.result()

    def write(self, fn: Callable, *args) -> None:
        """Run fn(*args) on the writer thread after every job submitted before it; a failed job raises here."""
        self._writes.append(self._writer.submit(fn, *args))
        while self._writes and (len(self._writes) > WRITES_IN_FLIGHT or self._writes[0].done()):
            self._writes.popleft().result()

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                while self._writes:
                    self._writes.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._writer.shutdown(wait=True)  # queued jobs still run: an abort after an error removes its temporary
