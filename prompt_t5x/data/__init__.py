"""data — what a run reads: the SeqIO bridge (``seqio_bridge``, the only TensorFlow user, imported
lazily), generated offline tasks (``synthetic``), a run's train/eval streams (``run_data``), task
metrics and opening tasks by name (``task_registry``).

May import: base, model, methods, parallel, and the top-level ``tasks`` package (lazily).
"""
