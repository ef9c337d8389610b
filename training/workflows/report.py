"""A Comparison as people read it: the Markdown table (printed by the CLI, pasted into the docs) and the ROC
plot's title."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.workflows.compare import Comparison, shown

_TABLE_COLUMNS = (
    ("EER", "eer"),
    ("ROC AUC", "roc_auc"),
    ("TAR@FAR=1e-2", "tar_at_far_1e-02"),
    ("TAR@FAR=1e-3", "tar_at_far_1e-03"),
    ("10-fold acc", "kfold_accuracy_mean"),
    ("rank-1", "rank1"),
    ("DIR@FAR=1e-1", "dir_at_far_1e-01"),
    ("episodes acc", "episodes"),
    ("test FAR @ thr(1e-3)", "test_far_at_calibrated_1e-03"),
    ("test TAR @ thr(1e-3)", "test_tar_at_calibrated_1e-03"),
)


def roc_title(dataset: str) -> str:
    label = dataset if dataset in ("digits", "digit-pairs") else Path(dataset).name
    return f"ROC on unseen {label} identities"


def markdown_table(comparison: Comparison) -> str:
    """The comparison as a Markdown table (printed by the CLI, pasted into the docs)."""

    def cell(row: dict[str, Any], key: str) -> str:
        if key == "episodes":  # its key names the protocol, e.g. episodes_20way_1shot_within_group_accuracy
            key = next((k for k in row if k.startswith("episodes_") and k.endswith("_accuracy")), key)
        value = row.get(key, "n/a")
        if key == "kfold_accuracy_mean" and isinstance(value, float):
            return f"{value:.3f} ± {row['kfold_accuracy_std']:.3f}"
        if isinstance(value, float):
            return f"{value:.3f}"
        return "n/a" if isinstance(value, str) else str(value)

    header = "| embedder | " + " | ".join(title for title, _ in _TABLE_COLUMNS) + " |"
    lines = [
        f"Unseen identities ({shown(comparison.heldout_classes)}):",
        "",
        header,
        "|" + "---|" * (len(_TABLE_COLUMNS) + 1),
    ]
    for row in comparison.rows():
        label = row["name"] + (f" (λ={row['lambda']:g})" if "lambda" in row else "")
        lines.append(f"| {label} | " + " | ".join(cell(row, key) for _, key in _TABLE_COLUMNS) + " |")
    episode_keys = {k for row in comparison.rows() for k in row if k.endswith("_accuracy") and "way_" in k}
    if episode_keys:
        lines.append(
            f"\nepisodes: {', '.join(sorted(k.removeprefix('episodes_')[:-9] for k in episode_keys))}"
        )
    split = comparison.main.split
    if split.has_calibration:
        lines.append(
            f"thresholds chosen on {len(split.calibration_classes)} calibration identities, "
            f"FAR/TAR measured on the {len(split.test_classes)} test identities"
        )
    ratio = comparison.eer_ratio()
    if ratio is not None:
        lines.append(f"\nEER {comparison.main.name} / {comparison.twin} = {ratio:.2f} (goal <= 0.70)")
    if comparison.seen:
        seen = ", ".join(f"{n} {e.verification.eer:.3f}" for n, e in comparison.seen.items())
        lines.append(f"EER on validation images of the training identities (seen): {seen}")
    return "\n".join(lines)
