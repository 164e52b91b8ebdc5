"""Type checks of gin values, run once the configuration is parsed and before any work.

Why: gin passes whatever literal it parsed straight into the configurable. A step count of
``'abc'`` then fails deep inside the loop as a ``TypeError``, a learning rate of ``'fast'`` as a
JAX traceback in the first compiled step, and ``1.5`` steps even *runs* (the loop counts to 2 and
never reaches a checkpoint step). Each of those is a user's mistake, so it must end as one
``UsageError`` naming the value, where it was set and what it must be, before a model directory
is created or a weight is loaded.

The table :data:`CHECKS` maps a gin binding (``configurable.parameter``) to what its value must
be. Macros are resolved (``train.train_steps = %TRAIN_STEPS``), and the message names the macro,
since that is what the user typed (``--gin.TRAIN_STEPS=1.5``). Bindings that are gin references
(``@optim.some_schedule()``) are left to the configurable they name; bindings that are not set
keep the configurable's (valid) default and are not checked.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import gin

from prompt_t5x.base.errors import UsageError
from prompt_t5x.methods.bias_tuning import BIAS_TARGETS
from prompt_t5x.model import prompt_inputs
from prompt_t5x.model import t5 as t5_lib
from prompt_t5x.training import factor_rules as rules_lib

# A check returns None when the value is fine, else what the value must be (for the message).
Check = Callable[[Any], Optional[str]]


def _is_int(v: Any) -> bool:
    # bool is an int subclass, but ``TRAIN_STEPS = True`` is surely not what anyone meant.
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def positive_int(v: Any) -> Optional[str]:
    return None if _is_int(v) and v > 0 else "a positive integer (e.g. 1000)"


def non_negative_int(v: Any) -> Optional[str]:
    return None if _is_int(v) and v >= 0 else "an integer >= 0"


def positive_float(v: Any) -> Optional[str]:
    return None if _is_real(v) and v > 0 else "a positive finite number (e.g. 0.3)"


def non_negative_float(v: Any) -> Optional[str]:
    return None if _is_real(v) and v >= 0 else "a finite number >= 0"


def fraction(v: Any) -> Optional[str]:
    return None if _is_real(v) and 0 <= v < 1 else "a number in [0, 1)"


def boolean(v: Any) -> Optional[str]:
    return None if isinstance(v, bool) else "True or False"


def text(v: Any) -> Optional[str]:
    return None if isinstance(v, str) and v.strip() else "a non-empty string"


def optional(check: Check) -> Check:
    def optional_check(v: Any) -> Optional[str]:
        wanted = None if v is None else check(v)
        return None if wanted is None else f"None or {wanted}"
    return optional_check


def one_of(*choices: Any) -> Check:
    def choice_check(v: Any) -> Optional[str]:
        # ``True == 1``: compare types too, so ``metric_mode = 1`` is not taken for a choice.
        ok = any(v == c and type(v) is type(c) for c in choices)
        return None if ok else "one of " + ", ".join(repr(c) for c in choices)
    return choice_check


def bias_targets(v: Any) -> Optional[str]:
    """``methods.bias_tuning.biases``: distinct names of dense layers that can get a bias."""
    wanted = ("a list of distinct names from " + ", ".join(repr(b) for b in BIAS_TARGETS))
    if not isinstance(v, (list, tuple)) or not all(isinstance(b, str) for b in v):
        return wanted
    return None if set(v) <= set(BIAS_TARGETS) and len(set(v)) == len(v) else wanted


def factor_rules(v: Any) -> Optional[str]:
    """``optim.adafactor.factor_rules``: ``{pattern: factoring}`` that parses."""
    try:
        rules_lib.parse(v)
    except ValueError as e:
        return f"a dict {{pattern: factoring}} of valid rules ({e})"
    return None
def prefix_parts(v: Any) -> Optional[str]:
    parts = ("encoder", "decoder_self", "decoder_cross")
    if (isinstance(v, (list, tuple)) and v and all(p in parts for p in v)
            and len(set(v)) == len(v)):
        return None
    return f"a non-empty list of distinct parts from {list(parts)}"


def lengths(v: Any) -> Optional[str]:
    """``train.feature_lengths``: {'inputs': L, 'targets': T} with positive integer lengths."""
    wanted = "{'inputs': L, 'targets': T} with positive integer lengths"
    if not isinstance(v, dict) or set(v) != {"inputs", "targets"}:
        return wanted
    return None if all(_is_int(x) and x > 0 for x in v.values()) else wanted


def p_tuning_template(v: Any) -> Optional[str]:
    """``methods.p_tuning.template``: one template string or a {task: template} dict."""
    from prompt_t5x.methods import templates
    wanted = ("a template with pseudo tokens [P] / [P*n] and {field} names (e.g. "
              "'[P*3] {sentence} [P*3]'), or a {task: template} dict")
    try:
        if isinstance(v, dict) and all(isinstance(k, str) for k in v):
            templates.all_templates(v)
        elif isinstance(v, str):
            templates.Template.parse(v)
        else:
            return wanted
    except templates.TemplateError:
        return wanted
    return None


def label_list(v: Any) -> Optional[str]:
    """``methods.classification_head.labels``: two or more distinct non-empty strings."""
    ok = (isinstance(v, (list, tuple)) and len(v) >= 2 and len(set(v)) == len(v)
          and all(text(w) is None for w in v))
    return None if ok else "a list of two or more distinct label words"


def task_list(v: Any) -> Optional[str]:
    """``methods.multitask_prompts.tasks``: one or more distinct task names."""
    ok = (isinstance(v, (list, tuple)) and len(v) >= 1 and len(set(v)) == len(v)
          and all(text(t) is None for t in v))
    return None if ok else "a list of one or more distinct task names (the mixture's tasks)"


CHECKS: Dict[str, Check] = {
    # the run
    "train.model_dir": text,
    "train.task": text,
    "train.train_steps": positive_int,
    "train.batch_size": positive_int,
    "train.feature_lengths": lengths,
    "train.num_microbatches": positive_int,
    "train.log_every": positive_int,
    "train.eval_every": non_negative_int,
    "train.checkpoint_every": positive_int,
    "train.keep_checkpoints": positive_int,
    "train.metric": text,
    "train.metric_mode": one_of("max", "min"),
    "train.early_stopping_patience": optional(positive_int),
    "train.max_eval_examples": optional(positive_int),
    "train.rank_classification": boolean,
    "train.z_loss": non_negative_float,
    "train.tensorboard": boolean,
    "train.progress_bar": boolean,
    "train.seed": non_negative_int,
    "train.parameter_partitioning_dims": one_of(1, 2),
    "train.activation_partitioning_dims": one_of(1, 2),
    # the model
    "t5.get_config.size": one_of(*sorted(t5_lib.SIZES), t5_lib.FROM_CHECKPOINT),
    "t5.get_config.dropout_rate": fraction,
    "t5.get_config.vocab_size": positive_int,
    # the method and its prompt
    "methods.prompt_tuning.prompt_length": positive_int,
    "methods.prompt_tuning.prompt_mode": one_of(*prompt_inputs.COMBINE_MODES),
    "methods.p_tuning.template": p_tuning_template,
    "methods.p_tuning.pseudo_token_id": optional(positive_int),
    "methods.p_tuning.encoder": one_of("lstm", "mlp", "none"),
    "methods.p_tuning.encoder_hidden": optional(positive_int),
    "methods.p_tuning.population": positive_int,
    "methods.deep_prompts.prompt_length": positive_int,
    "methods.deep_prompts.prompt_mode": one_of(*prompt_inputs.COMBINE_MODES),
    "methods.classification_head.labels": optional(label_list),
    "methods.multitask_prompts.tasks": task_list,
    "methods.idpg.prompt_length": positive_int,
    "methods.idpg.bottleneck": positive_int,
    "methods.idpg.representation": one_of("encoder", "embedding"),
    "methods.idpg.generator": one_of("dense", "phm"),
    "methods.idpg.phm_n": positive_int,
    "methods.idpg.layers": one_of("input", "all"),
    "methods.idpg.prompt_mode": one_of(*prompt_inputs.COMBINE_MODES),
    "methods.spt.memory_size": positive_int,
    "methods.spt.prompt_length": positive_int,
    "methods.spt.top_k": positive_int,
    "methods.spt.similarity": one_of("cosine", "dot"),
    "methods.spt.temperature": positive_float,
    "methods.spt.combine": one_of("weighted", "concat"),
    "methods.spt.representation": one_of("encoder", "embedding"),
    "methods.spt.task_prompt_length": non_negative_int,
    "methods.spt.tasks": optional(task_list),
    "methods.spt.prompt_mode": one_of(*prompt_inputs.COMBINE_MODES),
    "methods.mpt_source.tasks": task_list,
    "methods.mpt_source.prompt_length": positive_int,
    "methods.mpt_source.rank": positive_int,
    "methods.mpt_source.teachers": optional(text),
    "methods.mpt_source.kl_weight": non_negative_float,
    "methods.mpt_source.mse_weight": non_negative_float,
    "methods.mpt_source.temperature": positive_float,
    "methods.mpt_source.prompt_mode": one_of(*prompt_inputs.COMBINE_MODES),
    "methods.mpt_target.tasks": task_list,
    "methods.mpt_target.source": optional(text),
    "methods.mpt_target.prompt_length": positive_int,
    "methods.mpt_target.rank": positive_int,
    "methods.mpt_target.train_shared": boolean,
    "methods.mpt_target.prompt_mode": one_of(*prompt_inputs.COMBINE_MODES),
    "methods.prefix_tuning.prefix_length": positive_int,
    "methods.prefix_tuning.parts": prefix_parts,
    "methods.prefix_tuning.reparameterization": one_of("direct", "mlp"),
    "methods.prefix_tuning.mlp_hidden": positive_int,
    "methods.prefix_tuning.prefix_dropout": fraction,
    "methods.prefix_tuning.init": optional(one_of("random", "zero", "text")),
    "methods.prefix_tuning.init_scale": positive_float,
    "methods.prefix_tuning.init_text": optional(text),
    "methods.prefix_tuning.prefix_bias": one_of(*t5_lib.PREFIX_BIAS),
    "methods.prefix_tuning.peft_layout": boolean,
    "methods.ipt.instance": one_of("lookup", "mlp", "bilstm", "cnn", "prefix"),
    "methods.ipt.task_length": positive_int,
    "methods.ipt.instance_length": positive_int,
    "methods.ipt.hidden": positive_int,
    "methods.ipt.lookup_rows": positive_int,
    "methods.ipt.prompt_mode": one_of(*prompt_inputs.COMBINE_MODES),
    "methods.ipt.parts": prefix_parts,
    "methods.ipt.instance_scale": positive_float,
    "methods.ipt.prefix_bias": one_of(*t5_lib.PREFIX_BIAS),
    "methods.ipt.population": positive_int,
    "optim.adamw.learning_rate": positive_float,
    "optim.adamw.weight_decay": non_negative_float,
    "prompts.class_labels.population": positive_int,
    "prompts.sampled_vocab.population": positive_int,
    "prompts.random_uniform.scale": positive_float,
    "prompts.random_uniform.symmetric": boolean,
    "prompts.from_file.path": text,
    "methods.bias_tuning.biases": bias_targets,
    "methods.bias_tuning.norm_scales": boolean,
    # the optimizer (a learning-rate schedule given as a reference is the schedule's business)
    "optim.adafactor.factor_rules": optional(factor_rules),
    "optim.adam.learning_rate": positive_float,
    "optim.adafactor.learning_rate": positive_float,
    "optim.adafactor.decay_rate": positive_float,
    "optim.adafactor.initial_step": non_negative_int,
    "optim.adafactor.step_offset": non_negative_int,
    "optim.adafactor.clipping_threshold": optional(positive_float),
    "optim.adafactor.weight_decay_rate": optional(non_negative_float),
    "optim.adafactor.epsilon1": positive_float,
    "optim.adafactor.epsilon2": positive_float,
    "optim.adafactor.factored": boolean,
    "optim.adafactor.min_dim_size_to_factor": positive_int,
    "optim.adafactor.multiply_by_parameter_scale": boolean,
}
# ``eval`` and ``infer`` bind the same knobs (their enum values are checked by EvalConfig).
for _command in ("evaluate", "infer"):
    CHECKS.update({
        f"{_command}.batch_size": positive_int,
        f"{_command}.inputs_length": positive_int,
        f"{_command}.targets_length": positive_int,
        f"{_command}.max_examples": optional(positive_int),
        f"{_command}.step": optional(non_negative_int),
        f"{_command}.beam_size": positive_int,
        f"{_command}.alpha": non_negative_float,
        f"{_command}.temperature": non_negative_float,
        f"{_command}.top_k": non_negative_int,
        f"{_command}.seed": non_negative_int,
    })


def _macro_name(value: Any) -> Optional[str]:
    if isinstance(value, gin.config.ConfigurableReference) and repr(value).startswith("%"):
        return repr(value)[1:]
    return None


def _resolve(value: Any, macros: Tuple[str, ...] = ()) -> Tuple[Any, Tuple[str, ...]]:
    """(value with macros replaced by their values, the macros met on the way). A reference
    to a configurable (``@x()``) stays a reference."""
    name = _macro_name(value)
    if name is not None:
        if name in macros:   # gin itself refuses cycles; never loop here either
            return value, macros
        return _resolve(gin.query_parameter(f"%{name}"), macros + (name,))
    if isinstance(value, dict):
        out, seen = {}, macros
        for k, v in value.items():
            out[k], seen = _resolve(v, seen)
        return out, seen
    if isinstance(value, (list, tuple)):
        items, seen = [], macros
        for v in value:
            item, seen = _resolve(v, seen)
            items.append(item)
        return type(value)(items), seen
    return value, macros


def _contains_reference(value: Any) -> bool:
    if isinstance(value, gin.config.ConfigurableReference):
        return True
    if isinstance(value, dict):
        return any(_contains_reference(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_contains_reference(v) for v in value)
    return False


def check_bindings(checks: Optional[Dict[str, Check]] = None,
                   bindings: Iterable[str] = ()) -> None:
    """UsageError for the first bound value (in :data:`CHECKS` order) that is not what its
    binding needs. ``bindings`` lists the command-line ``--gin.NAME`` names, so the message
    can say where a value was set."""
    given = set(bindings)
    for binding, check in (checks or CHECKS).items():
        try:
            raw = gin.query_parameter(binding)
        except ValueError:   # not bound (or its configurable not used): the default stands
            continue
        value, macros = _resolve(raw)
        if value is gin.REQUIRED or _contains_reference(value):
            continue
        wanted = check(value)
        if wanted is None:
            continue
        macro = macros[-1] if macros else None
        if macro is not None:
            source = f"--gin.{macro}" if macro in given else f"macro {macro}"
            what = f"{source}={value!r} (used by {binding})"
        else:
            source = f"--gin.{binding}" if binding in given else binding
            what = f"{source}={value!r}"
        raise UsageError(f"{what} must be {wanted}; got {type(value).__name__} {value!r}.")
