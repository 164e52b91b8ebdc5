"""parallel — devices: meshes and T5X's logical-axis rules (``sharding``), partitioned functions
and weights (``partitioning``: one device is a 1x1 mesh), and multi-host setup (``distributed``).

May import: base, model, methods.
"""
