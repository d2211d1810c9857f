"""`run(main)`: absl's app.run for the main job and the tools. Bad input is one "error:" line and
exit status 1 instead of a traceback or the whole help: a flag or config override that does not
parse or names no config key, a config file that does not load (with the configs there are), a
missing flag (app.UsageError), and a missing path, an unreadable file, a value that does not fit or
a workdir in use that the job finds (FileNotFoundError, PermissionError, ValueError,
BlockingIOError, each naming the culprit; --verbosity=1 shows where it was raised). A string flag or
config field that starts with "~" is under the user's home, as in a shell (bash leaves
`--workdir=~/x` as it is)."""
import os
import pathlib
import re
import sys

import ml_collections
from absl import app, flags, logging

_BAD_INPUT = (FileNotFoundError, PermissionError, ValueError, BlockingIOError)
_HELP = "--helpshort lists the flags"


def _unwrapped(e: BaseException) -> str:
  """ml_collections wraps a KeyError's message in an AttributeError: the innermost message."""
  while e.args and isinstance(e.args[0], BaseException):
    e = e.args[0]
  return str(e.args[0]) if e.args else str(e)


def _home(config: ml_collections.ConfigDict) -> None:
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      _home(value)
    elif isinstance(value, str) and value.startswith("~"):
      config[key] = os.path.expanduser(value)


def config_files(argv: list[str]) -> list[str]:
  """The FILE[:ARG] of every --config=FILE[:ARG] and --config FILE[:ARG] in `argv`."""
  files = []
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      files.append(arg[9:])
    elif arg == "--config" and i + 1 < len(argv):
      files.append(argv[i + 1])
  return files


def _bad_config(argv: list[str], problem: str) -> str:
  """The error line of a --config that does not load, listing the config files of its folder."""
  spec = next(iter(config_files(argv)), "")
  folder = pathlib.Path(spec.split(":")[0]).parent
  folder = folder if folder.is_dir() else pathlib.Path("configs")
  names = sorted(p.name for p in folder.glob("*.py") if "def get_config" in p.read_text())
  listed = f"; the configs in {folder}/: {', '.join(names)} (each also :tiny)" if names else ""
  return f"error: --config={spec}: {problem}{listed}"


def _parse(argv: list[str]) -> list[str]:
  if len(given := config_files(argv)) > 1:  # config_flags would silently take the first
    sys.exit(f"error: --config given more than once ({', '.join(given)}): give one")
  try:
    rest = flags.FLAGS(argv)
    for name in flags.FLAGS:
      flag = flags.FLAGS[name]
      if isinstance(flag.value, str) and flag.value.startswith("~"):
        flag.value = os.path.expanduser(flag.value)
      elif isinstance(flag.value, ml_collections.ConfigDict):
        _home(flag.value)
      elif type(flag.value).__name__ == "_ErrorConfig":  # config_flags defers a load failure
        flag.value.lock()
  except flags.Error as e:  # a get_config error arrives as its traceback: its last line is news
    last = re.sub(r"^\w+Error: ", "", str(e).strip().splitlines()[-1])
    sys.exit(f"error: {last}; {_HELP}")
  except (AttributeError, KeyError) as e:  # an override of a key the config does not have
    if "get_config" in str(e):  # a Python file without one, e.g. configs/common.py
      sys.exit(_bad_config(argv, "not a config file (it has no get_config)"))
    sys.exit(f"error: the config has no key {_unwrapped(e)}".replace("\n", "; "))
  except OSError as e:
    if "No such file" in str(e):
      sys.exit(_bad_config(argv, "no such file"))
    sys.exit(f"error: {e}".replace("\n", "; "))
  return rest


def run(main) -> None:
  def checked(argv):
    try:
      return main(argv)
    except _BAD_INPUT as e:
      if logging.level_debug():
        raise
      sys.exit(f"error: {e}")
    except app.UsageError as e:  # absl would print the whole help before it
      sys.exit(f"error: {e}; {_HELP}")
  app.run(checked, flags_parser=_parse)
