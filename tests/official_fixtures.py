"""Small AffectNet and FEC inputs in the exact official formats, with known faces and bad rows.

Photos are smooth colour noise with procedurally rendered faces pasted at known boxes, saved as
real JPEG (and one PNG) files. Each writer returns the ground truth the tests check against:
per CSV line, what the prepare step must do with it ("written" or the skip reason).
"""
import csv
import dataclasses
import pathlib

import numpy as np
from PIL import Image

from avemo_jax.data import render, synthetic

# The header line of AffectNet's training.csv / validation.csv.
AFFECTNET_HEADER = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
                    "facial_landmarks", "expression", "valence", "arousal")
TRIPLET_TYPES = ("ONE_CLASS_TRIPLET", "TWO_CLASS_TRIPLET", "THREE_CLASS_TRIPLET")


@dataclasses.dataclass
class Face:
  """One face of a CSV row: its file, box (x0, y0, x1, y1 in pixels) and pasted pixels."""
  path: pathlib.Path
  box: tuple[int, int, int, int]
  pixels: np.ndarray | None


@dataclasses.dataclass
class Row:
  line: int
  expect: str  # "written" or the report's skip reason
  faces: list[Face]
  label: int = -1  # AffectNet expression code / FEC odd face (0-2)
  valence: float = 0.0
  arousal: float = 0.0
  triplet_type: int = -1
  votes: tuple[int, ...] = ()


def _face(rng: np.random.Generator, code: int, side: int) -> np.ndarray:
  expression = synthetic.PROTOTYPES[code % 8] * rng.uniform(0.9, 1.2)
  return render.render_face(expression.astype(np.float32), render.random_identity(rng), rng, side)


def _photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  coarse = rng.integers(0, 256, (h // 24 + 2, w // 24 + 2, 3), dtype=np.uint8)
  return np.array(Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR))


def _save(image: np.ndarray, path: pathlib.Path, *, truncate: bool = False) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  fmt = "PNG" if path.suffix == ".png" else "JPEG"
  Image.fromarray(image).save(path, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
  if truncate:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _landmarks(rng: np.random.Generator, box) -> str:
  x0, y0, x1, y1 = box
  pts = np.stack([rng.uniform(x0, x1, 68), rng.uniform(y0, y1, 68)], 1).ravel()
  return ";".join(f"{p:.2f}" for p in pts)


def write_affectnet(manual_dir: pathlib.Path, seed: int = 0) -> dict[str, list[Row]]:
  """training.csv / validation.csv in Manually_Annotated_file_lists/ and the images under
  Manually_Annotated/Manually_Annotated_Images/, as in the release. Returns {csv: rows}."""
  rng = np.random.default_rng(seed)
  image_root = manual_dir / "Manually_Annotated" / "Manually_Annotated_Images"
  # (code, valence, arousal, kind): "ok", "png", "edge" (box touching the image border),
  # "missing", "truncated", "malformed"
  train = [(c, 0.1 * c - 0.3, 0.5, "ok") for c in range(8) for _ in range(2)]
  train[0] = (0, -2.0, -2.0, "ok")  # invalid valence/arousal: kept, va_valid False
  train[3] = (1, 1.5, 0.2, "edge")  # valence out of range: kept, va_valid False
  train += [(8, 0.0, 0.0, "ok"), (9, 0.1, 0.1, "ok"), (10, -2.0, -2.0, "ok"), (11, 0.0, 0.0, "ok"),
            (2, -0.5, 0.1, "missing"), (3, 0.4, 0.7, "truncated"), (5, 0.1, 0.2, "malformed"),
            (4, -0.3, 0.6, "png")]
  valid = [(c, 0.05 * c, -0.2, "ok") for c in range(8)] + [(6, -0.6, 0.6, "missing")]
  reasons = {8: "expression 8 (None)", 9: "expression 9 (Uncertain)",
             10: "expression 10 (No-Face)", 11: "expression code out of range (0-10)"}
  out = {}
  for name, spec in (("training.csv", train), ("validation.csv", valid)):
    rows, lines = [], []
    for i, (code, v, a, kind) in enumerate(spec):
      line = i + 2
      h, w = int(rng.integers(150, 220)), int(rng.integers(150, 220))
      side = int(rng.integers(60, 110))
      x = 0 if kind == "edge" else int(rng.integers(0, w - side))
      y = h - side if kind == "edge" else int(rng.integers(0, h - side))
      ext = ".png" if kind == "png" else ".jpg"
      rel = f"{rng.integers(1, 1000)}/{rng.bytes(28).hex()}{ext}"
      photo, face = _photo(rng, h, w), _face(rng, code, side)
      photo[y:y + side, x:x + side] = face
      if kind != "missing":
        _save(photo, image_root / rel, truncate=kind == "truncated")
      box = (x, y, x + side, y + side)
      fields = [rel, x, y, side, side, _landmarks(rng, box), code, f"{v:g}", f"{a:g}"]
      if kind == "malformed":
        fields = fields[:5] + fields[6:]  # the landmarks column is missing
      lines.append(fields)
      expect = {"missing": "missing image", "truncated": "unreadable image",
                "malformed": "malformed line"}.get(kind, reasons.get(code, "written"))
      rows.append(Row(line, expect, [Face(image_root / rel, box, face)], code, v, a))
    path = manual_dir / "Manually_Annotated_file_lists" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
      writer = csv.writer(f, lineterminator="\n")
      writer.writerow(AFFECTNET_HEADER)
      writer.writerows(lines)
    out[name] = rows
  return out


def _url(rng: np.random.Generator, ext: str = "jpg") -> str:
  return (f"http://farm{rng.integers(1, 10)}.staticflickr.com/{rng.integers(1000, 9999)}/"
          f"{rng.integers(10**9, 10**10)}_{rng.bytes(5).hex()}_b.{ext}")


def write_fec(manual_dir: pathlib.Path, seed: int = 1) -> dict[str, list[Row]]:
  """faceexp-comparison-data-{train,test}-public.csv (no header, 28 columns, URLs quoted) and
  the images under images/<URL basename>. Returns {"train": rows, "test": rows}."""
  rng = np.random.default_rng(seed)
  images = manual_dir / "images"
  made: dict[str, list[Face]] = {}  # url -> faces in that photo
  sizes: dict[str, tuple[int, int]] = {}  # url -> (width, height)

  def photo(kind: str = "ok") -> str:
    """A new photo URL with two faces (one touching the border); only "missing" has no file."""
    url = _url(rng)
    h, w = int(rng.integers(140, 200)), int(rng.integers(160, 240))
    pixels, faces = _photo(rng, h, w), []
    for corner in (True, False):
      side = int(rng.integers(40, 64))
      x, y = (w - side, 0) if corner else (int(rng.integers(0, w // 2 - side)), h // 3)
      face = _face(rng, int(rng.integers(8)), side)
      pixels[y:y + side, x:x + side] = face
      faces.append(Face(images / url.rsplit("/", 1)[1], (x, y, x + side, y + side), face))
    if kind == "placeholder":  # a PNG where a Flickr JPEG belongs
      faces[0].path.parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(pixels).save(faces[0].path, "PNG")
    elif kind != "missing":
      _save(pixels, faces[0].path, truncate=kind == "truncated")
    made[url], sizes[url] = faces, (w, h)
    return url

  # (triplet type, votes 1-3, image kinds, fault): votes give a plurality unless "no majority".
  train = [(0, (1, 1, 1, 2, 1, 3), "ok"), (1, (2, 2, 3, 2, 2, 2), "ok"),
           (2, (3, 3, 3, 1, 2, 2), "ok"), (0, (2, 1, 2, 3, 2, 2), "ok"),
           (1, (3, 3, 3, 3, 3, 3), "ok"), (2, (1, 1, 2, 2, 1, 3), "ok"),
           (0, (1, 1, 1, 2, 2, 2), "no majority"), (1, (1, 1, 2, 2, 3, 3), "no majority"),
           (2, (1, 1, 1, 1, 2, 3), "missing"), (0, (2, 2, 2, 2, 1, 1), "truncated"),
           (1, (3, 3, 3, 1, 1, 2), "placeholder"), (2, (1, 1, 1, 1, 1, 1), "malformed"),
           (0, (2, 2, 2, 1, 1, 3), "bad box")]
  test = [(0, (1, 1, 1, 1, 2, 3), "ok"), (1, (2, 2, 2, 1, 3, 3), "ok"),
          (2, (3, 3, 3, 3, 1, 1), "ok"), (0, (1, 2, 1, 1, 1, 1), "missing")]
  expects = {"ok": "written", "no majority": "no majority", "missing": "missing image",
             "truncated": "unreadable image", "placeholder": "unreadable image",
             "malformed": "malformed line", "bad box": "bad box"}
  urls = [photo() for _ in range(6)]
  out = {}
  for split, spec in (("train", train), ("test", test)):
    rows, lines = [], []
    for i, (kind, votes, fault) in enumerate(spec):
      picks = [urls[j] for j in rng.choice(len(urls), 3, replace=False)]
      if fault in ("missing", "truncated", "placeholder"):
        picks[1] = photo(fault)
      which = [int(rng.integers(2)) for _ in range(3)]
      faces = [made[u][k] for u, k in zip(picks, which)]
      fields = []
      for u, face in zip(picks, faces):
        w, h = sizes[u]
        x0, y0, x1, y1 = face.box
        fields += [u, round(x0 / w, 6), round(x1 / w, 6), round(y0 / h, 6), round(y1 / h, 6)]
      if fault == "bad box":
        fields[1], fields[2] = fields[2], fields[1]  # left > right
      fields.append(TRIPLET_TYPES[kind])
      for k, vote in enumerate(votes):
        fields += [int(rng.integers(100, 400)) + k, vote]
      if fault == "malformed":
        fields = fields[:-1]  # 27 columns
      lines.append(fields)
      counts = np.bincount(np.array(votes) - 1, minlength=3)
      rows.append(Row(i + 1, expects[fault], faces, int(counts.argmax()),
                      triplet_type=kind, votes=tuple(v - 1 for v in votes)))
    path = manual_dir / "FEC_dataset" / f"faceexp-comparison-data-{split}-public.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
      csv.writer(f, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\n").writerows(lines)
    out[split] = rows
  return out
