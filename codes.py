"""
The codes file: conversations of codec codes (and optional text tokens), one place for the format.

    python codes.py info conv_codes.bin

Layout (little-endian), written by CodesWriter and read by CodesFile:

    header   128 bytes: magic, version, shape of a frame, cardinalities, frame rate, counts
    payload  n_frames x n_cols uint16, row-major; a frame's columns are
             [text_0 .. text_{n_text-1}, s0k0 .. s0k{K-1}, s1k0 .. ]  (text first, then streams)
    index    (n_conversations + 1) uint64 frame offsets; conversation i is frames
             index[i]:index[i+1], so training never splices two conversations

The payload is memory-mapped, never read whole. Every reader validates the header, the sizes and
the code ranges and says what is wrong with a file; every writer writes a temporary file and
renames it, so a crash never leaves a half-written codes file behind.
"""
import os
import struct
import sys

import numpy as np

MAGIC = b"CONVCODE"
VERSION = 1
HEADER_SIZE = 128
# magic, version, n_streams, n_codebooks, cardinality, n_text, text_cardinality, frame_rate,
# n_frames, n_conversations
_HEADER = struct.Struct("<8sIIIIIIdQQ")
MAX_CARDINALITY = 65536  # uint16 payload


class CodesFormatError(ValueError):
    """A codes file (or the data meant for one) does not follow the format."""


class CodesFile:
    """Read-only, memory-mapped view of a codes file.

    f = CodesFile("conv_codes.bin")
    f.conversation(i)  -> np.ndarray [frames, n_cols] uint16 (a view of the memory map)
    f.audio(i)         -> [frames, n_streams, n_codebooks]
    f.text(i)          -> [frames, n_text]
    """

    def __init__(self, path, check_codes=True):
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"codes file {self.path!r} does not exist")
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as fh:
            head = fh.read(HEADER_SIZE)
        if len(head) < _HEADER.size or head[:8] != MAGIC:
            raise CodesFormatError(f"{self.path!r} is not a codes file (bad magic); "
                                   "make one with `python mimi.py encode` or `python data.py synthetic`")
        (_, version, self.n_streams, self.n_codebooks, self.cardinality, self.n_text,
         self.text_cardinality, self.frame_rate, self.n_frames, n_conv) = _HEADER.unpack_from(head)
        if version != VERSION:
            raise CodesFormatError(f"{self.path!r} has format version {version}; this code reads "
                                   f"version {VERSION}")
        self.n_cols = self.n_text + self.n_streams * self.n_codebooks
        if self.n_cols == 0 or len(head) < HEADER_SIZE:
            raise CodesFormatError(f"{self.path!r}: header is damaged (a frame has no columns)")
        payload = self.n_frames * self.n_cols * 2
        want = HEADER_SIZE + payload + (n_conv + 1) * 8
        if size != want:
            raise CodesFormatError(
                f"{self.path!r} is {size} bytes but its header describes {want} "
                f"({self.n_frames} frames x {self.n_cols} columns, {n_conv} conversations): "
                "the file is truncated or was damaged; re-create it")
        self.index = np.fromfile(self.path, dtype="<u8", count=n_conv + 1,
                                 offset=HEADER_SIZE + payload).astype(np.int64)
        if self.index[0] != 0 or self.index[-1] != self.n_frames or np.any(np.diff(self.index) <= 0):
            raise CodesFormatError(f"{self.path!r}: conversation index is damaged")
        self.data = (np.memmap(self.path, dtype="<u2", mode="r", offset=HEADER_SIZE,
                               shape=(self.n_frames, self.n_cols))
                     if self.n_frames else np.zeros((0, self.n_cols), np.uint16))
        if check_codes:
            self._check_codes()

    def _check_codes(self, rows=1 << 20):
        limits = np.array([self.text_cardinality] * self.n_text +
                          [self.cardinality] * (self.n_streams * self.n_codebooks))
        for start in range(0, self.n_frames, rows):
            hi = self.data[start:start + rows].max(axis=0)
            bad = np.nonzero(hi >= limits)[0]
            if len(bad):
                c = int(bad[0])
                rel = np.nonzero(self.data[start:start + rows, c] >= limits[c])[0][0]
                raise CodesFormatError(
                    f"{self.path!r}: frame {start + rel}, column {c} holds code "
                    f"{int(self.data[start + rel, c])} >= cardinality {int(limits[c])}")

    def __len__(self):
        return len(self.index) - 1

    @property
    def lengths(self):
        return np.diff(self.index)

    def conversation(self, i):
        return self.data[self.index[i]:self.index[i + 1]]

    def audio(self, i):
        c = self.conversation(i)[:, self.n_text:]
        return c.reshape(len(c), self.n_streams, self.n_codebooks)

    def text(self, i):
        return self.conversation(i)[:, :self.n_text]

    def meta(self):
        """The shape of a frame, as CodesWriter takes it."""
        return dict(n_streams=self.n_streams, n_codebooks=self.n_codebooks,
                    cardinality=self.cardinality, frame_rate=self.frame_rate,
                    n_text=self.n_text, text_cardinality=self.text_cardinality)

    def __repr__(self):
        mins = self.n_frames / self.frame_rate / 60
        return (f"CodesFile({self.path!r}: {len(self)} conversations, {self.n_frames} frames "
                f"({mins:.1f} min), {self.n_streams} streams x {self.n_codebooks} codebooks "
                f"of {self.cardinality}, {self.n_text} text streams of {self.text_cardinality})")


class CodesWriter:
    """Write conversations to a codes file, atomically.

    with CodesWriter("out.bin", n_streams=2, n_codebooks=8) as w:
        w.add(frames)   # [frames, n_cols] or, without text, [frames, n_streams, n_codebooks]

    The file appears under its name only when the block exits cleanly; an exception or a kill
    leaves the previous file (if any) untouched. append=True adds to an existing file of the same
    frame shape.
    """

    def __init__(self, path, n_streams, n_codebooks, cardinality=2048, frame_rate=12.5,
                 n_text=0, text_cardinality=0, append=False):
        self.path = str(path)
        self.n_streams, self.n_codebooks, self.cardinality = int(n_streams), int(n_codebooks), int(cardinality)
        self.frame_rate, self.n_text, self.text_cardinality = float(frame_rate), int(n_text), int(text_cardinality)
        for name, v in [("cardinality", self.cardinality), ("text_cardinality", self.text_cardinality)]:
            if v > MAX_CARDINALITY:
                raise CodesFormatError(f"{name} {v} does not fit the uint16 codes format "
                                       f"(at most {MAX_CARDINALITY})")
        if self.n_streams < 0 or self.n_codebooks < 0 or self.n_text < 0 or self.n_text + self.n_streams * self.n_codebooks == 0:
            raise CodesFormatError("a frame needs at least one column")
        if self.n_text and self.text_cardinality <= 0:
            raise CodesFormatError("a text stream needs text_cardinality > 0")
        self.n_cols = self.n_text + self.n_streams * self.n_codebooks
        self.limits = np.array([self.text_cardinality] * self.n_text + [self.cardinality] * (self.n_cols - self.n_text))
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"cannot write {self.path!r}: folder {folder!r} does not exist")
        self.tmp = f"{self.path}.{os.getpid()}.tmp"
        self.offsets = [0]
        if append and os.path.exists(self.path):
            old = CodesFile(self.path)
            if old.meta() != self.meta():
                raise CodesFormatError(f"cannot append to {self.path!r}: it holds frames of shape "
                                       f"{old.meta()}, the new data is {self.meta()}")
            with open(self.path, "rb") as src, open(self.tmp, "wb") as dst:
                src.seek(HEADER_SIZE)
                dst.write(b"\0" * HEADER_SIZE)
                left = old.n_frames * old.n_cols * 2
                while left:
                    buf = src.read(min(left, 1 << 24))
                    dst.write(buf)
                    left -= len(buf)
            self.offsets = [int(x) for x in old.index]
            del old
            self.fh = open(self.tmp, "r+b")
            self.fh.seek(0, 2)
        else:
            self.fh = open(self.tmp, "wb")
            self.fh.write(b"\0" * HEADER_SIZE)

    def meta(self):
        return dict(n_streams=self.n_streams, n_codebooks=self.n_codebooks, cardinality=self.cardinality,
                    frame_rate=self.frame_rate, n_text=self.n_text, text_cardinality=self.text_cardinality)

    def add(self, frames):
        """Append one whole conversation, [frames, n_cols] (or [frames, streams, codebooks] without text)."""
        self._write(frames)
        self.offsets.append(self.offsets[-1] + len(frames))

    def extend(self, frames):
        """Append frames to the last conversation (starting one if there is none): for writers
        that make a conversation piece by piece."""
        self._write(frames)
        if len(self.offsets) == 1:
            self.offsets.append(0)
        self.offsets[-1] += len(frames)

    def _write(self, frames):
        a = np.asarray(frames)
        if a.ndim == 3 and self.n_text == 0:
            a = a.reshape(len(a), -1)
        if a.ndim != 2 or a.shape[1] != self.n_cols:
            raise CodesFormatError(f"conversation has shape {tuple(np.shape(frames))}; this file holds "
                                   f"frames of {self.n_cols} columns ({self.n_text} text + "
                                   f"{self.n_streams} streams x {self.n_codebooks} codebooks)")
        if len(a) == 0:
            raise CodesFormatError("cannot add an empty conversation")
        if a.dtype.kind not in "iu":
            raise CodesFormatError(f"codes must be integers, got {a.dtype}")
        if a.min() < 0 or np.any(a.max(axis=0) >= self.limits):
            c = int(np.nonzero((a.max(axis=0) >= self.limits) | (a.min(axis=0) < 0))[0][0])
            raise CodesFormatError(f"column {c} holds codes outside [0, {int(self.limits[c])})")
        self.fh.write(np.ascontiguousarray(a, dtype="<u2").tobytes())

    def close(self):
        """Write the index and header, then move the file into place."""
        if self.fh is None:
            return
        fh, self.fh = self.fh, None
        # the index goes right after the frames the offsets count: frames written by an add() that an
        # interrupt (Ctrl-C) cut before it counted them are dropped, not left to shift the index
        fh.seek(HEADER_SIZE + self.offsets[-1] * self.n_cols * 2)
        fh.truncate()
        fh.write(np.asarray(self.offsets, dtype="<u8").tobytes())
        head = _HEADER.pack(MAGIC, VERSION, self.n_streams, self.n_codebooks, self.cardinality,
                            self.n_text, self.text_cardinality, self.frame_rate,
                            self.offsets[-1], len(self.offsets) - 1)
        fh.seek(0)
        fh.write(head.ljust(HEADER_SIZE, b"\0"))
        fh.flush()
        os.fsync(fh.fileno())
        fh.close()
        os.replace(self.tmp, self.path)

    def abort(self):
        if self.fh is not None:
            self.fh.close()
            self.fh = None
        if os.path.exists(self.tmp):
            os.remove(self.tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_codes(path, conversations, **meta):
    """Write a list of [frames, n_cols] arrays as one codes file."""
    with CodesWriter(path, **meta) as w:
        for c in conversations:
            w.add(c)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "info":
        sys.exit("usage: python codes.py info FILE")
    try:
        f = CodesFile(sys.argv[2])
    except (OSError, CodesFormatError) as e:
        sys.exit(f"error: {e}")
    print(f)
    lens = f.lengths / f.frame_rate / 60
    if len(lens):
        print(f"conversation minutes: min {lens.min():.1f}, mean {lens.mean():.1f}, max {lens.max():.1f}")
