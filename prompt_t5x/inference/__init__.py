"""inference — using a prompted frozen T5: decoding (greedy/beam/sampling over a KV cache), rank
classification, prompt ensembles, loading a prompted model, evaluation/inference over a task split,
and prompt neighbours.

May import: base, model, methods, parallel, data, checkpoints. Never training.
"""
