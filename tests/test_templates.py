"""P-tuning templates (prompt_t5x.methods.templates): parsing, longest-first truncation, rendering
of the generated tasks' batches and of SeqIO tasks from their raw fields (local RTE / SST-2
fixtures through tasks/templated.py and the data bridge)."""

import numpy as np
import pytest

from prompt_t5x.data import run_data, synthetic
from prompt_t5x.methods import templates

RTE = "[P*3] premise: {premise} [P*3] hypothesis: {hypothesis} ? [P*3]"


def test_parse_pieces_counts_and_fields():
    t = templates.Template.parse(RTE)
    assert t.pieces == (("pseudo", 3), ("text", "premise:"), ("field", "premise"),
                        ("pseudo", 3), ("text", "hypothesis:"), ("field", "hypothesis"),
                        ("text", "?"), ("pseudo", 3))
    assert t.num_pseudo == 9 and t.fields == ("premise", "hypothesis")
    assert t.anchors() == ("premise:", "hypothesis:", "?")
    assert templates.Template.parse("[P]{inputs}[P*2]").num_pseudo == 3


@pytest.mark.parametrize("text, needle", [
    ("{inputs}", "no pseudo tokens"),
    ("[P*0] {inputs}", "count >= 1"),
    ("[P] {two words}", "not a field name"),
    ("[P] {inputs", "unbalanced"),
    ("[P] {inputs} }", "unbalanced"),
    ("[P] {inputs} [P*x]", r"write pseudo tokens as \[P\] or \[P\*n\]"),
    ("  ", "non-empty"),
    ("{inputs} [P] {inputs}", "appears twice"),
])
def test_malformed_templates_are_one_line_errors(text, needle):
    with pytest.raises(templates.TemplateError, match=needle):
        templates.Template.parse(text)


def test_fields_are_cut_longest_first():
    assert templates.field_budgets([3, 4], 10) == [3, 4]          # fits: nothing cut
    assert templates.field_budgets([10, 2], 6) == [4, 2]          # only the long one is cut
    assert templates.field_budgets([9, 7, 1], 10) == [5, 4, 1]    # cap 4, one spare to the first
    for lengths, room in (([5, 5, 5], 7), ([20, 1, 8], 9), ([4], 0)):
        keep = templates.field_budgets(lengths, room)
        assert sum(keep) == min(room, sum(lengths))
        assert all(0 <= k <= n for k, n in zip(keep, lengths))


def test_render_keeps_pseudo_tokens_and_anchors_whole():
    t = templates.Template.parse("[P*2] q: {a} [P] {b}")
    ids = templates.render_ids(t, {"a": [10, 11, 12, 13], "b": [20, 21]}, [[5, 6]], 99, 8)
    assert ids == [99, 99, 5, 6, 10, 11, 99, 20]   # room 3: cap 1 each, the spare one to a
    assert len(templates.render_ids(t, {"a": [1] * 50, "b": [2] * 50}, [[5, 6]], 99, 5)) == 5
    with pytest.raises(templates.TemplateError, match="needs 5 tokens.*raise inputs_length"):
        templates.render_ids(t, {"a": [], "b": []}, [[5, 6]], 99, 4)


def test_per_task_templates_and_unknown_fields():
    setting = {"task_a": "[P] {x}", "task_b": "[P*4] {y}"}
    assert templates.template_for_task(setting, "task_b").num_pseudo == 4
    assert templates.num_pseudo_tokens(setting) == 4
    with pytest.raises(templates.TemplateError, match="templates are given for: task_a, task_b"):
        templates.template_for_task(setting, "task_c")
    with pytest.raises(templates.TemplateError,
                       match="task 't' has no field 'x'; its fields: sentence, idx"):
        templates.Template.parse("[P] {x}").check_fields(["sentence", "idx"], "t")
    spec = templates.input_template({"template": setting}, 32128)
    assert spec.placeholder_id == 32127 and hash(spec)        # batch specs hold it: hashable
    assert templates.input_template({"prompt_length": 3}, 32128) is None


def test_generated_task_batches_hold_the_template():
    spec = templates.input_template({"template": "[P*2] {inputs} [P]"}, 32)
    data = run_data.SyntheticData("synthetic_last", 13, 2, 16, template=spec,
                                  model_vocab_size=32)
    records = data.train_examples(0)
    tokens = next(iter(data.train_batches(0)))["encoder_input_tokens"]
    for record, row in zip(records, tokens):
        symbols = synthetic.encode(record["inputs"])[:9]        # 13 - 3 pseudo - EOS
        np.testing.assert_array_equal(row[:len(symbols) + 4],
                                      [31, 31] + symbols + [31, synthetic.EOS])
    assert max(len(r["inputs"].split()) for r in records) == 11   # so some rows were cut
    assert (tokens == 31).sum(axis=1).tolist() == [3] * 16
    with pytest.raises(templates.TemplateError, match="pseudo_token_id=5 is a real token"):
        run_data.SyntheticData("synthetic_last", 13, 2, 16, model_vocab_size=32,
                               template=templates.InputTemplate("[P] {inputs}", 5))


@pytest.fixture(scope="module")
def registry(fixtures_dir):
    import tasks
    tasks.register_all(vocab_path=str(fixtures_dir / "vocab" / "t5_cc_all_32000_100extra.spm.model"),
                       data_dir=str(fixtures_dir / "data"))
    from prompt_t5x.data import seqio_bridge
    return seqio_bridge


def test_seqio_tasks_render_the_template_from_raw_fields(registry):
    import seqio
    bridge = registry
    spec = templates.input_template({"template": {"local_super_glue_rte": RTE,
                                                  "local_super_glue_rte_task_index": RTE,
                                                  "local_glue_sst2": "[P*2] {sentence} [P]"}},
                                    32128)
    vocab = seqio.get_mixture_or_task("local_glue_sst2").output_features["inputs"].vocabulary
    batch = next(bridge.eval_batches("local_super_glue_rte", bridge.BatchSpec(32, 4, 2,
                                                                               template=spec)))
    example = bridge.eval_examples("local_super_glue_rte", bridge.BatchSpec(32, 4, 2,
                                                                            template=spec))[0]
    row = batch["encoder_input_tokens"][0].tolist()
    assert len(row) == 32 and row[-1] == 1 and row.count(32127) == 9
    assert row[:3] == [32127] * 3 and row[-4:] == [32127] * 3 + [1]
    assert vocab.decode([t for t in row if t != 32127]).startswith("premise: ")
    assert example["targets_pretokenized"] in (b"entailment", b"not_entailment")
    assert example["inputs_pretokenized"].decode().startswith("[P] [P] [P] premise: ")
    # The task-index variant keeps its task token first, within the same length.
    indexed = next(bridge.eval_batches("local_super_glue_rte_task_index",
                                       bridge.BatchSpec(32, 4, 2, template=spec)))
    first = indexed["encoder_input_tokens"][0].tolist()
    assert len(first) == 32 and first[1:4] == [32127] * 3 and first[0] >= vocab.vocab_size - 100
    # SST-2: one field; a long sentence is cut, the pseudo tokens and EOS stay.
    tokens = next(iter(bridge.train_batches("local_glue_sst2", bridge.BatchSpec(
        8, 4, 4, template=spec))))["encoder_input_tokens"]
    assert (tokens[:, :2] == 32127).all() and ((tokens == 32127).sum(axis=1) == 3).all()
    with pytest.raises(templates.TemplateError, match="its fields: sentence"):
        bridge.check_split_readable(bridge.get_task_or_mixture("local_glue_sst2"),
                                    bridge.BatchSpec(8, 4, 4, template=templates.InputTemplate(
                                        "[P] {premise}", 32127)), "train")
