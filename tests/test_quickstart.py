"""The quickstart's frozen model and a short prompt-tuning run on its generated task."""

import numpy as np

from prompt_t5x.checkpoints import bundled
from prompt_t5x.commands import quickstart
from prompt_t5x.data import synthetic
from prompt_t5x.model import t5


def test_asset_is_a_t5x_tree_and_the_generated_task_is_balanced():
    config, params = bundled.load_asset()
    import jax
    want = jax.tree.map(lambda s: s.shape, t5.param_shapes(config))
    got = jax.tree.map(lambda a: a.shape, params)
    assert got == want
    recs = synthetic.examples("contains", 400, seed=3, with_marker=False)
    labels = [r["targets"] for r in recs]
    assert labels.count("yes") == labels.count("no") == 200
    for r in recs[:50]:   # the label is really the answer to the skill
        symbols = [synthetic.SYMBOLS.index(w) for w in r["inputs"].split()]
        assert (r["targets"] == "yes") == synthetic.answer("contains", symbols)
    batch = synthetic.to_batch(recs[:4])
    assert batch["encoder_input_tokens"].shape == (4, 13)
    assert np.all(batch["decoder_input_tokens"][:, 0] == 0)


def test_prompt_tuning_selects_the_skill(capsys):
    result = quickstart.prompt_tune("contains", steps=150, prompt_length=8, batch_size=32, seed=0)
    assert result["before"] < 70.0         # percent; without the skill marker: near chance
    assert result["after"] >= 95.0         # the learned prompt selects the skill
    out = capsys.readouterr().out
    assert "val accuracy" in out and "before" in out
    # Evaluated every step at first: the curve shows the rise, not only its end.
    steps = [s for s, _ in result["curve"]]
    assert steps[:11] == list(range(11)) and steps[-1] == 150
    assert min(a for _, a in result["curve"][:3]) < 70.0 <= result["curve"][-1][1]
