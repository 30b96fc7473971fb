"""TensorBoard event files: CRC32C of the TFRecord framing and a scalar round trip."""

from train.runtime.tensorboard import ScalarWriter, crc32c, read_scalars


def test_crc32c_known_values():
  # The standard check value of CRC-32C (Castagnoli) and an RFC 3720 test vector.
  assert crc32c(b"123456789") == 0xE3069283
  assert crc32c(bytes(32)) == 0x8A9136AA


def test_scalars_round_trip(tmp_path):
  writer = ScalarWriter(tmp_path / "tb")
  writer.scalars(1, {"loss": 2.5, "retain/nll": 0.125})
  writer.scalars(2, {"loss": 1.25})
  writer.close()
  assert writer.path.name.startswith("events.out.tfevents.")
  assert list(read_scalars(writer.path)) == [
    (1, "loss", 2.5),
    (1, "retain/nll", 0.125),
    (2, "loss", 1.25),
  ]
