"""MXNet/insightface RecordIO (`train.rec` + `train.idx`) read and written without MXNet.

The byte layout, as dmlc-core's `recordio.cc` and MXNet's `python/mxnet/recordio.py` define it:

- every record starts on a 4-byte boundary with the magic word `0xced7230a` (little-endian uint32), then a
  length word `lrec`: the upper 3 bits are the continuation flag `cflag`, the lower 29 bits the length of
  this part's payload; the payload follows, zero-padded to a multiple of 4;
- `cflag` is 0 for a whole record. A payload that itself contains the magic word at a 4-byte-aligned
  position is split there by the writer into parts flagged 1 (first), 2 (middle), 3 (last); the magic word
  is dropped at each split and the reader puts it back between the parts;
- the payload of an image record (`mx.recordio.pack`) is an `IRHeader` packed as `struct 'IfQQ'` (flag
  uint32, label float32, id uint64, id2 uint64: 24 bytes); when `flag > 0` the label is an array of `flag`
  float32 values stored right after the header (and the header's own label is 0); the encoded image follows;
- `.idx` is text, one `key<TAB>offset` line per record (the byte offset of its magic word).

insightface's face datasets (CASIA-WebFace, MS1M-ArcFace, Glint360K) add an index-0 header record with
`flag > 0` and label `(a, b)`: images are records `1 .. a-1`; records `a .. b-1` are one per identity, with
label `(first, end)`: the image records of that identity (its class index is its position, `key - a`).
Image records carry the identity as label (a float, or the first value of an array label).

Nothing here loads a whole file: readers `pread` one record at a time, so a `tf.data` pipeline can read
millions of records at random offsets with bounded memory. Every malformed byte sequence is reported as a
`RecordIOError` naming the file and the offset.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.data.sources import DataError

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LEN_MASK = (1 << 29) - 1
MAX_PART = 1 << 29
IR_FORMAT = "<IfQQ"
IR_SIZE = struct.calcsize(IR_FORMAT)  # 24
# Bytes read ahead for a record whose length is not known yet: the two words plus the IRHeader and a
# two-value label, i.e. everything `list_rec` needs from an identity record in one read.
_PEEK = 8 + IR_SIZE + 8


class RecordIOError(DataError):
    """A .rec/.idx that is not valid RecordIO; the message names the file and the byte offset."""


@dataclass(frozen=True)
class IRHeader:
    """MXNet's image-record header. `label` is a float, or a float32 array when `flag > 0`."""

    flag: int
    label: float | np.ndarray
    id: int = 0
    id2: int = 0

    def label_value(self) -> float:
        """The class label as insightface reads it: the scalar, or the first value of an array label."""
        if isinstance(self.label, np.ndarray):
            if self.label.size == 0:
                raise ValueError("empty label array")
            return float(self.label[0])
        return float(self.label)


def pack(header: IRHeader, payload: bytes) -> bytes:
    """`IRHeader` + payload as `mx.recordio.pack` writes them (an array label sets `flag` to its size)."""
    if isinstance(header.label, np.ndarray | list | tuple):
        label = np.asarray(header.label, dtype="<f4").ravel()
        head = struct.pack(IR_FORMAT, label.size, 0.0, header.id, header.id2)
        return head + label.tobytes() + payload
    return struct.pack(IR_FORMAT, 0, float(header.label), header.id, header.id2) + payload


def unpack(record: bytes, *, where: str = "record") -> tuple[IRHeader, bytes]:
    """A record payload -> (`IRHeader`, image bytes), as `mx.recordio.unpack`."""
    if len(record) < IR_SIZE:
        raise RecordIOError(f"{where}: {len(record)} bytes, shorter than the {IR_SIZE}-byte IRHeader")
    flag, label, rid, rid2 = struct.unpack_from(IR_FORMAT, record)
    body = record[IR_SIZE:]
    if flag > 0:
        if len(body) < 4 * flag:
            raise RecordIOError(
                f"{where}: IRHeader flag {flag} needs {4 * flag} label bytes, has {len(body)}"
            )
        labels = np.frombuffer(body, dtype="<f4", count=flag).astype(np.float32)
        return IRHeader(flag, labels, rid, rid2), body[4 * flag :]
    return IRHeader(0, float(label), rid, rid2), body


def _split_parts(payload: bytes) -> list[tuple[int, bytes]]:
    """(cflag, part) as dmlc's writer emits them: split at every 4-aligned magic word (which is dropped)."""
    parts: list[tuple[int, bytes]] = []
    start = 0
    pos = payload.find(_MAGIC_BYTES)
    while pos != -1:
        if pos % 4 == 0:
            parts.append((1 if not parts else 2, payload[start:pos]))
            start = pos + 4
            pos = payload.find(_MAGIC_BYTES, start)
        else:
            pos = payload.find(_MAGIC_BYTES, pos + 1)
    parts.append((3 if parts else 0, payload[start:]))
    return parts


def encode_record(payload: bytes) -> bytes:
    """The bytes of one record on disk (magic, lrec, payload, padding; split into parts if needed)."""
    if len(payload) >= MAX_PART:
        raise ValueError(f"RecordIO records must be shorter than 2^29 bytes, got {len(payload)}")
    out = bytearray()
    for cflag, part in _split_parts(payload):
        out += _MAGIC_BYTES + struct.pack("<I", (cflag << 29) | len(part)) + part
        out += b"\0" * (-len(part) % 4)
    return bytes(out)


class RecordIOWriter:
    """Writes `rec` and its `.idx` (`key<TAB>offset` lines), as `mx.recordio.MXIndexedRecordIO(..., 'w')`."""

    def __init__(self, rec: Path | str, idx: Path | str | None = None) -> None:
        self.rec_path = Path(rec)
        self.idx_path = Path(idx) if idx is not None else self.rec_path.with_suffix(".idx")
        self._rec = self.rec_path.open("wb")
        self._idx = self.idx_path.open("w", encoding="ascii")
        self._last_key = -1

    def write(self, key: int, payload: bytes) -> int:
        """Append one record under `key` (keys increasing, as insightface writes them); returns its offset."""
        if key <= self._last_key:
            raise ValueError(f"{self.idx_path}: key {key} after key {self._last_key}; keys must increase")
        self._last_key = key
        offset = self._rec.tell()
        self._rec.write(encode_record(payload))
        self._idx.write(f"{key}\t{offset}\n")
        return offset

    def close(self) -> None:
        self._rec.close()
        self._idx.close()

    def __enter__(self) -> RecordIOWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_insightface_rec(
    rec: Path | str,
    identities: Iterable[Iterable[bytes]],
    *,
    idx: Path | str | None = None,
    label_array: bool = False,
) -> tuple[int, int]:
    """Write identities (each a list of encoded images, class k = k-th list) in insightface's layout.

    Index 0 is the header record (label `(a, b)`), images are `1 .. a-1` (label = class, a float, or
    `[class, 0]` with `label_array`), identity records `a .. b-1` carry `(first, end)`. The header needs
    `a`, known only at the end, so the file is written with a placeholder header of the same size and
    patched in place. Returns (images, identities).
    """
    ranges: list[tuple[int, int]] = []
    key = 1
    with RecordIOWriter(rec, idx) as writer:
        header_offset = writer.write(0, pack(IRHeader(2, np.zeros(2, np.float32)), b""))
        for k, images in enumerate(identities):
            first = key
            for data in images:
                label: float | np.ndarray = np.array([k, 0], np.float32) if label_array else float(k)
                writer.write(key, pack(IRHeader(0, label, key, 0), data))
                key += 1
            if key == first:
                raise ValueError(f"identity {k} has no images")
            ranges.append((first, key))
        a = key
        for k, (first, end) in enumerate(ranges):
            writer.write(a + k, pack(IRHeader(2, np.array([first, end], np.float32), a + k, 0), b""))
        b = a + len(ranges)
        writer._rec.flush()
        header = encode_record(pack(IRHeader(2, np.array([a, b], np.float32)), b""))
        writer._rec.seek(header_offset)
        writer._rec.write(header)
        writer._rec.seek(0, os.SEEK_END)
    return a - 1, len(ranges)


def read_idx_file(idx: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """(keys int64, offsets int64) of an `.idx` file, in file order; a bad line is named."""
    idx = Path(idx)
    try:
        text = idx.read_bytes()
    except OSError as exc:
        raise RecordIOError(f"{idx}: cannot read ({exc})") from exc
    n_lines = text.count(b"\n") + (0 if text.endswith(b"\n") or not text else 1)
    # Parsed by numpy in one pass (no Python object per line: a 5.8 M-line index would cost ~0.5 GB as lists).
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            values = np.fromstring(text, dtype=np.int64, sep=" ")
    except ValueError:
        values = np.zeros(0, np.int64)
    if len(values) != 2 * n_lines or _bad_layout(text, n_lines):
        for n, line in enumerate(text.split(b"\n"), 1):
            fields = line.split(b"\t")
            if line and (len(fields) != 2 or not all(f.strip().isdigit() for f in fields)):
                raise RecordIOError(f"{idx}: line {n} is {line[:60]!r}, expected 'key<TAB>offset'")
        raise RecordIOError(f"{idx}: not a 'key<TAB>offset' index")
    if n_lines == 0:
        raise RecordIOError(f"{idx}: empty index")
    table = values.reshape(-1, 2)
    return table[:, 0], table[:, 1]


def _bad_layout(text: bytes, n_lines: int) -> bool:
    """Two numbers per line but not tab-separated, one per line (e.g. `1 2\n3 4` is fine for fromstring)."""
    return text.count(b"\t") != n_lines


class RecordIOReader:
    """Random access to a `.rec` through its `.idx` (or a sequential scan when there is no `.idx`).

    Thread-safe (every read is an `os.pread`); the file is never read as a whole.
    """

    def __init__(self, rec: Path | str, idx: Path | str | None = None) -> None:
        self._fd = -1
        self.rec_path = Path(rec)
        if not self.rec_path.is_file():
            raise RecordIOError(f"{self.rec_path}: not a file")
        self.size = self.rec_path.stat().st_size
        idx_path = Path(idx) if idx is not None else self.rec_path.with_suffix(".idx")
        if idx_path.is_file():
            keys, offsets = read_idx_file(idx_path)
            self.idx_path: Path | None = idx_path
        else:
            keys, offsets = self._scan()
            self.idx_path = None
        bad = np.flatnonzero((offsets < 0) | (offsets > self.size - 8) | (offsets % 4 != 0))
        if bad.size:
            i = int(bad[0])
            raise RecordIOError(
                f"{self.rec_path}: offset {int(offsets[i])} of key {int(keys[i])} in "
                f"{idx_path} is outside the {self.size}-byte file or not 4-byte aligned (truncated .rec?)"
            )
        order = np.argsort(keys, kind="stable")
        self.keys = keys[order]
        self.offsets = offsets[order]
        if np.any(np.diff(self.keys) == 0):
            dup = int(self.keys[np.flatnonzero(np.diff(self.keys) == 0)[0]])
            raise RecordIOError(f"{idx_path}: key {dup} appears twice")
        self._fd = os.open(self.rec_path, os.O_RDONLY)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.keys)

    def offset_of(self, key: int) -> int:
        i = int(np.searchsorted(self.keys, key))
        if i >= len(self.keys) or self.keys[i] != key:
            raise RecordIOError(f"{self.idx_path or self.rec_path}: no record with key {key}")
        return int(self.offsets[i])

    def _pread(self, n: int, offset: int) -> bytes:
        return os.pread(self._fd, n, offset)

    def read_at(self, offset: int) -> tuple[bytes, int]:
        """The payload of the record at `offset` (parts joined) and the offset just past it."""
        return read_record(self._pread, offset, self.size, self.rec_path)

    def read(self, key: int) -> bytes:
        return self.read_at(self.offset_of(key))[0]

    def header(self, key: int) -> IRHeader:
        """Only the IRHeader of a record (one small read unless the record is split into parts)."""
        offset = self.offset_of(key)
        head = self._pread(_PEEK, offset)
        if len(head) >= 8:
            magic, lrec = struct.unpack_from("<II", head)
            if magic == MAGIC and lrec >> 29 == 0 and (lrec & _LEN_MASK) + 8 <= len(head):
                return unpack(head[8 : 8 + (lrec & _LEN_MASK)], where=f"{self.rec_path}: offset {offset}")[0]
        return unpack(self.read_at(offset)[0], where=f"{self.rec_path}: offset {offset}")[0]

    def _scan(self) -> tuple[np.ndarray, np.ndarray]:
        """Offsets of every record by walking the file (no `.idx`): keys are 0, 1, 2, ... in file order."""
        offsets = []
        fd = os.open(self.rec_path, os.O_RDONLY)
        try:
            offset = 0
            while offset < self.size:
                offsets.append(offset)
                _, offset = read_record(lambda n, o: os.pread(fd, n, o), offset, self.size, self.rec_path)
        finally:
            os.close(fd)
        return np.arange(len(offsets), dtype=np.int64), np.asarray(offsets, dtype=np.int64)

    def check(self, *, image_records: bool = True) -> int:
        """Read every record once (file order) and validate its framing (and IRHeader, for image records);
        returns the count."""
        for offset in np.sort(self.offsets):
            payload, _ = self.read_at(int(offset))
            if image_records:
                unpack(payload, where=f"{self.rec_path}: offset {int(offset)}")
        return len(self.offsets)

    def iter_records(self) -> Iterator[tuple[int, bytes]]:
        for key, offset in zip(self.keys, self.offsets, strict=True):
            yield int(key), self.read_at(int(offset))[0]


def read_record(pread, offset: int, size: int, path: Path) -> tuple[bytes, int]:
    """One record's payload starting at `offset` through `pread(n, offset)`; validates every part."""
    chunks: list[bytes] = []
    pos = offset
    while True:
        if pos + 8 > size:
            raise RecordIOError(
                f"{path}: offset {pos}: file ends {size - pos} bytes into a record header (truncated file)"
            )
        head = pread(8, pos)
        magic, lrec = struct.unpack("<II", head)
        if magic != MAGIC:
            raise RecordIOError(
                f"{path}: offset {pos}: magic {magic:#010x}, expected {MAGIC:#010x} (corrupt file or wrong "
                "offset in the .idx)"
            )
        cflag, length = lrec >> 29, lrec & _LEN_MASK
        expected = (0, 1) if pos == offset else (2, 3)
        if cflag not in expected:
            raise RecordIOError(
                f"{path}: offset {pos}: continuation flag {cflag} where {' or '.join(map(str, expected))} "
                "belongs (corrupt file)"
            )
        padded = length + (-length % 4)
        if pos + 8 + padded > size:
            raise RecordIOError(
                f"{path}: offset {pos}: record of {length} bytes runs past the end of the {size}-byte file "
                "(truncated file)"
            )
        chunks.append(pread(length, pos + 8) if length else b"")
        pos += 8 + padded
        if cflag in (0, 3):
            return _MAGIC_BYTES.join(chunks), pos


@dataclass(frozen=True)
class RecListing:
    """What training needs from a .rec, without pixels: per image, its record offset and class."""

    path: Path
    offsets: np.ndarray  # int64 [N]
    labels: np.ndarray  # int32 [N], 0..K-1
    class_names: list[str]
    layout: str  # "insightface" (index-0 header with identity ranges) or "flat" (labels read per record)
    spans: np.ndarray | None = None  # int32 [N]: bytes to the next record (one read per record)


def list_rec(rec: Path | str, idx: Path | str | None = None) -> RecListing:
    """Offsets and labels of every image of a .rec, as insightface's `MXFaceDataset` sees them.

    With insightface's header record the identity records give each identity's image range, so listing
    MS1M (5.8 M images, 85 k identities) reads 85 k small records, not 5.8 M. Without it every record is an
    image and its header is read for the label. Labels are remapped to 0..K-1 in order of value; the class
    names are the original label values.
    """
    reader = RecordIOReader(rec, idx)
    try:
        first_key = int(reader.keys[0])
        head0 = reader.header(first_key)
        if (
            first_key == 0
            and head0.flag > 0
            and isinstance(head0.label, np.ndarray)
            and head0.label.size >= 2
        ):
            listing = _list_insightface(reader, head0)
        else:
            labels = np.empty(len(reader), dtype=np.float64)
            for i, key in enumerate(reader.keys):
                labels[i] = _label_of(reader, int(key))
            listing = _relabel(reader, reader.offsets.copy(), labels, "flat")
        spans = record_spans(reader.offsets, listing.offsets, reader.size)
        return dataclasses.replace(listing, spans=spans)
    finally:
        reader.close()


def _label_of(reader: RecordIOReader, key: int) -> float:
    try:
        return reader.header(key).label_value()
    except ValueError as exc:
        raise RecordIOError(f"{reader.rec_path}: offset {reader.offset_of(key)}: {exc}") from exc


def _relabel(reader: RecordIOReader, offsets: np.ndarray, raw: np.ndarray, layout: str) -> RecListing:
    if np.any(raw != np.round(raw)) or np.any(raw < 0):
        i = int(np.flatnonzero((raw != np.round(raw)) | (raw < 0))[0])
        raise RecordIOError(
            f"{reader.rec_path}: offset {int(offsets[i])}: label {raw[i]} is not a class index (>= 0 integer)"
        )
    values, labels = np.unique(raw.astype(np.int64), return_inverse=True)
    names = [str(int(v)) for v in values]
    return RecListing(reader.rec_path, offsets, labels.astype(np.int32), names, layout)


def _list_insightface(reader: RecordIOReader, head0: IRHeader) -> RecListing:
    a, b = (int(v) for v in np.asarray(head0.label)[:2])
    where = f"{reader.rec_path}: offset {reader.offset_of(0)}"
    if not 1 <= a <= b:
        raise RecordIOError(f"{where}: header record label ({a}, {b}) is not insightface's (images+1, end)")
    image_keys = np.arange(1, a, dtype=np.int64)
    pos = np.searchsorted(reader.keys, image_keys)
    missing = (pos >= len(reader.keys)) | (reader.keys[np.minimum(pos, len(reader.keys) - 1)] != image_keys)
    if np.any(missing):
        raise RecordIOError(
            f"{reader.idx_path}: image key {int(image_keys[np.argmax(missing)])} (of 1..{a - 1} announced by "
            "the header record) is not in the index"
        )
    offsets = reader.offsets[pos]
    if b == a:  # no identity records: read the label of each image
        raw = np.array([_label_of(reader, int(k)) for k in image_keys], dtype=np.float64)
        return _relabel(reader, offsets, raw, "insightface")
    labels = np.full(a - 1, -1, dtype=np.int64)
    for k, key in enumerate(range(a, b)):
        head = reader.header(key)
        span = np.asarray(head.label).ravel() if isinstance(head.label, np.ndarray) else np.array([])
        if span.size < 2:
            raise RecordIOError(
                f"{reader.rec_path}: offset {reader.offset_of(key)}: identity record {key} has no "
                "(first, end) label"
            )
        first, end = int(span[0]), int(span[1])
        if not 1 <= first < end <= a:
            raise RecordIOError(
                f"{reader.rec_path}: offset {reader.offset_of(key)}: identity record {key} spans images "
                f"{first}..{end - 1}, outside 1..{a - 1}"
            )
        labels[first - 1 : end - 1] = k
    if np.any(labels < 0):
        orphan = int(np.argmax(labels < 0)) + 1
        raise RecordIOError(f"{reader.rec_path}: image record {orphan} belongs to no identity record")
    names = [str(k) for k in range(b - a)]
    return RecListing(reader.rec_path, offsets, labels.astype(np.int32), names, "insightface")


def read_images(
    rec: Path | str, offsets: np.ndarray, size: int | None = None, spans: np.ndarray | None = None
) -> tuple[list[bytes], np.ndarray]:
    """Encoded image bytes and header label values (float64) of the records at `offsets`: what a training
    step reads. With `spans` (bytes from each offset to the next record, `RecListing.spans`) a whole record
    is one `pread` and is parsed in place; records split into parts, or a span that does not hold the
    record, take the general path (`read_record`), which validates and names every malformed byte."""
    path = Path(rec)
    size = size if size is not None else path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    unpack_from = struct.unpack_from
    try:
        images, labels = [], np.empty(len(offsets), dtype=np.float64)
        span_list = np.asarray(spans).tolist() if spans is not None else None
        for i, offset in enumerate(np.asarray(offsets).tolist()):
            if span_list is not None:
                buf = os.pread(fd, span_list[i], offset)
                if len(buf) >= 8 + IR_SIZE:
                    magic, lrec = unpack_from("<II", buf)
                    length = lrec & _LEN_MASK
                    if magic == MAGIC and lrec >> 29 == 0 and IR_SIZE <= length <= len(buf) - 8:
                        flag, label = unpack_from("<If", buf, 8)
                        start = 8 + IR_SIZE + 4 * flag
                        if start <= 8 + length:
                            if flag > 0:
                                label = unpack_from("<f", buf, 8 + IR_SIZE)[0]
                            images.append(buf[start : 8 + length])
                            labels[i] = label
                            continue
            payload, _ = read_record(lambda n, o: os.pread(fd, n, o), offset, size, path)
            header, image = unpack(payload, where=f"{path}: offset {offset}")
            images.append(image)
            try:
                labels[i] = header.label_value()
            except ValueError as exc:
                raise RecordIOError(f"{path}: offset {offset}: {exc}") from exc
        return images, labels
    finally:
        os.close(fd)


def record_spans(all_offsets: np.ndarray, offsets: np.ndarray, size: int) -> np.ndarray:
    """Bytes from each of `offsets` to the next record of the file (or its end): one read holds the record."""
    ordered = np.unique(all_offsets)
    following = np.append(ordered[1:], size)
    spans = following[np.searchsorted(ordered, offsets)] - offsets
    return np.minimum(spans, MAX_PART + 8).astype(np.int32)
