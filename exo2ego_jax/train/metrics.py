"""Metric sinks: WORKDIR/metrics.jsonl (one JSON object per logged step) and TensorBoard event files.

The event files are written directly (TFRecord framing of `Event` protos holding scalar summaries), so
TensorBoard reads them without TensorFlow or tensorboard being installed where training runs.
"""
from __future__ import annotations

import json
import os
import socket
import struct
import time


def _crc32c_table():
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint((number << 3) | wire) + payload


def _bytes_field(number: int, data: bytes) -> bytes:
    return _field(number, 2, _varint(len(data)) + data)


def encode_event(wall_time: float, step: int, *, scalars: dict | None = None, file_version: str | None = None) -> bytes:
    """tensorflow.Event: wall_time=1 (double), step=2 (int64), file_version=3, summary=5 {value=1 {tag=1, simple_value=2}}."""
    msg = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version is not None:
        msg += _bytes_field(3, file_version.encode())
    if scalars:
        values = b"".join(_bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", float(v))))
                          for tag, v in scalars.items())
        msg += _bytes_field(5, values)
    return msg


class TensorBoardWriter:
    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(logdir, name)
        self._f = open(self.path, "ab")
        self._write(encode_event(time.time(), 0, file_version="brain.Event:2"))

    def _write(self, record: bytes) -> None:
        header = struct.pack("<Q", len(record))
        self._f.write(header + struct.pack("<I", _masked_crc(header)) + record + struct.pack("<I", _masked_crc(record)))

    def scalars(self, step: int, values: dict) -> None:
        self._write(encode_event(time.time(), step, scalars=values))
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_events(path: str) -> list[tuple[int, dict]]:
    """Parse our own event files back (tests): [(step, {tag: value})] for events carrying scalars."""
    out = []
    data = open(path, "rb").read()
    pos = 0
    while pos < len(data):
        (n,) = struct.unpack("<Q", data[pos:pos + 8])
        record = data[pos + 12:pos + 12 + n]
        pos += 12 + n + 4
        step, scalars, i = 0, {}, 0
        while i < len(record):
            key, i = _read_varint(record, i)
            number, wire = key >> 3, key & 7
            if wire == 0:
                value, i = _read_varint(record, i)
                if number == 2:
                    step = value
            elif wire == 1:
                i += 8
            elif wire == 2:
                length, i = _read_varint(record, i)
                if number == 5:
                    scalars.update(_read_summary(record[i:i + length]))
                i += length
        if scalars:
            out.append((step, scalars))
    return out


def _read_varint(buf: bytes, i: int):
    shift = value = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def _read_summary(buf: bytes) -> dict:
    out, i = {}, 0
    while i < len(buf):
        _, i = _read_varint(buf, i)
        length, i = _read_varint(buf, i)
        value = buf[i:i + length]
        i += length
        tag, simple, j = None, None, 0
        while j < len(value):
            key, j = _read_varint(value, j)
            if key >> 3 == 1:
                ln, j = _read_varint(value, j)
                tag = value[j:j + ln].decode()
                j += ln
            else:
                simple = struct.unpack("<f", value[j:j + 4])[0]
                j += 4
        out[tag] = simple
    return out


class MetricsLogger:
    """Writes each logged step to metrics.jsonl and TensorBoard (process 0 only)."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        if enabled:
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            self._tb = TensorBoardWriter(os.path.join(workdir, "tensorboard"))

    def log(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **record}) + "\n")
        self._jsonl.flush()
        self._tb.scalars(step, {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
