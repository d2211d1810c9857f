"""Names that Python finds only when a line runs: pyflakes over the package, tools, configs and
tests (rarely run paths, such as a benchmark row a test leaves out, fail here instead)."""
import io
import pathlib

from pyflakes import api, reporter

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_no_undefined_or_unused_names():
  out = io.StringIO()
  paths = [ROOT / d for d in ("avemo_jax", "tools", "configs", "tests")]
  api.checkRecursive([str(p) for p in paths], reporter.Reporter(out, out))
  problems = []
  for line in out.getvalue().splitlines():
    path, number = line.split(":")[:2]
    if "tests/reference/" in path:  # third-party files, fetched
      continue
    if "# noqa" not in pathlib.Path(path).read_text().splitlines()[int(number) - 1]:
      problems.append(line)
  assert not problems, "\n".join(problems)
