"""methods — what is trainable and how it enters the frozen T5: the ``Method`` interface
(``interface``), prompt initializers, and one module per method (prompt tuning, model tuning, ...).

May import: base, model. The train step, checkpoints, evaluation, decoding and sharding talk to
``interface.Method`` only, so a new method is a new module here, never a new train step.
"""
