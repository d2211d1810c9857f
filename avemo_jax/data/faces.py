"""Face detection (OpenCV's bundled Haar cascade), square crops, video face tracks, image loading.

The detector works offline: its model is the cascade XML inside the `opencv-python-headless` 4.x
wheel (`cv2.data.haarcascades`; OpenCV 5 no longer ships it). It finds frontal faces, upright or
tilted by up to about 25 degrees; video tracks carry the last box over frames where it finds none.
"""
import math
import os
from typing import Iterable, Iterator, NamedTuple

import cv2
import numpy as np
from PIL import Image, ImageOps

__all__ = ["FaceDetector", "crop", "TrackedFace", "track", "load_image"]

_WINDOW = 24  # pixels: the bundled cascades' window, the smallest face they find


class FaceDetector:
  """Frontal face detector. Not thread-safe: make one per thread (loading takes ~30 ms).

  Picklable (it pickles its settings), so it can be handed to data-loader worker processes.
  """

  def __init__(self, *, cascade: str = "haarcascade_frontalface_alt2.xml", min_face: float = 0.1,
               max_side: int = 480, scale_factor: float = 1.1, min_neighbors: int = 4,
               rolls: tuple[float, ...] = (15.0, -15.0)):
    """Args:
      cascade: a file name in `cv2.data.haarcascades`, or a path to a cascade XML.
      min_face: smallest face side searched, as a fraction of the image's shorter side.
      max_side: images whose longer side is larger are shrunk to it before detection (speed).
      scale_factor, min_neighbors: `cv2.CascadeClassifier.detectMultiScale` settings.
      rolls: rotations (degrees) also searched when the upright image has no face, for tilted
        heads; each costs one more pass on such images.
    """
    self._settings = dict(cascade=cascade, min_face=min_face, max_side=max_side,
                          scale_factor=scale_factor, min_neighbors=min_neighbors,
                          rolls=tuple(rolls))
    self.__setstate__(self._settings)

  def __getstate__(self):
    return self._settings

  def __setstate__(self, settings):
    self._settings = settings
    path = settings["cascade"]
    if not os.path.exists(path):
      path = os.path.join(cv2.data.haarcascades, path)
    self._cascade = cv2.CascadeClassifier(path)
    if self._cascade.empty():
      raise FileNotFoundError(f"{path}: no cascade XML there; install opencv-python-headless<5 "
                              "(it ships cv2.data.haarcascades) or pass a path to a cascade file")

  def detect(self, image_HxWx3: np.ndarray) -> np.ndarray:
    """Returns faces as float32 [K, 5] rows (x, y, w, h, score) in pixels, best first.

    The score is the number of overlapping raw detections merged into the box (higher is surer);
    ties go to the larger box.
    """
    image = np.asarray(image_HxWx3)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
      raise ValueError(f"expected an RGB uint8 HxWx3 image, got {image.dtype} {image.shape}")
    s = self._settings
    scale = min(1.0, s["max_side"] / max(image.shape[:2]))
    if min(image.shape[:2]) * scale < _WINDOW:  # a banner, or a thumbnail: no face fits
      return np.zeros((0, 5), np.float32)
    if scale < 1.0:
      image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    gray = cv2.equalizeHist(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY))
    side = max(_WINDOW, round(s["min_face"] * min(gray.shape)))
    faces = self._detect_turned(gray, 0.0, side)
    if not len(faces):
      faces = np.concatenate([faces, *(self._detect_turned(gray, a, side) for a in s["rolls"])])
    faces[:, :4] /= scale
    return faces[np.lexsort((-faces[:, 2] * faces[:, 3], -faces[:, 4]))]

  def _detect_turned(self, gray: np.ndarray, angle: float, side: int) -> np.ndarray:
    """Detects in `gray` turned by `angle` degrees -> [K, 5], axis-aligned boxes in `gray`."""
    s = self._settings
    turn = cv2.getRotationMatrix2D((gray.shape[1] / 2, gray.shape[0] / 2), angle, 1.0)
    turned = gray if angle == 0 else cv2.warpAffine(gray, turn, gray.shape[::-1],
                                                    borderMode=cv2.BORDER_REPLICATE)
    boxes, counts = self._cascade.detectMultiScale2(
      turned, scaleFactor=s["scale_factor"], minNeighbors=s["min_neighbors"], minSize=(side, side))
    faces = np.concatenate([np.reshape(boxes, (-1, 4)), np.reshape(counts, (-1, 1))], axis=1)
    faces = faces.astype(np.float32)
    if angle != 0:  # move the box centres back; a box keeps its size
      back = cv2.invertAffineTransform(turn)
      centres = faces[:, :2] + faces[:, 2:4] / 2
      faces[:, :2] = centres @ back[:, :2].T + back[:, 2] - faces[:, 2:4] / 2
    return faces


def crop(image: np.ndarray, box, *, margin: float, size: int) -> np.ndarray:
  """Cuts a square around `box` (x, y, w, h) and resizes it to [size, size, 3] uint8.

  The square is centred on the box with side max(w, h) * (1 + 2 * margin) (`margin` added on each
  side as a fraction of the box side), placed to sub-pixel accuracy (boxes of images decoded at a
  reduced scale are fractional); parts outside the image repeat the edge pixels; resized with
  PIL's antialiased bicubic filter. The one crop of the project: AffectNet/FEC boxes, detections.
  """
  x, y, w, h = (float(v) for v in np.asarray(box, np.float64)[:4])
  if not (w > 0 and h > 0) or size < 1:
    raise ValueError(f"crop needs a box with positive sides and size >= 1, got {box}, {size}")
  side = max(w, h) * (1 + 2 * margin)
  left, top = x + (w - side) / 2, y + (h - side) / 2
  height, width = image.shape[:2]
  wx0, wy0 = math.floor(left), math.floor(top)  # the integer window covering the square
  wx1, wy1 = math.ceil(left + side), math.ceil(top + side)
  cx0, cy0, cx1, cy1 = max(wx0, 0), max(wy0, 0), min(wx1, width), min(wy1, height)
  if cx0 >= cx1 or cy0 >= cy1:
    raise ValueError(f"crop box {box} lies wholly outside the {width}x{height} image")
  window = np.pad(image[cy0:cy1, cx0:cx1],
                  ((cy0 - wy0, wy1 - cy1), (cx0 - wx0, wx1 - cx1), (0, 0)), mode="edge")
  square = (left - wx0, top - wy0, left - wx0 + side, top - wy0 + side)
  return np.asarray(Image.fromarray(window).resize((size, size), Image.Resampling.BICUBIC,
                                                   box=square))


class TrackedFace(NamedTuple):
  time_s: float
  crop: np.ndarray  # [size, size, 3] uint8
  box: np.ndarray  # (x, y, w, h) float32 that was cropped
  detected: bool  # False: no face found, box carried (frames skipped by detect_every: the last
  # detection's result, so a stretch without a face counts every frame of it)


def track(frames: Iterable[tuple[float, np.ndarray]], detector: FaceDetector, *, margin: float,
          size: int, name: str = "video", smooth: float = 0.0, detect_every: int = 1,
          max_lead: int = 125, box: np.ndarray | None = None) -> Iterator[TrackedFace]:
  """Streams one face crop per (time_s, frame) of `frames`, e.g. `media.video_frames(path)`.

  Each frame takes the best detection (`FaceDetector.detect` order). A frame without one carries
  the last detected box; frames before the first detection (at most `max_lead` of them are held in
  memory) take the first detected box, or `box` when given (`first_box` of a first pass over the
  video: then no frame is held). Count `detected == False` to report misses.

  Args:
    name: the file name for error messages.
    smooth: 0 follows each detection; a in (0, 1) keeps a * previous box + (1 - a) * detection.
    detect_every: run the detector on every n-th frame only, carrying the box in between (speed).
    max_lead: frames to hold while waiting for the first face.

  Raises:
    ValueError: no face in the first `max_lead` frames, or in the whole video.
  """
  if not 0 <= smooth < 1 or detect_every < 1:
    raise ValueError(f"need 0 <= smooth < 1 and detect_every >= 1, got {smooth}, {detect_every}")
  box, lead, found = None if box is None else np.asarray(box, np.float32), [], False
  for index, (time_s, frame) in enumerate(frames):
    if index % detect_every == 0 or box is None:
      faces = detector.detect(frame)
      found = bool(len(faces))
      if found:
        new = faces[0, :4]
        box = new if box is None else (smooth * box + (1 - smooth) * new).astype(np.float32)
    if box is None:
      if len(lead) >= max_lead:
        raise ValueError(f"{name}: no face found in the first {max_lead} frames; check the video "
                         "(faces must be upright and frontal) or raise max_lead")
      lead.append((time_s, frame))
      continue
    for lead_time, lead_frame in lead:
      yield TrackedFace(lead_time, crop(lead_frame, box, margin=margin, size=size), box, False)
    lead = []
    yield TrackedFace(time_s, crop(frame, box, margin=margin, size=size), box, found)
  if box is None:
    raise ValueError(f"{name}: no face found in any of its {len(lead)} frames; check the video "
                     "(faces must be upright and frontal, at least a tenth of the frame)")


def first_box(frames: Iterable[tuple[float, np.ndarray]], detector: FaceDetector,
              every: int = 1) -> np.ndarray | None:
  """The best detected box of the first frame showing a face among every n-th of `frames` (the
  grid `track(..., detect_every=every)` searches), or None."""
  for index, (_, frame) in enumerate(frames):
    if index % every == 0 and len(found := detector.detect(frame)):
      return found[0, :4]
  return None


def load_image(path) -> np.ndarray:
  """Reads an image file -> RGB uint8 HxWx3 (EXIF rotation applied, alpha dropped, grey (8 or 16
  bits) expanded).

  Raises:
    FileNotFoundError: no such file.
    ValueError: not an image, or corrupt/truncated (callers over a folder count and skip these).
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such image file; check the path")
  try:
    with Image.open(path) as image:
      image.load()
      image = ImageOps.exif_transpose(image)
      if image.mode.startswith("I"):  # 16-bit grey ("I;16", or "I"): convert would clip at 255
        grey = np.asarray(image).astype(np.int64)
        sixteen = image.mode.startswith("I;16") or grey.max() > 255
        image = Image.fromarray((grey >> 8 if sixteen else grey).clip(0, 255).astype(np.uint8))
      return np.asarray(image.convert("RGB"))
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f"{path}: cannot decode image ({e}); it is corrupt, truncated or not an "
                     "image: re-download or delete it") from e
