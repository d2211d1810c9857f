"""The face detector's command-line flags, shared by the prepare tools that detect faces (each
adopts them, `flags.adopt_module_key_flags`, so that they show in its --help)."""
from absl import flags

_CASCADE = flags.DEFINE_string("cascade", "haarcascade_frontalface_alt2.xml",
                               "OpenCV cascade: a file in cv2.data.haarcascades, or a path.")
_MIN_FACE = flags.DEFINE_float("min_face", 0.1, "Smallest face side searched, as a fraction of "
                               "the image's shorter side (larger is faster).")
_MAX_SIDE = flags.DEFINE_integer("max_side", 480, "Images are shrunk to this longer side for "
                                 "detection (smaller is faster); crops come from the full image.")
_SCALE_FACTOR = flags.DEFINE_float("scale_factor", 1.1, "Detector scale step.")
_MIN_NEIGHBORS = flags.DEFINE_integer("min_neighbors", 4, "Detector: raw hits a face needs.")
_ROLLS = flags.DEFINE_list("rolls", ["15", "-15"], "Head tilts (degrees) also searched in images "
                           "without an upright face (empty: none; each costs a pass).")


def options() -> dict:
  """`faces.FaceDetector` keyword arguments from the flags."""
  return dict(cascade=_CASCADE.value, min_face=_MIN_FACE.value, max_side=_MAX_SIDE.value,
              scale_factor=_SCALE_FACTOR.value, min_neighbors=_MIN_NEIGHBORS.value,
              rolls=tuple(float(r) for r in _ROLLS.value))
