"""The run's metric logs: the TensorBoard event files tensorboardX writes (TFRecord framing
with CRC32C, Event protocol buffers) read back with their tags, steps and values; the JSONL
log; both trimmed on resume; nothing written by a non-primary process."""

import json
import struct

import pytest
from tensorboardX.crc32c import crc32c
from tensorboardX.proto import event_pb2

from train.runtime.metrics import MetricsLogger
from train.runtime.tensorboard import read_scalars


def _masked(crc):
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _events(path):
  """The Event messages of a TFRecord file, checking both CRCs of every record."""
  data, pos, events = path.read_bytes(), 0, []
  while pos < len(data):
    header = data[pos : pos + 8]
    (length,) = struct.unpack("<Q", header)
    payload = data[pos + 12 : pos + 12 + length]
    assert struct.unpack("<I", data[pos + 8 : pos + 12])[0] == _masked(crc32c(header))
    assert struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])[0] == _masked(
      crc32c(payload)
    )
    events.append(event_pb2.Event.FromString(payload))
    pos += 16 + length
  return events


def _scalars(events):
  return [(e.step, v.tag, v.simple_value) for e in events for v in e.summary.value]


def _event_files(run_dir):
  return sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_crc32c_known_values():
  # The standard check value of CRC-32C (Castagnoli) and an RFC 3720 test vector: the CRC
  # of the TFRecord framing that the test reader checks.
  assert crc32c(b"123456789") == 0xE3069283
  assert crc32c(bytes(32)) == 0x8A9136AA


def test_scalars_round_trip(tmp_path):
  with MetricsLogger(tmp_path) as logger:
    logger.log({"step": 1, "objective": 0, "loss": 2.5, "retain/nll": 0.125})
    logger.log({"step": 2, "objective": 1, "loss": 1.25, "per_leaf": {"['w']": 0.5}})
  (path,) = _event_files(tmp_path)
  events = _events(path)
  assert events[0].file_version == "brain.Event:2"
  # Float values only: not the int objective, nor the per-leaf dict.
  expected = [(1, "loss", 2.5), (1, "retain/nll", 0.125), (2, "loss", 1.25)]
  assert _scalars(events) == expected
  assert list(read_scalars(path)) == expected
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert lines == logger.history
  assert lines[1] == {"step": 2, "objective": 1, "loss": 1.25, "per_leaf": {"['w']": 0.5}}


def test_read_scalars_rejects_a_corrupt_record(tmp_path):
  with MetricsLogger(tmp_path) as logger:
    logger.log({"step": 1, "loss": 2.5})
  (path,) = _event_files(tmp_path)
  data = bytearray(path.read_bytes())
  data[-6] ^= 0xFF  # inside the last record's payload
  path.write_bytes(bytes(data))
  with pytest.raises(ValueError, match="corrupt record"):
    list(read_scalars(path))


def test_resume_drops_what_followed_the_checkpoint(tmp_path):
  with MetricsLogger(tmp_path) as logger:
    for step in range(1, 6):
      logger.log({"step": step, "loss": float(step)})
  # Killed after step 5, resumed from the checkpoint of step 3.
  with MetricsLogger(tmp_path, start_step=3) as logger:
    assert [json.loads(line)["step"] for line in logger.path.read_text().splitlines()] == [1, 2, 3]
    logger.log({"step": 4, "loss": 40.0})
  steps = [
    json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
  ]
  assert steps == [1, 2, 3, 4]
  first, second = _event_files(tmp_path)  # the resumed run's file sorts after the first
  assert _scalars(_events(first)) == [(s, "loss", float(s)) for s in range(1, 6)]
  # TensorBoard purges the earlier events from step 4 on when it reads a session start.
  resumed = _events(second)
  starts = [e.step for e in resumed if e.session_log.status == event_pb2.SessionLog.START]
  assert starts == [4]
  assert _scalars(resumed) == [(4, "loss", 40.0)]


def test_a_new_run_purges_nothing_and_other_processes_write_nothing(tmp_path):
  with MetricsLogger(tmp_path / "new") as logger:
    logger.log({"step": 1, "loss": 1.0})
  (path,) = _event_files(tmp_path / "new")
  assert not any(e.HasField("session_log") for e in _events(path))
  with MetricsLogger(tmp_path / "other", write=False) as logger:
    logger.log({"step": 1, "loss": 1.0})
  assert logger.history == [{"step": 1, "loss": 1.0}]
  assert not (tmp_path / "other").exists()
