"""Config files and key=value overrides: every value is checked against its field's type."""

import pytest

from delvm.classify.train import ClassifyConfig
from delvm.cli import main
from delvm.configs import shipped_configs
from delvm.demo.pipeline import load_demo_config
from delvm.errors import DelvmError
from delvm.train.config import TrainConfig, load_config


def refused(*overrides: str, schema: type = TrainConfig) -> str:
    with pytest.raises(DelvmError) as err:
        load_config(None, list(overrides), schema=schema)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_the_issue_examples_are_refused_naming_key_value_and_type(capsys):
    assert refused("steps=ten") == "config: steps = 'ten' must be an integer"
    assert refused("micro_batch=2.5") == "config: micro_batch = 2.5 must be an integer"
    assert refused("data.store=2024") == (
        "config: data.store = 2024 must be a string (quote it to mean text)"
    )
    # On the command line: one line on stderr, exit status 2, nothing run.
    assert main(["train", "tiny", "steps=ten"]) == 2
    assert "tiny.toml: steps = 'ten' must be an integer" in capsys.readouterr().err


def test_a_config_file_is_checked_like_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('steps = 100\n[optim]\nlr = "fast"\n')
    with pytest.raises(DelvmError, match=r"run\.toml: optim\.lr = 'fast' must be a number"):
        load_config(path)


def test_bools_and_integers_do_not_stand_in_for_each_other():
    assert refused("steps=true") == "config: steps = true must be an integer"
    assert refused("compile=1") == "config: compile = 1 must be true or false"
    assert refused("optim.lr=false") == "config: optim.lr = false must be a number"


def test_integers_widen_to_floats_and_lists_to_tuples():
    config = load_config(None, ["optim.lr=1", "optim.betas=[0, 1]", "data.task_weights.pose=2"])
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
    assert config.optim.betas == (0.0, 1.0) and all(
        isinstance(b, float) for b in config.optim.betas
    )
    assert config.data.task_weights == {"pose": 2.0}
    assert isinstance(config.data.task_weights["pose"], float)


def test_nested_list_tuple_and_table_values_are_checked_element_by_element():
    assert refused("optim.betas=[0.9]") == "config: optim.betas = [0.9] must be a list of 2 values"
    assert refused("optim.betas=[0.9, 'x']") == "config: optim.betas[1] = 'x' must be a number"
    assert refused("stages=3") == "config: stages = 3 must be a list"
    assert refused("stages=[{'tasks': ['pose', 7], 'steps': 2}]") == (
        "config: stages[0].tasks[1] = 7 must be a string (quote it to mean text)"
    )
    assert refused("stages=[{'tasks': ['pose'], 'steps': 'two'}]") == (
        "config: stages[0].steps = 'two' must be an integer"
    )
    assert refused("data.task_weights.pose='heavy'") == (
        "config: data.task_weights.pose = 'heavy' must be a number"
    )
    assert refused("data=3").startswith("config: data = 3 must be a table")
    # model.overrides are ModelConfig fields, checked against ModelConfig's types and names.
    assert refused("model.overrides.num_layers=2.5") == (
        "config: model.overrides.num_layers = 2.5 must be an integer"
    )
    assert refused("model.overrides.num_codes='x'") == (
        "config: model.overrides.num_codes = 'x' must be an integer or nothing"
    )
    assert "['model.overrides.layers']" in refused("model.overrides.layers=2")
    config = load_config(None, ["model.overrides.num_codes=None", "model.overrides.rope_theta=500"])
    assert config.model.overrides == {"num_codes": None, "rope_theta": 500.0}


def test_stages_become_stage_sections():
    config = load_config(None, ["steps=4", "stages=[{'tasks': ['pose'], 'steps': 4}]"])
    assert config.stages[0].tasks == ["pose"] and config.stages[0].steps == 4


def test_classify_and_demo_configs_are_checked_too(tmp_path):
    message = refused("classifier.mean=[0.5, 0.5]", schema=ClassifyConfig)
    assert message == "config: classifier.mean = [0.5, 0.5] must be a list of 3 values"
    assert refused("data.toy.train=many", schema=ClassifyConfig) == (
        "config: data.toy.train = 'many' must be an integer"
    )
    with pytest.raises(DelvmError, match=r"scores\.queries = 2\.5 must be an integer"):
        load_demo_config("demo", ["scores.queries=2.5"])
    # The stages' own sections are tables of ToyWorldConfig, TokenizerTrainConfig, ... fields.
    with pytest.raises(DelvmError, match=r"^demo: world\.segmentation = 'ten' must be an integer"):
        load_demo_config("demo", ["world.segmentation=ten"])
    with pytest.raises(DelvmError, match=r"^demo: tokenizer\.hflip = 1 must be true or false"):
        load_demo_config("demo", ["tokenizer.hflip=1"])
    with pytest.raises(DelvmError, match=r"steps = 'ten' must be an integer"):
        load_demo_config("demo", ["train.steps=ten"])


def test_the_shipped_configs_of_these_loaders_load():
    loaders = {
        ("tiny", "paper_80m", "paper_300m", "paper_1b", "continual", "finetune", "kd_1b_to_300m"):
            load_config,
        ("classify_toy", "classify_imagenet"): lambda name: load_config(name, schema=ClassifyConfig),
        ("demo", "demo_full"): load_demo_config,
    }  # fmt: skip
    for names, load in loaders.items():
        assert set(names) <= set(shipped_configs())
        for name in names:
            load(name)
