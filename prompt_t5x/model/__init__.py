"""model — T5 1.1 in flax.linen with a T5X checkpoint's parameter tree: config and size table,
layers, attention, and how prompts/prefixes enter the network (``prompt_inputs``).

May import: base. Knows nothing of training, methods or data.
"""
