"""Prompt neighbours: the chunked top-k cosine search against brute-force numpy, on the released
SST-2 prompt; and the command on the real tiny T5X checkpoint and vocabulary."""

import json

import numpy as np
import pytest

from prompt_t5x.commands import cli
from prompt_t5x.inference import neighbors


def _brute_force(prompt, embedding, k):
    p = prompt / np.linalg.norm(prompt, axis=1, keepdims=True)
    e = embedding / np.linalg.norm(embedding, axis=1, keepdims=True)
    sims = p @ e.T
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(sims, ids, axis=1)


def test_released_prompt_against_random_embedding(fixtures_dir, monkeypatch):
    prompt = np.load(fixtures_dir / "prompts" / "t5_1_1_lm100k_base_sst2.npy")
    assert prompt.shape == (100, 768)
    rng = np.random.default_rng(0)
    embedding = rng.normal(size=(20000, 768)).astype(np.float32)
    # Plant exact matches: rows 12345 and 777 are scaled copies of prompt vectors 3 and 50
    # (cosine 1: each must be its vector's nearest token whatever the scale).
    embedding[12345] = 7.0 * prompt[3]
    embedding[777] = 0.01 * prompt[50]
    monkeypatch.setattr(neighbors, "_VOCAB_CHUNK", 4096)  # several chunks, one partial
    ids, sims = neighbors.nearest_tokens(prompt, embedding, k=5)
    want_ids, want_sims = _brute_force(prompt.astype(np.float64), embedding.astype(np.float64), 5)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(sims, want_sims, rtol=1e-5, atol=1e-5)
    assert ids[3, 0] == 12345 and ids[50, 0] == 777
    assert sims[3, 0] == pytest.approx(1.0, abs=1e-5)
    assert (np.diff(sims, axis=1) <= 0).all()


def test_ties_and_zero_rows():
    embedding = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 0.0], [-1.0, 0.0]])
    ids, sims = neighbors.nearest_tokens(np.array([[3.0, 0.0], [0.0, 0.0]]), embedding, k=3)
    assert ids[0].tolist() == [0, 1, 2]          # equal cosines: lower id first
    np.testing.assert_allclose(sims[0], [1.0, 1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(sims[1], [0.0, 0.0, 0.0], atol=1e-6)  # a zero prompt vector
    with pytest.raises(ValueError, match="different model size"):
        neighbors.nearest_tokens(np.zeros((2, 3)), embedding, k=1)
    with pytest.raises(ValueError, match="k=6"):
        neighbors.nearest_tokens(np.zeros((2, 2)), embedding, k=6)


def test_token_strings_with_real_vocab(fixtures_dir):
    vocab = str(fixtures_dir / "vocab" / "t5_cc_all_32000_100extra.spm.model")
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=vocab)
    great = sp.piece_to_id("▁great")
    pieces = neighbors.token_strings(np.array([[great, 1, 32127]]), vocab)
    assert pieces == [["▁great", "</s>", "<id 32127>"]]
    assert neighbors.token_strings(np.array([[5]]), None) == [["<id 5>"]]


def test_command_on_real_checkpoint(fixtures_dir, tmp_path, capsys):
    ckpt = str(fixtures_dir / "t5x" / "t5_1_1_tiny_checkpoint_3")
    vocab = str(fixtures_dir / "vocab" / "t5_cc_all_32000_100extra.spm.model")
    from prompt_t5x.checkpoints import t5x_reader
    table = t5x_reader.open_checkpoint(ckpt).params["token_embedder/embedding"].read()
    prompt = np.stack([table[1000], -table[42], table[7] + 1e-3])  # [3, 4]
    np.save(tmp_path / "p.npy", prompt)
    out_json = tmp_path / "n.json"
    code = cli.main(["neighbors", "--prompt", str(tmp_path / "p.npy"), "--checkpoint", ckpt,
                     "--vocab", vocab, "-k", "3", "--json", str(out_json)])
    assert code == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 3 and printed[0].startswith("0: ")
    rows = json.loads(out_json.read_text())
    want_ids, want_sims = _brute_force(prompt.astype(np.float64), table.astype(np.float64), 3)
    for row, ids, sims in zip(rows, want_ids, want_sims):
        assert [n["id"] for n in row["neighbors"]] == ids.tolist()
        np.testing.assert_allclose([n["cosine"] for n in row["neighbors"]], sims, atol=1e-5)
    assert rows[0]["neighbors"][0]["id"] == 1000
    import sentencepiece as spm
    assert rows[0]["neighbors"][0]["token"] == spm.SentencePieceProcessor(
        model_file=vocab).id_to_piece(1000)
    assert rows[0]["neighbors"][0]["token"] in printed[0]


def test_command_on_hf_dir(tmp_path, capsys):
    import jax

    from prompt_t5x.checkpoints import hf_checkpoint
    from prompt_t5x.model import t5
    config = t5.get_config("test")
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape).astype(np.float32),
                                    t5.param_shapes(config))
    hf_checkpoint.save_hf_t5(str(tmp_path / "hf"), params, config)
    table = params["token_embedder"]["embedding"]
    np.save(tmp_path / "p.npy", table[[17, 60]] * 3.0)
    assert cli.main(["neighbors", "--prompt", str(tmp_path / "p.npy"), "--checkpoint",
                     str(tmp_path / "hf"), "-k", "2", "--json", str(tmp_path / "n.json")]) == 0
    rows = json.loads((tmp_path / "n.json").read_text())
    want_ids, _ = _brute_force(table[[17, 60]].astype(np.float64), table.astype(np.float64), 2)
    assert [[n["id"] for n in r["neighbors"]] for r in rows] == want_ids.tolist()
    assert rows[0]["neighbors"][0]["id"] == 17 and rows[1]["neighbors"][0]["token"] == "<id 60>"
    capsys.readouterr()


def test_command_errors(fixtures_dir, tmp_path, capsys):
    ckpt = str(fixtures_dir / "t5x" / "t5_1_1_tiny_checkpoint_3")
    np.save(tmp_path / "wide.npy", np.zeros((2, 8), np.float32))
    cases = [
        (["--prompt", str(tmp_path / "missing.npy"), "--checkpoint", ckpt], "missing.npy"),
        (["--prompt", str(tmp_path / "wide.npy"), "--checkpoint", str(tmp_path / "nockpt")],
         "nockpt"),
        (["--prompt", str(tmp_path / "wide.npy"), "--checkpoint", ckpt], "different model size"),
        (["--prompt", str(tmp_path / "wide.npy")], "exactly one of"),
    ]
    for argv, needle in cases:
        assert cli.main(["neighbors"] + argv) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, (needle, err)
