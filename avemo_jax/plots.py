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
