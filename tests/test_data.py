"""The data bridge on the real local RTE fixture: fixed shapes, determinism, position restore,
per-host shards, eval padding/mask, packing refusal, and a batch consumed by the train step."""

import numpy as np
import pytest

from prompt_t5x.data import seqio_bridge

SPEC = seqio_bridge.BatchSpec(inputs_length=48, targets_length=8, batch_size=4, prompt_length=5)
TASK = "local_super_glue_rte"            # eval: 277 validation examples
TRAIN_TASK = "local_super_glue_wsc_simple_train"  # train: 259 examples (small shuffle buffer fill)


@pytest.fixture(scope="module")
def registry(fixtures_dir):
    import tasks
    tasks.register_all(
        vocab_path=str(fixtures_dir / "vocab" / "t5_cc_all_32000_100extra.spm.model"),
        data_dir=str(fixtures_dir / "data"))
    return tasks


def _one_host():
    import seqio
    return seqio.ShardInfo(index=0, num_shards=1)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(np.array_equal(a[k], b[k]) for k in seqio_bridge.MODEL_FEATURES)


def test_fixed_shapes_and_dtypes(registry):
    batches = _take(seqio_bridge.train_batches(TRAIN_TASK, SPEC, seed=0, shard_info=_one_host()), 3)
    for b in batches:
        assert set(b) == set(seqio_bridge.MODEL_FEATURES)
        for k in ("encoder_input_tokens",):
            assert b[k].shape == (4, 48) and b[k].dtype == np.int32
        for k in ("decoder_input_tokens", "decoder_target_tokens"):
            assert b[k].shape == (4, 8) and b[k].dtype == np.int32
        assert b["decoder_loss_weights"].dtype == np.float32
        # Teacher forcing: inputs are targets shifted right, starting from 0.
        np.testing.assert_array_equal(b["decoder_input_tokens"][:, 1:],
                                      b["decoder_target_tokens"][:, :-1])
        assert np.all(b["decoder_input_tokens"][:, 0] == 0)
        np.testing.assert_array_equal(b["decoder_loss_weights"], b["decoder_target_tokens"] > 0)
    assert SPEC.encoder_length == 53


def test_determinism_and_position_restore(registry):
    first = seqio_bridge.train_batches(TRAIN_TASK, SPEC, seed=3, shard_info=_one_host())
    reference = _take(first, 7)
    assert first.position == 7
    again = _take(seqio_bridge.train_batches(TRAIN_TASK, SPEC, seed=3, shard_info=_one_host()), 7)
    assert all(_same(a, b) for a, b in zip(reference, again))
    other_seed = _take(seqio_bridge.train_batches(TRAIN_TASK, SPEC, seed=4, shard_info=_one_host()), 2)
    assert not _same(reference[0], other_seed[0])

    partial = seqio_bridge.train_batches(TRAIN_TASK, SPEC, seed=3, shard_info=_one_host())
    _take(partial, 4)
    state = partial.state()
    assert state == {"name": TRAIN_TASK, "split": "train", "seed": 3, "position": 4,
                     "shard_index": 0, "num_shards": 1}
    # What a resume does (the training loop first checks the rest of the state).
    resumed = seqio_bridge.train_batches(TRAIN_TASK, SPEC, seed=3, position=state["position"])
    assert all(_same(a, b) for a, b in zip(_take(resumed, 3), reference[4:7]))
    assert resumed.position == 7


def test_eval_covers_every_example_once_with_padding_mask(registry):
    batches = list(seqio_bridge.eval_batches(TASK, SPEC, split="validation", shard_info=_one_host()))
    assert all(b["encoder_input_tokens"].shape == (4, 48) for b in batches)
    masks = np.concatenate([b["example_mask"] for b in batches])
    indices = np.concatenate([b["example_index"] for b in batches])
    assert masks.sum() == 277 and len(batches) == 70          # ceil(277 / 4)
    np.testing.assert_array_equal(indices[masks], np.arange(277))
    last = batches[-1]
    assert last["example_mask"].tolist() == [True, False, False, False]
    assert np.all(last["encoder_input_tokens"][1:] == 0)
    assert np.all(last["decoder_loss_weights"][1:] == 0)
    assert np.all(last["example_index"][1:] == -1)


def test_two_host_shards_are_disjoint_and_complete(registry):
    import seqio
    spec = seqio_bridge.BatchSpec(inputs_length=48, targets_length=8, batch_size=8)
    rows = []
    for index in range(2):
        for b in seqio_bridge.eval_batches(TASK, spec, split="validation",
                                   shard_info=seqio.ShardInfo(index, 2)):
            assert b["encoder_input_tokens"].shape == (4, 48)     # host batch = 8 / 2
            rows += [tuple(r) for r in b["encoder_input_tokens"][b["example_mask"]]]
    single = [tuple(r) for b in seqio_bridge.eval_batches(TASK, spec, split="validation",
                                                  shard_info=_one_host())
              for r in b["encoder_input_tokens"][b["example_mask"]]]
    assert len(rows) == 277 and sorted(rows) == sorted(single)
    with pytest.raises(seqio_bridge.DataError, match="not divisible"):
        seqio_bridge.host_batch_size(seqio_bridge.BatchSpec(48, 8, batch_size=5), seqio.ShardInfo(0, 2))


def test_packing_refused_with_prompt_and_bad_names(registry):
    with pytest.raises(seqio_bridge.DataError, match="packing is not supported with a prompt"):
        seqio_bridge.BatchSpec(inputs_length=48, targets_length=8, batch_size=4, prompt_length=10,
                       pack=True)
    seqio_bridge.BatchSpec(inputs_length=48, targets_length=8, batch_size=4, pack=True)  # no prompt: ok
    with pytest.raises(seqio_bridge.DataError, match="Did you mean: local_super_glue_rte"):
        seqio_bridge.train_batches("local_super_glue_rtf", SPEC, shard_info=_one_host())
    with pytest.raises(seqio_bridge.DataError, match="no split 'dev'"):
        seqio_bridge.train_batches(TASK, SPEC, split="dev", shard_info=_one_host())


def test_bridge_batch_feeds_prompt_tuning_train_step(registry):
    import jax

    from prompt_t5x.methods import prompt_tuning
    from prompt_t5x.model import t5
    from prompt_t5x.training import optim, train
    config = t5.get_config("tiny")
    frozen = t5.init_params(config, jax.random.PRNGKey(0))
    method = prompt_tuning.PromptTuning(t5.T5(config), prompt_length=SPEC.prompt_length)
    optimizer = optim.adafactor(learning_rate=0.3)
    state = train.create_train_state(method, optimizer, frozen, jax.random.PRNGKey(1))
    step = train.make_train_step(method, optimizer)
    batch = next(seqio_bridge.train_batches(TRAIN_TASK, SPEC, seed=0, shard_info=_one_host()))
    before = np.asarray(state.params["prompt"]).copy()
    state, metrics = step(state, frozen, batch)
    assert np.isfinite(float(metrics["loss"]))
    assert not np.allclose(np.asarray(state.params["prompt"]), before)


def test_bad_local_record_is_one_data_error(registry, tmp_path):
    from tasks import local_files
    path = tmp_path / "val.jsonl"
    path.write_text('{"premise": "a", "label": "entailment", "idx": 0}\n')
    local_files.register_local_task(local_files.family_for("super_glue_rte")[0],
                                    {"validation": str(path)}, name="broken_rte")
    with pytest.raises(seqio_bridge.DataError, match=rf"'broken_rte': {path}:1: .*'hypothesis'"):
        list(seqio_bridge.eval_batches("broken_rte", SPEC, shard_info=_one_host()))
