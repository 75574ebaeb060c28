"""Run configuration: precedence, `--set` parsing, strict keys and types, every shipped config."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagetx.config import RunConfig, load_config, save_config
from imagetx.model.config import ConfigError, ModelConfig
from imagetx.storage.toml import parse_set, tomllib

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_defaults_are_valid_and_round_trip_through_toml(tmp_path):
    config = RunConfig()
    config.validate()
    save_config(config, tmp_path / "config.toml")
    assert load_config(tmp_path / "config.toml") == config
    assert RunConfig.from_dict(config.to_dict()) == config


def test_precedence_defaults_file_flags_set(tmp_path):
    path = write(tmp_path, "[train]\nlr = 1e-4\nbatch_size = 4\nseed = 7\n[model]\nn_layers = 2\n")
    config = load_config(
        path,
        flags={"train.batch_size": 8, "train.seed": None, "train.out": "somewhere"},
        sets=["train.batch_size=9", "model.image_size=[8, 8]"],
    )
    assert config.train.lr == 1e-4  # file over default
    assert config.train.seed == 7  # a flag left at None does not override
    assert config.train.out == "somewhere"  # flag over default
    assert config.train.batch_size == 9  # --set over flag over file
    assert config.model.n_layers == 2 and config.model.image_size == (8, 8)
    assert config.train.max_steps == RunConfig().train.max_steps


def test_set_values_are_toml_literals_or_strings():
    assert parse_set("train.lr=3e-4") == ("train.lr", 3e-4)
    assert parse_set("train.compile=false") == ("train.compile", False)
    assert parse_set("model.query_shape=[4, 8]") == ("model.query_shape", [4, 8])
    assert parse_set("train.device=cuda:1") == ("train.device", "cuda:1")
    assert parse_set('data.data_dir="/a b"') == ("data.data_dir", "/a b")
    assert load_config(sets=["train.max_minutes=5"]).train.max_minutes == 5.0  # int -> float field
    for bad in ("train.lr", "lr=1", "a.b.c=1", ".x=1"):
        with pytest.raises(ConfigError, match="section.key=value"):
            parse_set(bad)


def test_every_problem_is_reported_and_names_its_key(tmp_path):
    path = write(tmp_path, "[trian]\nlr = 1\n[train]\nlrr = 1\nbatch_size = 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, sets=["model.n_heads=5", "train.precision=fp8", "data.num_workers=true"])
    problems = info.value.problems
    text = "\n".join(problems)
    assert "unknown section [trian]" in text and "did you mean train?" in text
    assert "unknown key train.lrr" in text and "did you mean train.lr?" in text
    assert "train.batch_size must be >= 1" in text
    assert "must be divisible by model.n_heads (5)" in text
    assert "train.precision must be one of auto, fp32, bf16" in text
    assert "data.num_workers must be an integer, got True" in text
    assert len(problems) == 6


def test_wrong_types_and_cross_section_problems():
    with pytest.raises(ConfigError, match=r"model.image_size must be a list of 2 integers, got \[16\]"):
        load_config(sets=["model.image_size=[16]"])
    with pytest.raises(ConfigError, match="train.lr must be a number, got 'fast'"):
        load_config(sets=["train.lr=fast"])
    with pytest.raises(ConfigError, match=r"data.task is \"superres\" but model.source_size is not set"):
        load_config(sets=['data.task="superres"'])
    config = load_config(sets=["data.task=superres", "model.source_size=[4, 4]", "model.encoder_layers=1"])
    assert config.model.source_size == (4, 4)
    superres = ["data.task=superres", "model.source_size=[4, 4]", "model.encoder_layers=1", "model.consistent=true"]
    assert load_config(sets=superres).model.consistent
    with pytest.raises(ConfigError, match="model.consistent needs an input that is its target area-downsampled"):
        load_config(sets=[*superres, "data.name=celeba", "data.celeba_protocol=true"])
    with pytest.raises(ConfigError, match=r"model.image_size \(12, 12\) to be a multiple of model.source_size \(5, 5\)"):
        load_config(sets=[*superres, "model.source_size=[5, 5]"])
    with pytest.raises(ConfigError, match='model.consistent needs output = "categorical"'):
        load_config(sets=[*superres, "model.output=dmol"])


def test_range_input_needs_a_consistent_categorical_model():
    superres = ["data.task=superres", "model.source_size=[4, 4]", "model.encoder_layers=1"]
    assert load_config(sets=[*superres, "model.consistent=true", "model.range_input=true"]).model.range_input
    needs = r'model.range_input needs model.consistent = true and output = "categorical"'
    with pytest.raises(ConfigError, match=needs):
        load_config(sets=[*superres, "model.range_input=true"])
    with pytest.raises(ConfigError, match=needs):  # consistent's own problem, and range_input's
        load_config(sets=[*superres, "model.consistent=true", "model.range_input=true", "model.output=dmol"])
    with pytest.raises(ConfigError, match=needs):
        load_config(sets=["model.range_input=true"])
    with pytest.raises(ConfigError, match="model.range_input must be true or false, got 1"):
        ModelConfig(source_size=(4, 4), encoder_layers=1, consistent=True, range_input=1)


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[train\n"))


SHIPPED = [
    "quickstart", "fashion_mnist", "cifar10", "cifar10_dmol", "cifar10_2d",
    "imagenet32", "imagenet64_1d", "imagenet64_2d", "cifar10_relative",
]


def test_every_shipped_config_loads_validates_and_sets_every_key():
    found = sorted(p.stem for p in CONFIGS.glob("*.toml"))
    assert set(SHIPPED) <= set(found)
    all_keys = {s: set(v) for s, v in RunConfig().to_dict().items()}
    for stem in found:
        path = CONFIGS / f"{stem}.toml"
        load_config(path).validate()
        raw = tomllib.loads(path.read_text())
        for section, keys in all_keys.items():
            optional = {"data_dir", "builtin_size", "source_size", "cache_dir"}  # None: left out of TOML
            missing = keys - set(raw.get(section, {})) - optional
            assert not missing, f"{path.name} leaves [{section}] {sorted(missing)} implicit"
        text = path.read_text()
        assert f"train --config configs/{stem}.toml" in text.split("[model]")[0], f"{path.name}: no launch command"


def test_quickstart_file_is_the_default():
    assert load_config(CONFIGS / "quickstart.toml") == RunConfig()


def test_a_seed_out_of_range_names_the_range():
    with pytest.raises(ConfigError, match=r"train.seed must be an integer in \[0, 9223372036854775807\]"):
        load_config(sets=["train.seed=100000000000000000000"])


def test_a_config_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('[train]\nout = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.toml is not UTF-8 text"):
        load_config(path)


# Each file in configs/ is complete: every key, with its comment, so a file is the whole run and
# can be copied and edited alone (TOML has no includes, and a base file would hide what a run
# used). The cost is repetition, and what keeps the copies honest is this table: a variant differs
# from the config it is a variant of in these keys and no others.
VARIANTS = {
    ("cifar10", "cifar10_2d"): {"model.attention", "model.block_length", "train.out"},
    ("cifar10", "cifar10_relative"): {"model.relative", "train.out"},
    ("cifar10", "cifar10_dmol"): {"model.output", "model.d_model", "model.n_heads", "model.d_ff", "model.attention_dim",
                                  "model.dropout", "model.positional", "train.batch_size", "train.lr", "train.out"},
    ("cifar10", "imagenet32"): {"data.name", "model.dropout", "train.eval_every", "train.out"},
    ("imagenet64_1d", "imagenet64_2d"): {"model.attention", "model.block_length", "model.query_shape",
                                         "model.memory_flange", "train.out"},
    ("celeba_superres_1d", "celeba_superres_2d"): {"model.attention", "model.block_length", "model.query_shape",
                                                   "model.memory_flange", "model.n_layers", "model.encoder_layers",
                                                   "train.batch_size", "train.out"},
    ("fashion_mnist", "fashion_mnist_classes"): {"model.num_classes", "train.max_steps", "train.max_minutes",
                                                 "train.cooldown", "train.eval_every", "train.out"},
    ("fashion_mnist", "fashion_mnist_superres"): {"data.task", "model.source_size", "model.encoder_layers",
                                                  "model.source_skip", "model.consistent", "model.range_input",
                                                  "train.ema", "train.out"},
}


@pytest.mark.parametrize("base, variant", sorted(VARIANTS), ids=lambda v: v)
def test_a_variant_config_differs_only_where_intended(base, variant):
    root = Path(__file__).resolve().parents[1] / "configs"

    def flat(name):
        return {f"{s}.{k}": v for s, values in load_config(root / f"{name}.toml").to_dict().items() for k, v in values.items()}

    a, b = flat(base), flat(variant)
    assert {k for k in a if a[k] != b[k]} == VARIANTS[(base, variant)]
