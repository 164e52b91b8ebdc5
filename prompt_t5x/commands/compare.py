"""``prompt-t5x compare``: several tuning methods on one task -> compare.csv, .md and .png.

  prompt-t5x compare [--gin_file=runs/compare.gin] [--gin.OUTPUT_DIR=/tmp/prompt_t5x_compare]

Each method is trained by its *own* run gin file (``runs/<method>.gin``: its paper recipe), with
the comparison's shared settings (task, steps, batch, lengths, evaluation: ``compare.shared``)
bound on top of it and then the method's own overrides (``compare.runs``), e.g.::

    compare.runs = {'prompt_tuning': ['runs/prompt_tuning.gin', 'PROMPT_LENGTH = 8'],
                    'model_tuning':  ['runs/model_tuning.gin', 'LEARNING_RATE = 0.01']}

A method's entry lists gin files (names ending in ``.gin``) and ``NAME = VALUE`` bindings; the
model gin files (``compare.model_gin_files``) come first, so every method tunes the same frozen
T5. Every method's configuration is parsed and checked before the first one trains (a mistake
in the third method stops the command before anything is written).

Each method then trains in its own child process (``prompt-t5x train``), so its peak memory is
its own: the child's peak resident set (``os.wait4``'s rusage) and, where the backend keeps one
(GPU/TPU), the device's ``peak_bytes_in_use`` read by the child after training. The wall time of
the child is the method's train time (start-up and compilation included, the same for all).

Outputs in ``compare.output_dir``: ``<method>/`` (the run directories), ``logs/<method>.log``,
``compare.csv`` (rewritten after every method), ``compare.md`` (a table) and ``compare.png``
(best validation metric against trainable parameters, log x, one point per method; train time;
peak memory). With a mixture whose validation reports each task's metric (``<task>/<metric>``,
e.g. ``synthetic_skills``), the table has a column per task; every row has the median time of a
training step (``metrics.jsonl``'s steps/s, compilation and evaluation excluded). A binding may
name ``{output_dir}`` (this comparison's directory) to start from an earlier method's run, e.g.
MPT's teachers. Run again, a method whose row is finished with the same command is not re-run;
an interrupted one resumes from its last checkpoint (``train``'s resume), and so does one whose
command changed (its ``resumed`` column says so, its time is this run's): for a fresh comparison
of changed settings, give a new ``OUTPUT_DIR``. A method whose train
reports a user mistake (exit 2: a missing checkpoint, bad data, divergence) stops the command
with that one line; one that crashes otherwise gets a ``failed`` row, the others still run, and
the command exits 1.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import gin

from prompt_t5x.base import extras, storage
from prompt_t5x.base.errors import EXIT_STOPPED, StoppedCleanly, UsageError
from prompt_t5x.commands import compare_report, configurables, gin_cli, gin_help, scaling

LOG = "logs"
OUTPUT_DIR_FIELD = "{output_dir}"
# A summary line of ``prompt-t5x train``'s stdout: the step it trained to.
_TRAINED = re.compile(r"^trained \S+ on \S+ to step (\d+)( \(resumed from)?")
_ERROR = re.compile(r"^prompt-t5x train: (?:error: )?(.*)$")
# train's first line: "<kind>: 1,234 trainable parameters (...)" (run_train.trainable_summary)
_COUNT = re.compile(r"^\S+: ([\d,]+) trainable parameters")


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    output_dir: str
    runs: Mapping[str, Sequence[str]]      # label -> gin files and 'NAME = VALUE' bindings
    model_gin_files: Sequence[str] = ()
    shared: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    checkpoint: Optional[str] = None       # None: the model gin file's own CHECKPOINT
    title: Optional[str] = None
    chance: Optional[float] = None
    zero_shot: Mapping[str, str] = dataclasses.field(default_factory=dict)  # label -> task


@gin.configurable("compare")
def compare_config(output_dir: str = gin.REQUIRED,
                   runs: Mapping[str, Sequence[str]] = gin.REQUIRED,
                   methods: Optional[Sequence[str]] = None,
                   model_gin_files: Sequence[str] = (), shared: Optional[Mapping[str, Any]] = None,
                   checkpoint: Optional[str] = None, title: Optional[str] = None,
                   chance: Optional[float] = None,
                   zero_shot: Optional[Mapping[str, str]] = None) -> CompareConfig:
    """``methods``: the labels of ``runs`` to run, in this order (None: all of them).
    ``zero_shot``: {label: held-out task} scored after training (``compare_zero_shot``); such
    a method may bind its own TASK (the mixture without the held-out task)."""
    if not runs:
        raise UsageError("compare.runs is empty: map a method label to its run gin file, e.g. "
                         "{'prompt_tuning': ['runs/prompt_tuning.gin']}")
    if methods is not None:
        unknown = [m for m in methods if m not in runs]
        if unknown or not methods:
            raise UsageError(f"compare.methods={list(methods)}: pick labels of compare.runs "
                             f"({', '.join(runs)})")
        runs = {m: runs[m] for m in methods}
    for label, entry in runs.items():
        if isinstance(entry, str) or not any(str(x).endswith(".gin") for x in entry):
            raise UsageError(f"compare.runs[{label!r}] = {entry!r}: give a list with the "
                             "method's run gin file first, e.g. ['runs/prompt_tuning.gin', "
                             "'PROMPT_LENGTH = 8']")
        for item in entry:
            if not str(item).endswith(".gin") and "=" not in str(item):
                raise UsageError(f"compare.runs[{label!r}]: {item!r} is neither a gin file "
                                 "(.gin) nor a binding 'NAME = VALUE'")
    slugs = [scaling._slug(label) for label in runs]
    if len(set(slugs)) != len(slugs):
        raise UsageError(f"compare.runs: labels {list(runs)} name the same directory; make "
                         "them differ in more than punctuation or case")
    zero_shot = {k: str(v) for k, v in dict(zero_shot or {}).items() if k in runs}
    return CompareConfig(os.path.expanduser(str(output_dir)), {k: list(v) for k, v in
                                                               runs.items()},
                         tuple(model_gin_files), dict(shared or {}),
                         None if checkpoint is None else str(checkpoint), title,
                         None if chance is None else float(chance), zero_shot)


configurables.register("compare", compare_config)


# ------------------------------------------------------------------------------- plans ----
@dataclasses.dataclass(frozen=True)
class Plan:
    """One method of the comparison, checked: its train command line and what it trains."""

    label: str
    model_dir: str
    argv: List[str]       # flags of ``prompt-t5x train``
    run: Any              # run_train.RunConfig, parsed from ``argv``
    trainable: Optional[int]   # None until the run says (a head needs the task's labels)

    @property
    def command(self) -> str:
        return "prompt-t5x train " + " ".join(shlex.quote(a) for a in self.argv)


def _flag_value(value: Any) -> str:
    """gin text of a value for ``--gin.NAME=``: a string bare where the command line reads it
    back as that string (``/tmp/x``, ``synthetic_first``), so the recorded command reads as a
    user would type it; quoted where it would read as something else (``'3'``, ``'None'``)."""
    if isinstance(value, str) and gin_cli.literal_or_string(value) == repr(value):
        return value
    return repr(value)


def train_argv(cfg: CompareConfig, label: str, search_paths: Sequence[str] = ()) -> List[str]:
    """The flags of the method's ``prompt-t5x train``: model files, its run file(s), the shared
    bindings, then its own bindings (last, so a method's override wins)."""
    entry = [str(x) for x in cfg.runs[label]]
    files = list(cfg.model_gin_files) + [x for x in entry if x.endswith(".gin")]
    argv = [f"--gin_file={f}" for f in files]
    if search_paths:
        argv.append("--gin_search_paths=" + ",".join(search_paths))
    bindings = [("MODEL_DIR", _flag_value(os.path.join(cfg.output_dir, scaling._slug(label))))]
    bindings += [(name, _flag_value(value)) for name, value in cfg.shared.items()]
    if cfg.checkpoint is not None:
        bindings.append(("CHECKPOINT", _flag_value(cfg.checkpoint)))
    for item in entry:
        if not item.endswith(".gin"):
            name, _, value = item.partition("=")
            # '{output_dir}' names this comparison's directory: a method may start from an
            # earlier method's run (MPT's teachers are the per-task prompts' run dir).
            bindings.append((name.strip(), value.strip().replace(OUTPUT_DIR_FIELD,
                                                                 cfg.output_dir)))
    # The child's stdout is a pipe into this command's log: no progress bar redraws.
    bindings.append(("train.progress_bar", "False"))
    return argv + [f"--gin.{name}={value}" for name, value in bindings]


def plan(cfg: CompareConfig, search_paths: Sequence[str] = ()) -> List[Plan]:
    """Parse and check every method's train configuration (in this process, nothing written);
    a mistake in any is a UsageError naming the method."""
    from prompt_t5x.commands import run_train
    plans = []
    for label in cfg.runs:
        argv = train_argv(cfg, label, search_paths)
        try:
            gin_cli.parse(gin_cli.split_argv(argv))
            run = gin_cli.call(run_train.train_config)
        except UsageError as e:
            raise UsageError(f"compare.runs[{label!r}]: {e}") from None
        try:   # builds the method: its own checks of its settings run before anything trains
            trainable = _trainable(run)
        except UsageError as e:
            raise UsageError(f"compare.runs[{label!r}]: {e}") from None
        plans.append(Plan(label, run.model_dir, argv, run, trainable))
    tasks = sorted({p.run.task for p in plans if p.label not in cfg.zero_shot})
    if len(tasks) > 1:
        raise UsageError(f"compare: the methods train on different tasks {tasks}; bind TASK "
                         "in compare.shared, not per method")
    return plans


def _trainable(run) -> Optional[int]:
    """The method's trainable count before it runs; None when building it needs the task's
    label words and the task is not a generated one (its run prints the count: ``_COUNT``)."""
    from prompt_t5x.data import synthetic
    if run.task in synthetic.TASKS:   # labels known: any refusal is the settings' own
        return run.method.trainable_parameters(run.model, label_words=list(synthetic.LABELS),
                                               encode=synthetic.encode)
    try:
        return run.method.trainable_parameters(run.model)
    except UsageError:   # e.g. a head, whose size needs the task's labels: its run says
        return None


# ----------------------------------------------------------------------------- running ----
# The child: ``prompt-t5x train``, then the device's peak memory (None on a CPU) to a file.
_CHILD = ("import sys; from prompt_t5x.commands import compare; "
          "sys.exit(compare.child_main(sys.argv[1:]))")


def child_main(argv: List[str]) -> int:
    """``argv`` = [stats file, train flags...]: train, then record the device's peak bytes."""
    import json

    from prompt_t5x.commands import cli
    code = cli.main(["train", *argv[1:]])
    peak = None
    if code == 0:
        import jax
        stats = jax.local_devices()[0].memory_stats()
        peak = stats.get("peak_bytes_in_use") if stats else None
    storage.write_bytes_atomic(argv[0], json.dumps({"device_peak_bytes": peak}).encode())
    return code


def run_child(p: Plan, log_path: str, log=print) -> Dict[str, Any]:
    """Train ``p`` in a child process; its output goes to ``log_path`` and, prefixed, to
    ``log``. Returns the exit code, wall seconds, peak RSS, device peak, last step, error."""
    stats_path = log_path + ".stats.json"
    if os.path.exists(stats_path):
        os.remove(stats_path)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, stats_path, *p.argv],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    out: Dict[str, Any] = {"last_step": None, "resumed": False, "error": None, "log": log_path}
    try:
        with open(log_path, "w", encoding="utf-8") as f:
            f.write(f"$ {p.command}\n")
            for line in proc.stdout:
                f.write(line)
                line = line.rstrip("\n")
                log(f"  [{p.label}] {line}")
                m = _TRAINED.match(line)
                if m:
                    out["last_step"], out["resumed"] = int(m.group(1)), bool(m.group(2))
                m = _COUNT.match(line)
                if m:
                    out["trainable"] = int(m.group(1).replace(",", ""))
                m = _ERROR.match(line)
                if m:
                    out["error"] = m.group(1)
    except KeyboardInterrupt:
        proc.wait()   # the child got the Ctrl-C too: it saves and stops
        raise StoppedCleanly(f"stopped during {p.label!r}; run the same command again to "
                             "resume it") from None
    # wait4, not wait: the child's own resource usage (its peak RSS), not the sum of children.
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    out.update(code=proc.returncode, seconds=time.perf_counter() - start,
               peak_rss_bytes=usage.ru_maxrss * 1024)   # Linux reports KiB
    out["device_peak_bytes"] = (storage.read_json(stats_path) or {}).get(
        "device_peak_bytes") if os.path.exists(stats_path) else None
    if os.path.exists(stats_path):
        os.remove(stats_path)
    return out


def row_of(p: Plan, result: Mapping[str, Any]) -> Dict[str, Any]:
    run = p.run
    best = storage.read_json(os.path.join(p.model_dir, "best.json")) or {} \
        if os.path.exists(os.path.join(p.model_dir, "best.json")) else {}
    value = best.get("value")
    code = result["code"]
    trainable = result.get("trainable") or p.trainable   # what the run itself printed
    metric = run.loop.metric
    per_task = {k[:-len(metric) - 1]: float(v) for k, v in (best.get("metrics") or {}).items()
                if k.endswith("/" + metric)} if code == 0 else {}
    status = "ok" if code == 0 else f"failed (exit {code})" + (
        f": {result['error']}" if result.get("error") else "")
    return {"method": p.label, "kind": run.method.kind, "task": run.task,
            "metric": run.loop.metric,
            "best_value": math.nan if value is None or code != 0 else float(value),
            "best_step": best.get("step") if code == 0 else None,
            "last_step": result.get("last_step"), "train_steps": run.loop.train_steps,
            "trainable_parameters": trainable, "model_parameters": run.model.num_params,
            "trainable_percent": math.nan if trainable is None
            else 100.0 * trainable / run.model.num_params,
            "seconds": round(result["seconds"], 1),
            "step_seconds": median_step_seconds(p.model_dir) if code == 0 else None,
            "per_task": json.dumps(per_task, sort_keys=True) if per_task else "",
            "peak_rss_bytes": result["peak_rss_bytes"],
            "device_peak_bytes": result.get("device_peak_bytes"),
            "resumed": bool(result.get("resumed")), "status": status,
            "model_dir": p.model_dir, "command": p.command}


def median_step_seconds(model_dir: str) -> Optional[float]:
    """Median seconds per training step over the logging windows of ``metrics.jsonl``, the
    first window (compilation) left out when there are others; None without windows."""
    from prompt_t5x.training import metrics_writer
    path = os.path.join(model_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    rates = [r["steps_per_second"] for r in metrics_writer.read_jsonl(path)
             if r.get("split") == "train" and r.get("steps_per_second")]
    rates = rates[1:] if len(rates) > 1 else rates
    return None if not rates else float(statistics.median(1.0 / r for r in rates))


def run_all(cfg: CompareConfig, plans: Sequence[Plan], log=print) -> List[Dict[str, Any]]:
    """Train every planned method not finished earlier; rows in ``plans`` order, the CSV
    rewritten after each."""
    csv_path = os.path.join(cfg.output_dir, compare_report.CSV)
    earlier = {r["method"]: r for r in compare_report.read_csv(csv_path)} \
        if os.path.exists(csv_path) else {}
    os.makedirs(os.path.join(cfg.output_dir, LOG), exist_ok=True)
    rows: Dict[str, Dict[str, Any]] = {}
    for p in plans:
        done = earlier.get(p.label)
        if done and done["status"] == "ok" and done["command"] == p.command:
            log(f"[compare] {p.label}: finished earlier with the same command; not re-run")
            rows[p.label] = done
            continue
        count = "?" if p.trainable is None else f"{p.trainable:,}"
        log(f"[compare] {p.label} ({p.run.method.kind}, {count} trainable) on "
            f"{p.run.task} -> {p.model_dir}")
        result = run_child(p, os.path.join(cfg.output_dir, LOG,
                                           scaling._slug(p.label) + ".log"), log)
        if result["code"] == EXIT_STOPPED:
            raise StoppedCleanly(f"{p.label!r} stopped after saving; run the same command "
                                 "again to resume it")
        if result["code"] == 2:
            # The user's to fix (a path, the data, a diverging learning rate): one line, as
            # train says it. Methods finished before stay in compare.csv; a rerun skips them.
            raise UsageError(f"method {p.label!r}: {result['error'] or 'train failed'} "
                             f"(log: {result['log']})")
        rows[p.label] = row_of(p, result)
        log(f"[compare] {p.label}: {rows[p.label]['status']} in {result['seconds']:.0f} s")
        # Rows of methods not planned this time are kept: the CSV is the whole comparison.
        kept = [r for m, r in earlier.items() if m not in rows and m not in cfg.runs]
        compare_report.write_csv(kept + [rows[q.label] for q in plans if q.label in rows],
                                 csv_path)
    return [rows[p.label] for p in plans]


# ---------------------------------------------------------------------------------- CLI ----
def main(argv: List[str]) -> int:
    gin_args = gin_cli.split_argv(argv)
    parser = gin_help.gin_parser("compare", "runs/compare.gin")
    parser.add_argument("--plot_only", action="store_true",
                        help="re-write compare.md and compare.png from an existing compare.csv")
    parser.add_argument("--no_plot", action="store_true",
                        help="write compare.csv and compare.md only (no matplotlib needed)")
    args = parser.parse_args(gin_args.rest)
    if args.plot_only and args.no_plot:
        raise UsageError("--plot_only and --no_plot contradict each other; pass one")
    if not args.no_plot:
        extras.require("plot", "prompt-t5x compare (its figure, compare.png)",
                       "or pass --no_plot to write compare.csv and compare.md only")
    gin_cli.parse(gin_args, default_files=["runs/compare.gin"])
    cfg = gin_cli.call(compare_config)
    csv_path = os.path.join(cfg.output_dir, compare_report.CSV)
    if args.plot_only:
        if not os.path.exists(csv_path):
            raise UsageError(f"--plot_only: {csv_path} does not exist; run the comparison "
                             "first")
        rows = compare_report.read_csv(csv_path)
    else:
        plans = plan(cfg, gin_args.search_paths)
        rows = run_all(cfg, plans)
    if not rows:
        raise UsageError(f"{csv_path} has no rows to report")
    chance = cfg.chance if cfg.chance is not None else compare_report.default_chance(rows)
    written = [compare_report.write_markdown(rows, os.path.join(cfg.output_dir, "compare.md"),
                                             chance=chance)]
    if not args.no_plot:
        written.append(compare_report.plot(rows, os.path.join(cfg.output_dir, "compare.png"),
                                           title=cfg.title, chance=chance))
    print(compare_report.markdown_table(rows, chance=chance))
    if cfg.zero_shot and not args.plot_only:
        from prompt_t5x.commands import compare_zero_shot
        ok = {r["method"] for r in rows if r["status"] == "ok"}
        held_out = compare_zero_shot.run_zero_shot(
            cfg.output_dir, {k: v for k, v in cfg.zero_shot.items() if k in ok}, plans)
        if held_out:
            print("\nZero-shot on held-out tasks:\n" + compare_zero_shot.markdown_table(held_out))
    print(f"wrote {csv_path}, " + " and ".join(written))
    failed = [r["method"] for r in rows if r["status"] != "ok"]
    if failed:
        print(f"prompt-t5x compare: {', '.join(failed)} failed (see {cfg.output_dir}/{LOG}/)",
              file=sys.stderr)
    return 1 if failed else 0
