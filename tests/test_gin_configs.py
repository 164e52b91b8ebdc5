"""Every gin file parses (with its includes) and resolves to the documented run settings."""

import pathlib

import gin
import pytest

from prompt_t5x.commands import configurables, gin_cli, run_train, scaling  # noqa: F401  (register 'train' and 'scaling')
from prompt_t5x.model import t5

GIN_DIR = pathlib.Path(__file__).resolve().parents[1] / "gin"
ALL_FILES = sorted(str(p.relative_to(GIN_DIR)) for p in GIN_DIR.rglob("*.gin"))
MODEL_SIZES = ("tiny", "small", "base", "large", "xl", "xxl")


def test_the_expected_files_exist():
    for name in ([f"models/{s}.gin" for s in MODEL_SIZES]
                 + [f"runs/{r}.gin" for r in ("prompt_tuning", "model_tuning", "lm_adaptation",
                                               "scaling")]
                 + [f"prompts/{p}.gin" for p in ("class_labels", "sampled_vocab",
                                                  "random_uniform", "from_file")]):
        assert name in ALL_FILES, name


@pytest.mark.parametrize("name", ALL_FILES)
def test_every_gin_file_parses_with_its_includes(name):
    gin_cli.register_configurables()
    gin.clear_config()
    gin.add_config_file_search_path(str(GIN_DIR))
    gin.parse_config_files_and_bindings([str(GIN_DIR / name)], [], finalize_config=False)
    text = (GIN_DIR / name).read_text()
    # A header comment gives the command to run it.
    header = text[:text.index("\n\n")] if "\n\n" in text else text
    assert header.startswith("#") and "prompt-t5x " in header, name


@pytest.mark.parametrize("size", MODEL_SIZES)
def test_model_files_take_sizes_from_the_size_table(size):
    gin_cli.parse(gin_cli.split_argv([f"--gin_file=models/{size}.gin",
                                      "--gin_file=runs/prompt_tuning.gin",
                                      "--gin.MODEL_DIR=/tmp/never_created", "--gin.TASK=x"]))
    run = gin_cli.call(run_train.train_config)
    assert run.model == t5.SIZES[size].replace(dropout_rate=0.1)
    for line in (GIN_DIR / "models" / f"{size}.gin").read_text().splitlines():
        # No dimension is restated in the model files: the size table is the one source.
        assert not line.strip().startswith(("t5.get_config.emb_dim", "t5.get_config.mlp_dim")), line


def test_prompt_tuning_defaults_are_the_paper_recipe():
    gin_cli.parse(gin_cli.split_argv(["--gin_file=models/base.gin",
                                      "--gin_file=runs/prompt_tuning.gin",
                                      "--gin.MODEL_DIR='/tmp/never_created'",
                                      "--gin.TASK='super_glue_rte_v102'"]))
    run = gin_cli.call(run_train.train_config)
    assert run.method == configurables.MethodSpec(
        "prompt_tuning", 100, "prepend", configurables.PromptInitSpec("class_labels"))
    assert (run.batch_size, run.inputs_length, run.targets_length) == (32, 512, 8)
    assert run.loop.train_steps == 30000 and run.loop.checkpoint_every == 1000
    assert run.model.dropout_rate == 0.1
    assert gin.query_parameter("%LEARNING_RATE") == 0.3
    assert run.checkpoint.endswith("t5_1_1_lm100k_base/checkpoint_1100000")


def test_prompt_init_files_override_the_run_default():
    for init, kind in (("sampled_vocab", "sampled_vocab"), ("random_uniform", "random_uniform")):
        gin_cli.parse(gin_cli.split_argv(["--gin_file=models/tiny.gin",
                                          "--gin_file=runs/prompt_tuning.gin",
                                          f"--gin_file=prompts/{init}.gin",
                                          "--gin.MODEL_DIR=/tmp/x", "--gin.TASK=t"]))
        assert gin_cli.call(run_train.train_config).method.prompt_init.kind == kind
    gin_cli.parse(gin_cli.split_argv(["--gin_file=models/tiny.gin",
                                      "--gin_file=runs/prompt_tuning.gin",
                                      "--gin_file=prompts/from_file.gin",
                                      "--gin.PROMPT_FILE=/p.npy",
                                      "--gin.MODEL_DIR=/tmp/x", "--gin.TASK=t"]))
    assert gin_cli.call(run_train.train_config).method.prompt_init == \
        configurables.PromptInitSpec("from_file", path="/p.npy")


def test_model_tuning_and_scaling_files_resolve():
    gin_cli.parse(gin_cli.split_argv(["--gin_file=models/small.gin",
                                      "--gin_file=runs/model_tuning.gin",
                                      "--gin.MODEL_DIR=/tmp/x", "--gin.TASK=t"]))
    assert gin_cli.call(run_train.train_config).method.kind == "model_tuning"
    gin_cli.parse(gin_cli.split_argv(["--gin_file=runs/scaling.gin"]))
    cfg = gin_cli.call(scaling.scaling_config)
    assert list(cfg.runs) == ["Prompt tuning", "Model tuning"]
    assert cfg.runs["Prompt tuning"].method.kind == "prompt_tuning"
    assert cfg.runs["Model tuning"].method.kind == "model_tuning"
    assert cfg.pretrain.task == "synthetic_marked"
    sizes = [scaling.model_config(m, 0.0).emb_dim for m in cfg.models]
    assert sizes == [32, 64, 128]


@pytest.mark.parametrize("value, text", [("3", "3"), ("/tmp/x", "'/tmp/x'"), ("'x'", "'x'"),
                                         ("None", "None"), ("[1, 2]", "[1, 2]"),
                                         ("local_glue_sst2", "'local_glue_sst2'"),
                                         ("@methods.model_tuning()", "@methods.model_tuning()")])
def test_command_line_values_are_literals_or_strings(value, text):
    assert gin_cli.literal_or_string(value) == text


def test_split_argv_separates_gin_flags():
    args = gin_cli.split_argv(["--gin_file", "a.gin", "--gin_file=b.gin", "--gin.X=1",
                               "--gin_search_paths=/p,/q", "--plot_only"])
    assert args.files == ["a.gin", "b.gin"] and args.bindings == [("X", "1")]
    assert args.search_paths == ["/p", "/q"] and args.rest == ["--plot_only"]
