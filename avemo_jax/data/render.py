"""Vectorised numpy renderer of procedural faces driven by a continuous expression vector.

Shapes are drawn in face coordinates (u right, v down, face centre at the origin, the image
spans about [-1, 1]) as approximate signed distances and alpha-composited with ~1 px soft
edges. Each feature is evaluated only inside its pixel bounding box, so one 140x140 face costs
about 2 ms on one core.
"""
import dataclasses
import math
import threading

import numpy as np

# The expression space: one dimension per facial action, 0 = rest, 1 = full intensity.
ACTIONS: tuple[str, ...] = (
    "brow_raise", "brow_inner_up", "brow_furrow", "eye_widen", "eye_squint", "nose_wrinkle",
    "upper_lip_raise", "mouth_open", "lip_stretch", "lip_press", "smile", "frown", "lip_asym")
NUM_ACTIONS = len(ACTIONS)

RGB = tuple[float, float, float]


@dataclasses.dataclass(frozen=True)
class Identity:
  """Everything about a person that stays fixed across their images (colours in [0, 1])."""
  face_w: float  # half-width of the face ellipse
  face_h: float  # half-height
  jaw: float  # how much the face narrows towards the chin
  skin: RGB
  hair: RGB
  hairline: float  # v of the hairline at the centre
  hair_long: float  # how far hair falls beside the face (0 = short)
  hair_part: float  # slope of the fringe (side parting)
  eye_spacing: float  # half distance between the eye centres
  eye_size: float  # eye half-width
  eye_y: float
  iris: RGB
  brow_gap: float  # brow height above the eyes
  brow_thickness: float
  nose_y: float  # v of the nostrils
  mouth_y: float
  mouth_w: float  # mouth half-width at rest
  lip_thickness: float
  lips: RGB
  background: tuple[RGB, RGB]  # gradient end colours
  background_angle: float
  shirt: RGB


def random_identity(rng: np.random.Generator) -> Identity:
  """Draws a person: face shape, skin tone, hair, feature placement, background."""
  u = rng.uniform
  tone = u()  # light to dark along a plausible skin-tone line, plus a little hue jitter
  skin = np.array([0.96, 0.80, 0.68]) * (1 - tone) + np.array([0.40, 0.26, 0.18]) * tone
  skin = np.clip(skin * u(0.95, 1.05, 3), 0, 1)
  hair = np.array([0.08, 0.06, 0.05]) + u(0, 1) ** 2 * np.array([0.70, 0.55, 0.30])
  if u() < 0.1:  # grey hair
    hair = np.full(3, u(0.55, 0.8))
  lips = skin * np.array([0.8, 0.5, 0.5]) + np.array([0.04, 0.0, 0.0])
  tup = lambda a: tuple(float(x) for x in a)
  return Identity(
      face_w=u(0.56, 0.68), face_h=u(0.80, 0.90), jaw=u(0.1, 0.3), skin=tup(skin),
      hair=tup(hair * u(0.9, 1.1, 3)), hairline=u(-0.68, -0.50), hair_long=u(0, 1) ** 2,
      hair_part=u(-0.25, 0.25),
      eye_spacing=u(0.22, 0.27), eye_size=u(0.105, 0.13), eye_y=u(-0.14, -0.08),
      iris=tup(np.array([0.30, 0.18, 0.08]) * u(0.3, 1) + np.array([0.1, 0.25, 0.4]) * u(0, 0.8)),
      brow_gap=u(0.14, 0.18), brow_thickness=u(0.032, 0.045), nose_y=u(0.18, 0.25),
      mouth_y=u(0.45, 0.52), mouth_w=u(0.17, 0.21), lip_thickness=u(0.028, 0.042),
      lips=tup(np.clip(lips, 0, 1)), background=(tup(u(0.1, 0.9, 3)), tup(u(0.1, 0.9, 3))),
      background_angle=u(0, 2 * math.pi), shirt=tup(u(0.05, 0.8, 3)))


_BUFFERS = threading.local()


def _buffers(size: int) -> tuple[np.ndarray, np.ndarray]:
  """This thread's reusable float image and scratch ([3, size, size] each).

  Fresh arrays this large come from mmap, and their page faults would cost more than the
  drawing itself.
  """
  cache = _BUFFERS.__dict__
  if cache.get("size") != size:
    shape = (3, size, size)
    cache.update(size=size, image=np.empty(shape, np.float32), scratch=np.empty(shape, np.float32))
  return cache["image"], cache["scratch"]


class _Canvas:
  """A float RGB image (channel-first) plus the face coordinates of every pixel in this pose."""

  def __init__(self, size: int, angle: float, scale: float, shift: tuple[float, float]):
    self.size, self.scale, self.shift = size, scale, shift
    self.c, self.s = math.cos(angle), math.sin(angle)
    self.grid = (np.arange(size, dtype=np.float32) + 0.5) * (2.0 / size) - 1.0  # image x or y
    x, y = self.grid[None, :] - shift[0], self.grid[:, None] - shift[1]
    self.u = (self.c * x + self.s * y) / scale
    self.v = (-self.s * x + self.c * y) / scale
    self.inv_px = size * scale / 2.0  # pixels per face unit: turns distances into coverage
    # Channel-first, so that blending broadcasts over long contiguous rows.
    self.image, self.scratch = _buffers(size)

  def window(self, u0: float, u1: float, v0: float, v1: float) -> tuple[slice, slice]:
    """Pixel rows/columns covering the face-coordinate box [u0, u1] x [v0, v1]."""
    corners = [(u, v) for u in (u0, u1) for v in (v0, v1)]
    xs = [self.scale * (self.c * u - self.s * v) + self.shift[0] for u, v in corners]
    ys = [self.scale * (self.s * u + self.c * v) + self.shift[1] for u, v in corners]
    half = self.size / 2.0
    lo = lambda t: min(max(int((t + 1.0) * half) - 1, 0), self.size)
    hi = lambda t: min(max(int((t + 1.0) * half) + 2, 0), self.size)
    return slice(lo(min(ys)), hi(max(ys))), slice(lo(min(xs)), hi(max(xs)))

  def coverage(self, dist: np.ndarray, opacity: float = 1.0, soft: float = 0.0) -> np.ndarray:
    """opacity x inside-ness of a signed distance: 1 inside, 0 outside, a ramp of ~1 px or
    `soft` face units (for shading) across the edge."""
    a = dist * (-opacity * min(self.inv_px, 1.0 / max(soft, 1e-6)))
    a += 0.5 * opacity
    np.maximum(a, 0.0, out=a)
    return np.minimum(a, opacity, out=a)

  def paint(self, win, alpha: np.ndarray, colour) -> None:
    """Blends `colour` over the window with per-pixel `alpha`."""
    idx = (slice(None), *win)
    region, delta = self.image[idx], self.scratch[idx]
    np.subtract(np.asarray(colour, np.float32)[:, None, None], region, out=delta)
    delta *= alpha
    region += delta

  def fill(self, win, dist: np.ndarray, colour, opacity: float = 1.0, soft: float = 0.0) -> None:
    self.paint(win, self.coverage(dist, opacity, soft), colour)


def _hypot(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  return np.sqrt(x * x + y * y)  # np.hypot is ~30x slower (it guards against overflow)


def _shade(rgb: RGB, factor: float) -> RGB:
  return (rgb[0] * factor, rgb[1] * factor, rgb[2] * factor)


def _band(v: np.ndarray, centre: np.ndarray, half: float) -> np.ndarray:
  """Signed distance to a horizontal-ish band of half-thickness `half` around a curve."""
  return np.abs(v - centre) - half


def _ramp(x: float, start: float) -> float:
  """0 below `start`, rising linearly to 1 at 1: fades optional details in continuously."""
  return min(1.0, max(0.0, (x - start) / (1.0 - start)))


def _draw_eyes(cv: _Canvas, e: list[float], idn: Identity, gaze: float) -> None:
  furrow, widen, squint = e[2], e[3], e[4]
  w, sp, cy = idn.eye_size, idn.eye_spacing, idn.eye_y
  top_h = 0.062 * (1 + 0.9 * widen - 0.45 * squint)  # upper lid: raised by widening
  bot_h = 0.045 * (1 + 0.3 * widen - 0.70 * squint)  # lower lid: pushed up by squinting
  win = cv.window(-sp - w - 0.05, sp + w + 0.05, cy - 0.16, cy + 0.09)
  u, v = cv.u[win], cv.v[win] - cy
  du = np.abs(u) - sp  # mirrored about the midline: both eyes in one pass
  q = 1.0 - np.square(du * (1.0 / w))
  top = -top_h * q
  # Eye socket, deep in shadow under lowered brows.
  socket = _hypot(du * (1 / 1.3), v + 0.02 + 0.03 * furrow) - w * (0.9 + 0.15 * furrow)
  cv.fill(win, socket, _shade(idn.skin, 0.88 - 0.25 * furrow), 0.5 + 0.3 * furrow, 0.04)
  sclera = cv.coverage(np.maximum(top - v, v - bot_h * q))
  cv.paint(win, sclera, (0.93, 0.91, 0.88))
  iris = _hypot(du - np.copysign(gaze * w * 0.3, u), v)  # both eyes look the same way
  cv.paint(win, sclera * cv.coverage(iris - 0.048), idn.iris)
  cv.paint(win, sclera * cv.coverage(iris - 0.02), (0.03, 0.03, 0.03))
  cv.fill(win, np.maximum(_band(v, top - 0.006, 0.007), -q), (0.08, 0.06, 0.05), 0.9)  # lashes
  crease = np.maximum(_band(v, top * 1.25 - 0.035, 0.004), 0.15 - q)
  cv.fill(win, crease, _shade(idn.skin, 0.7), 0.6)
  if squint > 0.15:  # raised cheek under the lower lid
    bulge = np.maximum(_band(v, bot_h * q + 0.03, 0.004), 0.2 - q)
    cv.fill(win, bulge, _shade(idn.skin, 0.65), _ramp(squint, 0.15))


def _draw_brows(cv: _Canvas, e: list[float], idn: Identity) -> None:
  raise_, inner_up, furrow = e[0], e[1], e[2]
  colour = np.minimum(idn.hair, _shade(idn.skin, 0.45))  # brows are always darker than skin
  half = 0.115
  base = idn.eye_y - idn.brow_gap - 0.09 * raise_ - 0.02 * inner_up + 0.055 * furrow
  tilt = 0.11 * inner_up - 0.11 * furrow  # >0: inner end higher than outer end
  arch = 0.02 + 0.045 * raise_ - 0.025 * inner_up - 0.01 * furrow
  cx = idn.eye_spacing + 0.015 - 0.03 * furrow  # furrowing pulls the brows together
  win = cv.window(-cx - half - 0.02, cx + half + 0.02, base - 0.1, base + 0.1)
  u, v = cv.u[win], cv.v[win]
  w = (np.abs(u) - cx) * (1.0 / half)  # -1 at the inner end, +1 at the outer end
  centre = base + tilt * w - arch * (1 - np.square(w))
  thick = idn.brow_thickness * (1.15 - 0.35 * w)
  cv.fill(win, np.maximum(np.abs(v - centre) - thick, (np.abs(w) - 1) * half), colour)
  if furrow > 0.2:  # vertical frown lines between the brows
    lines = np.maximum(np.abs(np.abs(u) - 0.03) - 0.005, np.abs(v - base - 0.03) - 0.05)
    cv.fill(win, lines, _shade(idn.skin, 0.6), _ramp(furrow, 0.2))
  strength = _ramp(raise_ + inner_up, 0.2)
  if strength > 0:  # two forehead lines: long for raised brows, short and bowed for grief
    half_len = min(0.22, 0.08 + 0.14 * raise_)
    win = cv.window(-half_len, half_len, base - 0.2, base - 0.04)
    u, v = cv.u[win], cv.v[win]
    arc = v - base + 0.125 - (0.4 * raise_ - 1.5 * inner_up) * np.square(u)
    lines = np.maximum(np.abs(np.abs(arc) - 0.025) - 0.004, np.abs(u) - half_len)
    hairline = idn.hairline + 0.03 + 0.25 * np.square(u * (1.0 / idn.face_w)) - idn.hair_part * u
    cv.fill(win, np.maximum(lines, hairline - v), _shade(idn.skin, 0.65), strength)


def _draw_nose(cv: _Canvas, e: list[float], idn: Identity) -> None:
  wrinkle, lip_raise, smile = e[5], e[6], e[10]
  ny = idn.nose_y - 0.03 * wrinkle - 0.015 * lip_raise  # wrinkling pulls the nostrils up
  win = cv.window(-0.12, 0.12, idn.eye_y, ny + 0.05)
  u, v = cv.u[win], cv.v[win]
  au = np.abs(u)
  ridge = np.maximum(np.abs(au - 0.05 - 0.06 * (v - idn.eye_y)) - 0.006,
                     np.abs(v - (idn.eye_y + ny) / 2) - (ny - idn.eye_y) / 2 + 0.04)
  tip = np.maximum(_band(v, ny + 0.03 - 0.7 * np.square(u), 0.007), au - 0.1)
  cv.fill(win, np.minimum(ridge, tip), _shade(idn.skin, 0.72), 0.65)
  cv.fill(win, _hypot((au - 0.05 - 0.015 * wrinkle) * (1 / 1.6), v - ny) - 0.018,
          _shade(idn.skin, 0.5))  # nostrils
  if wrinkle > 0.15:  # three horizontal creases across the bridge
    arc = v - idn.eye_y - 0.075 - 0.8 * np.square(u)
    creases = np.minimum(np.abs(np.abs(arc) - 0.035), np.abs(arc)) - 0.005
    cv.fill(win, np.maximum(creases, au - 0.07), _shade(idn.skin, 0.55), _ramp(wrinkle, 0.15))
  # Nasolabial folds from beside the nostrils to beyond the mouth corners.
  depth = min(1.0, 0.15 + 0.8 * smile + 0.8 * wrinkle + 0.6 * lip_raise)
  win = cv.window(-0.4, 0.4, ny - 0.04, idn.mouth_y + 0.08)
  u, v = cv.u[win], cv.v[win]
  t = (v - ny + 0.02) * (1.0 / (idn.mouth_y + 0.06 - ny))  # 0 at the nostril, 1 below the corner
  curve = 0.1 + t * (0.1 + 0.3 * idn.mouth_w * t + 0.03 * smile)
  fold = np.maximum(np.abs(np.abs(u) - curve) - 0.006, (np.abs(t - 0.5) - 0.5) * 0.2)
  cv.fill(win, fold, _shade(idn.skin, 0.6), depth, 0.02)


def _draw_cheeks(cv: _Canvas, e: list[float], idn: Identity) -> None:
  """Cheeks pushed up and out (smile, squint, snarl) catch the light."""
  lift = min(1.0, e[10] + 0.3 * e[4] + 0.2 * e[6])
  if lift <= 0.05:
    return
  cy, cx = idn.eye_y + 0.22 - 0.04 * lift, idn.eye_spacing + 0.03
  win = cv.window(-cx - 0.2, cx + 0.2, cy - 0.15, cy + 0.15)
  apple = _hypot((np.abs(cv.u[win]) - cx) * (1 / 1.3), cv.v[win] - cy) - 0.07
  light = tuple(min(1.0, c * 1.25 + 0.05) for c in idn.skin)
  cv.fill(win, apple, light, 0.7 * lift, 0.06)


def _draw_mouth(cv: _Canvas, e: list[float], idn: Identity) -> None:
  lip_raise, opened, stretch, press, smile, frown, asym = e[6:13]
  w = idn.mouth_w * (1 + 0.25 * smile + 0.4 * stretch - 0.3 * press - 0.3 * opened
                     + 0.12 * asym)
  my = idn.mouth_y + 0.03 * opened
  win = cv.window(-w - 0.04, w + 0.07, my - 0.1 - 0.13 * asym - 0.1 * smile, my + 0.25)
  u, v = cv.u[win], cv.v[win]
  s = u * (1.0 / w)
  s2 = np.square(s)
  q = np.sqrt(np.maximum(1.0 - s2, 0.0))  # elliptic profile, 0 at the corners
  flat = np.sqrt(q)  # squarer profile for stretched / snarling mouths
  # Mid line: corners up for a smile, down for a frown, one corner up for contempt.
  centre = my + (0.15 * frown - 0.12 * smile) * s2
  if asym > 0:
    centre -= 0.18 * asym * np.square(np.maximum(s, 0.0))
  up_open = (0.02 * smile + 0.05 * opened + 0.012 * stretch) * q + 0.05 * lip_raise * flat
  down_open = (0.16 * opened + 0.035 * stretch + 0.02 * smile) * (q + stretch * (flat - q))
  top_in, bot_in = centre - up_open, centre + down_open
  lip = idn.lip_thickness * (1 - 0.75 * press)  # pressed lips thin out
  top_out = top_in - lip * (0.3 + 0.7 * q) + 0.008 * np.exp(-40.0 * s2)  # cupid's bow dip
  bot_out = bot_in + lip * (1.2 + 0.4 * frown) * (0.3 + 0.7 * q)  # sad lower lip pouts
  edge = (np.abs(s) - 1.0) * w
  lips = tuple(c + 0.6 * press * (0.95 * k - c) for c, k in zip(idn.lips, idn.skin))  # blanch
  cv.fill(win, np.maximum(np.maximum(top_out - v, v - bot_out), edge), lips)
  if opened + stretch + smile + lip_raise > 0.05:  # dark mouth cavity, maybe with teeth
    inside = cv.coverage(np.maximum(np.maximum(top_in - v, v - bot_in), edge))
    cv.paint(win, inside, (0.22, 0.05, 0.06))
    teeth = min(1.0, max(0.0, 3.0 * (smile + lip_raise + stretch) - 0.6))  # none in an "O"
    if teeth > 0:
      cv.paint(win, inside * cv.coverage(v - top_in - 0.045, teeth), (0.95, 0.93, 0.86))
    if stretch > 0.3:  # bared lower teeth of fear
      lower = teeth * _ramp(stretch, 0.3)
      cv.paint(win, inside * cv.coverage(bot_in - 0.03 - v, lower), (0.9, 0.88, 0.82))
  seam = np.maximum(_band(v, centre, 0.006 * (1 - 0.4 * press)), edge)
  cv.fill(win, seam, (0.25, 0.08, 0.08), 0.9)
  if asym > 0.2:  # dimple and a deep crease at the raised, tightened corner
    dv = v - my + 0.12 * asym
    crease = np.maximum(np.abs(u - w - 0.04 + 6.0 * np.square(dv)) - 0.006, np.abs(dv) - 0.06)
    cv.fill(win, crease, _shade(idn.skin, 0.6), _ramp(asym, 0.2), 0.01)
    cv.fill(win, _hypot(u - w - 0.015, dv) - 0.014, _shade(idn.skin, 0.5), _ramp(asym, 0.2))
  if frown + press > 0.4:  # chin boss raised by the mentalis
    chin = np.maximum(_band(v, my + 0.17 + 0.5 * w * w * s2, 0.005), np.abs(u) - 0.1)
    cv.fill(win, chin, _shade(idn.skin, 0.65), _ramp(frown + press, 0.4))


_NOISE: dict[int, np.ndarray] = {}


def _noise_bank(size: int) -> np.ndarray:
  """A fixed [3, 2*size, 2*size] unit-Gaussian field; each image reads a random window.

  Drawing fresh per-pixel noise costs more than rendering the whole face.
  """
  if size not in _NOISE:
    _NOISE[size] = np.random.default_rng(size).standard_normal((3, 2 * size, 2 * size),
                                                               np.float32)
  return _NOISE[size]


def render_face(expression_K: np.ndarray, identity: Identity, rng: np.random.Generator,
                size: int = 140) -> np.ndarray:
  """uint8 [size, size, 3] face; `rng` draws pose, lighting, gaze and pixel noise."""
  # Python floats, so that float32 pixel arrays are not promoted to float64.
  e = [float(x) for x in np.clip(expression_K, 0.0, 1.5)]
  idn, u_ = identity, rng.uniform
  # Pose: rotation up to 10 degrees, scale +-8% (of a crop the face nearly fills), shift 6%.
  cv = _Canvas(size, math.radians(u_(-10, 10)), 1.1 * u_(0.92, 1.08),
               (u_(-0.12, 0.12), u_(-0.12, 0.12)))
  ramp = lambda angle: math.cos(angle) * cv.grid[None, :] + math.sin(angle) * cv.grid[:, None]
  b0, b1 = np.asarray(idn.background, np.float32)[:, :, None, None]
  np.multiply(0.5 + 0.35 * ramp(idn.background_angle), b1 - b0, out=cv.image)
  cv.image += b0
  fw, fh, skin = idn.face_w, idn.face_h, idn.skin
  drop = 0.12 * e[7]
  win = cv.window(-1.0, 1.0, 0.5, 2.0)
  u, v = cv.u[win], cv.v[win]
  cv.fill(win, np.maximum(np.abs(u) - 0.24, 0.5 - v), _shade(skin, 0.8))  # neck
  cv.fill(win, _hypot(u * (1 / 1.6), v - 1.25) - 0.45, idn.shirt)
  win = cv.window(-fw - 0.1, fw + 0.1, -fh - 0.2, 0.3 + 0.6 * idn.hair_long)
  u, v = cv.u[win], cv.v[win]
  back = _hypot(u * (1 / (fw + 0.09)), (v + 0.12) * (1 / (fh * (0.95 + 0.4 * idn.hair_long))))
  cv.fill(win, np.maximum(back * 0.6 - 0.6, v - 0.3 - 0.6 * idn.hair_long), idn.hair)
  win = cv.window(-fw - 0.07, fw + 0.07, idn.eye_y - 0.05, idn.eye_y + 0.25)
  ears = _hypot((np.abs(cv.u[win]) - fw * 0.97) * (1 / 0.6), cv.v[win] - idn.eye_y - 0.1)
  cv.fill(win, ears - 0.075, _shade(skin, 0.9))
  win = cv.window(-fw - 0.02, fw + 0.02, -fh - 0.02, fh * (1 + drop) + 0.02)
  u, v = cv.u[win], cv.v[win]
  vv = v * (1 / fh)
  taper = 1.0 - idn.jaw * np.clip(vv, 0.0, 1.0)  # narrower towards the chin
  vv -= np.maximum(vv, 0.0) * (drop / (1.0 + drop))  # the jaw drops with an open mouth
  face = (_hypot(u / (fw * taper), vv) - 1.0) * fw
  cv.fill(win, face, skin)
  # Fringe: only the rows above the lowest point of the hairline need painting.
  lowest = idn.hairline + 0.25 + abs(idn.hair_part) * fw
  rows = cv.window(-fw - 0.02, fw + 0.02, -fh - 0.02, lowest)[0].stop - win[0].start
  win = (slice(win[0].start, win[0].start + rows), win[1])
  u, v, face = u[:rows], v[:rows], face[:rows]
  hairline = idn.hairline + 0.25 * np.square(u * (1 / fw)) - idn.hair_part * u
  # It overlaps the face edge by a pixel so that no seam of skin shows through.
  cv.fill(win, np.maximum(face - 1.5 / cv.inv_px, v - hairline), idn.hair)
  _draw_brows(cv, e, idn)
  _draw_eyes(cv, e, idn, u_(-1, 1))
  _draw_cheeks(cv, e, idn)
  _draw_nose(cv, e, idn)
  _draw_mouth(cv, e, idn)
  # Lighting: ambient level times a directional gradient; then sensor noise.
  shade = (255.0 * u_(0.8, 1.15)) * (1 + u_(0.0, 0.35) * ramp(u_(0, 2 * math.pi)))
  top, left = int(u_(0, size)), int(u_(0, size))
  noise = _noise_bank(size)[:, top:top + size, left:left + size]
  out = cv.image  # in place: see _buffers
  out *= shade
  out += np.multiply(noise, 255.0 * u_(0.005, 0.03), out=cv.scratch)
  np.clip(out, 0.0, 255.0, out=out)
  out += 0.5  # round, not truncate, in the cast
  return out.transpose(1, 2, 0).astype(np.uint8, order="C")
