"""PNG figures for a person to look at (matplotlib, Agg backend: no display needed)."""
import pathlib
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def confusion_matrix_png(confusion: np.ndarray, class_names: Sequence[str], path: pathlib.Path,
                         title: str) -> None:
  """Row-normalised confusion matrix (rows: true class), with the counts written in the cells."""
  confusion = np.asarray(confusion)
  rates = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
  fig, ax = plt.subplots(figsize=(7, 6))
  im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
  ticks = np.arange(len(class_names))
  ax.set(xticks=ticks, yticks=ticks, xticklabels=class_names, yticklabels=class_names,
         xlabel="predicted", ylabel="true", title=title)
  plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
  for i, j in np.ndindex(*confusion.shape):
    ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=8,
            color="white" if rates[i, j] > 0.5 else "black")
  fig.colorbar(im, ax=ax, fraction=0.046)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def valence_arousal_png(truth_Tx2: np.ndarray, predictions: dict[str, np.ndarray],
                        path: pathlib.Path, title: str, fps: float = 25.0,
                        gaps: dict[str, np.ndarray] | None = None) -> None:
  """Valence (top) and arousal (bottom) over time: gold standard and each model's prediction;
  `gaps` (label -> bool [T]) shades the frames where a modality is missing."""
  t = np.arange(len(truth_Tx2)) / fps
  fig, axes = plt.subplots(2, 1, figsize=(10, 5), sharex=True)
  for d, (ax, name) in enumerate(zip(axes, ("valence", "arousal"))):
    for (label, mask), colour in zip((gaps or {}).items(), ("tab:blue", "tab:orange", "tab:gray")):
      ax.fill_between(t, 0, 1, where=mask[:len(t)], transform=ax.get_xaxis_transform(),
                      color=colour, alpha=0.12, step="mid", linewidth=0, label=label)
    ax.plot(t, truth_Tx2[:, d], color="black", linewidth=2, label="gold standard")
    for model, pred_Tx2 in predictions.items():
      ax.plot(t, pred_Tx2[:len(t), d], linewidth=1, label=model)
    ax.set(ylabel=name, ylim=(-1.1, 1.1))
    ax.grid(alpha=0.3)
  axes[0].set_title(title)
  axes[0].legend(loc="upper right", fontsize=7, ncol=len(predictions) + 1 + len(gaps or {}))
  axes[1].set_xlabel("time (s)")
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)
