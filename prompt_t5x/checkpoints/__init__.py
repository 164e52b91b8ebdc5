"""checkpoints — weights on disk: T5X legacy/Orbax reading and writing, lazy arrays and the one
strict load, Hugging Face T5 import/export, training-run checkpoints (trainable state + manifest),
prompt export (.npy, PEFT adapters), the bundled quickstart T5 and where frozen weights come from.

May import: base, model, methods, parallel, data.
"""
