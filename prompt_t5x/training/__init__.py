"""training — the optimizer (Adafactor, T5X semantics), the train state and pure train step, the
partitioned run (``sharded_run``), the non-finite-guarded step, validation, the training loop and
its metrics writer.

May import: base, model, methods, parallel, data, checkpoints, inference (for validation).
"""
