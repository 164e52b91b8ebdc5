"""A generated multi-skill task family for the quickstart, tests and CPU-sized experiments.

Inputs are sequences of symbols ``a``..``p``; every skill answers ``yes`` or ``no``:

- ``first``:    is the first symbol in the upper half (``i``..``p``)?
- ``last``:     is the last symbol in the upper half?
- ``majority``: are most symbols in the upper half? (odd lengths, so no ties)
- ``contains``: does the sequence contain ``a``?

The answers of different skills are close to independent, so a model that applies the wrong
skill is near chance (50%). A tiny T5 pretrained on all skills, each marked by a leading skill
token (``contains: c k p ...``), is the frozen model of the quickstart; prompt tuning then sees
the inputs *without* the marker and has to learn a prompt that selects the skill.

``synthetic_skills`` mixes the four unmarked tasks (a quarter each): a prompt per task (a task
bank, ``methods.task_bank``) must learn which skill each example's task asks for, while one
shared prompt cannot know it from the input. Each example keeps the name of its task.
``synthetic_skills_but_<skill>`` leaves one skill out (zero-shot transfer to it).

The unmarked ``synthetic_<skill>`` tasks are *null prompts* in the sense of Logan IV et al.
(2022): the input is the fields alone, with no template words and no task name (what the
``null_<task>`` variants of the SeqIO tasks are; bias tuning trains on them).

Nothing here is third-party data: every example is drawn from a seeded numpy generator.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

PAD, EOS, UNK = 0, 1, 2
SYMBOLS = [chr(ord("a") + i) for i in range(16)]
SKILLS = ("first", "last", "majority", "contains")
LABELS = ("yes", "no")
# Word-level vocabulary: special ids, skill markers, symbols, label words.
WORDS: List[str] = ["<pad>", "</s>", "<unk>"] + [f"{s}:" for s in SKILLS] + SYMBOLS + list(LABELS)
VOCAB_SIZE = 32  # >= len(WORDS); spare ids stay unused (round size for the model)
assert len(WORDS) <= VOCAB_SIZE
WORD_TO_ID: Dict[str, int] = {w: i for i, w in enumerate(WORDS)}
LENGTHS = (7, 9, 11)
# The generated tasks every command takes by name (no SeqIO): one per skill without its marker,
# and the marked mixture of all four that the bundled quickstart T5 was pretrained on.
MARKED_TASK = "synthetic_marked"
SKILL_TASKS = tuple(f"synthetic_{s}" for s in SKILLS)
MIXTURE_TASK = "synthetic_skills"     # the unmarked tasks mixed; examples keep their task
# The mixture without one skill: train on three, evaluate zero-shot on the held-out one.
HELD_OUT_MIXTURES = {f"{MIXTURE_TASK}_but_{s}": tuple(t for t in SKILLS if t != s)
                     for s in SKILLS}
TASKS = SKILL_TASKS + (MARKED_TASK, MIXTURE_TASK) + tuple(HELD_OUT_MIXTURES)


def encode(text: str) -> List[int]:
    """Whitespace tokenisation into the word vocabulary (no EOS added)."""
    return [WORD_TO_ID.get(w, UNK) for w in text.split()]


def decode(ids: Sequence[int]) -> str:
    return " ".join(WORDS[i] for i in ids if i not in (PAD, EOS))


def answer(skill: str, symbols: Sequence[int]) -> bool:
    """``symbols`` are indices 0..15 into SYMBOLS."""
    upper = [s >= 8 for s in symbols]
    if skill == "first":
        return upper[0]
    if skill == "last":
        return upper[-1]
    if skill == "majority":
        return sum(upper) * 2 > len(upper)
    if skill == "contains":
        return 0 in symbols
    raise ValueError(f"unknown skill {skill!r}; choose from {SKILLS}")


def examples(skill: str, n: int, seed: int, with_marker: bool) -> List[Dict[str, str]]:
    """``n`` examples {'inputs': text, 'targets': 'yes'|'no'} of one skill, balanced labels."""
    if skill not in SKILLS:
        raise ValueError(f"unknown skill {skill!r}; choose from {SKILLS}")
    rng = np.random.RandomState(seed)
    out: List[Dict[str, str]] = []
    want_yes = True
    while len(out) < n:
        length = LENGTHS[rng.randint(len(LENGTHS))]
        symbols = list(rng.randint(0, 16, size=length))
        if skill == "contains" and want_yes and 0 not in symbols:
            symbols[rng.randint(length)] = 0
        if answer(skill, symbols) != want_yes:
            continue  # rejection sampling keeps the classes balanced
        text = " ".join(SYMBOLS[s] for s in symbols)
        if with_marker:
            text = f"{skill}: {text}"
        out.append({"inputs": text, "targets": "yes" if want_yes else "no"})
        want_yes = not want_yes
    order = rng.permutation(n)
    return [out[i] for i in order]


def to_batch(records: Sequence[Dict[str, str]], input_length: int = 13,
             target_length: int = 2,
             encode_inputs: Optional[Callable[[Dict[str, str]], List[int]]] = None
             ) -> Dict[str, np.ndarray]:
    """Records -> a SeqIO-style encoder-decoder batch (EOS appended, padded with 0).
    ``encode_inputs`` (record -> ids without EOS) replaces ``encode(record['inputs'])``, e.g.
    to render a P-tuning template."""
    n = len(records)
    enc = np.zeros((n, input_length), np.int32)
    tgt = np.zeros((n, target_length), np.int32)
    for i, r in enumerate(records):
        ids = (encode(r["inputs"]) if encode_inputs is None else list(encode_inputs(r))) + [EOS]
        if len(ids) > input_length:
            raise ValueError(f"example {i} has {len(ids)} input tokens > {input_length}")
        enc[i, :len(ids)] = ids
        t = encode(r["targets"]) + [EOS]
        tgt[i, :len(t)] = t[:target_length]
    dec_in = np.concatenate([np.zeros((n, 1), np.int32), tgt[:, :-1]], axis=1)
    return {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in,
            "decoder_target_tokens": tgt, "decoder_loss_weights": (tgt > 0).astype(np.float32)}


def mixture_batches(skills: Sequence[str], batch_size: int, seed: int, with_marker: bool,
                    skill_weights: Optional[Sequence[float]] = None):
    """Endless iterator of batches mixing ``skills`` (deterministic for a seed)."""
    rng = np.random.RandomState(seed)
    chunk = 0
    while True:
        chunk += 1
        per = [examples(s, batch_size, seed * 100_003 + chunk * 31 + k, with_marker)
               for k, s in enumerate(skills)]
        pool = [r for recs in per for r in recs]
        idx = rng.choice(len(pool), size=batch_size, replace=False,
                         p=None if skill_weights is None else np.repeat(
                             np.asarray(skill_weights) / np.sum(skill_weights) / batch_size,
                             batch_size))
        yield to_batch([pool[i] for i in idx])
