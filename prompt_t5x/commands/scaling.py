"""``prompt-t5x scaling``: one tuning run per (method, model size) -> scaling.csv + scaling.png.

  prompt-t5x scaling --gin_file=runs/scaling.gin [--gin.OUTPUT_DIR="'/tmp/scaling'"]

The shape of Figure 1 of the prompt-tuning paper: the best validation metric of each method
against the number of model parameters (log x axis), one line per method, plus a second panel
with the share of parameters each method trains.

gin: ``scaling.runs`` maps a method label to a scoped ``train`` configuration
(``'Prompt tuning': @prompt_tuning/train()``): everything the ``train`` command takes, with scope
bindings for what differs per method (learning rate, method). ``scaling.models`` lists the models:
each a dict with ``name``, ``size`` (a row of ``prompt_t5x.model.t5.SIZES``), optional
``checkpoint``
and any ``T5Config`` field overrides, e.g. ``{'name': 'd64', 'size': 'tiny', 'emb_dim': 64}``.
Optional ``scaling.pretrain`` (a model-tuning ``train`` configuration) first trains each model
(from its checkpoint, or from random weights) and hands the result to every method as its
pretrained checkpoint: pretrain once, then prompt-tune and model-tune from the same weights.

Each run lives in ``<output_dir>/<method>/<model>/`` and resumes like ``train`` does, so an
interrupted sweep picks up where it stopped; ``scaling.csv`` is rewritten after every run.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import re
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import gin

from prompt_t5x.base import extras
from prompt_t5x.base.errors import StoppedCleanly, UsageError
from prompt_t5x.commands import configurables, gin_cli, gin_help
from prompt_t5x.data import metrics as metrics_lib
from prompt_t5x.model import t5 as t5_lib

CSV_FIELDS = ("method", "model", "seed", "size", "model_parameters", "trainable_parameters",
              "trainable_percent", "metric", "best_value", "best_step", "last_step",
              "train_steps", "seconds", "status", "model_dir")


@dataclasses.dataclass(frozen=True)
class ScalingConfig:
    output_dir: str
    models: Sequence[Mapping[str, Any]]
    runs: Mapping[str, Any]        # label -> run_train.RunConfig
    title: Optional[str] = None
    pretrain: Any = None           # optional run_train.RunConfig (model tuning) run per model
    seeds: Sequence[int] = (0,)    # each (method, model) is trained once per seed
    chance: Optional[float] = None  # the metric's chance level (a line in the figure)


@gin.configurable("scaling")
def scaling_config(output_dir: str = gin.REQUIRED,
                   models: Sequence[Mapping[str, Any]] = gin.REQUIRED,
                   runs: Mapping[str, Any] = gin.REQUIRED, title: Optional[str] = None,
                   pretrain: Any = None, seeds: Sequence[int] = (0,),
                   chance: Optional[float] = None) -> ScalingConfig:
    if not models:
        raise UsageError("scaling.models is empty: list at least one model")
    if not runs:
        raise UsageError("scaling.runs is empty: map a method label to @scope/train()")
    names = set()
    for entry in models:
        if not isinstance(entry, Mapping) or "size" not in entry:
            raise UsageError(f"scaling.models entry {entry!r} needs at least a 'size' "
                             f"(one of {sorted(t5_lib.SIZES)})")
        name = model_name(entry)
        if name in names:
            raise UsageError(f"scaling.models: two entries are named {name!r}; give each a "
                             "distinct 'name'")
        names.add(name)
        model_config(entry, dropout_rate=0.0)  # every override is checked before any run
    if pretrain is not None and pretrain.method.kind != "model_tuning":
        raise UsageError("scaling.pretrain must be a model-tuning run (methods.model_tuning): "
                         "its weights become the frozen/initial model of every method")
    seeds = tuple(int(x) for x in seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise UsageError(f"scaling.seeds={list(seeds)} must list distinct seeds, e.g. [0, 1, 2]")
    if chance is None:
        chance = default_chance(runs.values())
    return ScalingConfig(os.path.expanduser(str(output_dir)), tuple(models), dict(runs), title,
                         pretrain, seeds, None if chance is None else float(chance))


def default_chance(runs) -> Optional[float]:
    """Chance accuracy (%) when every run is scored by accuracy on a generated yes/no task (one
    of two label words); None otherwise: a chance level of another task is the user's to give
    (scaling.chance), since it depends on its label balance."""
    from prompt_t5x.data import synthetic
    runs = list(runs)
    if runs and all(r.task in synthetic.TASKS and r.loop.metric == "accuracy" for r in runs):
        return 100.0 / len(synthetic.LABELS)
    return None


configurables.register("scaling", scaling_config)


def model_name(entry: Mapping[str, Any]) -> str:
    return str(entry.get("name") or entry["size"])


def model_config(entry: Mapping[str, Any], dropout_rate: float) -> t5_lib.T5Config:
    overrides = {k: v for k, v in entry.items() if k not in ("name", "size", "checkpoint")}
    overrides.setdefault("dropout_rate", dropout_rate)
    try:
        # 'checkpoint' also serves size 'from_checkpoint' (the config of those weights).
        return configurables.get_config(entry["size"], checkpoint=entry.get("checkpoint"),
                                        **overrides)
    except (ValueError, TypeError) as e:
        raise UsageError(f"scaling.models entry {model_name(entry)!r}: {e}") from None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text.strip().lower()).strip("_") or "run"


# ----------------------------------------------------------------------------- the sweep ----
def run_sweep(cfg: ScalingConfig, gin_text: str = "", log=print) -> List[Dict[str, Any]]:
    from prompt_t5x.commands import run_train
    from prompt_t5x.training.training_loop import NonFiniteError

    os.makedirs(cfg.output_dir, exist_ok=True)
    rows: List[Dict[str, Any]] = []
    for entry in sorted(cfg.models, key=lambda e: model_config(e, 0.0).num_params):
        checkpoint = entry.get("checkpoint")
        if cfg.pretrain is not None:
            # Stage 1: pretrain this size (model tuning); its weights are every method's start.
            pre = cfg.pretrain.replace(
                model=model_config(entry, cfg.pretrain.model.dropout_rate),
                checkpoint=checkpoint if checkpoint is not None else cfg.pretrain.checkpoint,
                model_dir=os.path.join(cfg.output_dir, "pretrain", _slug(model_name(entry))))
            log(f"[scaling] pretrain / {model_name(entry)} ({pre.model.num_params:,} "
                f"parameters) on {pre.task} -> {pre.model_dir}")
            result = run_train.execute(pre, gin_config=gin_text)
            if result.stopped is not None:
                raise StoppedCleanly(result.stopped.message(pre.model_dir) + " The sweep "
                                     "resumes there when run again.")
            log(f"[scaling] pretrained {model_name(entry)}: best "
                + metrics_lib.format_metrics({pre.loop.metric: result.best_value}))
            checkpoint = pre.model_dir
        for label, base, seed in [(label, base, seed) for label, base in cfg.runs.items()
                                  for seed in cfg.seeds]:
            config = model_config(entry, base.model.dropout_rate)
            model_dir = os.path.join(cfg.output_dir, _slug(label), _slug(model_name(entry)))
            if len(cfg.seeds) > 1:   # one seed keeps the directory layout of earlier sweeps
                model_dir = os.path.join(model_dir, f"seed_{seed}")
            run = base.replace(model=config, seed=seed, model_dir=model_dir,
                               checkpoint=checkpoint if checkpoint is not None else base.checkpoint)
            log(f"[scaling] {label} / {model_name(entry)} ({config.num_params:,} parameters) "
                f"seed {seed} -> {run.model_dir}")
            start = time.perf_counter()
            status = "ok"
            try:
                result = run_train.execute(run, gin_config=gin_text)
                if result.stopped is not None:   # SIGTERM / Ctrl-C: the sweep stops too
                    raise StoppedCleanly(result.stopped.message(run.model_dir) + " The sweep "
                                         "resumes there when run again.")
                best_value, best_step, last_step = (result.best_value, result.best_step,
                                                    result.last_step)
            except NonFiniteError as e:
                log(f"[scaling] {label} / {model_name(entry)} failed: {e}")
                status, best_value, best_step, last_step = "non-finite", math.nan, None, None
            trainable = run.method.trainable_parameters(config)
            rows.append({
                "method": label, "model": model_name(entry), "seed": seed,
                "size": entry["size"],
                "model_parameters": config.num_params, "trainable_parameters": trainable,
                "trainable_percent": 100.0 * trainable / config.num_params,
                "metric": run.loop.metric,
                "best_value": math.nan if best_value is None else best_value,
                "best_step": best_step, "last_step": last_step,
                "train_steps": run.loop.train_steps,
                "seconds": round(time.perf_counter() - start, 1), "status": status,
                "model_dir": run.model_dir})
            write_csv(rows, os.path.join(cfg.output_dir, "scaling.csv"))
    return rows


def write_csv(rows: Sequence[Mapping[str, Any]], path: str,
              fields: Sequence[str] = CSV_FIELDS) -> None:
    """Rows -> CSV (``fields`` in order), replaced atomically: a kill never leaves half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k) for k in fields})
    os.replace(tmp, path)


def read_csv(path: str) -> List[Dict[str, Any]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in ("model_parameters", "trainable_parameters"):
            row[key] = int(row[key])
        row["seed"] = int(row.get("seed") or 0)   # CSVs of one-seed sweeps before seeds
        for key in ("trainable_percent", "best_value"):
            row[key] = float(row[key]) if row[key] not in ("", None) else math.nan
    return rows


# ------------------------------------------------------------------------------ the plot ----
_METRIC_LABELS = {"accuracy": "accuracy (%)", "f1": "F1 (%)", "mcc": "Matthews corr. (%)",
                  "loss": "loss", "token_accuracy": "token accuracy (%)"}


def _human(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def aggregate(rows: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """One point per (method, model) over its seeds: mean, min and max of the best value (runs
    that failed, NaN, are left out of all three), the seeds counted; in the rows' order."""
    groups: Dict[tuple, List[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["model"]), []).append(r)
    points = []
    for (method, model), group in groups.items():
        values = [float(r["best_value"]) for r in group if not math.isnan(float(r["best_value"]))]
        points.append({"method": method, "model": model,
                       "model_parameters": group[0]["model_parameters"],
                       "trainable_percent": group[0]["trainable_percent"],
                       "mean": sum(values) / len(values) if values else math.nan,
                       "min": min(values) if values else math.nan,
                       "max": max(values) if values else math.nan,
                       "seeds": len(group)})
    return points


def plot(rows: Sequence[Mapping[str, Any]], path: str, *, title: Optional[str] = None,
         task: Optional[str] = None, dpi: int = 200, chance: Optional[float] = None) -> str:
    """Metric vs model parameters (log x), one line per method (the mean over seeds, with
    min-max bars when there are several) and the chance level; right panel: % trainable."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    if not rows:
        raise ValueError("nothing to plot: no scaling rows")
    methods = list(dict.fromkeys(r["method"] for r in rows))
    metric = rows[0]["metric"]
    points = aggregate(rows)
    several_seeds = any(p["seeds"] > 1 for p in points)
    fig, (ax, ax_params) = plt.subplots(1, 2, figsize=(11, 4.2),
                                        gridspec_kw={"width_ratios": [1.6, 1]})
    markers = "osD^v<>"
    for i, method in enumerate(methods):
        mine = sorted((p for p in points if p["method"] == method),
                      key=lambda p: p["model_parameters"])
        xs = [p["model_parameters"] for p in mine]
        style = dict(marker=markers[i % len(markers)], linewidth=2, markersize=6, color=f"C{i}")
        means = [p["mean"] for p in mine]
        if several_seeds:
            seeds = max(p["seeds"] for p in mine)
            ax.errorbar(xs, means, yerr=[[p["mean"] - p["min"] for p in mine],
                                         [p["max"] - p["mean"] for p in mine]],
                        capsize=4, label=f"{method} (mean, min-max of {seeds} seeds)", **style)
        else:
            ax.plot(xs, means, label=method, **style)
        ax_params.plot(xs, [p["trainable_percent"] for p in mine], label=method, **style)
    if chance is not None:
        ax.axhline(chance, color="gray", linestyle="--", linewidth=1.2,
                   label=f"chance ({chance:g}{'%' if metrics_lib.is_percent(metric) else ''})")
    # Ticks at the models actually run, labelled with their size and name.
    sizes = sorted({(r["model_parameters"], r["model"]) for r in rows})
    xs_all = [n for n, _ in sizes]
    for a in (ax, ax_params):
        a.set_xscale("log")
        a.set_xlabel("Model parameters")
        a.set_xticks(xs_all)
        a.set_xticklabels([f"{_human(n)}\n{name}" for n, name in sizes], fontsize=8.5)
        a.xaxis.set_minor_formatter(NullFormatter())
        a.set_xlim(min(xs_all) / 1.6, max(xs_all) * 1.6)
        a.grid(True, which="major", linestyle="-", alpha=0.35)
        a.grid(True, which="minor", linestyle=":", alpha=0.2)
        a.spines[["top", "right"]].set_visible(False)
    ax.set_ylabel(f"Best validation {_METRIC_LABELS.get(metric, metric)}")
    ax.set_title(title or ("Scaling: " + " vs ".join(methods) + (f" on {task}" if task else "")),
                 fontsize=11)
    ax.legend(frameon=False, loc="best")
    ax_params.set_yscale("log")
    ax_params.set_ylabel("Trainable parameters (% of model)")
    ax_params.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}%"))
    ax_params.set_title("Parameter cost", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------- CLI ----
def main(argv: List[str]) -> int:
    gin_args = gin_cli.split_argv(argv)
    parser = gin_help.gin_parser("scaling", "runs/scaling.gin")
    parser.add_argument("--plot_only", action="store_true",
                        help="re-draw scaling.png from an existing scaling.csv")
    parser.add_argument("--no_plot", action="store_true",
                        help="write scaling.csv only (no matplotlib needed)")
    args = parser.parse_args(gin_args.rest)
    if args.plot_only and args.no_plot:
        raise UsageError("--plot_only and --no_plot contradict each other; pass one")
    if not args.no_plot:
        # Before the sweep, not after it: the figure is the last step of many minutes of work.
        extras.require("plot", "prompt-t5x scaling (its figure, scaling.png)",
                       "or pass --no_plot to write scaling.csv only")
    gin_cli.parse(gin_args, default_files=["runs/scaling.gin"])
    cfg = gin_cli.call(scaling_config)
    csv_path = os.path.join(cfg.output_dir, "scaling.csv")
    tasks = sorted({run.task for run in cfg.runs.values()})
    if args.plot_only:
        if not os.path.exists(csv_path):
            raise UsageError(f"--plot_only: {csv_path} does not exist; run the sweep first")
        rows = read_csv(csv_path)
    else:
        rows = run_sweep(cfg, gin_cli.operative_config())
    png = None if args.no_plot else plot(rows, os.path.join(cfg.output_dir, "scaling.png"),
                                         title=cfg.title, task=", ".join(tasks),
                                         chance=cfg.chance)
    width = max(len(r["method"]) for r in rows)
    for r in rows:
        print(f"{r['method']:<{width}}  {r['model']:<10} seed {r.get('seed', 0)}  "
              f"params={r['model_parameters']:>12,}  "
              f"trainable={r['trainable_parameters']:>10,}  best "
              + metrics_lib.format_metrics({r["metric"]: float(r["best_value"])}),
              file=sys.stdout)
    print(f"wrote {csv_path}" + (f" and {png}" if png else ""))
    return 0
