"""Reading back the TensorBoard scalars of a run (written by :mod:`train.runtime.metrics`).

For tests and quick looks without TensorBoard. An event file is a TFRecord file: records
framed as ``length (u64) | masked crc32c(length) (u32) | payload | masked crc32c(payload)
(u32)``, whose payloads are ``Event`` protocol buffers; tensorboardX provides the
``Event`` message and the CRC.
"""

from __future__ import annotations

import os
import pathlib
import struct
from collections.abc import Iterator


def read_scalars(path: str | os.PathLike[str]) -> Iterator[tuple[int, str, float]]:
  """Yields ``(step, tag, value)`` for every scalar in the event file ``path``, in order.

  Raises:
    ValueError: A record's length or payload does not match its CRC (a corrupt file).
  """
  from tensorboardX.proto import event_pb2  # noqa: PLC0415 (tensorboardX imports torch)
  from tensorboardX.record_writer import masked_crc32c  # noqa: PLC0415

  data = pathlib.Path(path).read_bytes()
  pos = 0
  while pos < len(data):
    header = data[pos : pos + 8]
    (length,) = struct.unpack("<Q", header)
    (header_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
    payload = data[pos + 12 : pos + 12 + length]
    (payload_crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
    if header_crc != masked_crc32c(header) or payload_crc != masked_crc32c(payload):
      raise ValueError(f"{path}: corrupt record at byte {pos}")
    pos += 16 + length
    event = event_pb2.Event.FromString(payload)
    for value in event.summary.value:
      yield event.step, value.tag, value.simple_value
