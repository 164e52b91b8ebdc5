"""Prompt interpretability (Lester et al. 2021, section 7): the vocabulary tokens nearest to each
soft-prompt vector by cosine similarity.

``prompt-t5x neighbors --prompt X.npy --checkpoint DIR [--vocab spm.model] [-k 5] [--json F]``
prints one line per prompt position. The prompt may also be a PEFT adapter or a training model
dir. The embedding table comes from a T5X checkpoint (only ``token_embedder/embedding`` is read),
a Hugging Face T5 dir (``shared.weight``), ``quickstart`` (the bundled tiny T5, whose tokens are
the words of ``prompt_t5x.data.synthetic``) or, with ``--embedding E.npy``, a ``[vocab, embed]``
array. Token strings come from a SentencePiece model; ids it does not know (T5's 28 padding rows
beyond the 32100 pieces) print as ``<id N>``.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from prompt_t5x.base.errors import UsageError

EMBEDDING_PARAM = "token_embedder/embedding"
QUICKSTART = "quickstart"
# Vocabulary rows per chunk: bounds the [P, chunk] similarity block for large vocabularies.
_VOCAB_CHUNK = 8192


def _unit_rows(x: jax.Array) -> jax.Array:
    """Rows scaled to unit L2 norm; an all-zero row stays zero (cosine 0 with everything)."""
    x = x.astype(jnp.float32)
    norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.where(norm > 0, norm, 1.0)


def nearest_tokens(prompt: np.ndarray, embedding: np.ndarray, k: int = 5
                   ) -> Tuple[np.ndarray, np.ndarray]:
    """For each prompt vector, the ``k`` vocabulary rows with the highest cosine similarity.

    Args:
      prompt: [P, D] soft prompt.
      embedding: [V, D] token embedding table.
      k: neighbours per prompt vector (<= V).
    Returns:
      (ids int32 [P, k], cosine similarities float32 [P, k]), most similar first.
    """
    prompt = np.asarray(prompt)
    embedding = np.asarray(embedding)
    if prompt.ndim != 2 or embedding.ndim != 2:
        raise ValueError(f"prompt must be [P, D] and embedding [V, D]; got {prompt.shape} and "
                         f"{embedding.shape}")
    if prompt.shape[1] != embedding.shape[1]:
        raise ValueError(f"prompt width {prompt.shape[1]} != embedding width {embedding.shape[1]}: "
                         "the prompt was trained for a different model size")
    if not 1 <= k <= embedding.shape[0]:
        raise ValueError(f"k={k} must be between 1 and the vocabulary size {embedding.shape[0]}")
    prompt_unit = _unit_rows(jnp.asarray(prompt))
    best_sims = np.full((prompt.shape[0], 0), -np.inf, np.float32)
    best_ids = np.zeros((prompt.shape[0], 0), np.int32)
    # Chunked over the vocabulary: keep a running top-k (candidates = previous best + chunk's).
    for start in range(0, embedding.shape[0], _VOCAB_CHUNK):
        chunk = jnp.asarray(embedding[start:start + _VOCAB_CHUNK])
        sims = np.asarray(prompt_unit @ _unit_rows(chunk).T)
        ids = np.broadcast_to(np.arange(start, start + chunk.shape[0], dtype=np.int32), sims.shape)
        all_sims = np.concatenate([best_sims, sims], axis=1)
        all_ids = np.concatenate([best_ids, ids], axis=1)
        # Stable sort on -similarity: ties keep the lower token id first.
        order = np.argsort(-all_sims, axis=1, kind="stable")[:, :k]
        best_sims = np.take_along_axis(all_sims, order, axis=1)
        best_ids = np.take_along_axis(all_ids, order, axis=1)
    return best_ids, best_sims.astype(np.float32)


def token_strings(ids: np.ndarray, vocab_path: Optional[str],
                  words: Optional[Sequence[str]] = None) -> List[List[str]]:
    """Token ids [P, k] -> SentencePiece pieces, or ``words[id]`` for a word vocabulary (the
    quickstart's); ``<id N>`` without either or for ids out of it."""
    if vocab_path is None:
        words = words or ()
        return [[words[int(i)] if int(i) < len(words) else f"<id {int(i)}>" for i in row]
                for row in ids]
    import sentencepiece as spm  # only this command needs it

    processor = spm.SentencePieceProcessor(model_file=vocab_path)
    size = processor.get_piece_size()
    return [[processor.id_to_piece(int(i)) if int(i) < size else f"<id {int(i)}>" for i in row]
            for row in ids]


def load_embedding(checkpoint: Optional[str], embedding_npy: Optional[str]) -> np.ndarray:
    """The [V, D] token embedding from a T5X checkpoint or a .npy file (exactly one given)."""
    if (checkpoint is None) == (embedding_npy is None):
        raise UsageError("give exactly one of --checkpoint (a T5X checkpoint) or --embedding "
                         "(a [vocab, embed] .npy)")
    if embedding_npy is not None:
        if not os.path.exists(embedding_npy):
            raise UsageError(f"--embedding {embedding_npy}: file not found")
        table = np.load(embedding_npy, allow_pickle=False)
        if table.ndim != 2:
            raise UsageError(f"--embedding {embedding_npy}: expected [vocab, embed], got "
                             f"shape {table.shape}")
        return table
    from prompt_t5x.checkpoints import bundled, hf_checkpoint, t5x_reader

    if checkpoint == QUICKSTART:
        # The committed tiny T5, a checkpoint name every other command takes too.
        try:
            _, params = bundled.load_asset()
        except FileNotFoundError as e:
            raise UsageError(f"--checkpoint quickstart: {e}") from None
        return np.asarray(params["token_embedder"]["embedding"], np.float32)
    if os.path.isdir(checkpoint) and hf_checkpoint.is_hf_t5_dir(checkpoint):
        try:
            state = hf_checkpoint.read_hf_state_dict(checkpoint)
        except (hf_checkpoint.HFCheckpointError, OSError, ValueError) as e:
            raise UsageError(f"--checkpoint {checkpoint}: {e}") from e
        if "shared.weight" not in state:
            raise UsageError(f"--checkpoint {checkpoint}: no 'shared.weight' tensor (the T5 "
                             "token embedding)")
        return np.asarray(state["shared.weight"], np.float32)
    try:
        ckpt = t5x_reader.open_checkpoint(checkpoint)
    except (t5x_reader.CheckpointError, OSError, ValueError) as e:
        raise UsageError(f"--checkpoint {checkpoint}: {e}") from e
    params = ckpt.params
    if EMBEDDING_PARAM not in params:
        raise UsageError(f"--checkpoint {checkpoint}: no {EMBEDDING_PARAM!r} parameter "
                         f"(found e.g. {sorted(params)[:3]}); is this a T5 checkpoint?")
    return params[EMBEDDING_PARAM].read((), np.float32)


def load_prompt(path: str) -> np.ndarray:
    """A .npy prompt, a PEFT prompt adapter or a training model dir (latest step)."""
    from prompt_t5x.checkpoints import prompt_export, train_checkpoints

    if not os.path.exists(path):
        raise UsageError(f"--prompt {path}: not found (give a .npy [length, embed], a PEFT "
                         "prompt adapter or a prompt_t5x training model dir)")
    try:
        return prompt_export.load_prompt(path)[0]
    except (prompt_export.ExportError, train_checkpoints.TrainCheckpointError, ValueError) as e:
        raise UsageError(f"--prompt {path}: {e}") from e


def format_table(ids: np.ndarray, sims: np.ndarray, pieces: Sequence[Sequence[str]]) -> str:
    lines = []
    width = len(str(len(ids) - 1))
    for pos, (row_pieces, row_sims) in enumerate(zip(pieces, sims)):
        cells = "  ".join(f"{p} ({s:.3f})" for p, s in zip(row_pieces, row_sims))
        lines.append(f"{str(pos).rjust(width)}: {cells}")
    return "\n".join(lines)
