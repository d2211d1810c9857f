"""`run(main)`: absl's app.run for the tools, with bad input (a missing path, a file or value
that does not fit: FileNotFoundError, ValueError, each naming the culprit) reported as one line
and exit status 1 instead of a traceback."""
import sys

from absl import app


def run(main) -> None:
  def checked(argv):
    try:
      return main(argv)
    except (FileNotFoundError, ValueError) as e:
      sys.exit(f"error: {e}")
  app.run(checked)
