"""Scalars to WORKDIR/<stage>/metrics.jsonl and TensorBoard event files (tensorboardX, no TF)."""
import json
import logging
import pathlib
import sys
from types import ModuleType


def _tensorboardx() -> ModuleType:
  """tensorboardX, imported on first use and without torch. Its writer imports torch when that is
  installed (the bench and test extras), only to accept torch tensors, which we never log: 1.2 s
  and ~300 MB in the training process and in each of Grain's worker processes, which import this
  module with `avemo_jax.main`. While tensorboardX loads, `import torch` fails as if absent."""
  if "tensorboardX" in sys.modules:
    return sys.modules["tensorboardX"]
  hide = "torch" not in sys.modules
  if hide:
    sys.modules["torch"] = None  # the import system's "not installed" marker
  try:
    import tensorboardX  # pylint: disable=import-outside-toplevel
  finally:
    if hide:
      del sys.modules["torch"]
  return tensorboardX


class MetricWriter:
  """Appends one JSON object per logged step; on resume drops lines past the restored step."""

  def __init__(self, directory: pathlib.Path, resume_step: int = 0):
    directory.mkdir(parents=True, exist_ok=True)
    self.path = directory / "metrics.jsonl"
    self._kept: list[dict] = []
    if self.path.exists():  # lines logged after the last checkpoint will be logged again
      for line in self.path.read_text().splitlines():
        try:
          record = json.loads(line)
          step = record["step"]
        except (ValueError, KeyError, TypeError):  # e.g. cut short by a full disk or a crash
          logging.warning("%s: dropping %r, not a metrics line", self.path, line[:80])
          continue
        if step <= resume_step:
          self._kept.append(record)
      self.path.write_text("".join(json.dumps(r) + "\n" for r in self._kept))
    self._file = self.path.open("a")
    self._tb = _tensorboardx().SummaryWriter(str(directory))

  def logged(self, step: int, prefix: str) -> bool:
    """Whether a line kept from before holds `step`'s values of a name starting with `prefix`."""
    return any(r["step"] == step and any(k.startswith(prefix) for k in r) for r in self._kept)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    self._file.write(json.dumps({"step": step, **scalars}) + "\n")
    self._file.flush()
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, step)

  def close(self) -> None:
    self._file.close()
    self._tb.close()
