import os

import numpy as np
import pytest

from codes import CodesFile, CodesFormatError, CodesWriter, write_codes, HEADER_SIZE


def _convs(rng, n_cols=16, lens=(5, 9, 3)):
    return [rng.integers(0, 2048, size=(n, n_cols)).astype(np.uint16) for n in lens]


def test_roundtrip_and_memmap(tmp_path):
    rng = np.random.default_rng(0)
    convs = _convs(rng)
    p = tmp_path / "c.bin"
    write_codes(p, convs, n_streams=2, n_codebooks=8)
    f = CodesFile(p)
    assert len(f) == 3 and f.n_frames == 17 and list(f.lengths) == [5, 9, 3]
    for i, c in enumerate(convs):
        np.testing.assert_array_equal(f.conversation(i), c)
        np.testing.assert_array_equal(f.audio(i), c.reshape(len(c), 2, 8))
    assert isinstance(f.data, np.memmap)


def test_text_columns_come_first(tmp_path):
    rng = np.random.default_rng(1)
    a = rng.integers(0, 2048, size=(4, 2, 3))
    t = rng.integers(0, 32000, size=(4, 1))
    p = tmp_path / "t.bin"
    write_codes(p, [np.concatenate([t, a.reshape(4, 6)], 1)], n_streams=2, n_codebooks=3,
                n_text=1, text_cardinality=32000)
    f = CodesFile(p)
    np.testing.assert_array_equal(f.text(0), t)
    np.testing.assert_array_equal(f.audio(0), a)


def test_append_and_shape_mismatch(tmp_path):
    rng = np.random.default_rng(2)
    p = tmp_path / "a.bin"
    write_codes(p, _convs(rng, lens=(4,)), n_streams=2, n_codebooks=8)
    with CodesWriter(p, n_streams=2, n_codebooks=8, append=True) as w:
        w.add(_convs(rng, lens=(6,))[0])
    assert list(CodesFile(p).lengths) == [4, 6]
    with pytest.raises(CodesFormatError, match="cannot append"):
        CodesWriter(p, n_streams=1, n_codebooks=8, append=True)


def test_bad_files_are_rejected(tmp_path):
    rng = np.random.default_rng(3)
    p = tmp_path / "b.bin"
    write_codes(p, _convs(rng), n_streams=2, n_codebooks=8)
    raw = p.read_bytes()
    (tmp_path / "trunc.bin").write_bytes(raw[:-20])
    with pytest.raises(CodesFormatError, match="truncated"):
        CodesFile(tmp_path / "trunc.bin")
    (tmp_path / "magic.bin").write_bytes(b"RIFF" + raw[4:])
    with pytest.raises(CodesFormatError, match="not a codes file"):
        CodesFile(tmp_path / "magic.bin")
    ver = bytearray(raw)
    ver[8] = 99
    (tmp_path / "ver.bin").write_bytes(bytes(ver))
    with pytest.raises(CodesFormatError, match="version 99"):
        CodesFile(tmp_path / "ver.bin")
    big = bytearray(raw)
    big[HEADER_SIZE + 2 * 7: HEADER_SIZE + 2 * 8] = (3000).to_bytes(2, "little")
    (tmp_path / "big.bin").write_bytes(bytes(big))
    with pytest.raises(CodesFormatError, match="frame 0, column 7 holds code 3000"):
        CodesFile(tmp_path / "big.bin")
    with pytest.raises(FileNotFoundError):
        CodesFile(tmp_path / "missing.bin")
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(CodesFormatError):
        CodesFile(tmp_path / "empty.bin")


def test_writer_rejects_bad_data_and_is_atomic(tmp_path):
    p = tmp_path / "w.bin"
    with pytest.raises(CodesFormatError, match="outside"):
        with CodesWriter(p, n_streams=1, n_codebooks=2) as w:
            w.add(np.array([[0, 2048]]))
    assert not p.exists() and not list(tmp_path.iterdir())  # nothing half-written is left
    with pytest.raises(CodesFormatError, match="columns"):
        with CodesWriter(p, n_streams=1, n_codebooks=2) as w:
            w.add(np.zeros((3, 5), np.int64))
    with pytest.raises(CodesFormatError, match="does not fit"):
        CodesWriter(p, n_streams=1, n_codebooks=1, n_text=1, text_cardinality=70000)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CodesWriter(tmp_path / "no" / "x.bin", n_streams=1, n_codebooks=1)


def test_frames_written_but_not_counted_are_dropped(tmp_path):
    # an interrupt between writing a piece's frames and counting them must not shift the index
    p = tmp_path / "c.bin"
    w = CodesWriter(p, n_streams=1, n_codebooks=2)
    w.extend(np.full((5, 2), 7))
    w._write(np.full((3, 2), 9))        # what extend() does before it counts the frames
    w.close()
    f = CodesFile(p)
    assert f.n_frames == 5 and len(f) == 1
    np.testing.assert_array_equal(np.asarray(f.conversation(0)).reshape(5, 2), np.full((5, 2), 7))
