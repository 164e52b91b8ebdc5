"""``prompt-t5x bench --peer peft``: ours, then the HF PEFT peer, each in a child process.

Children, not threads or one process: JAX keeps the accelerator memory it reserved until its
process exits, and each side must be pinned to the same cores from its first instruction
(``bench_protocol.pinned_python``) so neither framework's thread pools spill onto others. Ours
is written to ``--json`` before the peer starts, so a peer that fails or is killed never loses
ours. Both sides get the same core count, dtype and MFU peak, resolved here once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Sequence

from prompt_t5x.bench import bench_protocol as protocol
from prompt_t5x.bench import bench_report


def _child(module: str, argv: Sequence[str], json_path: str) -> Dict[str, Any]:
    """Run ``python -m module argv --json json_path``; its stdout/stderr pass through (its own
    block of figures among them). Pinned from its first instruction to the cores its
    ``--cpu_threads`` names, so no thread either framework starts runs elsewhere."""
    threads = int(argv[argv.index("--cpu_threads") + 1]) if "--cpu_threads" in argv else None
    cmd = protocol.pinned_python(protocol.cpu_cores(threads), module, [*argv, "--json", json_path])
    proc = subprocess.run(cmd, env=os.environ.copy())
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with status {proc.returncode}")
    with open(json_path) as f:
        return json.load(f)


def _strip_flags(argv: Sequence[str], names: Sequence[str]) -> List[str]:
    """``argv`` without the flags ``names`` (each taking a value, or a ``--peer_*`` switch)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in names:
            skip = True
            continue
        if a.startswith(tuple(f"{n}=" for n in names)) or a.startswith("--peer_"):
            continue
        out.append(a)
    return out


def run(args, argv: Sequence[str]) -> Dict[str, Any]:
    """``--peer peft``: ours, then the peer, each in a child process; both results."""
    if args.aot:
        raise protocol.usage_error("--aot compiles only; it cannot be combined with --peer")
    from prompt_t5x.bench import peft_peer
    peft_peer.check_available()
    # Both sides get the same explicit core count (default: every core this command may use)
    # and one MFU peak. Ours resolves the peak in its pinned child, in its resolved dtype (on a
    # CPU it measures a matmul on exactly the cores both sides use); the peer, which cannot
    # measure a JAX matmul, is handed that value. This process never starts JAX.
    threads = len(protocol.cpu_cores(args.cpu_threads))
    ours_argv = _strip_flags(argv, ("--peer", "--json", "--cpu_threads")) + [
        "--cpu_threads", str(threads)]
    with tempfile.TemporaryDirectory() as tmp:
        ours = _child("prompt_t5x.bench.bench", ours_argv, os.path.join(tmp, "ours.json"))
        peer_argv = _strip_flags(ours_argv, ("--profile", "--peak_flops")) + (
            ["--compile"] if args.peer_compile else []) + (
            ["--grad_ckpt"] if args.peer_grad_ckpt else [])
        peak = ours.get("config", {}).get("peak_flops")
        if peak is not None:
            peer_argv += ["--peak_flops", repr(peak)]
        print(f"MFU peak: {ours.get('peak_flops_source')} ({peak})", file=sys.stderr)
        if args.json:   # ours is kept even if the peer then fails or the run is killed
            bench_report.publish({"ours": ours, "peer": {"error": "not run yet"}}, args.json,
                                 quiet=True)
        try:
            peer = _child("prompt_t5x.bench.peft_peer", peer_argv, os.path.join(tmp, "peer.json"))
        except RuntimeError as e:
            peer = {"error": str(e)}
    return {"ours": ours, "peer": peer}
