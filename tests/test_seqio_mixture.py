"""SeqIO mixtures with task ids (data/seqio_bridge.py, data/run_data.SeqioData): on a mixture of
two real local-file tasks (SST-2 and RTE, first rows of the shared fixtures), every batch carries
each example's task id in the bank's order, the mixed stream resumes at batch n exactly,
validation is each task's split in turn scored per task (and as the mean), the bank checks are
one-line UsageErrors, and evaluation accepts the mixture (routing each example to its bank task,
metrics per task). A full train-then-evaluate of a bank on the mixture passed once by hand but is
left out here: compiling the tiny model's training and decoding takes minutes on shared CPUs."""

import numpy as np
import pytest

from prompt_t5x.base.errors import UsageError
from prompt_t5x.methods.interface import TASK_IDS

MIXTURE = "test_sst2_rte_mix"
SST2, RTE = "local_glue_sst2", "local_super_glue_rte"
BANK = (RTE, SST2)            # not the mixture's (name) order: ids must follow the bank
N_VAL = {SST2: 5, RTE: 3}
LENGTHS = dict(inputs_length=48, targets_length=4, batch_size=4, prompt_length=2)


@pytest.fixture(scope="module")
def world(fixtures_dir, tmp_path_factory):
    """Small copies of the fixture splits (tmp dir), the tasks registered on them, and a mixture
    of the two at equal rates."""
    root = tmp_path_factory.mktemp("mix") / "data"
    sst2, rte = root / "glue_sst2", root / "super_glue_rte"
    sst2.mkdir(parents=True)
    rte.mkdir()
    src = fixtures_dir / "data"
    lines = (src / "sst2" / "train_full.tsv").read_text().splitlines()
    (sst2 / "train.tsv").write_text("\n".join(lines[:33]) + "\n")
    lines = (src / "sst2" / "dev.tsv").read_text().splitlines()
    (sst2 / "dev.tsv").write_text("\n".join(lines[:N_VAL[SST2] + 1]) + "\n")
    lines = (src / "super_glue_rte" / "train.jsonl").read_text().splitlines()
    (rte / "train.jsonl").write_text("\n".join(lines[:32]) + "\n")
    lines = (src / "super_glue_rte" / "val.jsonl").read_text().splitlines()
    (rte / "val.jsonl").write_text("\n".join(lines[:N_VAL[RTE]]) + "\n")
    vocab = str(fixtures_dir / "vocab" / "t5_cc_all_32000_100extra.spm.model")
    import tasks
    tasks.register_all(vocab_path=vocab, data_dir=str(root))
    tasks.families.add_mixture(MIXTURE, [(SST2, 1.0), (RTE, 1.0)], "SST-2 + RTE (test)")
    return dict(vocab=vocab, data_dir=str(root), spm=tasks.vocab.get_vocabulary(vocab))


def _data(world, **kw):
    from prompt_t5x.data import run_data
    return run_data.SeqioData(kw.pop("name", MIXTURE), **LENGTHS, vocabulary=world["vocab"],
                              data_dir=world["data_dir"], seed=3, **kw)


@pytest.fixture(scope="module")
def bank(world):
    """The mixture as a task bank's data (ids in BANK's order)."""
    return _data(world, task_names=BANK)


def _source_ids(world, tokens):
    """Each row's task id in BANK, read from its decoded text ('sst2 sentence:' / 'rte ...')."""
    texts = [world["spm"].decode([int(t) for t in row if t > 1]) for row in tokens]
    assert all(t.startswith(("sst2 ", "rte ")) for t in texts), texts
    return np.asarray([BANK.index(SST2 if t.startswith("sst2 ") else RTE) for t in texts])


def _half_right(examples):
    """Predictions right on every SST-2 example and wrong on every RTE one."""
    flip = {"entailment": "not_entailment", "not_entailment": "entailment"}
    targets = [e["targets_pretokenized"].decode() for e in examples]
    return [t if e["task"] == SST2 else flip[t] for t, e in zip(targets, examples)]


def test_mixed_training_batches_carry_task_ids_and_resume(world, bank):
    stream = bank.train_batches(0)
    batches = [next(stream) for _ in range(4)]
    for batch in batches:
        assert batch[TASK_IDS].dtype == np.int32 and batch[TASK_IDS].shape == (4,)
        np.testing.assert_array_equal(batch[TASK_IDS],
                                      _source_ids(world, batch["encoder_input_tokens"]))
    assert set(np.concatenate([b[TASK_IDS] for b in batches]).tolist()) == {0, 1}
    # Resuming at position 3 replays the same stream: batch 3 exactly, every feature.
    resumed = next(bank.train_batches(3))
    assert set(resumed) == set(batches[3])
    for key in resumed:
        np.testing.assert_array_equal(resumed[key], batches[3][key])


def test_validation_is_each_task_in_turn_scored_per_task(world, bank):
    batches = bank.eval_batches()
    mask = np.concatenate([b["example_mask"] for b in batches])
    ids = np.concatenate([b[TASK_IDS] for b in batches])[mask]
    tokens = np.concatenate([b["encoder_input_tokens"] for b in batches])[mask]
    np.testing.assert_array_equal(ids, _source_ids(world, tokens))
    # The mixture's order (by name): SST-2's split, then RTE's.
    np.testing.assert_array_equal(ids, [1] * N_VAL[SST2] + [0] * N_VAL[RTE])
    examples = bank.eval_examples()
    assert [e["task"] for e in examples] == [SST2] * N_VAL[SST2] + [RTE] * N_VAL[RTE]
    metrics = bank.compute_metrics(examples, _half_right(examples))
    assert metrics[f"{SST2}/accuracy"] == pytest.approx(100.0)
    assert metrics[f"{RTE}/accuracy"] == pytest.approx(0.0)
    assert metrics["accuracy"] == pytest.approx(50.0)   # the mean over tasks
    assert bank.decode_for_metrics and bank.label_words is None


def test_single_task_of_a_bank_and_bank_checks(world):
    from prompt_t5x.data import seqio_bridge
    spec = seqio_bridge.BatchSpec(48, 4, 4, prompt_length=2)
    batches = list(seqio_bridge.eval_batches(SST2, spec, task_names=BANK))
    ids = np.concatenate([b[TASK_IDS][b["example_mask"]] for b in batches])
    np.testing.assert_array_equal(ids, [1] * N_VAL[SST2])
    with pytest.raises(UsageError, match="would never train") as e:   # bank > data, to train
        _data(world, name=SST2, task_names=BANK)
    assert "\n" not in str(e.value)
    with pytest.raises(UsageError, match="does not know") as e:       # data task not in bank
        _data(world, task_names=(SST2,), training=False)
    assert "\n" not in str(e.value) and RTE in str(e.value)


def test_evaluation_accepts_a_mixture(world, tmp_path):
    """``eval`` on the mixture: its source (no bank ids in the batches: a shared prompt, or a
    bank routed by each example's ``task``), the bank router's ids, and per-task metrics."""
    from prompt_t5x.data import seqio_bridge
    from prompt_t5x.inference import evaluation
    np.save(tmp_path / "p.npy", np.zeros((2, 4), np.float32))
    cfg = evaluation.EvalConfig(task=MIXTURE, output_dir=str(tmp_path / "eval"),
                                prompt=str(tmp_path / "p.npy"), vocabulary=world["vocab"],
                                data_dir=world["data_dir"], inputs_length=48, targets_length=4,
                                batch_size=4)
    source = evaluation.setup_task(cfg)
    assert source.label_words is None   # SST-2's and RTE's differ: decoded and scored per task
    batches, examples = source.batches_and_examples(seqio_bridge.BatchSpec(48, 4, 4, 2))
    assert TASK_IDS not in batches[0]

    class Bank:
        tasks = list(BANK)
    route = evaluation.task_router(Bank(), examples, MIXTURE)
    for batch in batches:
        mask = batch["example_mask"]
        np.testing.assert_array_equal(route(batch["example_index"])[mask], _source_ids(
            world, batch["encoder_input_tokens"][mask]))
    metrics = source.metrics(examples, _half_right(examples))
    assert metrics == {"accuracy": 50.0, f"{SST2}/accuracy": 100.0, f"{RTE}/accuracy": 0.0}
