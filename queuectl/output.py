"""The output store: every run's whole output, kept beside the ledger in chunks.

Output is data, not an action: the ledger's ``finished`` events keep the tail of each run
as before, so replay never reads this table, ``rebuild --check`` ignores it and ``ledger
export`` leaves it out. Rules it keeps:

- A worker writes what its run printed while it runs, every ``FLUSH_EVERY`` seconds when
  there is new output (sooner when ``FLUSH_SIZE`` bytes wait), each write a short
  transaction of its own (``Db.side_transaction``): never the one that records a result.
- A run whose whole output fits in the ledger's tail, and that ended before its first
  write was due, is not written here at all: its finished event holds all of it. So quick
  jobs cost the store nothing more.
- At most ``log-limit`` bytes of a run are kept, and one chunk more: past that the oldest
  chunks are deleted as new ones come, so the end is kept, and readers mark the gap.
- Chunks name their run by job, attempt and worker, and are read within the run's start and
  end (the times of the events that began and ended it), so that each life of a requeued
  or restarted job keeps its own output, and neither is shown the other's.
- Text is stored as UTF-8 decoded on the way in (a character split between two reads is
  whole in one chunk; invalid bytes and NULs, which no PostgreSQL text can hold, become
  U+FFFD); sizes and gaps count the bytes the run wrote.
"""

from __future__ import annotations

import codecs
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import msgspec

from queuectl import settings
from queuectl.states import FINAL
from queuectl.store import Db

if TYPE_CHECKING:
    from queuectl.records import Run

FLUSH_EVERY = 0.25  # seconds between writes of a run's new output, at most
FLUSH_SIZE = 256 * 1024  # bytes waiting that are written without waiting for FLUSH_EVERY
FOLLOW_POLL = 0.2  # seconds between a follower's looks at the store
_DECODER = codecs.getincrementaldecoder("utf-8")


def gap(dropped: int) -> str:
    """The line that stands where output was dropped."""
    return f"[... {settings.size(dropped, tenths=True)} of output dropped ...]\n"


# -- writing (the worker) -------------------------------------------------------------------


class Sink:
    """What one run prints, on its way to the output store: ``add`` takes each read of the
    run's pipe (the runner's thread); the worker writes what is due with ``write``."""

    def __init__(self, job_id: str, attempt: int, worker_id: str, limit: int,
                 tail: int) -> None:
        self.job_id, self.attempt, self.worker_id = job_id, attempt, worker_id
        self.limit = limit  # log-limit: bytes kept; 0, none
        self.tail = tail  # bytes of tail the ledger keeps
        self.total = 0  # bytes the run wrote so far
        self.waiting: list[bytes] = []
        self.waiting_size = 0
        self.start = 0  # where the waiting bytes begin in the run's output
        self.seq = 0  # the last chunk written
        self.written = False  # whether any was
        self.kept: deque[tuple[int, int]] = deque()  # (seq, size) of the chunks in the store
        self.kept_size = 0
        self.due_at = time.monotonic() + FLUSH_EVERY
        self._decoder = _DECODER("replace")

    def add(self, chunk: bytes) -> None:
        if not self.limit:
            return
        self.total += len(chunk)
        self.waiting.append(chunk)
        self.waiting_size += len(chunk)
        if self.waiting_size > self.limit + FLUSH_SIZE:  # the store is away: keep the end
            self._drop_head(self.waiting_size - self.limit)

    def _drop_head(self, n: int) -> None:
        data = b"".join(self.waiting)[n:]
        self.waiting, self.waiting_size = [data], len(data)
        self.start += n
        self._decoder.reset()

    def due(self, now: float) -> bool:
        return bool(self.waiting) and (now >= self.due_at or self.waiting_size >= FLUSH_SIZE)

    def needed_at_end(self, truncated: bool) -> bool:
        """Whether the run's end must still be written: not if nothing was, and the
        ledger's tail holds the whole output."""
        return bool(self.waiting) and (self.written or truncated or self.total > self.tail)


def write(db: Db, sink: Sink, final: bool = False) -> None:
    """Write what ``sink`` holds as chunks of ``FLUSH_SIZE`` bytes at most, and delete the
    oldest chunks past its limit, in one short transaction of its own. ``final``: the run
    has ended."""
    if sink.waiting_size > sink.limit:
        sink._drop_head(sink.waiting_size - sink.limit)
    data = b"".join(sink.waiting)
    pieces = [data[i:i + FLUSH_SIZE] for i in range(0, len(data), FLUSH_SIZE)]
    texts = [sink._decoder.decode(piece, final and n == len(pieces) - 1).replace("\0", "\ufffd")
             for n, piece in enumerate(pieces)]
    run = (sink.job_id, sink.attempt, sink.worker_id)
    with db.side_transaction():
        seq = sink.seq
        if not sink.written:  # after what an earlier life of the job left (a restart)
            (seq,) = db.execute("SELECT coalesce(max(seq), 0) FROM output WHERE job_id = ? "
                                "AND attempt = ? AND worker_id = ?", run).fetchone()
        kept, size, start = deque(sink.kept), sink.kept_size, sink.start
        for piece, text in zip(pieces, texts, strict=True):
            seq += 1
            db.insert("output", {"job_id": sink.job_id, "attempt": sink.attempt,
                                 "worker_id": sink.worker_id, "seq": seq, "at": db.now(),
                                 "start": start, "size": len(piece), "data": text})
            kept.append((seq, len(piece)))
            size, start = size + len(piece), start + len(piece)
        gone = []
        while len(kept) > 1 and size - kept[0][1] >= sink.limit:
            oldest, n = kept.popleft()
            gone.append(oldest)
            size -= n
        if gone:
            db.execute("DELETE FROM output WHERE job_id = ? AND attempt = ? AND worker_id = ? "
                       f"AND seq IN ({', '.join('?' * len(gone))})", (*run, *gone))
    # Only once committed: a write that failed is tried again with more.
    sink.seq, sink.written = seq, True
    sink.kept, sink.kept_size, sink.start = kept, size, start
    sink.waiting, sink.waiting_size = [], 0
    sink.due_at = time.monotonic() + FLUSH_EVERY


# -- reading --------------------------------------------------------------------------------


class Chunk(msgspec.Struct):
    seq: int
    start: int
    size: int
    data: str


def chunks(db: Db, job_id: str, run: Run, after: int = 0) -> list[Chunk]:
    """The chunks of ``job_id``'s ``run`` in the store after chunk ``after``, oldest first."""
    sql = ("SELECT seq, start, size, data FROM output WHERE job_id = ? AND attempt = ? "
           "AND worker_id = ? AND seq > ? AND at >= ?")
    params: tuple[object, ...] = (job_id, run.attempt, run.worker_id, after, run.started_at)
    if run.finished_at is not None:
        sql, params = sql + " AND at <= ?", (*params, run.finished_at)
    return [Chunk(*row) for row in db.execute(sql + " ORDER BY seq", params).fetchall()]


class Reader:
    """One run's output as it grows: each ``more`` gives the text stored since the last,
    with a gap line where chunks were dropped before it read them."""

    def __init__(self, job_id: str, run: Run) -> None:
        self.job_id, self.run = job_id, run
        self.seq = 0  # the last chunk read
        self.end = 0  # where the text given so far ends, in the run's bytes
        self.done = False  # the run ended, and all of it was given

    def more(self, db: Db) -> str:
        parts = []
        for chunk in chunks(db, self.job_id, self.run, self.seq):
            if chunk.start > self.end:
                parts.append(gap(chunk.start - self.end))
            parts.append(chunk.data)
            self.seq, self.end = chunk.seq, chunk.start + chunk.size
        return "".join(parts)

    def rest(self, db: Db, ended: Run) -> str:
        """The last of the run, ``ended`` as the event that ended it says: the store's
        chunks, or the ledger's tail if the store had none (a short run's whole output)."""
        if self.done:
            return ""
        self.run, self.done = ended, True
        text = self.more(db)
        if self.seq == 0 and ended.output:
            lost = "[... earlier output not kept ...]\n" if ended.truncated else ""
            return lost + ended.output
        return text


def full(db: Db, job_id: str, run: Run) -> str:
    """All that is kept of ``job_id``'s ``run``'s output."""
    reader = Reader(job_id, run)
    return reader.rest(db, run) if run.finished_at is not None else reader.more(db)


def delete(db: Db, job_ids: list[str]) -> None:
    """Remove these jobs' output (``prune``), inside the caller's write transaction."""
    db.delete("output", "job_id", job_ids)


# -- following ------------------------------------------------------------------------------


class NextRun(msgspec.Struct):
    """Between two runs when following: how the last ended, which one starts."""

    ended: Run
    run: Run
    job_id: str

    def __str__(self) -> str:
        how = self.ended.error or self.ended.outcome
        return f"==> job {self.job_id}: attempt {self.ended.attempt} {self.ended.outcome} " \
               f"({how}); attempt {self.run.attempt} follows <=="


def follow(db: Db, job_id: str, sleep: Callable[[float], None] = time.sleep
           ) -> Iterator[str | NextRun]:
    """A job's output as it is written, from the start of its current run (or its last one,
    if it is not running; once it starts, if it has not), on into each run after it, until
    the job is final. Yields text, and a ``NextRun`` between runs."""
    for step in steps(db, job_id):
        if isinstance(step, float):
            sleep(step)
        else:
            yield step


def steps(db: Db, job_id: str, poll: float = FOLLOW_POLL) -> Iterator[str | NextRun | float]:
    """``follow``, yielding how long to sleep (a float) where it would sleep: a caller that
    shares ``db`` with others (``Queue.follow``) lets go of it meanwhile."""
    from queuectl import reads  # the reading side: a worker, which only writes, never loads it

    reads.get_job(db, job_id)  # an unknown id: NotFound now
    reader: Reader | None = None
    index = 0
    while True:
        # The job first, then its runs, then their chunks: a run seen ended has all its
        # chunks written (the worker writes them before it records the end).
        final = reads.get_job(db, job_id).state in FINAL
        runs = reads.runs_of(db, job_id)
        if reader is None and runs:
            index = len(runs) - 1
            reader = Reader(job_id, runs[index])
        while reader is not None:
            run = runs[index]
            if run.finished_at is None:
                if text := reader.more(db):
                    yield text
                break
            if text := reader.rest(db, run):
                yield text
            if index + 1 == len(runs):
                break
            index += 1
            yield NextRun(run, runs[index], job_id)
            reader = Reader(job_id, runs[index])
        if final and (not runs or runs[-1].finished_at is not None):
            return
        yield poll
