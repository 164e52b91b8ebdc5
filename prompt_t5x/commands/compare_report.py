"""What ``prompt-t5x compare`` writes about its methods: compare.csv, compare.md, compare.png.

The CSV is the record (one row per method; the command resumes from it), the markdown table is
for a README or a pull request, and the figure puts the trade-off in one picture: the best
validation metric against the number of trained parameters (log x: prompt tuning's thousands
against model tuning's whole model), with each method's train time and peak memory beside it.
"""

from __future__ import annotations

import csv
import json
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

from prompt_t5x.commands import scaling
from prompt_t5x.data import metrics as metrics_lib

CSV = "compare.csv"
CSV_FIELDS = ("method", "kind", "task", "metric", "best_value", "best_step", "last_step",
              "train_steps", "trainable_parameters", "model_parameters", "trainable_percent",
              "seconds", "step_seconds", "per_task", "peak_rss_bytes", "device_peak_bytes",
              "resumed", "status", "model_dir", "command")
_INTS = ("best_step", "last_step", "train_steps", "trainable_parameters", "model_parameters",
         "peak_rss_bytes", "device_peak_bytes")
_FLOATS = ("best_value", "trainable_percent", "seconds", "step_seconds")
MIB = 2 ** 20


def write_csv(rows: Sequence[Mapping[str, Any]], path: str) -> None:
    scaling.write_csv(rows, path, CSV_FIELDS)


def read_csv(path: str) -> List[Dict[str, Any]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in _INTS:
            row[key] = int(row[key]) if row.get(key) not in ("", None) else None
        for key in _FLOATS:
            row[key] = float(row[key]) if row.get(key) not in ("", None) else math.nan
        row["resumed"] = row.get("resumed") == "True"
        row["per_task"] = row.get("per_task") or ""
    return rows


def per_task(row: Mapping[str, Any]) -> Dict[str, float]:
    """{task: best-checkpoint metric} of a mixture's row (its ``per_task`` JSON); {} if none."""
    text = row.get("per_task") or ""
    return {k: float(v) for k, v in json.loads(text).items()} if text else {}


def default_chance(rows: Sequence[Mapping[str, Any]]) -> Optional[float]:
    """Chance accuracy (%) when every method is scored by accuracy on a generated yes/no task;
    None otherwise (another task's chance level depends on its label balance: compare.chance)."""
    from prompt_t5x.data import synthetic
    if rows and all(r["task"] in synthetic.TASKS and r["metric"] == "accuracy" for r in rows):
        return 100.0 / len(synthetic.LABELS)
    return None


# ------------------------------------------------------------------------------ the table ----
def _value(row: Mapping[str, Any]) -> str:
    value = float(row["best_value"])
    if math.isnan(value):
        return "-"
    return f"{value:.2f}{'%' if metrics_lib.is_percent(row['metric']) else ''}"


def peak_memory(row: Mapping[str, Any]) -> str:
    """The device's peak where it was measured (GPU/TPU), else the train process's peak RSS."""
    if row.get("device_peak_bytes"):
        return f"{row['device_peak_bytes'] / MIB:,.0f} MiB (device)"
    if row.get("peak_rss_bytes"):
        return f"{row['peak_rss_bytes'] / MIB:,.0f} MiB (process RSS)"
    return "-"


def _count(value) -> str:
    """A trainable count, or '-' where the run died before it said (a head's needs its task)."""
    return "-" if value is None or value == "" else f"{int(value):,}"


def _percent(value) -> str:
    return "-" if value is None or value == "" or math.isnan(float(value)) \
        else f"{float(value):.3g}%"


def _step_time(row: Mapping[str, Any]) -> str:
    value = row.get("step_seconds")
    if value is None or value == "" or math.isnan(float(value)):
        return "-"
    return f"{1000.0 * float(value):.0f} ms"


def markdown_table(rows: Sequence[Mapping[str, Any]], chance: Optional[float] = None) -> str:
    """One row per method; a column per task of a mixture (each row's own best checkpoint)."""
    metric = rows[0]["metric"] if rows else "metric"
    tasks = ", ".join(dict.fromkeys(str(r["task"]) for r in rows))
    task_columns = list(dict.fromkeys(t for r in rows for t in sorted(per_task(r))))
    percent = "%" if metrics_lib.is_percent(metric) else ""
    head = f"best validation {metric}" + (" (all tasks)" if task_columns else "")
    lines = [f"Task: {tasks}" + (f" (chance {chance:g}%)" if chance is not None else ""), "",
             f"| method | kind | trainable parameters | % of the T5 | {head} | "
             + "".join(f"{t} | " for t in task_columns)
             + "at step | steps | step time | train time | peak memory | status |",
             "|---|---|---:|---:|---:|" + "---:|" * len(task_columns)
             + "---:|---:|---:|---:|---:|---|"]
    for r in rows:
        own = per_task(r)
        cells = "".join(f"{own[t]:.2f}{percent} | " if t in own else "- | "
                        for t in task_columns)
        lines.append(
            f"| {r['method']} | {r['kind']} | {_count(r['trainable_parameters'])} | "
            f"{_percent(r['trainable_percent'])} | {_value(r)} | {cells}"
            f"{'-' if r.get('best_step') is None else r['best_step']} | "
            f"{'-' if r.get('last_step') is None else r['last_step']} | {_step_time(r)} | "
            f"{float(r['seconds']):.0f} s | {peak_memory(r)} | {r['status']} |")
    return "\n".join(lines)


def write_markdown(rows: Sequence[Mapping[str, Any]], path: str,
                   chance: Optional[float] = None) -> str:
    text = ("Step time: median seconds of a training step (compilation and evaluation "
            "excluded). Train time: wall time of each method's `prompt-t5x train` process "
            "(start-up and compilation included). Peak memory: the device's peak where the backend reports "
            "one, else the process's peak resident set.\n\n"
            + markdown_table(rows, chance) + "\n\nCommands:\n\n"
            + "\n".join(f"- {r['method']}: `{r['command']}`" for r in rows) + "\n")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


# ------------------------------------------------------------------------------ the plot ----
def plot(rows: Sequence[Mapping[str, Any]], path: str, *, title: Optional[str] = None,
         chance: Optional[float] = None, dpi: int = 150) -> str:
    """Left: best validation metric vs trainable parameters (log x), one labelled point per
    method, and the chance level. Middle: train time. Right: peak memory."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    if not rows:
        raise ValueError("nothing to plot: no compare rows")
    metric = rows[0]["metric"]
    fig, (ax, ax_time, ax_mem) = plt.subplots(1, 3, figsize=(13, 4.2),
                                              gridspec_kw={"width_ratios": [1.7, 1, 1]})
    markers = "osD^v<>ph*"
    for i, r in enumerate(rows):
        value = float(r["best_value"])
        if math.isnan(value) or not r["trainable_parameters"]:
            continue   # a failed (or uncounted) method has no point; its bars still show
        ax.plot([r["trainable_parameters"]], [value], marker=markers[i % len(markers)],
                markersize=9, linestyle="none", color=f"C{i}", label=r["method"])
        ax.annotate(r["method"], (r["trainable_parameters"], value), textcoords="offset points",
                    xytext=(6, 6), fontsize=8.5)
    if chance is not None:
        ax.axhline(chance, color="gray", linestyle="--", linewidth=1.2,
                   label=f"chance ({chance:g}{'%' if metrics_lib.is_percent(metric) else ''})")
    counts = [int(r["trainable_parameters"]) for r in rows if r["trainable_parameters"]] or [1]
    ax.set_xscale("log")
    ax.set_xlim(min(counts) / 3, max(counts) * 12)   # room for the last label
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: scaling._human(v)))
    ax.set_xlabel("Trainable parameters")
    ax.set_ylabel(f"Best validation {scaling._METRIC_LABELS.get(metric, metric)}")
    tasks = ", ".join(dict.fromkeys(str(r["task"]) for r in rows))
    ax.set_title(title or f"Methods on {tasks}", fontsize=11)
    ax.legend(frameon=False, loc="best", fontsize=8.5)
    ax.grid(True, which="major", alpha=0.35)

    names = [r["method"] for r in rows]
    colors = [f"C{i}" for i in range(len(rows))]
    ax_time.barh(names, [float(r["seconds"]) for r in rows], color=colors)
    ax_time.set_xlabel("Train time (s, wall, whole process)")
    ax_time.set_title("Train time", fontsize=11)
    device = any(r.get("device_peak_bytes") for r in rows)
    memory = [(r.get("device_peak_bytes") if device else r.get("peak_rss_bytes")) or 0
              for r in rows]
    ax_mem.barh(names, [m / MIB for m in memory], color=colors)
    ax_mem.set_xlabel("Peak device memory (MiB)" if device else "Peak process RSS (MiB)")
    ax_mem.set_title("Peak memory", fontsize=11)
    for a in (ax_time, ax_mem):
        a.invert_yaxis()   # the table's order, top to bottom
        a.grid(True, axis="x", alpha=0.35)
    for a in (ax, ax_time, ax_mem):
        a.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
