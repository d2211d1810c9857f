"""Converts torchvggish's AudioSet VGGish weights for our audio encoder.

  python tools/convert_vggish.py --input=vggish-10086976.pth --output=DIR

Writes DIR/variables (Orbax: params of avemo_jax.models.audio.VGGish without its valence/arousal
head) and DIR/conversion.json (source file and sha256, key counts, what was ignored: PCA
post-processing parameters, if the file has them), and prints the latter. Train from it with
--config.init.audio=DIR. Needs torch (pip install -e '.[convert]'); training does not.
"""
import json

from absl import flags

from avemo_jax import cli
from avemo_jax.models import convert

_INPUT = flags.DEFINE_string("input", None, "torchvggish state dict (.pth).", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Folder to write (must not hold variables/).",
                              required=True)


def main(argv):
  del argv
  print(json.dumps(convert.convert_file("vggish", _INPUT.value, _OUTPUT.value), indent=2))


if __name__ == "__main__":
  cli.run(main)
