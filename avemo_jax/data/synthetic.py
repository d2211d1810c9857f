"""Procedural, deterministic stand-ins for AffectNet (faces), Google FEC (triplets) and
unlabelled faces.

Faces are rendered procedurally (face shape, skin tone, pose, lighting, background and noise
vary per identity and image; brows, eyes, mouth and nose follow the expression, which also sets
valence and arousal). FEC-style triplets are labelled by distance in expression space, judged by
six noisy simulated annotators.

Every item is a pure function of (seed, split, index): sources are random-access and safe to
read in any order from several threads. Identities are disjoint between splits, so "test" faces
are held-out people.
"""
import numpy as np

from avemo_jax.data.render import ACTIONS, NUM_ACTIONS, Identity, random_identity, render_face

__all__ = [
    "ACTIONS", "EXPRESSIONS", "NUM_CLASSES", "PROTOTYPES", "VALENCE_AROUSAL", "TRIPLET_TYPES",
    "Identity", "random_identity", "render_face", "valence_arousal",
    "expression_for_valence_arousal", "SyntheticFaces", "SyntheticTriplets",
    "SyntheticUnlabelled", "save_sample_grid"]

EXPRESSIONS: tuple[str, ...] = (
    "Neutral", "Happy", "Sad", "Surprise", "Fear", "Disgust", "Anger", "Contempt")
NUM_CLASSES = len(EXPRESSIONS)

# Full-intensity action values per class (unlisted actions are 0). Each easily confused pair
# differs in at least one strong cue: Fear (inner-brow slant, stretched mouth with teeth) vs
# Surprise (arched brows, round dark "O"); Disgust (nose creases, raised upper lip) vs Anger
# (V brows, pressed thin lips); Contempt (one corner up, closed) vs Happy (both up, teeth).
_PROTOTYPE_ACTIONS: dict[str, dict[str, float]] = {
    "Neutral": {},
    "Happy": {"smile": 1.0, "eye_squint": 0.6, "mouth_open": 0.35, "brow_raise": 0.1},
    "Sad": {"brow_inner_up": 1.0, "frown": 1.0, "eye_squint": 0.45},
    "Surprise": {"brow_raise": 1.0, "eye_widen": 1.0, "mouth_open": 1.0},
    "Fear": {"brow_raise": 0.4, "brow_inner_up": 0.9, "brow_furrow": 0.3, "eye_widen": 1.0,
             "mouth_open": 0.35, "lip_stretch": 1.0, "frown": 0.3},
    "Disgust": {"nose_wrinkle": 1.0, "upper_lip_raise": 1.0, "brow_furrow": 0.5,
                "eye_squint": 0.6, "frown": 0.4},
    "Anger": {"brow_furrow": 1.0, "lip_press": 1.0, "eye_widen": 0.5, "eye_squint": 0.3},
    "Contempt": {"lip_asym": 1.0, "eye_squint": 0.2},
}
PROTOTYPES: np.ndarray = np.array(
    [[_PROTOTYPE_ACTIONS[name].get(a, 0.0) for a in ACTIONS] for name in EXPRESSIONS],
    np.float32)
# Circumplex position of each class; Fear/Anger and Disgust/Contempt are kept a little apart so
# that `expression_for_valence_arousal` can tell them apart.
VALENCE_AROUSAL: np.ndarray = np.array(
    [[0.0, 0.0], [0.8, 0.4], [-0.7, -0.4], [0.3, 0.8], [-0.5, 0.85], [-0.7, 0.3], [-0.75, 0.6],
     [-0.45, 0.1]], np.float32)
# Least-squares (minimum-norm) linear map expression -> (valence, arousal); Neutral = 0 -> 0.
_VA_MAP_Kx2: np.ndarray = np.linalg.lstsq(
    PROTOTYPES.astype(np.float64), VALENCE_AROUSAL.astype(np.float64), rcond=None)[0]

TRIPLET_TYPES: tuple[str, ...] = ("ONE_CLASS_TRIPLET", "TWO_CLASS_TRIPLET", "THREE_CLASS_TRIPLET")
NUM_ANNOTATORS = 6

_SPLITS = {"train": 0, "test": 1, "unlabelled": 2}
_KINDS = {"face": 0, "triplet": 1, "unlabelled": 2, "grid": 3}
_IDENTITIES_PER_SPLIT = 1 << 20  # identity ids of split s lie in [s * 2**20, (s + 1) * 2**20)
_JITTER = 0.05  # per-face Gaussian jitter of every action
# Intensity range of a class's prototype: pronounced expressions, so that a network trained
# from scratch for a few hundred steps on CPU (the default runs) finds a clear signal.
_INTENSITY = (0.9, 1.3)


def valence_arousal(expression_K: np.ndarray) -> np.ndarray:
  """(valence, arousal) of an expression vector, float32 [2] in [-1, 1]."""
  va = np.asarray(expression_K, np.float64) @ _VA_MAP_Kx2
  return np.clip(va, -1.0, 1.0).astype(np.float32)


def expression_for_valence_arousal(valence: float, arousal: float,
                                   temperature: float = 0.05) -> np.ndarray:
  """A smooth inverse of `valence_arousal`: float32 [K].

  Blends the emotional prototypes with softmax weights on their squared V/A distance, then
  scales the blend by how far (valence, arousal) is from neutral relative to the blended
  classes, so the origin maps to the neutral face and everything varies continuously.
  """
  target = np.array([valence, arousal], np.float64)
  va_Cx2 = VALENCE_AROUSAL[1:].astype(np.float64)
  logits = -np.sum(np.square(va_Cx2 - target), axis=1) / temperature
  weights = np.exp(logits - logits.max())
  weights /= weights.sum()
  reach = float(weights @ np.linalg.norm(va_Cx2, axis=1))
  scale = min(1.0, float(np.linalg.norm(target)) / reach)
  return (scale * (weights @ PROTOTYPES[1:])).astype(np.float32)


def _split_code(split: str) -> int:
  if split not in _SPLITS:
    raise ValueError(f"split={split!r}: expected one of {tuple(_SPLITS)}")
  return _SPLITS[split]


def _face(rng: np.random.Generator, *, seed: int, split_code: int, label: int, size: int,
          lo: float = _INTENSITY[0], hi: float = _INTENSITY[1]
          ) -> tuple[int, np.ndarray, np.ndarray]:
  """A new face of class `label` at intensity ~ U(lo, hi) by a random person of the split.

  Returns (identity id, expression [K], uint8 image). A person's parameters depend only on
  (seed, identity id), and ids of different splits lie in disjoint ranges.
  """
  ident = split_code * _IDENTITIES_PER_SPLIT + int(rng.integers(_IDENTITIES_PER_SPLIT))
  person = random_identity(np.random.default_rng([seed, ident]))
  expression = rng.uniform(lo, hi) * PROTOTYPES[label] + rng.normal(0, _JITTER, NUM_ACTIONS)
  expression = np.clip(expression, 0.0, 1.5).astype(np.float32)  # the renderable range
  return ident, expression, render_face(expression, person, rng, size)


class _Source:
  """Random access by index with a per-item generator seeded by (seed, split, kind, index)."""
  _kind = ""

  def __init__(self, num_examples: int, *, seed: int, split: str, size: int):
    self.num_examples, self.seed, self.split, self.size = num_examples, seed, split, size
    self._split_code = _split_code(split)

  def __len__(self) -> int:
    return self.num_examples

  def _rng(self, index: int) -> np.random.Generator:
    index = int(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f"index {index} out of range for {self.num_examples} examples")
    return np.random.default_rng([self.seed, self._split_code, _KINDS[self._kind], index])

  def _face(self, rng: np.random.Generator, label: int, lo: float = _INTENSITY[0],
            hi: float = _INTENSITY[1]):
    return _face(rng, seed=self.seed, split_code=self._split_code, label=label,
                 size=self.size, lo=lo, hi=hi)


class SyntheticFaces(_Source):
  """AffectNet-style labelled faces: uniform class, intensity ~ U(0.9, 1.3), continuous V/A.

  `label_noise` is the probability that "label" is replaced by a uniformly random other class;
  "clean_label" keeps the truth.
  """
  _kind = "face"

  def __init__(self, num_examples: int, *, seed: int, split: str = "train", size: int = 140,
               label_noise: float = 0.0):
    super().__init__(num_examples, seed=seed, split=split, size=size)
    self.label_noise = label_noise

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    rng = self._rng(index)
    clean = int(rng.integers(NUM_CLASSES))
    # Drawn unconditionally so the image does not depend on the configured noise rate.
    flip, other = rng.random() < self.label_noise, int(rng.integers(NUM_CLASSES - 1))
    label = (clean + 1 + other) % NUM_CLASSES if flip else clean
    ident, expression, image = self._face(rng, clean)
    valence, arousal = valence_arousal(expression)
    return {"image": image, "label": np.int32(label), "clean_label": np.int32(clean),
            "valence": np.float32(valence), "arousal": np.float32(arousal),
            "expression": expression, "identity": np.int32(ident)}


def _odd_one_out(distances_3: np.ndarray) -> int:
  """Index of the face outside the closest pair; distances ordered (d01, d02, d12)."""
  return 2 - int(np.argmin(distances_3))  # closest pair (0,1) -> 2, (0,2) -> 1, (1,2) -> 0


class SyntheticTriplets(_Source):
  """FEC-style triplets: "label" names the face most different from the other two.

  "triplet_type" indexes TRIPLET_TYPES: three faces of one (non-neutral) class at intensities
  spread over U(0.2, 1); two of one class and one of another; or three classes. Each of six
  annotators perturbs the three pairwise expression-space distances with Gaussian noise of std
  `annotator_noise` and picks the face outside the closest pair; the label is the majority vote
  (ties -> the noiseless answer). Faces are by different people.
  """
  _kind = "triplet"

  def __init__(self, num_examples: int, *, seed: int, split: str = "train", size: int = 140,
               annotator_noise: float = 0.1):
    super().__init__(num_examples, seed=seed, split=split, size=size)
    self.annotator_noise = annotator_noise

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    rng = self._rng(index)
    kind = int(rng.integers(3))
    if kind == 0:  # one class: spread intensities so that an odd one usually exists
      classes = [int(rng.integers(1, NUM_CLASSES))] * 3
      lo, hi = 0.3, _INTENSITY[1]
    else:
      picked = [int(c) for c in rng.choice(NUM_CLASSES, size=kind + 1, replace=False)]
      classes = [picked[0], picked[0], picked[1]] if kind == 1 else picked
      lo, hi = _INTENSITY
    classes = [classes[i] for i in rng.permutation(3)]
    faces = [self._face(rng, c, lo, hi) for c in classes]
    expression_3xK = np.stack([f[1] for f in faces])
    pairs = expression_3xK[[0, 0, 1]] - expression_3xK[[1, 2, 2]]
    distances = np.linalg.norm(pairs, axis=1)
    noisy = distances + self.annotator_noise * rng.standard_normal((NUM_ANNOTATORS, 3))
    votes = np.bincount([_odd_one_out(d) for d in noisy], minlength=3)
    winners = np.flatnonzero(votes == votes.max())
    label = int(winners[0]) if len(winners) == 1 else _odd_one_out(distances)
    return {"images": np.stack([f[2] for f in faces]), "label": np.int32(label),
            "triplet_type": np.int32(kind), "expression": expression_3xK,
            "identity": np.array([f[0] for f in faces], np.int32)}


class SyntheticUnlabelled(_Source):
  """Extra faces without labels (for distillation), from their own pool of identities."""
  _kind = "unlabelled"

  def __init__(self, num_examples: int, *, seed: int, size: int = 140):
    super().__init__(num_examples, seed=seed, split="unlabelled", size=size)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    rng = self._rng(index)
    return {"image": self._face(rng, int(rng.integers(NUM_CLASSES)))[2]}


def save_sample_grid(path, *, seed: int, size: int = 140, per_class: int = 6) -> None:
  """PNG with one row per class (labelled) of `per_class` training-split faces. A file that
  already holds this grid (its PNG text names the arguments) is left as it is: a restarted run
  does not draw it again (2 s on 2 AMD Zen 3 cores)."""
  from PIL import Image  # only needed here

  made_by = f"avemo_jax sample grid: seed={seed} size={size} per_class={per_class}"
  try:
    with Image.open(path) as png:
      if png.info.get("Description") == made_by:
        return
  except (OSError, ValueError):  # missing, or not a PNG of ours: drawn (again)
    pass
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(1.5 * per_class + 0.6, 1.5 * NUM_CLASSES), dpi=max(100, size / 1.3))
  FigureCanvasAgg(fig)
  axes = fig.subplots(NUM_CLASSES, per_class, squeeze=False)
  for c, name in enumerate(EXPRESSIONS):
    for j in range(per_class):
      rng = np.random.default_rng([seed, _SPLITS["train"], _KINDS["grid"], c, j])
      ax = axes[c, j]
      ax.imshow(_face(rng, seed=seed, split_code=_SPLITS["train"], label=c, size=size)[2])
      ax.set_xticks([])
      ax.set_yticks([])
      if j == 0:
        ax.set_ylabel(name, fontsize=11)
  fig.tight_layout()
  fig.savefig(path, format="png", metadata={"Description": made_by})
