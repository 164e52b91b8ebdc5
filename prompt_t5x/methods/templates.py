"""P-tuning templates: where the pseudo tokens sit among the task's own text.

P-tuning (Liu et al., 2021, "GPT Understands, Too", Section 2.2) writes each task as a
*template* that interleaves trainable pseudo tokens with anchor words and the example's fields,
e.g. ``"[P*3] premise: {premise} [P*3] hypothesis: {hypothesis} ? [P*3]"``. Syntax:

- ``[P]`` one pseudo token, ``[P*n]`` n of them;
- ``{name}`` a text field of the raw example (``premise``; ``inputs`` for the generated tasks);
- anything else is anchor text, tokenised as it is.

The data side renders a template into encoder token ids, writing every pseudo token as one
reserved *placeholder id* that the tokenizer never produces (T5: 32127, a row of the 32128-row
embedding beyond SentencePiece's 32100 ids; the generated tasks: 31, beyond their 25 words). The
model then puts prompt row j at the j-th placeholder of each row (``prompt_inputs`` mode
``'template'``), so batches stay plain token ids and training, rank classification, decoding
and eval need nothing else. Pseudo tokens and anchors are never cut: the fields are truncated,
longest first, so that everything plus EOS fits the encoder length. Unlike the paper (GPT/BERT,
one template string tokenised at once), each piece is tokenised on its own, so SentencePiece
sees a word start at every piece boundary.

Pure Python, no TensorFlow, in the methods wing because the P-tuning method counts its prompt
rows from the template: ``tasks/templated.py`` applies it to SeqIO tasks, ``run_data`` to the
generated ones.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, List, Mapping, Optional, Sequence, Tuple, Union

from prompt_t5x.base.errors import UsageError

_TOKEN = re.compile(r"\[P(?:\*(\d+))?\]|\{([^{}]*)\}")
Piece = Tuple[str, Union[int, str]]      # ('pseudo', n) | ('field', name) | ('text', anchor)
TemplateSetting = Union[str, Mapping[str, str]]


class TemplateError(UsageError):
    """A malformed template, an unknown field, or lengths that cannot hold the template."""


@dataclasses.dataclass(frozen=True)
class Template:
    """A parsed template string (see the module docstring)."""

    text: str
    pieces: Tuple[Piece, ...]

    @classmethod
    def parse(cls, text: str) -> "Template":
        if not isinstance(text, str) or not text.strip():
            raise TemplateError(f"a P-tuning template must be a non-empty string, got {text!r}")
        pieces: List[Piece] = []
        end = 0
        for match in _TOKEN.finditer(text):
            _anchor(pieces, text[end:match.start()])
            count, field = match.groups()
            if field is not None:
                if not field.isidentifier():
                    raise TemplateError(f"template {text!r}: {{{field}}} is not a field name")
                if ("field", field) in pieces:   # each field has one token budget
                    raise TemplateError(f"template {text!r}: {{{field}}} appears twice; "
                                        "name each field once")
                pieces.append(("field", field))
            else:
                n = 1 if count is None else int(count)
                if n < 1:
                    raise TemplateError(f"template {text!r}: [P*{count}] needs a count >= 1")
                pieces.append(("pseudo", n))
            end = match.end()
        _anchor(pieces, text[end:])
        template = cls(text, tuple(pieces))
        if template.num_pseudo == 0:
            raise TemplateError(f"template {text!r} has no pseudo tokens: write [P] or [P*n]")
        return template

    @property
    def num_pseudo(self) -> int:
        return sum(int(v) for k, v in self.pieces if k == "pseudo")

    @property
    def fields(self) -> Tuple[str, ...]:
        return tuple(dict.fromkeys(str(v) for k, v in self.pieces if k == "field"))

    def anchors(self) -> Tuple[str, ...]:
        return tuple(str(v) for k, v in self.pieces if k == "text")

    def check_fields(self, available: Sequence[str], task: str) -> None:
        """TemplateError (one line) when the template names a field the task does not have."""
        unknown = [f for f in self.fields if f not in available]
        if unknown:
            raise TemplateError(
                f"template {self.text!r}: task {task!r} has no field "
                f"{', '.join(repr(f) for f in unknown)}; its fields: {', '.join(available)}")



def _anchor(pieces: List[Piece], text: str) -> None:
    if "{" in text or "}" in text:
        raise TemplateError(f"template anchor text {text.strip()!r}: unbalanced braces")
    if "[P" in text:   # '[P*x]', '[P* 3]': a pseudo token misspelt, not anchor text
        raise TemplateError(f"template anchor text {text.strip()!r}: write pseudo tokens as "
                            "[P] or [P*n]")
    if text.strip():
        pieces.append(("text", text.strip()))


def field_budgets(lengths: Sequence[int], room: int) -> List[int]:
    """How many tokens each field keeps so that they sum to at most ``room``: the longest
    fields are cut first (water-filling: every field keeps min(length, cap), the cap as high as
    fits, leftover tokens go to the earlier fields at the cap)."""
    if sum(lengths) <= room:
        return list(lengths)
    room = max(room, 0)
    low, high = 0, max(lengths)
    while low < high:                      # the largest cap with sum(min(len, cap)) <= room
        mid = (low + high + 1) // 2
        if sum(min(n, mid) for n in lengths) <= room:
            low = mid
        else:
            high = mid - 1
    keep = [min(n, low) for n in lengths]
    spare = room - sum(keep)
    for i, n in enumerate(lengths):
        if spare and n > low:
            keep[i] += 1
            spare -= 1
    return keep


def render_ids(template: Template, field_ids: Mapping[str, Sequence[int]],
               anchor_ids: Sequence[Sequence[int]], placeholder_id: int, budget: int
               ) -> List[int]:
    """Template + tokenised fields -> encoder ids (no EOS), at most ``budget`` of them.

    ``anchor_ids`` are the token ids of ``template.anchors()`` in order; every pseudo token is
    ``placeholder_id``. Fields are truncated at their end, longest first.
    """
    fixed = template.num_pseudo + sum(len(a) for a in anchor_ids)
    if fixed > budget:
        raise TemplateError(f"template {template.text!r} needs {fixed} tokens without its "
                            f"fields but the inputs hold {budget} (+ EOS): raise inputs_length")
    names = template.fields
    keep = dict(zip(names, field_budgets([len(field_ids[n]) for n in names], budget - fixed)))
    out: List[int] = []
    anchors = iter(anchor_ids)
    for kind, value in template.pieces:
        if kind == "pseudo":
            out += [placeholder_id] * int(value)
        elif kind == "text":
            out += list(next(anchors))
        else:
            out += list(field_ids[str(value)])[:keep[str(value)]]
    return out


class TemplateRenderer:
    """A template bound to a tokenizer: raw text fields -> encoder ids (EOS excluded)."""

    def __init__(self, template: Template, encode: Callable[[str], Sequence[int]],
                 placeholder_id: int):
        self.template, self.encode, self.placeholder_id = template, encode, placeholder_id
        self.anchor_ids = [list(encode(a)) for a in template.anchors()]

    def check_fits(self, budget: int) -> None:
        """TemplateError now (not at the first batch) if anchors and pseudo tokens alone
        exceed ``budget``."""
        self({name: "" for name in self.template.fields}, budget)

    def __call__(self, fields: Mapping[str, str], budget: int) -> List[int]:
        ids = {name: list(self.encode(fields[name])) for name in self.template.fields}
        return render_ids(self.template, ids, self.anchor_ids, self.placeholder_id, budget)


# ------------------------------------------------------------------- run settings ----
def template_for_task(setting: TemplateSetting, task: str) -> Template:
    """The run's template for ``task``: one string for every task, or ``{task: template}``."""
    if isinstance(setting, Mapping):
        if task not in setting:
            raise TemplateError(f"no P-tuning template for task {task!r}; templates are given "
                                f"for: {', '.join(sorted(setting))}")
        return Template.parse(setting[task])
    return Template.parse(setting)


def all_templates(setting: TemplateSetting) -> List[Template]:
    if isinstance(setting, Mapping):
        if not setting:
            raise TemplateError("the P-tuning template dict is empty: give {task: template}")
        return [Template.parse(setting[k]) for k in sorted(setting)]
    return [Template.parse(setting)]


def num_pseudo_tokens(setting: TemplateSetting) -> int:
    """Prompt rows a setting needs: the most pseudo tokens of any of its templates (a template
    with fewer uses the first rows)."""
    return max(t.num_pseudo for t in all_templates(setting))


def default_placeholder_id(model_vocab_size: int) -> int:
    """The last embedding row: beyond SentencePiece's 32100 ids in T5's 32128-row table, and
    beyond the 25 words of the generated tasks' 32-id vocabulary."""
    return model_vocab_size - 1


@dataclasses.dataclass(frozen=True)
class InputTemplate:
    """What the data side needs to render one run's inputs: the template (one string, or
    sorted (task, template) pairs: hashable, as the batch specs holding it are) and the
    placeholder id."""

    setting: Union[str, Tuple[Tuple[str, str], ...]]
    placeholder_id: int

    def for_task(self, task: str) -> Template:
        setting = self.setting
        return template_for_task(setting if isinstance(setting, str) else dict(setting), task)

    def check_placeholder(self, tokenizer_ids: int, model_vocab_size: Optional[int]) -> None:
        """The placeholder must be an embedding row the tokenizer never produces."""
        top = model_vocab_size
        if self.placeholder_id < tokenizer_ids or (top is not None and
                                                   self.placeholder_id >= top):
            where = f"{tokenizer_ids}..{top - 1}" if top else f">= {tokenizer_ids}"
            raise TemplateError(
                f"pseudo_token_id={self.placeholder_id} is a real token of the task's "
                f"vocabulary or outside the model's embedding: pick one in {where}")

    def renderer(self, task: str, fields: Sequence[str], encode: Callable[[str], Sequence[int]],
                 tokenizer_ids: int, model_vocab_size: Optional[int]) -> "TemplateRenderer":
        """The checked renderer of ``task`` (whose text fields are ``fields``)."""
        template = self.for_task(task)
        template.check_fields(fields, task)
        self.check_placeholder(tokenizer_ids, model_vocab_size)
        return TemplateRenderer(template, encode, self.placeholder_id)


def input_template(method_settings: Mapping, model_vocab_size: int) -> Optional[InputTemplate]:
    """A method's template settings (``template``, ``pseudo_token_id``; a wrapper's are its
    ``inner`` method's), or None when the method places no pseudo tokens among the inputs."""
    setting = method_settings.get("template")
    inner = method_settings.get("inner")
    if setting is None and inner is not None:
        # A wrapper (the classification head) places its inner method's pseudo tokens:
        # ``inner`` is a gin MethodSpec (its ``settings``) or a saved method config.
        inner_settings = dict(inner.settings) if hasattr(inner, "settings") else dict(inner)
        return input_template(inner_settings, model_vocab_size)
    if setting is None:
        return None
    setting = tuple(sorted(setting.items())) if isinstance(setting, Mapping) else setting
    placeholder = method_settings.get("pseudo_token_id")
    return InputTemplate(setting, int(default_placeholder_id(model_vocab_size)
                                      if placeholder is None else placeholder))

