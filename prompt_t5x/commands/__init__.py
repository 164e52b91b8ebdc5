"""commands — the command line: the ``prompt-t5x`` entry point, gin command lines and
configurables, and one module per command (train, eval/infer, quickstart, scaling, plan, tasks,
inspect, export, neighbors). The only wing that parses gin; ``bench`` keeps its own flags.

May import every other wing. Nothing imports it (the CLI names ``bench`` by module path only).
"""
