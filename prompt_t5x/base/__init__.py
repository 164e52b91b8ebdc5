"""base — the ground floor: the user-error type and exit-status policy, and storage paths.

Imports nothing of prompt_t5x. Everything else may import it.
"""
