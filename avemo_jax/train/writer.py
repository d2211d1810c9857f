"""Scalars to WORKDIR/<stage>/metrics.jsonl and TensorBoard event files (tensorboardX, no TF)."""
import json
import pathlib

import tensorboardX


class MetricWriter:
  """Appends one JSON object per logged step; on resume drops lines past the restored step."""

  def __init__(self, directory: pathlib.Path, resume_step: int = 0):
    directory.mkdir(parents=True, exist_ok=True)
    self.path = directory / "metrics.jsonl"
    if self.path.exists():  # lines logged after the last checkpoint will be logged again
      kept = [l for l in self.path.read_text().splitlines()
              if l.strip() and json.loads(l)["step"] <= resume_step]
      self.path.write_text("".join(l + "\n" for l in kept))
    self._file = self.path.open("a")
    self._tb = tensorboardX.SummaryWriter(str(directory))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    self._file.write(json.dumps({"step": step, **scalars}) + "\n")
    self._file.flush()
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, step)

  def close(self) -> None:
    self._file.close()
    self._tb.close()
