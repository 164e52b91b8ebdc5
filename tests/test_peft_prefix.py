"""Prefix-tuning against transformers + PEFT (a reference nobody here wrote), fp32: with only
decoder self-attention prefixes and 'leading' position bias, our logits equal PEFT's for the
same prefix values, both ways through adapter files; and PEFT's T5 layout is what
checkpoints/peft_prefix.py documents (cross-attention rows dropped, layers j and j + L/2
shared)."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import jax.numpy as jnp  # noqa: E402

from prompt_t5x.checkpoints import hf_interop, peft_prefix  # noqa: E402
from prompt_t5x.commands import cli  # noqa: E402
from prompt_t5x.methods import interface, registry  # noqa: E402
from prompt_t5x.model import t5  # noqa: E402

P, LAYERS, HEADS, DKV = 3, 4, 4, 10


@pytest.fixture(scope="module")
def world():
    torch.manual_seed(0)
    cfg = transformers.T5Config(feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
                                vocab_size=101, d_model=32, d_kv=DKV, d_ff=48,
                                num_layers=LAYERS, num_decoder_layers=LAYERS, num_heads=HEADS)
    base = transformers.T5ForConditionalGeneration(cfg).eval()
    config = hf_interop.config_from_hf(cfg.to_dict(), dtype="float32")
    params = hf_interop.params_from_hf_state_dict(base.state_dict(), config)
    rng = np.random.RandomState(1)
    ids = rng.randint(2, 101, size=(3, 40))
    ids[:, -1] = 1
    ids[1, 25:] = 0
    ids[1, 24] = 1
    dec = rng.randint(2, 101, size=(3, 6))
    dec[:, 0] = 0
    targets = np.concatenate([dec[:, 1:], np.ones((3, 1), int)], axis=1)
    batch = {"encoder_input_tokens": jnp.asarray(ids, jnp.int32),
             "decoder_input_tokens": jnp.asarray(dec, jnp.int32),
             "decoder_target_tokens": jnp.asarray(targets, jnp.int32)}
    return dict(cfg=cfg, base=base, config=config, params=params, ids=ids, dec=dec, batch=batch)


def _peft_model(world, table):
    pc = peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P,
                                 token_dim=HEADS * DKV, num_attention_heads=HEADS)
    model = peft.get_peft_model(world["base"], pc).eval()
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.copy_(torch.tensor(table))
    return model


def _hf_logits(world, model):
    with torch.no_grad():
        return model(input_ids=torch.tensor(world["ids"]),
                     attention_mask=torch.tensor(world["ids"] > 0),
                     decoder_input_ids=torch.tensor(world["dec"])).logits.numpy()


def _our_logits(world, tables, config):
    method = registry.build(t5.T5(world["config"]), config)
    trainable = interface.unflatten_tables({k: jnp.asarray(v) for k, v in tables.items()})
    return np.asarray(method.logits(world["params"], trainable, world["batch"]))


def test_peft_adapter_logits_match_ours_both_ways(world, tmp_path):
    table = np.random.RandomState(2).normal(size=(P, LAYERS * 2 * HEADS * DKV))
    table = table.astype(np.float32)
    model = _peft_model(world, table)
    ref = _hf_logits(world, model)
    model.save_pretrained(str(tmp_path / "peft"))
    tables, config = peft_prefix.read_adapter(str(tmp_path / "peft"), num_decoder_layers=LAYERS,
                                              heads=HEADS, head_dim=DKV)
    ours = _our_logits(world, tables, config)
    assert np.abs(ours - ref).max() <= 1e-4
    # The zero bias (our default) is a different function: the parity needs 'leading'.
    assert np.abs(_our_logits(world, tables, {**config, "prefix_bias": "zero"}) - ref).max() > 1e-3

    # Our tables -> adapter -> PEFT loads it -> the same logits.
    peft_prefix.write_adapter(str(tmp_path / "ours"), tables["decoder_self/key"],
                              tables["decoder_self/value"], heads=HEADS, head_dim=DKV)
    loaded = peft.PeftModel.from_pretrained(world["base"], str(tmp_path / "ours")).eval()
    assert np.abs(_hf_logits(world, loaded) - ours).max() <= 1e-4


def test_peft_layout_cross_rows_dropped_and_layers_shared(world):
    rs = np.random.RandomState(3)
    table = rs.normal(size=(P, 2 * LAYERS, HEADS * DKV)).astype(np.float32)
    ref = _hf_logits(world, _peft_model(world, table.reshape(P, -1)))
    used = {r for pair in peft_prefix.decoder_rows(LAYERS) for r in pair}
    assert used == {0, 1, 4, 5}                         # L = 4: rows 2, 3, 6, 7 feed no layer
    assert peft_prefix.decoder_rows(LAYERS)[0] == peft_prefix.decoder_rows(LAYERS)[2]
    dropped = table.copy()
    dropped[:, [2, 3, 6, 7]] = rs.normal(size=(P, 4, HEADS * DKV))
    np.testing.assert_array_equal(_hf_logits(world, _peft_model(world, dropped.reshape(P, -1))),
                                  ref)                  # PEFT ignores them: cross is dropped
    moved = table.copy()
    moved[:, 4] += 1.0                                  # layer 1's (and 3's) key
    assert np.abs(_hf_logits(world, _peft_model(world, moved.reshape(P, -1))) - ref).max() > 1e-4


def test_export_refuses_what_peft_cannot_compute(world):
    key = np.random.RandomState(4).normal(size=(LAYERS, P, HEADS, DKV)).astype(np.float32)
    with pytest.raises(peft_prefix.PeftPrefixError, match="layers 0 and 2"):
        peft_prefix.table_from_prefixes(key, key)
    shared = np.concatenate([key[:2], key[:2]])
    k, v = peft_prefix.prefixes_from_table(peft_prefix.table_from_prefixes(shared, -shared),
                                           LAYERS, HEADS, DKV)
    np.testing.assert_array_equal(k, shared)
    np.testing.assert_array_equal(v, -shared)
    for config, needle in ((dict(parts=["encoder", "decoder_self"]), "only decoder self"),
                           (dict(prefix_bias="zero"), "leading")):
        with pytest.raises(peft_prefix.PeftPrefixError, match=needle):
            peft_prefix.check_exportable({**peft_prefix.method_config(P), **config})


def test_cli_peft_layout_run_exports_an_adapter_peft_runs(tmp_path):
    """Train with peft_layout (decoder self-attention, layers j and j + L/2 tied, 'leading'
    bias), export --format peft, load the adapter with PEFT onto the HF conversion of the same
    frozen T5: PEFT's logits equal our method's on the run's trained state."""
    from prompt_t5x.checkpoints import bundled, method_export
    run = str(tmp_path / "run")
    assert cli.main(["train", "--gin_file=models/quickstart.gin",
                     "--gin_file=runs/p_tuning_v2.gin", f"--gin.MODEL_DIR={run}",
                     "--gin.TASK=synthetic_contains", "--gin.INPUTS_LENGTH=13",
                     "--gin.TARGETS_LENGTH=2", "--gin.TRAIN_STEPS=2", "--gin.EVAL_EVERY=2",
                     "--gin.BATCH_SIZE=4", "--gin.PROMPT_LENGTH=2",
                     "--gin.PREFIX_PARTS=['decoder_self']",
                     "--gin.methods.prefix_tuning.prefix_bias='leading'",
                     "--gin.methods.prefix_tuning.peft_layout=True",
                     "--gin.train.progress_bar=False", "--gin.train.tensorboard=False",
                     "--gin.train.max_eval_examples=8"]) == 0
    adapter = str(tmp_path / "adapter")
    assert cli.main(["export", run, "--out", adapter, "--format", "peft"]) == 0
    method, trainable, _, _ = method_export.run_method(run)
    _, params = bundled.load_asset()   # the run's frozen T5 (models/quickstart.gin)
    hf_config = transformers.T5Config(**{k: v for k, v in hf_interop.hf_config_from(
        method.model.config).items() if k != "architectures"})
    base = transformers.T5ForConditionalGeneration(hf_config).eval()
    base.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in
                          hf_interop.hf_state_dict_from_params(params).items()})
    loaded = peft.PeftModel.from_pretrained(base, adapter).eval()
    rs = np.random.RandomState(5)
    ids = rs.randint(3, 25, size=(2, 9))
    ids[:, -1] = 1
    dec = np.concatenate([np.zeros((2, 1), int), rs.randint(3, 25, size=(2, 3))], 1)
    with torch.no_grad():
        ref = loaded(input_ids=torch.tensor(ids), attention_mask=torch.tensor(ids > 0),
                     decoder_input_ids=torch.tensor(dec)).logits.numpy()
    batch = {"encoder_input_tokens": jnp.asarray(ids, jnp.int32),
             "decoder_input_tokens": jnp.asarray(dec, jnp.int32),
             "decoder_target_tokens": jnp.ones(dec.shape, jnp.int32)}
    ours = np.asarray(method.logits(params, trainable, batch))
    assert np.abs(ours - ref).max() <= 1e-4
    # The adapter directory is an eval source (with the frozen model named): the run's metric.
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    out = tmp_path / "eval"
    assert cli.main(["eval", "--gin_file=runs/eval.gin", f"--gin.PROMPT={adapter}",
                     "--gin.CHECKPOINT=quickstart", f"--gin.OUTPUT_DIR={out}",
                     "--gin.TASK=synthetic_contains", "--gin.INPUTS_LENGTH=13",
                     "--gin.TARGETS_LENGTH=2", "--gin.evaluate.max_examples=8"]) == 0
    record = json.loads((out / "synthetic_contains_validation_metrics.json").read_text())
    assert record["metrics"]["accuracy"] == pytest.approx(best["metrics"]["accuracy"])
