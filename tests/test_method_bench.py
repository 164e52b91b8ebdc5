"""``prompt-t5x bench --method``: a registry method's train step against prompt tuning's."""

import json
import math

import pytest

from prompt_t5x.commands import cli
from prompt_t5x.model import t5

SMALL = ["--size", "test", "--batch", "2", "--encoder_len", "12", "--prompt_len", "4",
         "--decoder_len", "3", "--steps", "3", "--warmup", "1", "--rounds", "2"]


def test_model_tuning_against_prompt_tuning_alternated(tmp_path, capsys):
    out = tmp_path / "m.json"
    assert cli.main(["bench", "--method", "model_tuning", *SMALL, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ratio model_tuning / prompt_tuning (median step time):" in printed
    r = json.loads(out.read_text())
    cfg = t5.get_config("test")
    method, prompt = r["sides"]
    assert method["method_config"] == {"kind": "model_tuning"}
    assert prompt["method_config"] == {"kind": "prompt_tuning", "prompt_length": 4,
                                       "prompt_mode": "prepend"}
    assert method["trainable_parameters"] == cfg.num_params
    assert prompt["trainable_parameters"] == 4 * cfg.emb_dim
    # The same 8 input tokens; prompt tuning adds its 4 positions, model tuning none.
    assert (method["encoder_positions"], prompt["encoder_positions"]) == (8, 12)
    for side in (method, prompt):
        assert side["calls"] == 2 * 3 and 0 < side["min_s"] <= side["median_s"]
        assert math.isfinite(side["final_loss"])
    assert r["ratio_median_step_time"] == pytest.approx(method["median_s"] / prompt["median_s"])
    assert len(r["round_ratios"]) == 2
    # Every weight's gradient and Adafactor update against a [4, 32] prompt's: slower.
    assert r["ratio_median_step_time"] > 1.0


@pytest.mark.parametrize("flags, message", [
    (["--method", "prefix_tunning"], "--method 'prefix_tunning' unknown; choose from"),
    (["--method", "model_tuning", "--method_config", "{oops"], "is not JSON"),
    (["--method", "model_tuning", "--method_config", "{\"depth\": 2}"], "bad settings"),
    (["--method", "model_tuning", "--peer", "peft"], "runs without --peer"),
])
def test_method_usage_errors(capsys, flags, message):
    assert cli.main(["bench", *SMALL, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
