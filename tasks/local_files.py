"""GLUE / SuperGLUE tasks read from local files, in exactly the TFDS tasks' formats.

Users who cannot (or do not want to) use TFDS bring the data as files in one directory per
family, named by the family key (``super_glue_rte``, ``glue_sst2``; a bare name such as ``sst2``
works where it is unambiguous), one file per split:

  train:       train.jsonl | train.tsv | train_full.tsv
  validation:  val.* | validation.* | dev.*       (MNLI: dev_matched.tsv, ...)
  test:        test-labeled.* | test_labeled.* | test.*

``.jsonl``: one JSON object per line with the SuperGLUE field names (nested ``target`` /
``passage`` objects as in the SuperGLUE distribution are flattened or expanded).
``.tsv``: a header row naming the TFDS feature columns (e.g. ``sentence<TAB>label``).
Labels may be label words (``entailment``), booleans, or class ids. Test splits may omit labels
(target ``<unk>``); other splits may not.

Every record is checked when a split is first read, before any example is produced: a missing
file, an empty split or a record without a required field raises one ValueError /
FileNotFoundError naming the task, the file and the line.
"""

from __future__ import annotations

import csv
import functools
import json
import pathlib
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import seqio

from tasks import families as fam
from tasks import glue, superglue

ALL_FAMILIES: List[fam.Family] = superglue.FAMILIES + glue.FAMILIES
_EXTENSIONS = (".jsonl", ".tsv")


def family_for(key: str) -> List[fam.Family]:
    """Families for a directory/family name: 'super_glue_rte', 'glue_sst2' or a unique 'sst2'."""
    exact = [f for f in ALL_FAMILIES if f.key == key]
    if exact:
        return exact
    bare = [f for f in ALL_FAMILIES if f.name == key]
    if len({f.benchmark for f in bare}) > 1:
        raise ValueError(f"{key!r} is ambiguous: name the directory "
                         f"{' or '.join(sorted({f.key for f in bare}))}.")
    return bare


def _split_basenames(split: str) -> List[str]:
    names = [split]
    if split == "train":
        names.append("train_full")
    if split.startswith("validation"):
        rest = split[len("validation"):]
        names += [f"val{rest}", f"dev{rest}"]
    if split.startswith("test"):
        rest = split[len("test"):]
        names = [f"test-labeled{rest}", f"test_labeled{rest}"] + names
    return names


def find_split_files(directory: pathlib.Path, family: fam.Family) -> Dict[str, str]:
    """``{split: path}`` for the family's splits present in ``directory``."""
    found = {}
    for split in family.splits:
        for base in _split_basenames(split):
            hits = [directory / f"{base}{ext}" for ext in _EXTENSIONS
                    if (directory / f"{base}{ext}").is_file()]
            if hits:
                found[split] = str(hits[0])
                break
    return found


# ------------------------------------------------------------------------------ reading ----
class RecordError(ValueError):
    """A bad record in a local file (message names task, file, line)."""


def _read_raw(path: pathlib.Path) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """(line number, raw record) pairs of a .jsonl or header-led .tsv file."""
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield line_no, json.loads(line)
                    except json.JSONDecodeError as e:
                        raise RecordError(f"{path}:{line_no}: not valid JSON ({e.msg}).") from e
    elif path.suffix == ".tsv":
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            for line_no, row in enumerate(reader, 2):
                yield line_no, row
    else:
        raise RecordError(f"{path}: unsupported file type {path.suffix!r} "
                          f"(use one of {', '.join(_EXTENSIONS)}).")


def _expand_nested(family: fam.Family, raw: Dict[str, Any]) -> List[Dict[str, Any]]:
    """SuperGLUE distribution records -> TFDS-shaped flat records (MultiRC, ReCoRD, WSC)."""
    passage = raw.get("passage")
    if family.name == "multirc" and isinstance(passage, dict):
        rows = []
        for question in passage.get("questions", []):
            for answer in question.get("answers", []):
                rows.append({"paragraph": passage.get("text"), "question": question.get("question"),
                             "answer": answer.get("text"), "label": answer.get("label"),
                             "idx": {"paragraph": raw.get("idx"), "question": question.get("idx"),
                                     "answer": answer.get("idx")}})
        return rows
    if family.name == "record" and isinstance(passage, dict):
        text = passage.get("text", "")

        def spans(items):
            return sorted({text[s["start"]:s["end"] + 1] for s in items})
        entities = spans(passage.get("entities", []))
        return [{"passage": text, "query": qa.get("query"), "entities": entities,
                 "answers": sorted({a["text"] for a in qa.get("answers", [])}),
                 "idx": {"passage": raw.get("idx"), "query": qa.get("idx")}}
                for qa in raw.get("qas", [])]
    flat = dict(raw)
    for key, value in raw.items():   # WSC keeps its spans under "target"
        if isinstance(value, dict) and key not in family.schema:
            flat.pop(key)
            flat.update(value)
    return [flat]


def _convert_label(value: Any, family: fam.Family, where: str) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    text = str(value).strip()
    names = family.label_names or ("False", "True")
    if text in names:
        return names.index(text)
    if text.lower() in ("true", "false"):
        return int(text.lower() == "true")
    try:
        return int(text)
    except ValueError:
        raise RecordError(f"{where}: label {value!r} is not one of {list(names)} "
                          "or a class id.") from None


def _convert_field(kind, value, name: str, family: fam.Family, where: str):
    if isinstance(kind, Mapping):
        if not isinstance(value, Mapping):
            raise RecordError(f"{where}: field {name!r} must be an object with {sorted(kind)}.")
        return {k: _convert_field(v, value.get(k), f"{name}.{k}", family, where)
                for k, v in kind.items()}
    if value is None:
        raise RecordError(f"{where}: record is missing required field {name!r}.")
    try:
        if kind == "text":
            return str(value)
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "text_list":
            return [str(v) for v in value]
    except (TypeError, ValueError):
        raise RecordError(f"{where}: field {name!r} = {value!r} is not a valid {kind}.") from None
    if kind == "label":
        return _convert_label(value, family, where)
    raise AssertionError(f"unknown schema kind {kind!r}")


def read_records(family: fam.Family, path: str, split: str, task_name: str
                 ) -> List[Dict[str, Any]]:
    """All records of one split file, converted to the TFDS schema and validated."""
    file = pathlib.Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"task {task_name!r}: {split} file {file} does not exist.")
    unlabelled_ok = split.startswith("test")
    records = []
    for line_no, raw in _read_raw(file):
        where = f"task {task_name!r}: {file}:{line_no}"
        if not isinstance(raw, dict):
            raise RecordError(f"{where}: expected a JSON object, got {type(raw).__name__}.")
        for row in _expand_nested(family, raw):
            row.setdefault("idx", len(records))
            if family.schema.get("label") in ("label", "float") and row.get("label") in (None, ""):
                if not unlabelled_ok:
                    raise RecordError(f"{where}: record is missing required field 'label' "
                                      f"(only test splits may be unlabelled).")
                row["label"] = -1
            records.append({name: _convert_field(kind, row.get(name), name, family, where)
                            for name, kind in family.schema.items()})
    if not records:
        raise RecordError(f"task {task_name!r}: split {split!r} is empty: {file} has no records.")
    return records


def _signature(kind):
    import tensorflow as tf
    if isinstance(kind, Mapping):
        return {k: _signature(v) for k, v in kind.items()}
    return {"text": tf.TensorSpec([], tf.string), "int": tf.TensorSpec([], tf.int32),
            "float": tf.TensorSpec([], tf.float32), "label": tf.TensorSpec([], tf.int64),
            "text_list": tf.TensorSpec([None], tf.string)}[kind]


def _dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None, *,
                family: fam.Family, files: Mapping[str, str], task_name: str):
    import tensorflow as tf
    del shuffle_files, seed  # one file per split: nothing to shuffle at file level
    if split not in files:
        raise ValueError(f"task {task_name!r} has no {split!r} split; available: {sorted(files)}.")
    records = read_records(family, files[split], split, task_name)  # eager: fail before output
    signature = {k: _signature(v) for k, v in family.schema.items()}
    return tf.data.Dataset.from_generator(lambda: iter(records), output_signature=signature)


def local_task_name(family: fam.Family) -> str:
    return f"local_{family.key}{family.task_suffix}"


def register_local_task(family: fam.Family, files: Mapping[str, str], *,
                        name: Optional[str] = None, vocab_path: Optional[str] = None
                        ) -> Tuple[str, ...]:
    """Register ``name`` (default ``local_<family key>``) and its variants over ``files``."""
    name = name or local_task_name(family)
    missing = {s: p for s, p in files.items() if not pathlib.Path(p).is_file()}
    if missing:
        raise FileNotFoundError(f"task {name!r}: missing file(s): "
                                + ", ".join(f"{s}: {p}" for s, p in missing.items()))
    unknown = set(files) - set(family.splits)
    if unknown:
        raise ValueError(f"task {name!r}: unknown split(s) {sorted(unknown)}; "
                         f"{family.key} has {sorted(family.splits)}.")
    source = seqio.FunctionDataSource(
        functools.partial(_dataset_fn, family=family, files=dict(files), task_name=name),
        splits=list(files))
    return fam.register_variants(family, source, name=name, source_kind="local",
                                 task_index=ALL_FAMILIES.index(family), vocab_path=vocab_path,
                                 local_files=dict(files))


def register_local_dir(data_dir: str, vocab_path: Optional[str] = None) -> List[str]:
    """Register a local task for every family directory under ``data_dir``; return their names."""
    root = pathlib.Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"local data directory {root} does not exist.")
    names = []
    for directory in sorted(p for p in root.iterdir() if p.is_dir()):
        families = family_for(directory.name)
        if not families and list(directory.glob("*.txt")):
            names.append(_register_text_dir(directory, vocab_path))
        for family in families:
            files = find_split_files(directory, family)
            if not files:
                raise FileNotFoundError(
                    f"{directory}: no split files for {family.key} (expected e.g. "
                    f"{', '.join(_split_basenames('train'))} with {' or '.join(_EXTENSIONS)}).")
            names.append(register_local_task(family, files, vocab_path=vocab_path)[0])
    return names


_TEXT_SPLITS = {"train": "train", "valid": "validation", "validation": "validation",
                "dev": "validation", "test": "test"}


def _register_text_dir(directory: pathlib.Path, vocab_path: Optional[str]) -> str:
    """A directory of plain text (``train.txt``, ``valid.txt``, ``test.txt``) -> a prefix-LM task
    named ``local_<dir>_prefix_lm``."""
    from tasks import lm_adaptation
    files = {_TEXT_SPLITS[p.stem]: str(p) for p in sorted(directory.glob("*.txt"))
             if p.stem in _TEXT_SPLITS}
    if not files:
        raise FileNotFoundError(f"{directory}: text files must be named train/valid/test.txt.")
    return lm_adaptation.register_local_text(f"local_{directory.name}_prefix_lm", files,
                                             vocab_path=vocab_path)
