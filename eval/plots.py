"""PNG figures of evaluation results: confusion matrices, search contact sheets, arithmetic recall charts."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def confusion_matrix(labels_N: np.ndarray, preds_N: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts: row = true class, column = predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels_N), np.asarray(preds_N)), 1)
    return matrix


def plot_confusion(path: str | Path, matrix_CC: np.ndarray, classes: list[str], *, title: str = "") -> Path:
    """Row-normalised confusion matrix; counts written in cells when there are few classes."""
    plt = _pyplot()
    num = len(classes)
    size = min(4 + 0.35 * num, 30)
    fig, ax = plt.subplots(figsize=(size, size))
    rows = matrix_CC.sum(axis=1, keepdims=True)
    frac = matrix_CC / np.maximum(rows, 1)
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    if num <= 40:
        ax.set_xticks(range(num), classes, rotation=90, fontsize=8)
        ax.set_yticks(range(num), classes, fontsize=8)
    if num <= 20:
        for i in range(num):
            for j in range(num):
                if matrix_CC[i, j]:
                    ax.text(j, i, str(matrix_CC[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "zero-shot confusion matrix (rows normalised)")
    return _save(fig, path)


def contact_sheet(path: str | Path, *, query_image, query_label: str, results: list[dict], images: dict,
                  key_column: str) -> Path:
    """The query (image or text) then each result with its key, score and caption."""
    import textwrap

    plt = _pyplot()
    tiles = [("query", query_image, textwrap.fill(query_label, 28))]
    for r in results:
        caption = textwrap.fill(str(r.get("caption", "")), 28)
        tiles.append((f"#{r['rank']} {r[key_column]}  {r['score']:.3f}", images.get(r[key_column]), caption))
    cols = min(6, len(tiles))
    rows = -(-len(tiles) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, image, text) in zip(axes.flat, tiles):
        if image is not None:
            ax.imshow(image)
        else:
            ax.text(0.5, 0.5, "(no image)" if title != "query" else "text query", ha="center", va="center")
        ax.set_title(title, fontsize=8)
        ax.text(0.5, -0.04, text, transform=ax.transAxes, ha="center", va="top", fontsize=7)
    return _save(fig, path)


def plot_arithmetic(path: str | Path, result: dict) -> Path:
    """Recall@k bars for arithmetic and its baselines, and arithmetic Recall@k against the weight W."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    methods = list(result["recall"])
    ks = list(result["recall"][methods[0]])
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        values = [result["recall"][method][k] for k in ks]
        left.bar(np.arange(len(ks)) + i * width, values, width, label=method.replace("_", " "))
    left.set_xticks(np.arange(len(ks)) + width * (len(methods) - 1) / 2, [f"R@{k}" for k in ks])
    left.set_ylim(0, 1)
    left.set_ylabel("recall")
    left.set_title(f"'{result['attribute']}' arithmetic, {result['num_queries']} queries")
    left.legend(fontsize=8)
    sweep = result.get("weight_sweep", {})
    if sweep:
        weights = sorted(sweep, key=float)
        for k in ks:
            right.plot([float(w) for w in weights], [sweep[w][k] for w in weights], marker="o", label=f"R@{k}")
        right.axvline(result["weight"], color="grey", linestyle=":", label=f"W = {result['weight']:g}")
        right.set_xlabel("weight W of (plus - minus)")
        right.set_ylim(0, 1)
        right.set_title("arithmetic recall against W")
        right.legend(fontsize=8)
    else:
        right.axis("off")
    return _save(fig, path)
