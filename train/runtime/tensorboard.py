"""A minimal TensorBoard scalar writer with no TensorFlow dependency.

TensorBoard reads ``events.out.tfevents.*`` files: TFRecords whose payloads are ``Event``
protocol buffers. Scalars need only a handful of fields, so this module encodes them by
hand (``wall_time`` = 1, ``step`` = 2, ``file_version`` = 3, ``summary`` = 5; a summary
holds values with ``tag`` = 1 and ``simple_value`` = 2). Each record is framed as
``length (u64) | masked crc32c(length) (u32) | payload | masked crc32c(payload) (u32)``.
"""

from __future__ import annotations

import os
import pathlib
import socket
import struct
import time
from collections.abc import Iterator, Mapping

_CRC_TABLE = []
for _i in range(256):
  _c = _i
  for _ in range(8):
    _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1  # Castagnoli polynomial (reversed)
  _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
  out = bytearray()
  while True:
    byte, value = value & 0x7F, value >> 7
    out.append(byte | (0x80 if value else 0))
    if not value:
      return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
  key = _varint((number << 3) | wire_type)
  if wire_type == 2:  # length-delimited
    return key + _varint(len(payload)) + payload
  return key + payload


def _event(step: int, wall_time: float, summary: bytes = b"", version: str = "") -> bytes:
  out = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
  if version:
    out += _field(3, 2, version.encode())
  if summary:
    out += _field(5, 2, summary)
  return out


def _record(payload: bytes) -> bytes:
  length = struct.pack("<Q", len(payload))
  return (
    length
    + struct.pack("<I", _masked_crc(length))
    + payload
    + struct.pack("<I", _masked_crc(payload))
  )


class ScalarWriter:
  """Appends scalars to a new event file in ``log_dir`` (``tensorboard --logdir`` it)."""

  def __init__(self, log_dir: str | os.PathLike[str]):
    self.log_dir = pathlib.Path(log_dir)
    self.log_dir.mkdir(parents=True, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self.path = self.log_dir / name
    self._file = self.path.open("ab")
    self._file.write(_record(_event(0, time.time(), version="brain.Event:2")))

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    summary = b"".join(
      _field(1, 2, _field(1, 2, tag.encode()) + _field(2, 5, struct.pack("<f", float(v))))
      for tag, v in values.items()
    )
    self._file.write(_record(_event(step, time.time(), summary)))
    self._file.flush()

  def close(self) -> None:
    self._file.close()


def read_scalars(path: str | os.PathLike[str]) -> Iterator[tuple[int, str, float]]:
  """Yields ``(step, tag, value)`` from an event file, checking every CRC (for tests and
  quick looks without TensorBoard)."""
  data = pathlib.Path(path).read_bytes()
  pos = 0
  while pos < len(data):
    length_bytes = data[pos : pos + 8]
    (length,) = struct.unpack("<Q", length_bytes)
    (length_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
    payload = data[pos + 12 : pos + 12 + length]
    (payload_crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
    if length_crc != _masked_crc(length_bytes) or payload_crc != _masked_crc(payload):
      raise ValueError(f"{path}: corrupt record at byte {pos}")
    pos += 16 + length
    yield from _decode_event(payload)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
  value = shift = 0
  while True:
    byte = data[pos]
    value |= (byte & 0x7F) << shift
    pos, shift = pos + 1, shift + 7
    if not byte & 0x80:
      return value, pos


def _fields(data: bytes) -> Iterator[tuple[int, bytes | int]]:
  pos = 0
  while pos < len(data):
    key, pos = _read_varint(data, pos)
    number, wire_type = key >> 3, key & 7
    if wire_type == 0:
      value, pos = _read_varint(data, pos)
    elif wire_type == 1:
      value, pos = data[pos : pos + 8], pos + 8
    elif wire_type == 5:
      value, pos = data[pos : pos + 4], pos + 4
    else:
      size, pos = _read_varint(data, pos)
      value, pos = data[pos : pos + size], pos + size
    yield number, value


def _decode_event(payload: bytes) -> Iterator[tuple[int, str, float]]:
  fields = list(_fields(payload))
  step = next((v for n, v in fields if n == 2), 0)
  for number, summary in fields:
    if number != 5:
      continue
    for _, value in _fields(summary):
      parts = dict(_fields(value))
      yield step, parts[1].decode(), struct.unpack("<f", parts[2])[0]
