"""The writer's choice of codec and I/O mode, from what it measures during the save.

One ``Controller`` per data file. Before each stretch of records (a tensor, or at most
``STRETCH`` bytes of a big one) the writer asks it for a ``Choice`` (codec, level, O_DIRECT or
buffered) and afterwards tells it what the write measured (``io.WriteResult``). It keeps, as
rates that forget by half every ``HALF_LIFE`` bytes:

- W[mode]: the write rate of each I/O mode, bytes of records / nanoseconds spent writing them
  (buffered writes include starting and awaiting their writeback, so W is the disk's rate, not
  the page cache's; see CKG_WRITEBACK_LAG in native/pipeline.h);
- E[c]: the encode rate of each candidate ``c`` per thread (copy, hash and compress), from the
  records written with it and from samples; it falls when the training process loads the cores;
- F[c]: the stored fraction of ``c`` (stored bytes / raw bytes), from the records and samples.

**Codec** (``compress="auto"``). With ``T`` threads, the expected seconds per raw byte are, for
the pipeline in which encoding and writing overlap::

    t(c) = max(1 / (E[c] * T), F[c] / W[mode])     t(raw) likewise, with F = 1

The choice is raw unless some candidate ``c`` has ``t(c) < (1 - MARGIN) * t(raw)``; then the one
with the least ``t``. Before W is measured (the file's first stretch) the choice is raw, the
fastest on a quiet disk. A candidate whose encoder alone cannot beat raw
(``1 / (E[c] * T) >= (1 - MARGIN) * t(raw)``) is not looked at further. Otherwise a tensor of at
least ``SAMPLE`` bytes has one block from its middle encoded with ``c`` (``F[c]`` of this tensor;
the time feeds E[c]); smaller tensors use the running F[c]. E[c] of a codec not in use is sampled
again after every ``RESAMPLE`` bytes, so a codec that lost is reconsidered when the disk slows.

**I/O mode** (``CKPTGUARD_ODIRECT`` unset or ``auto``, native path, a file system that takes
O_DIRECT). The file starts buffered. After ``FIRST_PROBE`` bytes, ``PROBE`` bytes are written in
the other mode; from then on each stretch goes in the mode with the higher W. Another probe of the
mode not in use follows after ``FIRST_PROBE`` bytes more, and the gap doubles each time a probe
does not change the mode (a probe on a quiet disk costs about ``PROBE / W`` seconds). A mode
forced by ``CKPTGUARD_ODIRECT=0|1`` is never probed.

Everything measured comes in through ``record`` and the ``probe`` function, so tests decide the
choices with given rates.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

from .encode import RAW, SHUFFLE_LZ4, SHUFFLE_ZSTD, encode_buffer

AUTO = -1
"""The codec argument of ``RankWriter.add`` that lets the controller choose."""

CANDIDATES: tuple[tuple[int, int], ...] = ((RAW, 0), (SHUFFLE_LZ4, 0), (SHUFFLE_ZSTD, 1))
"""(codec id, level) pairs ``compress="auto"`` chooses from; raw first."""

SAMPLE = 64 << 10
STRETCH = 64 << 20
HALF_LIFE = 64 << 20
RESAMPLE = 64 << 20
FIRST_PROBE = 128 << 20
PROBE = 16 << 20
MARGIN = 0.10

Probe = Callable[[memoryview, int, int, int], tuple[int, int]]
"""(block, elem_size, codec, level) -> (stored bytes, nanoseconds to encode)."""


def probe_encode(block: memoryview, elem_size: int, codec: int, level: int) -> tuple[int, int]:
    """Encode one block as a record would be, on one thread of the active backend (the encoder
    the records will use); its stored size and time."""
    n = len(block) // 16 * 16  # a chunk size encode_buffer takes
    if n < 64:
        return len(block), 1
    t0 = time.perf_counter_ns()
    ((_, payload, _),) = encode_buffer(block[:n], elem_size, n, codec, threads=1, level=level)
    return len(payload), time.perf_counter_ns() - t0


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
    limit: int  # at most this many bytes go with this choice (a probe is short)


class Measured(NamedTuple):
    """What one ``write_records`` call measured (``io.WriteResult`` has these fields)."""

    raw_bytes: int
    stored_bytes: int  # payload bytes of its records
    written: int  # record bytes written
    enc_ns: int
    write_ns: int
    direct: bool  # every record went through O_DIRECT


class Controller:
    """Chooses codec and I/O mode per stretch of one data file (see the module docstring)."""

    def __init__(
        self,
        threads: int,
        direct: bool | None,
        direct_ok: bool,
        candidates: Sequence[tuple[int, int]] = CANDIDATES,
        probe: Probe = probe_encode,
    ) -> None:
        self.threads = max(1, threads)
        self.candidates = [c for c in candidates if c[0] != RAW]
        self.probe = probe
        self.enc = {c: Rate() for c in [(RAW, 0), *self.candidates]}
        self.frac = {c: Rate() for c in self.candidates}
        self.write = {False: Rate(), True: Rate()}
        self.auto_io = direct is None and direct_ok
        self.direct = bool(direct) and direct_ok
        self.next_probe = FIRST_PROBE  # bytes of the file after which the other mode is tried
        self.gap = FIRST_PROBE
        self.probing = 0  # bytes left in the probe under way
        self.written = 0
        self.since_sample = RESAMPLE  # sample codec speeds at the first chance
        self.used: dict[str, dict[str, int]] = {"codec": {}, "io": {}}

    # -- I/O mode ---------------------------------------------------------------------------
    def _mode(self) -> tuple[bool, int]:
        """The mode of the next stretch and how many bytes it may cover."""
        if not self.auto_io:
            return self.direct, STRETCH
        if self.probing > 0:
            return not self.direct, self.probing
        if self.written >= self.next_probe:
            self.probing = PROBE
            return not self.direct, PROBE
        return self.direct, min(STRETCH, max(self.next_probe - self.written, PROBE))

    def _settle(self) -> None:
        """After a probe: take the mode with the higher write rate; back off if it was kept."""
        cur, other = self.write[self.direct].get(), self.write[not self.direct].get()
        if cur is not None and other is not None and other > cur:
            self.direct = not self.direct
            self.gap = FIRST_PROBE
        else:
            self.gap *= 2
        self.next_probe = self.written + self.gap

    # -- codec ------------------------------------------------------------------------------
    def _seconds(self, c: tuple[int, int], frac: float, w: float) -> float:
        e = self.enc[c].get()
        enc = 1.0 / (e * self.threads) if e else 0.0
        return max(enc, frac / w)

    def _codec(self, view: memoryview, elem_size: int, direct: bool) -> tuple[int, int]:
        w = self.write[direct].get() or self.write[not direct].get()
        if w is None or not self.candidates:
            return RAW, 0
        raw = (RAW, 0)
        bar = (1 - MARGIN) * self._seconds(raw, 1.0, w)
        best, best_t = raw, bar
        due = self.since_sample >= RESAMPLE  # refresh the speeds of codecs not in use
        for c in self.candidates:
            e = self.enc[c].get()
            if not due and e is not None and 1.0 / (e * self.threads) >= bar:
                continue  # its encoder alone is slower than writing raw
            frac = None
            if len(view) >= SAMPLE or e is None:
                frac = self._sample(view, elem_size, c)
            frac = frac if frac is not None else self.frac[c].get()
            if frac is None:
                continue
            t = self._seconds(c, frac, w)
            if t < best_t:
                best, best_t = c, t
        return best

    def _sample(self, view: memoryview, elem_size: int, c: tuple[int, int]) -> float | None:
        n = min(len(view), SAMPLE) // elem_size * elem_size
        if not n:
            return None
        at = (len(view) - n) // 2 // elem_size * elem_size
        stored, ns = self.probe(view[at : at + n], elem_size, c[0], c[1])
        self.enc[c].add(n, max(ns, 1) / 1e9, n)
        self.frac[c].add(stored, n, n)
        self.since_sample = 0
        return stored / n

    # -- the writer's interface -------------------------------------------------------------
    def choose(self, view: memoryview, elem_size: int, auto_codec: bool) -> Choice:
        """How to write (the start of) ``view``: codec (if ``auto_codec``), level, mode, and
        the most bytes this choice covers."""
        direct, limit = self._mode()
        codec, level = self._codec(view, elem_size, direct) if auto_codec else (RAW, 0)
        return Choice(codec, level, direct, limit)

    def record(self, choice: Choice, m: Measured) -> None:
        """Take in what a stretch written with ``choice`` measured."""
        if choice.direct and not m.direct and m.written:
            self.auto_io = self.direct = False  # refused O_DIRECT: buffered for the rest
            self.probing = 0
        if m.written:
            self.write[m.direct].add(m.written, max(m.write_ns, 1) / 1e9, m.written)
        key = (choice.codec, choice.level)
        if key in self.enc and m.raw_bytes:
            self.enc[key].add(m.raw_bytes, max(m.enc_ns, 1) / 1e9, m.raw_bytes)
        if key in self.frac and m.raw_bytes:
            self.frac[key].add(m.stored_bytes, m.raw_bytes, m.raw_bytes)
        self.written += m.written
        self.since_sample += m.raw_bytes
        if self.probing > 0 and choice.direct != self.direct:
            self.probing -= m.written
            if self.probing <= 0:
                self.probing = 0
                self._settle()

    def note_use(self, codec_name: str, mode_direct: bool, nbytes: int) -> None:
        """Count raw bytes per codec actually stored and per I/O mode (the save's stats)."""
        u = self.used
        u["codec"][codec_name] = u["codec"].get(codec_name, 0) + nbytes
        mode = "direct" if mode_direct else "buffered"
        u["io"][mode] = u["io"].get(mode, 0) + nbytes
