"""`run(main)`: absl's app.run for the main job and the tools. Bad input is one "error:" line and
exit status 1 instead of a traceback: a flag or config override that does not parse or names no
config key, a config file that does not load, and a missing path, an unreadable file or a value
that does not fit that the job finds (FileNotFoundError, PermissionError, ValueError, each naming
the culprit; --verbosity=1 shows where it was raised). A string flag or config field that starts
with "~" is under the user's home, as in a shell (bash leaves `--workdir=~/x` as it is)."""
import os
import sys

import ml_collections
from absl import app, flags, logging

_BAD_INPUT = (FileNotFoundError, PermissionError, ValueError)


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


def _parse(argv: list[str]) -> list[str]:
  try:
    argv = flags.FLAGS(argv)
    for name in flags.FLAGS:
      flag = flags.FLAGS[name]
      if isinstance(flag.value, str) and flag.value.startswith("~"):
        flag.value = os.path.expanduser(flag.value)
      elif isinstance(flag.value, ml_collections.ConfigDict):
        _home(flag.value)
      elif type(flag.value).__name__ == "_ErrorConfig":  # config_flags defers a load failure
        flag.value.lock()
  except flags.Error as e:  # a get_config error arrives as its traceback: its last line is news
    sys.exit(f"error: {str(e).strip().splitlines()[-1]}\n"
             "Pass --helpshort or --helpfull to see help on flags.")
  except (AttributeError, KeyError) as e:  # an override of a key the config does not have
    sys.exit(f"error: the config has no key {_unwrapped(e)}".replace("\n", "; "))
  except OSError as e:
    sys.exit(f"error: {e}")
  return argv


def run(main) -> None:
  def checked(argv):
    try:
      return main(argv)
    except _BAD_INPUT as e:
      if logging.level_debug():
        raise
      sys.exit(f"error: {e}")
  app.run(checked, flags_parser=_parse)
