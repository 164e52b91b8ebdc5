"""The matmul probe's reading of compiled HLO: every dot as a canonical [b, M, K] x [b, K, N]."""

import math

import jax
import jax.numpy as jnp

from prompt_t5x.bench import flops, matmul_probe


def test_dots_become_canonical_batched_matmuls_with_the_hlo_flops():
    def f(q, k, w):
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k)        # batch (b, h), M q, K d, N k
        return jnp.einsum("bhqk,kn->bhqn", scores, w)        # no batch, M b*h*q, K k, N n

    q = jax.ShapeDtypeStruct((2, 5, 3, 7), jnp.float32)
    k = jax.ShapeDtypeStruct((2, 11, 3, 7), jnp.float32)
    w = jax.ShapeDtypeStruct((11, 13), jnp.float32)
    text = jax.jit(f).lower(q, k, w).compile().as_text()
    problems = matmul_probe.matmul_problems(text)
    assert problems == {(6, 5, 7, 11): 1, (1, 30, 11, 13): 1}, problems
    assert sum(2 * math.prod(p) * n for p, n in problems.items()) == flops.hlo_dot_flops(text)


def test_a_train_step_counts_every_matmul_of_the_analytic_flops():
    from prompt_t5x.bench import bench_protocol
    args = bench_protocol.build_parser().parse_args(
        ["--size", "tiny", "--batch", "2", "--encoder_len", "12", "--prompt_len", "4",
         "--decoder_len", "3", "--dtype", "float32", "--param_dtype", "float32"])
    problems = matmul_probe.step_problems(args)
    cfg = bench_protocol.model_config(args)
    total = sum(2 * math.prod(p) * n for p, n in problems.items())
    assert total == flops.train_step_flops(cfg, 2, 12, 3).total
