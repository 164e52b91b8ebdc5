"""``prompt-t5x eval`` and ``prompt-t5x infer``: a task split through a frozen T5 and a prompt.

  prompt-t5x eval  --gin_file=runs/eval.gin  --gin.PROMPT="'/tmp/pt_rte'" \\
      --gin.TASK="'super_glue_rte_v102'" --gin.OUTPUT_DIR="'/tmp/pt_rte/eval'"
  prompt-t5x infer --gin_file=runs/infer.gin --gin.PROMPT="'prompt.npy'" \\
      --gin.CHECKPOINT="'/ckpts/t5_1_1_lm100k_base'" --gin.TASK=... --gin.OUTPUT_DIR=...
  ... --ensemble a.npy,b.npy,c.npy      (prompt ensembling, one batched pass)

The gin configurables ``evaluate`` / ``infer`` take exactly the fields of
``prompt_t5x.inference.evaluation.EvalConfig``, which checks them; see that module for what is
computed and written.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from typing import Any, Dict, List, Sequence

import gin

from prompt_t5x.commands import configurables, gin_cli, gin_help
from prompt_t5x.data import metrics as metrics_lib
from prompt_t5x.inference import evaluation


def _gin_bindings(**knobs) -> Dict[str, Any]:
    """What gin binds, as given: checked by ``EvalConfig`` outside the gin call so that errors
    read as one plain message. Its signature (set below) is ``EvalConfig``'s fields."""
    return knobs


def _gin_default(field: dataclasses.Field):
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return gin.REQUIRED if field.default is dataclasses.MISSING else field.default


_gin_bindings.__signature__ = inspect.Signature([  # gin reads parameter names and defaults here
    inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=_gin_default(f))
    for f in dataclasses.fields(evaluation.EvalConfig) if f.init])
eval_config = gin.external_configurable(_gin_bindings, name="evaluate")
infer_config = gin.external_configurable(_gin_bindings, name="infer")
configurables.register("evaluate", eval_config)
configurables.register("infer", infer_config)


def _parse(argv: Sequence[str], name: str, configurable) -> evaluation.EvalConfig:
    gin_args = gin_cli.split_argv(argv)
    default_file = f"runs/{'eval' if name == 'eval' else 'infer'}.gin"
    parser = gin_help.gin_parser(name, default_file)
    parser.add_argument("--prompt", help="prompt source (overrides the gin binding)")
    parser.add_argument("--ensemble", help="comma-separated prompt sources to ensemble")
    parser.add_argument("--checkpoint", help="frozen T5 checkpoint (overrides the gin binding)")
    args = parser.parse_args(gin_args.rest)
    gin_cli.parse(gin_args, default_files=(default_file,))
    overrides: Dict[str, Any] = {}
    if args.ensemble:
        overrides["ensemble"] = [p for p in args.ensemble.split(",") if p]
    elif args.prompt:
        overrides["prompt"] = args.prompt
    if args.checkpoint:
        overrides["checkpoint"] = args.checkpoint
    return evaluation.EvalConfig(**gin_cli.call(configurable, **overrides))


def eval_main(argv: List[str]) -> int:
    cfg = _parse(argv, "eval", eval_config)
    record = evaluation.run_eval(cfg)
    shown = metrics_lib.format_metrics(record["metrics"])
    print(f"{cfg.task} {cfg.split} ({record['num_examples']} examples, {record['mode']}): "
          f"{shown}")
    print(f"wrote {record['path']}", file=sys.stderr)
    return 0


def infer_main(argv: List[str]) -> int:
    cfg = _parse(argv, "infer", infer_config)
    path = evaluation.run_infer(cfg)
    print(f"wrote {path}")
    return 0
