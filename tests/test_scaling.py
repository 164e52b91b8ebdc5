"""``prompt-t5x scaling``: a tiny sweep (2 sizes x 2 methods, a few steps) -> CSV rows + PNG."""

import math

from prompt_t5x.commands import cli, scaling
from prompt_t5x.model import t5

MODELS = ("[{'name': 'd16', 'size': 'tiny', 'vocab_size': 32, 'emb_dim': 16, 'num_heads': 2, "
          "'head_dim': 8, 'mlp_dim': 24, 'num_encoder_layers': 1, 'num_decoder_layers': 1}, "
          "{'name': 'd32', 'size': 'tiny', 'vocab_size': 32, 'emb_dim': 32, 'num_heads': 2, "
          "'head_dim': 8, 'mlp_dim': 48, 'num_encoder_layers': 1, 'num_decoder_layers': 1}]")


def test_tiny_scaling_sweep_writes_csv_and_png(tmp_path, capsys):
    out = tmp_path / "scaling"
    argv = ["scaling", "--gin_file=runs/scaling.gin", f"--gin.OUTPUT_DIR={out}",
            f"--gin.MODELS={MODELS}", "--gin.PRETRAIN_STEPS=2", "--gin.TRAIN_STEPS=2",
            "--gin.EVAL_EVERY=2", "--gin.PROMPT_LENGTH=4", "--gin.BATCH_SIZE=8",
            "--gin.pretrain/train.batch_size=8", "--gin.train.progress_bar=False"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out / 'scaling.csv'}" in printed

    rows = scaling.read_csv(str(out / "scaling.csv"))
    assert [(r["method"], r["model"]) for r in rows] == [
        ("Prompt tuning", "d16"), ("Model tuning", "d16"),
        ("Prompt tuning", "d32"), ("Model tuning", "d32")]
    for row in rows:
        emb = 16 if row["model"] == "d16" else 32
        config = t5.get_config("tiny", vocab_size=32, emb_dim=emb, num_heads=2, head_dim=8,
                               mlp_dim=emb * 3 // 2, num_encoder_layers=1, num_decoder_layers=1)
        assert row["model_parameters"] == config.num_params
        expected = 4 * emb if row["method"] == "Prompt tuning" else config.num_params
        assert row["trainable_parameters"] == expected
        assert row["metric"] == "accuracy" and row["status"] == "ok"
        assert 0.0 <= row["best_value"] <= 100.0 and not math.isnan(row["best_value"])
        assert int(row["last_step"]) == 2
        # Both methods start from this size's pretrained weights.
        assert (out / "pretrain" / row["model"] / "checkpoints" / "2").is_dir()

    png = (out / "scaling.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000

    # Re-drawing from the CSV alone works and gives the same figure size.
    (out / "scaling.png").unlink()
    assert cli.main(argv + ["--plot_only"]) == 0
    assert (out / "scaling.png").read_bytes()[:4] == b"\x89PNG"
