"""bench — speed: the benchmark of the train step, rank classification and decoding, what it
shares with its HF PEFT peer (flags, timing, figures), exact FLOP counts and profile reports.

May import every wing below it: base, model, methods, parallel, data, checkpoints, inference,
training. Only ``commands`` sits above it (``prompt-t5x plan`` uses the FLOP counts).
"""
