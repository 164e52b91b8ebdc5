"""Local-file tasks on the real fixture files: exact preprocessed strings and token ids, every
record readable, and one clear error per kind of bad input."""

import json

import numpy as np
import pytest

LENGTHS = {"inputs": 512, "targets": 32}


@pytest.fixture(scope="module")
def registry(fixtures_dir):
    import tasks
    vocab = str(fixtures_dir / "vocab" / "t5_cc_all_32000_100extra.spm.model")
    tasks.register_all(vocab_path=vocab, data_dir=str(fixtures_dir / "data"))
    return tasks


@pytest.fixture(scope="module")
def spm(fixtures_dir):
    import sentencepiece
    return sentencepiece.SentencePieceProcessor(
        model_file=str(fixtures_dir / "vocab" / "t5_cc_all_32000_100extra.spm.model"))


def _examples(name, split, n=None):
    import seqio
    ds = seqio.get_mixture_or_task(name).get_dataset(
        LENGTHS, split=split, shuffle=False, use_cached=False, try_in_mem_cache=False)
    if n is not None:
        ds = ds.take(n)
    return list(ds.as_numpy_iterator())


def _strings(ex):
    return ex["inputs_pretokenized"].decode(), ex["targets_pretokenized"].decode()


def test_sst2_tsv_exact_strings_and_ids(registry, spm):
    first, second = _examples("local_glue_sst2", "validation", 2)
    assert _strings(first) == (
        "sst2 sentence: it 's a charming and often affecting journey . ", "positive")
    assert _strings(second) == ("sst2 sentence: unflinchingly bleak and desperate ", "negative")
    # Token ids: independent SentencePiece encoding + EOS (1).
    assert first["inputs"].tolist() == spm.encode(_strings(first)[0]) + [1]
    assert first["targets"].tolist() == spm.encode("positive") + [1]


def test_rte_jsonl_exact_strings_and_variants(registry):
    ex = _examples("local_super_glue_rte", "validation", 1)[0]
    hypothesis = "Christopher Reeve had an accident."
    premise = ("Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at "
               "age 44, according to the Christopher Reeve Foundation.")
    assert _strings(ex) == (f"rte hypothesis: {hypothesis} premise: {premise}", "not_entailment")
    assert ex["idx"] == 0 and ex["label"] == 1
    taskless = _examples("taskless_local_super_glue_rte", "validation", 1)[0]
    assert _strings(taskless) == (f"hypothesis: {hypothesis} premise: {premise}", "not_entailment")
    indexed = _examples("local_super_glue_rte_task_index", "validation", 1)[0]
    from tasks import families, preprocessors, vocab
    index = families.TASK_INFO["local_super_glue_rte_task_index"].task_index
    token = preprocessors.task_index_token(vocab.get_vocabulary(), index)
    assert token == 32099 - index  # <extra_id_{index}>
    assert indexed["inputs"][0] == token
    assert indexed["inputs"][1:].tolist() == ex["inputs"].tolist()


def test_unlabelled_test_split_and_all_records_read(registry, fixtures_dir):
    test = _examples("local_super_glue_wsc_simple_eval", "test")
    with open(fixtures_dir / "data" / "super_glue_wsc" / "test.jsonl") as f:
        assert len(test) == sum(1 for line in f if line.strip())
    assert {_strings(e)[1] for e in test} != {"<unk>"}  # WSC targets are the candidate text
    assert {int(e["label"]) for e in test} == {-1}
    rte_test = _examples("local_super_glue_rte", "test", 3)
    assert {_strings(e)[1] for e in rte_test} == {"<unk>"}
    val = _examples("local_super_glue_rte", "validation")
    assert len(val) == 277


def test_wsc_simple_exact_strings_and_train_filter(registry, fixtures_dir):
    first = _examples("local_super_glue_wsc_simple_eval", "validation", 1)[0]
    assert _strings(first) == (
        "wsc: Bernard , who had not told the government official that he was less than 21 when "
        "he filed for a homestead claim, did not consider that he had done anything dishonest. "
        "Still, anyone who knew that he was 19 years old could take his claim away from *him* .",
        "anyone")
    assert first["label"] == 0
    train = _examples("local_super_glue_wsc_simple_train", "train")
    with open(fixtures_dir / "data" / "super_glue_wsc" / "train.jsonl") as f:
        records = [json.loads(line) for line in f]
    positives = [r for r in records if r["label"]]
    assert len(train) == len(positives)
    assert {e["label"] for e in train} == {1}
    r = positives[0]
    words = r["text"].split(" ")
    i = r["target"]["span2_index"]
    expected = " ".join(["wsc:"] + words[:i] + [f"*{words[i]}*"] + words[i + 1:])
    assert _strings(train[0]) == (expected, r["target"]["span1_text"])


def test_wsc_postprocessor_and_metric_on_local_eval(registry):
    from prompt_t5x.data import seqio_bridge, seqio_metrics
    spec = seqio_bridge.BatchSpec(inputs_length=512, targets_length=32, batch_size=8)
    import seqio
    examples = seqio_bridge.eval_examples("local_super_glue_wsc_simple_eval", spec, split="validation",
                                  shard_info=seqio.ShardInfo(0, 1))
    # Echoing the candidate says "yes, it is the referent" for every example: accuracy is then
    # the fraction of examples whose candidate is right.
    echo = [ex["targets_pretokenized"].decode() for ex in examples]
    got = seqio_metrics.compute_metrics("local_super_glue_wsc_simple_eval", examples, echo)
    expected = 100 * np.mean([ex["label"] == 1 for ex in examples])
    assert got["accuracy"] == pytest.approx(expected)


def test_rte_metrics_through_postprocessor(registry):
    import seqio

    from prompt_t5x.data import seqio_bridge, seqio_metrics
    spec = seqio_bridge.BatchSpec(inputs_length=64, targets_length=8, batch_size=4)
    examples = seqio_bridge.eval_examples("local_super_glue_rte", spec, split="validation",
                                  shard_info=seqio.ShardInfo(0, 1))
    perfect = [ex["targets_pretokenized"].decode() for ex in examples]
    assert seqio_metrics.compute_metrics("local_super_glue_rte", examples, perfect) == {"accuracy": 100.0}
    constant = ["entailment"] * len(examples)
    frac = np.mean([ex["label"] == 0 for ex in examples])
    got = seqio_metrics.compute_metrics("local_super_glue_rte", examples, constant)["accuracy"]
    assert got == pytest.approx(100 * frac)
    garbage = ["maybe"] * len(examples)   # not a label word: counted wrong
    assert seqio_metrics.compute_metrics("local_super_glue_rte", examples, garbage) == {"accuracy": 0.0}


# ------------------------------------------------------------------------------ bad input ----
def _family(key):
    from tasks import local_files
    return local_files.family_for(key)[0]


def test_missing_field_names_task_file_and_line(registry, tmp_path):
    from tasks import local_files
    path = tmp_path / "train.jsonl"
    path.write_text('{"premise": "a", "hypothesis": "b", "label": "entailment", "idx": 0}\n'
                    '{"premise": "c", "label": "entailment", "idx": 1}\n')
    local_files.register_local_task(_family("super_glue_rte"), {"train": str(path)},
                                    name="my_rte")
    with pytest.raises(ValueError) as e:
        _examples("my_rte", "train")
    message = str(e.value)
    assert "'my_rte'" in message and f"{path}:2" in message and "'hypothesis'" in message


def test_unlabelled_train_record_and_bad_label_are_errors(registry, tmp_path):
    from tasks import local_files
    path = tmp_path / "train.tsv"
    path.write_text("sentence\tlabel\ngood film\t1\nbad film\t\n")
    local_files.register_local_task(_family("sst2"), {"train": str(path)}, name="my_sst2")
    with pytest.raises(ValueError, match=r"train.tsv:3: record is missing required field 'label'"):
        _examples("my_sst2", "train")
    path.write_text("sentence\tlabel\ngood film\tgreat\n")
    with pytest.raises(ValueError, match=r"train.tsv:2: label 'great' is not one of"):
        _examples("my_sst2", "train")


def test_missing_file_empty_split_and_ambiguous_dir(registry, tmp_path):
    from tasks import local_files
    with pytest.raises(FileNotFoundError, match="'my_cb'.*missing file"):
        local_files.register_local_task(_family("cb"), {"train": str(tmp_path / "nope.jsonl")},
                                        name="my_cb")
    empty = tmp_path / "val.jsonl"
    empty.write_text("\n")
    local_files.register_local_task(_family("cb"), {"validation": str(empty)}, name="my_cb")
    with pytest.raises(ValueError, match=r"'my_cb': split 'validation' is empty"):
        _examples("my_cb", "validation")
    (tmp_path / "rte").mkdir()
    with pytest.raises(ValueError, match="ambiguous"):
        local_files.register_local_dir(str(tmp_path))


def test_cli_show_task_and_errors(registry, fixtures_dir, capsys):
    from prompt_t5x.commands import cli
    vocab = str(fixtures_dir / "vocab" / "t5_cc_all_32000_100extra.spm.model")
    common = ["--vocab", vocab, "--data_dir", str(fixtures_dir / "data")]
    assert cli.main(["show-task", "local_glue_sst2", "-n", "1", *common]) == 0
    out = capsys.readouterr().out
    assert "inputs: sst2 sentence: it 's a charming and often affecting journey ." in out
    assert "targets_ids (2): [1465, 1]" in out
    assert cli.main(["show-task", "local_glue_sst3", *common]) == 2
    err = capsys.readouterr().err
    assert "unknown task or mixture 'local_glue_sst3'" in err and "local_glue_sst2" in err
    assert cli.main(["show-task", "local_glue_sst2", "--split", "dev", *common]) == 2
    assert "has no split 'dev'; available: train, validation, test" in capsys.readouterr().err
    assert cli.main(["tasks", "--filter", "local_", *common]) == 0
    out = capsys.readouterr().out
    assert "local_super_glue_wsc_simple_eval" in out and "local/taskless" in out
    bad = ["--vocab", "/nonexistent/spm.model", "--data_dir", str(fixtures_dir / "data")]
    try:
        assert cli.main(["show-task", "local_glue_sst2", *bad]) == 2
        assert "cannot read the SentencePiece vocabulary '/nonexistent/spm.model'" in (
            capsys.readouterr().err)
    finally:  # the bad path became the default: restore the fixture vocabulary
        registry.register_all(vocab_path=vocab, data_dir=str(fixtures_dir / "data"))


def test_superglue_distribution_format_multirc_and_record(registry, tmp_path):
    """MultiRC / ReCoRD jsonl as SuperGLUE distributes them (nested) -> the TFDS-shaped rows."""
    from tasks import local_files
    multirc = {"idx": 4, "passage": {"text": "<b>Sent 1: </b>Tom ran.<br>", "questions": [
        {"question": "Who ran?", "idx": 0, "answers": [{"text": "Tom", "idx": 0, "label": 1},
                                                       {"text": "Ann", "idx": 1, "label": 0}]}]}}
    (tmp_path / "m.jsonl").write_text(json.dumps(multirc) + "\n")
    local_files.register_local_task(_family("multirc"), {"validation": str(tmp_path / "m.jsonl")},
                                    name="my_multirc")
    rows = _examples("my_multirc", "validation")
    assert [_strings(r) for r in rows] == [
        ("multirc question: Who ran? answer: Tom paragraph: Sent 1: Tom ran. ", "True"),
        ("multirc question: Who ran? answer: Ann paragraph: Sent 1: Tom ran. ", "False")]
    assert [(r["idx/paragraph"], r["idx/question"], r["idx/answer"]) for r in rows] == [
        (4, 0, 0), (4, 0, 1)]
    text = "Obama met Macron.\n@highlight\nParis talks"
    record = {"idx": 9, "passage": {"text": text, "entities": [
        {"start": 0, "end": 4}, {"start": 10, "end": 15}, {"start": 29, "end": 33}]},
        "qas": [{"query": "@placeholder met Macron.", "idx": 3,
                 "answers": [{"start": 0, "end": 4, "text": "Obama"}]}]}
    (tmp_path / "r.jsonl").write_text(json.dumps(record) + "\n")
    local_files.register_local_task(_family("record"), {"train": str(tmp_path / "r.jsonl")},
                                    name="my_record")
    (row,) = _examples("my_record", "train")
    assert _strings(row) == ("record query: @placeholder met Macron. entities: Macron, Obama, "
                             "Paris passage: Obama met Macron. Paris talks", "Obama")
