"""The shared method checks (tests/method_contract.py) on prompt tuning, the reference method;
each other method's test file runs the same checks on itself. (Prompt tuning on 1x8 / 2x4 / 4x2
meshes: tests/test_sharding.py.)"""

import jax
import method_contract as contract
import pytest

from prompt_t5x.methods import prompt_init, registry
from prompt_t5x.methods.prompt_tuning import PromptTuning
from prompt_t5x.model import t5


@pytest.fixture(scope="module")
def setup():
    config = contract.tiny_config()
    frozen = contract.tiny_frozen(config)
    method = PromptTuning(t5.T5(config), prompt_length=3, prompt_mode="before_eos",
                          prompt_init=prompt_init.random_uniform_init())
    return method, frozen


def test_prompt_tuning_trains_only_its_prompt(setup):
    method, frozen = setup
    state = contract.check_trains_only_its_parameters(method, frozen)
    assert set(state.params) == {"prompt"}
    contract.check_config_round_trip(method, frozen, state.params)


def test_the_frozen_kernel_check_catches_model_tuning(setup):
    """The check must fail where frozen-shaped gradients exist: model tuning's kernels."""
    method, frozen = setup
    contract.check_no_frozen_kernel_gradient(method, frozen)
    tuned = registry.build(method.model, {"kind": "model_tuning"})
    with pytest.raises(AssertionError, match="frozen-kernel shape"):
        contract.check_no_frozen_kernel_gradient(tuned, {}, trainable=frozen)


def test_prompt_tuning_cached_decoding(setup):
    method, frozen = setup
    trainable = method.init_trainable(jax.random.PRNGKey(2), frozen)
    contract.check_cached_decoding(method, frozen, trainable)


def test_registry_rejects_unknown_methods_and_settings(setup):
    method, _ = setup
    with pytest.raises(registry.UnknownMethodError, match="unknown method 'nope'"):
        registry.build(method.model, {"kind": "nope"})
    with pytest.raises(registry.UnknownMethodError, match="bad settings"):
        registry.build(method.model, {"kind": "prompt_tuning", "prompt_lenght": 3})
