"""Synthetic audio-visual recordings: deterministic, smooth, and carrying the designed signal."""
import numpy as np
import pytest

from avemo_jax.data import sequences


@pytest.fixture(scope="module")
def recordings():
  return sequences.SyntheticRecordings(2, seed=0, split="train", seconds=12.0, size=64)


def test_deterministic_and_split_disjoint(recordings):
  again = sequences.SyntheticRecordings(2, seed=0, split="train", seconds=12.0, size=64)
  np.testing.assert_array_equal(recordings[1].audio, again[1].audio)
  np.testing.assert_array_equal(recordings.frame(1, 17), again.frame(1, 17))
  dev = sequences.SyntheticRecordings(2, seed=0, split="dev", seconds=12.0, size=64)
  assert not np.allclose(dev[0].labels, recordings[0].labels)
  with pytest.raises(ValueError, match="split"):
    sequences.SyntheticRecordings(1, seed=0, split="test", seconds=1.0, size=64)


def test_shapes_and_ranges(recordings):
  rec = recordings[0]
  assert rec.labels.shape == (300, 2) and rec.labels.dtype == np.float32
  assert rec.audio.shape == (300 * 640,) and np.abs(rec.audio).max() <= 1.0
  assert np.abs(rec.labels).max() <= 1.0
  # Smooth at 25 Hz: frame-to-frame steps are small next to the spread.
  assert np.abs(np.diff(rec.labels, axis=0)).max() < 0.2 * rec.labels.std()
  assert recordings.frame(0, 0).shape == (64, 64, 3)


def test_loudness_follows_arousal_while_speaking():
  """Per 1 s window spoken throughout, the voice's energy (dB) correlates with the recording's
  arousal (the voice follows 0.85 arousal + 0.15 the speaker's own variation, plus per-syllable
  loudness noise); listening windows are near silent."""
  recs = sequences.SyntheticRecordings(4, seed=1, split="train", seconds=30.0, size=64)
  db, arousal, silent_db = [], [], []
  for r in range(4):
    rec = recs[r]
    windows = rec.audio.reshape(-1, sequences.SAMPLE_RATE)
    energy = 10 * np.log10(np.mean(np.square(windows), axis=1))
    speaking = rec.speaking.reshape(-1, sequences.FPS)
    db.append(energy[speaking.all(1)])
    arousal.append(rec.labels[:, 1].reshape(-1, sequences.FPS).mean(1)[speaking.all(1)])
    silent_db.append(energy[~speaking.any(1)])
  assert np.corrcoef(np.concatenate(db), np.concatenate(arousal))[0, 1] > 0.6
  silent_db = np.concatenate(silent_db)
  assert len(silent_db) and np.median(silent_db) < np.median(np.concatenate(db)) - 15


def _spoken_seconds(recs: sequences.SyntheticRecordings):
  """Per 1 s spoken throughout: log energy in 24 frequency bands, mean (valence, arousal)."""
  bands, labels = [], []
  for r in range(len(recs)):
    rec = recs[r]
    halves = rec.audio.reshape(-1, sequences.SAMPLE_RATE // 2)
    power = np.abs(np.fft.rfft(halves * np.hanning(halves.shape[1]), axis=1)) ** 2
    log_bands = np.log(np.stack([b.sum(1) for b in np.array_split(power, 24, axis=1)], 1))
    spoken = rec.speaking.reshape(-1, sequences.FPS).all(1)
    bands.append(log_bands.reshape(-1, 2, 24).mean(1)[spoken])
    labels.append(rec.labels.reshape(-1, sequences.FPS, 2).mean(1)[spoken])
  return np.concatenate(bands), np.concatenate(labels)


def test_voice_carries_arousal_well_and_valence_weakly():
  """A ridge read-out of the voice's band energies, fitted on 12 speakers and scored on 4 others,
  recovers arousal (pitch, loudness, rate) far better than valence (brightness alone, mixed with
  the speaker's own variation). With valence at 0.7 of the brightness: 0.64 against 0.71."""
  x, y = _spoken_seconds(sequences.SyntheticRecordings(12, seed=1, split="train", seconds=30.0,
                                                       size=64))
  x_dev, y_dev = _spoken_seconds(
      sequences.SyntheticRecordings(4, seed=1, split="dev", seconds=30.0, size=64))
  mean, std = x.mean(0), x.std(0)
  design = lambda b: np.c_[(b - mean) / std, np.ones(len(b))]
  w = np.linalg.solve(design(x).T @ design(x) + np.eye(25), design(x).T @ y)
  pred = design(x_dev) @ w
  valence, arousal = (np.corrcoef(pred[:, k], y_dev[:, k])[0, 1] for k in (0, 1))
  assert arousal > 0.6 and 0.2 < valence < arousal - 0.2, (valence, arousal)


def test_face_shows_valence_fully_and_arousal_in_part(recordings):
  rec = recordings[0]
  np.testing.assert_array_equal(rec.face_va[:, 0], rec.labels[:, 0])
  corr = np.corrcoef(rec.face_va[:, 1], rec.labels[:, 1])[0, 1]
  assert 0.5 < corr < 0.99


def test_turns_alternate_with_the_configured_lengths():
  rng = np.random.default_rng(0)
  mask = sequences.turns(rng, 25 * 600, (1.5, 5.0), (0.8, 2.5))
  edges = np.flatnonzero(np.diff(mask.astype(np.int8))) + 1
  runs = np.diff(edges) / sequences.FPS  # whole stretches (the first and last are cut)
  on, off = runs[::2], runs[1::2]
  if not mask[edges[0]]:
    on, off = off, on
  assert 1.5 - 0.02 <= on.min() and on.max() <= 5.0 + 0.02
  assert 0.8 - 0.02 <= off.min() and off.max() <= 2.5 + 0.02
  assert abs(mask.mean() - 3.25 / (3.25 + 1.65)) < 0.04


def test_each_modality_is_missing_at_its_own_times():
  recs = sequences.SyntheticRecordings(6, seed=2, split="dev", seconds=20.0, size=64)
  speaking = np.concatenate([recs[r].speaking for r in range(6)])
  visible = np.concatenate([recs[r].visible for r in range(6)])
  assert 0.5 < speaking.mean() < 0.8 and 0.55 < visible.mean() < 0.85
  assert abs(np.corrcoef(speaking, visible)[0, 1]) < 0.2  # independent gaps
  # A hand covers the middle of a hidden face (eyes, nose, mouth): its pixels vary little there.
  spread = lambda r, t: recs.frame(r, int(t))[24:40, 24:40].astype(float).std((0, 1)).mean()
  for r in range(3):
    hidden, seen = np.flatnonzero(~recs[r].visible)[::7], np.flatnonzero(recs[r].visible)[::7]
    assert max(spread(r, t) for t in hidden) < 8 < min(spread(r, t) for t in seen)


def test_clips():
  clips = sequences.SyntheticClips(4, seed=0)
  item = clips[3]
  assert item["audio"].shape == (sequences.SAMPLE_RATE,) and item["labels"].shape == (2,)
  np.testing.assert_array_equal(item["audio"], sequences.SyntheticClips(4, seed=0)[3]["audio"])
  with pytest.raises(IndexError):
    clips[4]
