"""Converts facenet-pytorch's InceptionResnetV1 weights (VGGFace2) for our face trunk.

  python tools/convert_facenet.py --input=20180402-114759-vggface2.pt --output=DIR [--cut=mixed_7a]

Writes DIR/variables (Orbax: params and batch_stats of avemo_jax.models.inception_resnet.
InceptionResnetV1 up to --cut, which must equal config.model.cut) and DIR/conversion.json (source
file and sha256, key counts, what was ignored), and prints the latter. Train from it with
--config.init.face_backbone=DIR. Needs torch (pip install -e '.[convert]'); training does not.
"""
import json

from absl import flags

from avemo_jax import cli
from avemo_jax.models import convert, inception_resnet

_INPUT = flags.DEFINE_string("input", None, "facenet-pytorch state dict (.pt).", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Folder to write (must not hold variables/).",
                              required=True)
_CUT = flags.DEFINE_enum("cut", "mixed_7a", inception_resnet.CUTS,
                         "Where the trunk ends (config.model.cut).")


def main(argv):
  del argv
  info = convert.convert_file("facenet", _INPUT.value, _OUTPUT.value, cut=_CUT.value)
  print(json.dumps(info, indent=2))


if __name__ == "__main__":
  cli.run(main)
