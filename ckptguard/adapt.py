"""The writer's choice of codec and I/O mode, from what it measures during the save.

One ``Controller`` per data file. Before each stretch of records (a tensor, or at most
``STRETCH`` bytes of a big one) the writer asks it for a ``Choice`` (codec, level, O_DIRECT or
buffered) and afterwards tells it what the write measured (``Measured``). It keeps, as rates
that forget by half every ``HALF_LIFE`` bytes:

- W[mode]: the write rate of each I/O mode, bytes of records / nanoseconds spent writing them
  (buffered writes include starting and awaiting their writeback, see CKG_WRITEBACK_LAG in
  native/pipeline.h, and any drain the controller asked for);
- E[c]: the encode rate per thread of each candidate ``c`` (copy, hash and compress) as the pool
  achieves it while it also writes: from the records written with ``c``; for a codec not in use,
  a one-thread sample scaled by how the pool's rate compared with the samples' when the codec
  (or, for one never used, any codec) was last used in this process (``Memory``: it falls when
  the pool's threads contend for cores and memory);
- F[c]: the stored fraction of ``c`` (stored bytes / raw bytes), from the records and samples.

**Codec** (``compress="auto"``). With ``T`` threads, each of which encodes a chunk and then
writes its record, records going to the disk one at a time, the expected seconds per raw byte
are (on the pure-Python path, which writes after encoding, ``1 / (E[c] T) + F[c] / W``)::

    t(c) = max((1 / E[c] + F[c] / W[mode]) / T, F[c] / W[mode])     t(raw) likewise, F = 1

The choice is raw unless some candidate ``c`` has ``t(c) < (1 - MARGIN) * t(raw)`` (the codec in
use: ``t(c) < t(raw)``); then the one with the least ``t``. Before W is measured (the file's
first stretch) the choice is raw, the fastest on a quiet disk. A candidate whose encoder alone
cannot beat raw is not looked at further. Otherwise a tensor of at least ``SAMPLE`` bytes has
one block from its middle encoded with ``c`` (``F[c]`` of this tensor, and a sample of E[c]);
smaller tensors use the running F[c]. E[c] of a codec not in use is sampled again after every
``RESAMPLE`` bytes, so a codec that lost is reconsidered when the disk slows.

A codec is kept only while its stretches take less time than raw would now: after ``JUDGE``
raw bytes of a codec's stretches, their observed time is compared with ``t(raw)`` at the W those
stretches measured, scaled by how raw's observed stretch times compared with ``t(raw)``. When
the codec loses, the model was optimistic: no codec is chosen for ``RESAMPLE`` raw bytes, twice
as long after each further loss (up to ``MAX_VETO``).

**I/O mode** (``CKPTGUARD_ODIRECT`` unset or ``auto``, native path, a file system that takes
O_DIRECT). A file starts in the mode this process last chose for its file system (``st_dev``),
else buffered. After ``FIRST_TRIAL`` bytes (or what the file system's schedule has left) comes a
trial: ``ROUNDS`` stretches of ``PROBE`` bytes in each mode, alternating, the codec fixed, each
stretch charged with writing back what it left in the page cache (``io.wait_written``), and
the one stretch before the trial drained likewise, so both modes start from the same disk. The
mode whose median rate is higher by ``MODE_MARGIN`` wins. The next trial follows ``REPROBE``
bytes later, and that gap doubles up to ``MAX_GAP`` each time a trial keeps the mode; the gap
and the mode carry over to the next file on the same file system. A mode forced by
``CKPTGUARD_ODIRECT=0|1`` is never tried.

Everything measured comes in through ``record``, the ``probe`` function and the ``drain``
function, so tests decide the choices with given rates.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import NamedTuple

from .encode import RAW, SHUFFLE_LZ4, SHUFFLE_ZSTD, encode_buffer
from .format.manifest import WriteStats

AUTO = -1
"""The codec argument of ``RankWriter.add`` that lets the controller choose."""

CANDIDATES: tuple[tuple[int, int], ...] = ((RAW, 0), (SHUFFLE_LZ4, 0), (SHUFFLE_ZSTD, 1))
"""(codec id, level) pairs ``compress="auto"`` chooses from; raw first."""

RAW_C = (RAW, 0)
SAMPLE = 64 << 10
STRETCH = 64 << 20
HALF_LIFE = 64 << 20
RESAMPLE = 64 << 20
MARGIN = 0.10
JUDGE = 16 << 20
MAX_VETO = 1 << 30
FIRST_TRIAL = 32 << 20
PROBE = 16 << 20
ROUNDS = 3
MODE_MARGIN = 0.05
REPROBE = 256 << 20
MAX_GAP = 4 << 30

Probe = Callable[[memoryview, int, int, int], tuple[int, int]]
"""(block, elem_size, codec, level) -> (stored bytes, nanoseconds to encode)."""

Drain = Callable[[], int]
"""Write back what the file's buffered writes left in the page cache; the nanoseconds it took."""


def probe_encode(block: memoryview, elem_size: int, codec: int, level: int) -> tuple[int, int]:
    """Encode one block as a record would be, on one thread of the active backend (the encoder
    the records will use); its stored size and time."""
    n = len(block) // 16 * 16  # a chunk size encode_buffer takes
    if n < 64:
        return len(block), 1
    t0 = time.perf_counter_ns()
    ((_, payload, _),) = encode_buffer(block[:n], elem_size, n, codec, threads=1, level=level)
    return len(payload), time.perf_counter_ns() - t0


def no_drain() -> int:
    return 0


class Rate:
    """``num`` per ``den`` over observations, older ones weighing half per ``HALF_LIFE`` of
    ``weight`` since."""

    def __init__(self) -> None:
        self.num = 0.0
        self.den = 0.0

    def add(self, num: float, den: float, weight: float) -> None:
        d = 0.5 ** (weight / HALF_LIFE)
        self.num = self.num * d + num
        self.den = self.den * d + den

    def get(self) -> float | None:
        return self.num / self.den if self.den > 0 and self.num > 0 else None


class Choice(NamedTuple):
    codec: int
    level: int
    direct: bool
    limit: int  # at most this many bytes go with this choice (a trial's stretch is short)


class Measured(NamedTuple):
    """What one ``write_records`` call measured (``io.WriteResult`` has most of these)."""

    raw_bytes: int
    stored_bytes: int  # payload bytes of its records
    written: int  # record bytes written
    enc_ns: int  # summed over the threads
    write_ns: int
    direct: bool  # every record went through O_DIRECT
    wall_ns: int = 0  # the whole call, as the writer waited for it (0: not measured)


class FsMode(NamedTuple):
    """What this process last concluded about one file system's I/O mode."""

    direct: bool
    gap: int  # bytes from one trial to the next (0: no trial has ended yet)
    left: int  # bytes still to write on it before the next trial


class Memory:
    """What a process's controllers hand on to later data files: the I/O mode and trial
    schedule per file system, and per codec how the pool's encode rate compared with a
    sample's (a ``Rate``: bytes the pool encoded per second it would have taken at the sample's
    rate)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._modes: dict[Hashable, FsMode] = {}
        self._ratios: dict[tuple[int, int] | None, Rate] = {}

    def mode(self, fs: Hashable) -> FsMode | None:
        with self._lock:
            return self._modes.get(fs)

    def set_mode(self, fs: Hashable, mode: FsMode) -> None:
        with self._lock:
            self._modes[fs] = mode

    def ratio(self, codec: tuple[int, int] | None) -> Rate:
        """The ratio of ``codec`` (None: of all codecs, for one not yet used)."""
        with self._lock:
            return self._ratios.setdefault(codec, Rate())

    def clear(self) -> None:
        with self._lock:
            self._modes.clear()
            self._ratios.clear()


MEMORY = Memory()
"""This process's memory (``Controller``'s default)."""


class ModeChooser:
    """Buffered or O_DIRECT per stretch of one data file (the module docstring's I/O rule)."""

    def __init__(
        self, direct: bool | None, direct_ok: bool, fs: Hashable | None, memory: Memory
    ) -> None:
        self.auto = direct is None and direct_ok
        self.direct = bool(direct) and direct_ok
        self.fs = fs if self.auto else None
        self.memory = memory
        self.gap, self.next_trial = 0, FIRST_TRIAL
        known = memory.mode(fs) if self.fs is not None else None
        if known is not None:
            self.direct, self.gap, self.next_trial = known
        self.written = 0
        self.plan: list[bool] = []  # the modes of the trial's stretches still to write
        self.acc = [0, 0]  # bytes and nanoseconds of the trial's stretch under way
        self.rates: dict[bool, list[float]] = {False: [], True: []}

    @property
    def trying(self) -> bool:
        return bool(self.plan)

    def choose(self) -> tuple[bool, int]:
        """The mode of the next stretch and how many bytes it may cover."""
        if not self.auto:
            return self.direct, STRETCH
        if not self.plan and self.written >= self.next_trial:
            self._start()  # a file that begins with a trial: nothing of it is pending
        if self.plan:
            return self.plan[0], PROBE - self.acc[0]
        return self.direct, min(STRETCH, self.next_trial - self.written)

    def record(self, asked: bool, m: Measured, drain: Drain) -> int:
        """Take in a stretch written in mode ``asked``; the nanoseconds of the drain it was
        charged with (0: none)."""
        self.written += m.written
        if asked and not m.direct and m.written:
            self._refused()
            return 0
        if not self.auto or not m.written:
            return 0
        if self.plan:
            self.acc[0] += m.written
            self.acc[1] += m.write_ns
            if self.acc[0] < PROBE:
                return 0
            extra = drain()
            self.rates[asked].append(self.acc[0] / max(self.acc[1] + extra, 1))
            self.acc = [0, 0]
            self.plan.pop(0)
            if not self.plan:
                self._verdict()
            return extra
        if self.written >= self.next_trial:
            extra = drain()  # the trial's first stretch starts with nothing pending
            self._start()
            return extra
        return 0

    def finish(self) -> None:
        """Hand the mode and the schedule on to the next file on this file system."""
        if self.fs is not None and self.auto:
            left = 0 if self.plan else max(0, self.next_trial - self.written)
            self.memory.set_mode(self.fs, FsMode(self.direct, self.gap, left))

    def _start(self) -> None:
        self.plan = [not self.direct, self.direct] * ROUNDS
        self.acc = [0, 0]
        self.rates = {False: [], True: []}

    def _verdict(self) -> None:
        cur = statistics.median(self.rates[self.direct])
        other = statistics.median(self.rates[not self.direct])
        if other > cur * (1 + MODE_MARGIN):
            self.direct = not self.direct
            self.gap = REPROBE
        else:
            self.gap = min(2 * self.gap, MAX_GAP) if self.gap else REPROBE
        self.next_trial = self.written + self.gap
        if self.fs is not None:
            self.memory.set_mode(self.fs, FsMode(self.direct, self.gap, self.gap))

    def _refused(self) -> None:
        """The file system refused O_DIRECT: buffered for the rest, and on it from now on."""
        self.auto = self.direct = False
        self.plan = []
        if self.fs is not None:
            self.memory.set_mode(self.fs, FsMode(False, MAX_GAP, MAX_GAP))


class Controller:
    """Chooses codec and I/O mode per stretch of one data file (see the module docstring).

    ``fs``: the file system's identity (``st_dev``) for the process's ``memory``;
    ``pipelined``: whether encoding and writing overlap (the native path)."""

    def __init__(
        self,
        threads: int,
        direct: bool | None,
        direct_ok: bool,
        candidates: Sequence[tuple[int, int]] = CANDIDATES,
        probe: Probe = probe_encode,
        fs: Hashable | None = None,
        memory: Memory = MEMORY,
        pipelined: bool = True,
    ) -> None:
        self.threads = max(1, threads)
        self.candidates = [c for c in candidates if c[0] != RAW]
        self.probe = probe
        self.memory = memory
        self.pipelined = pipelined
        self.mode = ModeChooser(direct, direct_ok, fs, memory)
        self.pool = {c: Rate() for c in [RAW_C, *self.candidates]}  # E from records
        self.sampled = {c: Rate() for c in self.candidates}  # E from one-thread samples
        self.frac = {c: Rate() for c in self.candidates}
        self.write = {False: Rate(), True: Rate()}
        self.cal = Rate()  # raw stretches: observed nanoseconds per predicted nanosecond
        self.raw_done = 0
        self.since_sample = RESAMPLE  # sample codec speeds at the first chance
        self.last_used = dict.fromkeys(self.pool, -math.inf)  # raw_done at its last records
        self.veto_until = 0  # no codec is chosen before raw_done reaches this
        self.veto_gap = RESAMPLE
        self.current = RAW_C  # the codec compress="auto" chose last
        self.judged = [0, 0.0, 0.0]  # its raw bytes, observed ns, raw's ns since it was chosen
        self.used: dict[str, dict[str, int]] = {"codec": {}, "io": {}}
        self.enc_ns = self.write_ns = 0

    # -- the model ------------------------------------------------------------------------
    def _enc(self, c: tuple[int, int]) -> float | None:
        """E[c]: the pool's encode rate per thread, from c's records while it is in use, else
        from its samples scaled as its records compared with them last time."""
        pool = self.pool[c].get()
        if c == RAW_C or (pool is not None and self.raw_done - self.last_used[c] < RESAMPLE):
            return pool
        sampled = self.sampled[c].get()
        if sampled is None:
            return pool
        return sampled * (self.memory.ratio(c).get() or self.memory.ratio(None).get() or 1.0)

    def _seconds(self, c: tuple[int, int], frac: float, w: float) -> float:
        """t(c): expected seconds per raw byte with stored fraction ``frac`` at write rate
        ``w`` (0 encode time while E is unknown)."""
        e = self._enc(c)
        enc = 1.0 / e if e else 0.0
        wr = frac / w
        if not self.pipelined:
            return enc / self.threads + wr
        return max((enc + wr) / self.threads, wr)

    def _w(self) -> float | None:
        d = self.mode.direct
        return self.write[d].get() or self.write[not d].get()

    # -- codec ------------------------------------------------------------------------------
    def _codec(self, view: memoryview, elem_size: int) -> tuple[int, int]:
        w = self._w()
        if w is None or not self.candidates:
            return RAW_C
        if self.mode.trying:
            return self.current  # a trial compares the modes with the codec fixed
        if self.veto_until > self.raw_done:
            return RAW_C  # the best codec's stretches took longer than raw's lately
        raw_t = self._seconds(RAW_C, 1.0, w)
        best, best_t = RAW_C, raw_t
        due = self.since_sample >= RESAMPLE  # refresh the speeds of codecs not in use
        for c in self.candidates:
            bar = raw_t if c == self.current else (1 - MARGIN) * raw_t
            e = self._enc(c)
            if not due and e is not None and 1.0 / (e * self.threads) >= bar:
                continue  # its encoder alone is slower than writing raw
            frac = None
            if len(view) >= SAMPLE or e is None:
                frac = self._sample(view, elem_size, c)
            frac = frac if frac is not None else self.frac[c].get()
            if frac is None:
                continue
            t = self._seconds(c, frac, w)
            if t < bar and t < best_t:
                best, best_t = c, t
        return best

    def _sample(self, view: memoryview, elem_size: int, c: tuple[int, int]) -> float | None:
        n = min(len(view), SAMPLE) // elem_size * elem_size
        if not n:
            return None
        at = (len(view) - n) // 2 // elem_size * elem_size
        stored, ns = self.probe(view[at : at + n], elem_size, c[0], c[1])
        self.sampled[c].add(n, max(ns, 1) / 1e9, n)
        self.frac[c].add(stored, n, n)
        self.since_sample = 0
        return stored / n

    def _judge(self, key: tuple[int, int], m: Measured, wall_ns: int) -> None:
        """Compare a stretch's observed time with raw's (see the module docstring)."""
        w = self.write[m.direct].get() or self._w()
        if w is None or not m.raw_bytes or not wall_ns:
            return
        raw_ns = self._seconds(RAW_C, 1.0, w) * m.raw_bytes * 1e9
        if key == RAW_C:
            self.cal.add(wall_ns, raw_ns, m.raw_bytes)
            return
        if key != self.current:
            return  # a fixed codec: not the controller's to judge
        j = self.judged
        j[0] += m.raw_bytes
        j[1] += wall_ns
        j[2] += raw_ns * (self.cal.get() or 1.0)
        if j[0] < JUDGE:
            return
        if j[1] >= j[2]:  # the model's best lost: the others it ranked lower would too
            self.veto_until = self.raw_done + self.veto_gap
            self.veto_gap = min(2 * self.veto_gap, MAX_VETO)
        else:
            self.veto_gap = RESAMPLE
        self.judged = [0, 0.0, 0.0]

    # -- the writer's interface -------------------------------------------------------------
    def choose(self, view: memoryview, elem_size: int, auto_codec: bool) -> Choice:
        """How to write (the start of) ``view``: codec (if ``auto_codec``), level, mode, and
        the most bytes this choice covers."""
        direct, limit = self.mode.choose()
        codec = RAW_C
        if auto_codec:
            codec = self._codec(view, elem_size)
            if codec != self.current:
                self.current, self.judged = codec, [0, 0.0, 0.0]
        return Choice(codec[0], codec[1], direct, limit)

    def steady(self, ahead: int) -> bool:
        """Whether the choices for up to ``ahead`` bytes of records past those measured so far
        may be made before those are measured (the writer queues stretches and writes them in
        one call): they lie within the stretch the I/O rule is in, before a trial or inside one
        of its stretches, so every stretch of a trial is measured in its own mode alone. Codec
        choices only lag by what is queued."""
        m = self.mode
        if not m.auto:
            return True
        if m.plan:
            return ahead < PROBE - m.acc[0]
        return m.written + ahead < m.next_trial

    def record(self, choice: Choice, m: Measured, drain: Drain = no_drain) -> None:
        """Take in what a stretch written with ``choice`` measured; ``drain`` is called when
        the I/O rule wants the stretch's buffered writes on the disk before the next one."""
        extra = self.mode.record(choice.direct, m, drain)
        write_ns = m.write_ns + extra
        if m.written:
            self.write[m.direct].add(m.written, max(write_ns, 1) / 1e9, m.written)
        key = (choice.codec, choice.level)
        if key in self.pool and m.raw_bytes:
            self.pool[key].add(m.raw_bytes, max(m.enc_ns, 1) / 1e9, m.raw_bytes)
            self.last_used[key] = self.raw_done
            sampled = self.sampled.get(key)
            rate = sampled.get() if sampled is not None else None
            if rate is not None:  # the pool's rate against the sample's: E of later samples
                for ratio in (self.memory.ratio(key), self.memory.ratio(None)):
                    ratio.add(m.raw_bytes, max(m.enc_ns, 1) / 1e9 * rate, m.raw_bytes)
        if key in self.frac and m.raw_bytes:
            self.frac[key].add(m.stored_bytes, m.raw_bytes, m.raw_bytes)
        self.raw_done += m.raw_bytes
        self.since_sample += m.raw_bytes
        self.enc_ns += m.enc_ns
        self.write_ns += write_ns
        if m.wall_ns:
            self._judge(key, m, m.wall_ns + extra)

    def note_use(self, codec_name: str, mode_direct: bool, nbytes: int) -> None:
        """Count raw bytes per codec actually stored and per I/O mode (the save's stats)."""
        u = self.used
        u["codec"][codec_name] = u["codec"].get(codec_name, 0) + nbytes
        mode = "direct" if mode_direct else "buffered"
        u["io"][mode] = u["io"].get(mode, 0) + nbytes

    def finish(self) -> WriteStats:
        """The file is written: hand the I/O mode on (``Memory``); what this file used."""
        self.mode.finish()
        return {
            "codec": dict(self.used["codec"]),
            "io": dict(self.used["io"]),
            "encode_s": self.enc_ns / 1e9,
            "write_s": self.write_ns / 1e9,
        }


def merge_stats(stats: Iterable[WriteStats]) -> WriteStats:
    """The ranks' ``WriteStats`` summed: what the whole save used."""
    out: WriteStats = {"codec": {}, "io": {}, "encode_s": 0.0, "write_s": 0.0}
    for s in stats:
        for into, part in ((out["codec"], s["codec"]), (out["io"], s["io"])):
            for k, v in part.items():
                into[k] = into.get(k, 0) + v
        out["encode_s"] += s["encode_s"]
        out["write_s"] += s["write_s"]
    return out


def stretch_bytes(chunk: int) -> int:
    """Bytes of a stretch the controller looks at: whole chunks, about ``STRETCH``."""
    return max(chunk, STRETCH // chunk * chunk)
