"""``prompt-t5x neighbors``: the vocabulary tokens nearest (cosine) to each soft-prompt vector.

The computation lives in ``prompt_t5x.inference.neighbors``; this is only the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List

from prompt_t5x.base.errors import UsageError
from prompt_t5x.data import synthetic
from prompt_t5x.inference import neighbors


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prompt-t5x neighbors",
        description="Nearest vocabulary tokens (cosine similarity) of every soft-prompt vector.")
    p.add_argument("--prompt", required=True,
                   help="prompt .npy [length, embed], PEFT adapter or training model dir")
    p.add_argument("--checkpoint", help="T5X checkpoint, HF T5 dir or 'quickstart' (the "
                                        "bundled tiny T5): its token embedding is searched")
    p.add_argument("--embedding", help="instead of --checkpoint: a [vocab, embed] .npy")
    p.add_argument("--vocab", help="SentencePiece model for token strings (default: print ids)")
    p.add_argument("-k", type=int, default=5, help="neighbours per prompt vector (default 5)")
    p.add_argument("--json", dest="json_path", help="also write the neighbours to this JSON file")
    return p


def main(argv: List[str]) -> int:
    args = _parser().parse_args(argv)
    prompt = neighbors.load_prompt(args.prompt)
    embedding = neighbors.load_embedding(args.checkpoint, args.embedding)
    if args.vocab is not None and not os.path.exists(args.vocab):
        raise UsageError(f"--vocab {args.vocab}: SentencePiece model not found")
    try:
        ids, sims = neighbors.nearest_tokens(prompt, embedding, args.k)
    except ValueError as e:
        raise UsageError(str(e)) from e
    # The quickstart model's vocabulary is the generated tasks' words, not a SentencePiece file.
    words = synthetic.WORDS if args.checkpoint == neighbors.QUICKSTART else None
    pieces = neighbors.token_strings(ids, args.vocab, words)
    print(neighbors.format_table(ids, sims, pieces))
    if args.json_path:
        rows = [{"position": pos, "neighbors": [
            {"id": int(i), "token": p, "cosine": float(s)} for i, p, s in zip(r_ids, r_p, r_s)]}
            for pos, (r_ids, r_p, r_s) in enumerate(zip(ids, pieces, sims))]
        with open(args.json_path, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"wrote {args.json_path}", file=sys.stderr)
    return 0
