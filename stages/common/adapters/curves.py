"""Training curves of the fitted synthesizer: `curve.jsonl`, `curve.csv` and `curve.png` in a build folder."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

LABELS = {"ppl_held_out": "held-out pieces of trained files", "ppl_held_out_files": "held-out files"}


def write_curve(folder: Path, rows: list[dict], title: str = "") -> list[Path]:
    """Write the rows (one per check: step, seconds, train_loss, ppl_*) as JSONL and CSV, and plot them."""
    if not rows:
        return []
    folder = Path(folder)
    written = [folder / "curve.jsonl", folder / "curve.csv", folder / "curve.png"]
    written[0].write_text("".join(json.dumps(row) + "\n" for row in rows))
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    written[1].write_text(buffer.getvalue())
    plot_curves({title or folder.name: rows}, written[2])
    return written


def plot_curves(runs: dict[str, list[dict]], out: Path, x: str = "step") -> None:
    """Perplexity of each held-out split against `x` (step or seconds), one line style per split, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for colour, (name, rows) in enumerate(runs.items()):
        for style, (key, label) in zip(("-", "--"), LABELS.items()):
            points = [(row[x], row[key]) for row in rows if row.get(key) is not None]
            if points:
                left.plot(*zip(*points), style, marker=".", color=f"C{colour % 10}", label=f"{name}: {label}")
        loss = [(row[x], row["train_loss"]) for row in rows if row.get("train_loss") is not None]
        if loss:
            right.plot(*zip(*loss), ".-", color=f"C{colour % 10}", label=name)
    left.set(xlabel=x, ylabel="perplexity", title="held-out perplexity (adapter live)")
    right.set(xlabel=x, ylabel="mean train loss since the last check", title="training loss")
    left.legend(fontsize=7)
    if runs:
        right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
