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


def test_loudness_follows_arousal():
  """Per 1 s window, the voice's energy (dB) correlates with the recording's arousal (the voice
  follows 0.7 arousal + 0.3 the speaker's own variation, plus per-syllable loudness noise)."""
  recs = sequences.SyntheticRecordings(3, seed=1, split="train", seconds=30.0, size=64)
  db, arousal = [], []
  for r in range(3):
    rec = recs[r]
    windows = rec.audio.reshape(-1, sequences.SAMPLE_RATE)
    db.append(10 * np.log10(np.mean(np.square(windows), axis=1)))
    arousal.append(rec.labels[:, 1].reshape(-1, sequences.FPS).mean(1))
  assert np.corrcoef(np.concatenate(db), np.concatenate(arousal))[0, 1] > 0.45


def test_face_shows_valence_fully_and_arousal_in_part(recordings):
  rec = recordings[0]
  np.testing.assert_array_equal(rec.face_va[:, 0], rec.labels[:, 0])
  corr = np.corrcoef(rec.face_va[:, 1], rec.labels[:, 1])[0, 1]
  assert 0.2 < corr < 0.95


def test_clips():
  clips = sequences.SyntheticClips(4, seed=0)
  item = clips[3]
  assert item["audio"].shape == (sequences.SAMPLE_RATE,) and item["labels"].shape == (2,)
  np.testing.assert_array_equal(item["audio"], sequences.SyntheticClips(4, seed=0)[3]["audio"])
  with pytest.raises(IndexError):
    clips[4]
