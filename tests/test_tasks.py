"""Every TFDS task family through ``tfds.testing.mock_data`` with hand-written records, so the
expected text-to-text strings can be checked exactly (T5's formats); variants, mixtures, the
prefix-LM objective and ``show-task`` on a TFDS task."""

import pytest

LENGTHS = {"inputs": 128, "targets": 16}

# builder name -> config -> split -> records (TFDS feature names and types)
RECORDS = {
    "super_glue": {
        "boolq": [{"question": "is the sky blue", "passage": "The sky is blue.", "idx": 0,
                   "label": 1}],
        "cb": [{"premise": "It may rain.", "hypothesis": "It rains.", "idx": 0, "label": 2}],
        "copa": [{"premise": "The man broke his toe.", "question": "cause",
                  "choice1": "He dropped a hammer on his foot.",
                  "choice2": "He got a hole in his sock.", "idx": 0, "label": 0}],
        "multirc": [{"paragraph": "<b>Sent 1: </b>Tom ran.<br><b>Sent 2: </b>He won.<br>",
                     "question": "Who ran?", "answer": "Tom",
                     "idx": {"paragraph": 3, "question": 1, "answer": 0}, "label": 1}],
        "record": [{"passage": "Obama visited Paris.\n@highlight\nHe met Macron\n@highlight\n"
                               "They talked",
                    "query": "@placeholder met Macron.", "entities": ["Obama", "Paris", "Macron"],
                    "answers": ["Obama", "Barack Obama"], "idx": {"passage": 0, "query": 7}}],
        "rte": [{"premise": "Cats purr.", "hypothesis": "Cats make sounds.", "idx": 0,
                 "label": 0}],
        "wic": [{"word": "bank", "sentence1": "He sat on the bank.",
                 "sentence2": "She robbed the bank.", "start1": 14, "end1": 18, "start2": 15,
                 "end2": 19, "idx": 0, "label": 0}],
        "wsc.fixed": [
            {"text": "Mark told Pete many lies about himself, which Pete included in his book. "
                     "He should have been more skeptical.",
             "span1_index": 0, "span2_index": 13, "span1_text": "Mark", "span2_text": "He",
             "idx": 0, "label": 0},
            {"text": "Mark told Pete many lies about himself, which Pete included in his book. "
                     "He should have been more skeptical.",
             "span1_index": 2, "span2_index": 13, "span1_text": "Pete", "span2_text": "He",
             "idx": 1, "label": 1},
            {"text": "John laughed out quite loud. \"Good for him,\" he said.",
             "span1_index": 0, "span2_index": 7, "span1_text": "John", "span2_text": "him",
             "idx": 2, "label": 0}],
        "axb": [{"sentence1": "The cat sat.", "sentence2": "A cat sat.", "idx": 0, "label": 1}],
        "axg": [{"premise": "The nurse left.", "hypothesis": "She left.", "idx": 0,
                 "label": 0}],
    },
    "glue": {
        "cola": [{"sentence": "The book was read.", "idx": 0, "label": 1}],
        "sst2": [{"sentence": "a gorgeous film", "idx": 0, "label": 1}],
        "mrpc": [{"sentence1": "He left.", "sentence2": "He went away.", "idx": 0, "label": 1}],
        "qqp": [{"question1": "How old?", "question2": "What age?", "idx": 0, "label": 0}],
        "stsb": [{"sentence1": "A dog runs.", "sentence2": "A dog is running.", "idx": 0,
                  "label": 3.75}],
        "mnli": [{"premise": "Tea is hot.", "hypothesis": "Tea is cold.", "idx": 0, "label": 2}],
        "qnli": [{"question": "Who won?", "sentence": "Tom won the race.", "idx": 0,
                  "label": 0}],
        "rte": [{"sentence1": "Cats purr.", "sentence2": "Dogs purr.", "idx": 0, "label": -1}],
        "wnli": [{"sentence1": "The fish ate it.", "sentence2": "The fish ate.", "idx": 0,
                  "label": 1}],
    },
    "c4": {"en": [{"text": "The quick brown fox jumps over the lazy dog. " * 4, "url": "u",
                   "timestamp": "t", "content-length": "1", "content-type": "text"}]},
}

EXPECTED = {  # task -> (split, inputs, targets) of the first example
    "super_glue_boolq_v102": ("train", "boolq passage: The sky is blue. question: is the sky blue",
                              "True"),
    "super_glue_cb_v102": ("train", "cb hypothesis: It rains. premise: It may rain.", "neutral"),
    "super_glue_copa_v102": ("train", "copa choice1: He dropped a hammer on his foot. choice2: He "
                             "got a hole in his sock. premise: The man broke his toe. question: "
                             "cause", "choice1"),
    "super_glue_multirc_v102": ("train", "multirc question: Who ran? answer: Tom paragraph: "
                                "Sent 1: Tom ran. Sent 2: He won. ", "True"),
    "super_glue_record_v102": ("train", "record query: @placeholder met Macron. entities: Obama, "
                               "Paris, Macron passage: Obama visited Paris. He met Macron. They "
                               "talked", "Obama"),
    "super_glue_rte_v102": ("train", "rte hypothesis: Cats make sounds. premise: Cats purr.",
                            "entailment"),
    "super_glue_wic_v102": ("train", "wic sentence1: He sat on the bank. sentence2: She robbed the "
                            "bank. word: bank", "False"),
    "super_glue_wsc_v102_simple_train": ("train", "wsc: Mark told Pete many lies about himself, "
                                         "which Pete included in his book. *He* should have been "
                                         "more skeptical.", "Pete"),
    "super_glue_wsc_v102_simple_eval": ("validation", "wsc: Mark told Pete many lies about "
                                        "himself, which Pete included in his book. *He* should "
                                        "have been more skeptical.", "Mark"),
    "super_glue_axb_v102": ("test", "rte sentence1: The cat sat. sentence2: A cat sat.",
                            "not_entailment"),
    "super_glue_axg_v102": ("test", "rte hypothesis: She left. premise: The nurse left.",
                            "entailment"),
    "glue_cola_v002": ("train", "cola sentence: The book was read.", "acceptable"),
    "glue_sst2_v002": ("train", "sst2 sentence: a gorgeous film", "positive"),
    "glue_mrpc_v002": ("train", "mrpc sentence1: He left. sentence2: He went away.", "equivalent"),
    "glue_qqp_v002": ("train", "qqp question1: How old? question2: What age?", "not_duplicate"),
    "glue_stsb_v002": ("train", "stsb sentence1: A dog runs. sentence2: A dog is running.", "3.8"),
    "glue_mnli_v002": ("validation_matched", "mnli hypothesis: Tea is cold. premise: Tea is hot.",
                       "contradiction"),
    "glue_mnli_matched_v002": ("validation", "mnli hypothesis: Tea is cold. premise: Tea is hot.",
                               "contradiction"),
    "glue_mnli_mismatched_v002": ("test", "mnli hypothesis: Tea is cold. premise: Tea is hot.",
                                  "contradiction"),
    "glue_qnli_v002": ("train", "qnli question: Who won? sentence: Tom won the race.",
                       "entailment"),
    "glue_rte_v002": ("test", "rte sentence1: Cats purr. sentence2: Dogs purr.", "<unk>"),
    "glue_wnli_v002": ("train", "wnli sentence1: The fish ate it. sentence2: The fish ate.",
                       "entailment"),
}


def _fake_as_dataset(self, split, decoders=None, read_config=None, **kwargs):
    import tensorflow as tf
    records = RECORDS[self.name][self.builder_config.name]
    return tf.data.Dataset.from_generator(
        lambda: iter(records), output_signature=self.info.features.get_tensor_spec())


@pytest.fixture(scope="module")
def mocked(fixtures_dir):
    import tensorflow_datasets as tfds

    import tasks
    tasks.register_all(
        vocab_path=str(fixtures_dir / "vocab" / "t5_cc_all_32000_100extra.spm.model"))
    with tfds.testing.mock_data(as_dataset_fn=_fake_as_dataset):
        yield tasks


def _examples(name, split, seed=None):
    import seqio
    ds = seqio.get_mixture_or_task(name).get_dataset(
        LENGTHS, split=split, shuffle=False, seed=seed, use_cached=False, try_in_mem_cache=False)
    return list(ds.as_numpy_iterator())


def _strings(ex):
    return ex["inputs_pretokenized"].decode(), ex["targets_pretokenized"].decode()


def test_every_tfds_family_is_checked(mocked):
    from tasks import families
    standard = {n for n, i in families.TASK_INFO.items()
                if i.source == "tfds" and i.variant == "standard" and i.family is not None}
    assert standard == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_tfds_task_formats(mocked, name):
    split, inputs, targets = EXPECTED[name]
    examples = _examples(name, split)
    assert _strings(examples[0]) == (inputs, targets)
    vocab = mocked.vocab.get_vocabulary()
    assert examples[0]["inputs"].tolist() == list(vocab.encode(inputs)) + [1]


def test_record_one_example_per_answer_with_answers_kept(mocked):
    examples = _examples("super_glue_record_v102", "train")
    assert [_strings(e)[1] for e in examples] == ["Obama", "Barack Obama"]
    for ex in examples:
        assert [a.decode() for a in ex["answers"]] == ["Obama", "Barack Obama"]
        assert (ex["idx/passage"], ex["idx/query"]) == (0, 7)


def test_wsc_glued_pronoun_and_train_filter(mocked):
    examples = _examples("super_glue_wsc_v102_simple_eval", "validation")
    assert len(examples) == 3
    assert _strings(examples[2])[0] == "wsc: John laughed out quite loud. \"Good for *him* ,\" he said."
    assert len(_examples("super_glue_wsc_v102_simple_train", "train")) == 1


def test_variants_taskless_and_task_index(mocked):
    from tasks import families
    for name in ("glue_stsb_v002", "super_glue_wsc_v102_simple_eval"):
        split = EXPECTED[name][0]
        base = _examples(name, split)[0]
        taskless = _examples(f"taskless_{name}", split)[0]
        assert _strings(taskless)[0] == _strings(base)[0].split(" ", 1)[1]
        assert _strings(taskless)[1] == _strings(base)[1]
        indexed = _examples(f"{name}_task_index", split)[0]
        index = families.TASK_INFO[f"{name}_task_index"].task_index
        assert indexed["inputs"][0] == 32099 - index
        assert indexed["inputs"][1:].tolist() == base["inputs"].tolist()
    indices = [i.task_index for i in families.TASK_INFO.values()
               if i.variant == "task_index" and i.source == "tfds"]
    assert len(indices) == len(set(indices)), "task indices must be distinct"


def test_c4_prefix_lm_splits_text_into_prefix_and_continuation(mocked):
    vocab = mocked.vocab.get_vocabulary()
    text = RECORDS["c4"]["en"][0]["text"]
    tokens = list(vocab.encode(text))
    examples = _examples("c4_prefix_lm", "train", seed=0)
    pieces = []
    for ex in examples:
        inputs, targets = ex["inputs"].tolist(), ex["targets"].tolist()
        assert inputs[-1] == 1 and targets[-1] == 1          # EOS on both, nothing trimmed
        assert 1 < len(inputs) <= LENGTHS["inputs"] and 1 < len(targets) <= LENGTHS["targets"]
        pieces += inputs[:-1] + targets[:-1]
    assert pieces == tokens   # prefix + continuation, piece after piece, re-form the document
    again = _examples("c4_prefix_lm", "train", seed=0)
    assert [e["inputs"].tolist() for e in again] == [e["inputs"].tolist() for e in examples]


def test_mixtures_rates_and_sampling(mocked):
    import seqio

    from tasks import mixtures
    mixture = seqio.get_mixture_or_task("super_glue_v102")
    rates = {t.name: mixture.get_rate(t) for t in mixture.tasks}
    assert rates["super_glue_cb_v102"] == 250 and rates["super_glue_record_v102"] == 138_854
    mixtures.register_proportional_mixture("tiny_cap", ["super_glue_cb_v102",
                                                        "super_glue_record_v102"], cap=1000)
    capped = seqio.get_mixture_or_task("tiny_cap")
    assert sorted(capped.get_rate(t) for t in capped.tasks) == [250, 1000]
    ds = capped.get_dataset(LENGTHS, split="train", shuffle=False, seed=1,
                            copy_pretokenized=True, try_in_mem_cache=False)
    names = [ex["inputs_pretokenized"].decode().split(" ")[0]
             for ex in ds.take(200).as_numpy_iterator()]
    # cb : record = 250 : 1000 -> about 40 cb of 200 (binomial sd ~5.7).
    assert set(names) == {"cb", "record"} and 15 <= names.count("cb") <= 65
    with pytest.raises(ValueError, match="unknown task"):
        mixtures.register_proportional_mixture("bad", ["no_such_task"])


def test_show_task_on_tfds_task(mocked, capsys):
    from prompt_t5x.commands import cli
    assert cli.main(["show-task", "super_glue_copa_v102", "--split", "train", "-n", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("=== super_glue_copa_v102 [train] example") == 1  # only 1 record exists
    assert "targets: choice1" in out
    assert cli.main(["show-task", "super_glue_axb_v102", "--split", "train"]) == 2
    assert "has no split 'train'; available: test" in capsys.readouterr().err
    assert cli.main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert "super_glue_v102" in out and "c4_prefix_lm" in out and "tfds/task_index" in out


def test_unknown_task_module_is_a_usage_error(mocked, capsys):
    from prompt_t5x.commands import cli
    assert cli.main(["tasks", "--task_module", "no_such_module_xyz"]) == 2
    assert "no_such_module_xyz" in capsys.readouterr().err


def test_open_task_reports_bad_tasks_splits_and_modules_as_usage_errors(mocked):
    """``eval``/``infer``/``show-task`` (and train's SeqIO data) resolve tasks this one way."""
    from prompt_t5x.base import errors
    from prompt_t5x.data import task_registry
    assert task_registry.open_task("super_glue_copa_v102", ("train",)).name == "super_glue_copa_v102"
    with pytest.raises(errors.UsageError, match="has no split 'validation'; available: test"):
        task_registry.open_task("super_glue_axb_v102", ("validation",))
    with pytest.raises(errors.UsageError, match=r"unknown task .* Generated tasks .*synthetic_contains"):
        task_registry.open_task("synthetic_contain")
    with pytest.raises(errors.UsageError, match="no_such_module_xyz"):
        task_registry.open_task("super_glue_copa_v102", task_modules=["no_such_module_xyz"])


def test_missing_seqio_is_one_usage_error_naming_the_extra(monkeypatch):
    """Where SeqIO/TensorFlow are absent (the GPU image), a SeqIO task asks for the extra."""
    import sys

    from prompt_t5x.base import errors
    from prompt_t5x.data import task_registry
    monkeypatch.setitem(sys.modules, "tasks", None)   # 'import tasks' raises ImportError
    with pytest.raises(errors.UsageError, match=r"pip install 'prompt_t5x\[data\]'"):
        task_registry.open_task("super_glue_copa_v102")
