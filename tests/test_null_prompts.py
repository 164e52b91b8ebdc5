"""Null prompts (Logan IV et al., 2022): the ``null_<task>`` SeqIO variants on the real fixture
files hold the task's fields alone, with no task name and no template words."""

import pytest

LENGTHS = {"inputs": 512, "targets": 32}


@pytest.fixture(scope="module")
def registry(fixtures_dir):
    import tasks
    vocab = str(fixtures_dir / "vocab" / "t5_cc_all_32000_100extra.spm.model")
    tasks.register_all(vocab_path=vocab, data_dir=str(fixtures_dir / "data"))
    return tasks


def _first(name, split="validation"):
    import seqio
    ds = seqio.get_mixture_or_task(name).get_dataset(
        LENGTHS, split=split, shuffle=False, use_cached=False, try_in_mem_cache=False)
    ex = next(ds.take(1).as_numpy_iterator())
    return ex["inputs_pretokenized"].decode(), ex["targets_pretokenized"].decode()


def test_null_rte_is_the_two_sentences_alone(registry):
    hypothesis = "Christopher Reeve had an accident."
    premise = ("Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at "
               "age 44, according to the Christopher Reeve Foundation.")
    assert _first("null_local_super_glue_rte") == (f"{hypothesis} {premise}", "not_entailment")
    info = registry.families.TASK_INFO["null_local_super_glue_rte"]
    assert info.variant == "null" and info.label_names == ("entailment", "not_entailment")


def test_null_sst2_keeps_the_text_and_the_targets(registry):
    text, target = _first("local_glue_sst2")
    null_text, null_target = _first("null_local_glue_sst2")
    assert text.startswith("sst2 sentence: ") and null_text == text[len("sst2 sentence: "):]
    assert null_target == target


def test_null_prompt_removes_only_template_words():
    """Field values that merely contain a field-like word keep it unless it is one of the
    family's field names followed by ': '."""
    import tensorflow as tf

    from tasks import preprocessors as prep
    ds = tf.data.Dataset.from_tensors({"inputs": tf.constant(
        "boolq question: is a note: a passage? passage: question:mark and passage")})
    out = next(iter(prep.null_prompt(ds, ("question", "passage")).as_numpy_iterator()))
    assert out["inputs"].decode() == "is a note: a passage? question:mark and passage"
