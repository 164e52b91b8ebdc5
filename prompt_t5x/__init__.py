"""prompt_t5x: parameter-efficient prompt tuning of frozen T5 (T5X-compatible) in JAX/Flax.

Importing this package imports no TensorFlow: the model, train step and checkpoints run on
jax/flax/optax alone. SeqIO/TFDS are imported only by ``tasks/`` and
``prompt_t5x.data.seqio_bridge``.
"""

__version__ = "0.1.0"
