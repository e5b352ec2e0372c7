"""The recipe's configuration: paper defaults, YAML + dotted overrides, every key documented, one-sentence errors
with the closest known key or value."""

import pytest

from drlora.cli import main
from drlora.recipe.config import ConfigError, RunConfig, auto_growth_interval, describe, load_config


def test_defaults_are_the_papers():
    config = load_config()
    assert (config.train.learning_rate, config.train.lr_scheduler, config.train.warmup_ratio) == (2e-5, "linear", 0.03)
    assert config.train.batch_size * config.train.gradient_accumulation_steps == 48
    engine = config.drlora_config(3750)
    assert (engine.r_init, engine.r_target, engine.r_max, engine.growth_interval) == (8, 16, 32, 200)
    assert (engine.gamma, engine.beta_f, engine.beta_g) == (1.2, 0.9, 0.9)
    assert (engine.scaling, engine.lora_dropout) == (2.0, 0.1)
    assert engine.target_projections == ("up", "down") and engine.importance == "product"


@pytest.mark.parametrize("steps", [12, 40, 300, 3750])
def test_the_growth_schedule_scales_with_the_run_and_reaches_the_target(steps):
    schedule = load_config().drlora_config(steps).schedule()
    assert schedule.growth_interval == auto_growth_interval(steps)
    assert schedule.num_events * 3 >= 16 - 8  # every expert can reach r_target
    assert schedule.events[-1] <= steps - schedule.growth_interval


def test_yaml_then_overrides_in_order(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: /some/model\ntrain:\n  learning_rate: 1.0e-3\n  max_steps: 50\n"
                    "data:\n  train: [siqa, sports]\ndrlora:\n  r_target: 12\n")
    config = load_config(path, ["train.learning_rate=1e-4", "data.eval=[strategyqa]", "drlora.gamma=0",
                                "overwrite=true"])
    assert config.model == "/some/model" and config.train.max_steps == 50
    assert config.train.learning_rate == 1e-4  # a YAML string '1e-4' becomes the float the field wants
    assert config.data.train == ["siqa", "sports"] and config.data.eval == ["strategyqa"]
    assert config.drlora == {"r_target": 12, "gamma": 0} and config.overwrite is True
    assert config.drlora_config(100).r_target == 12


@pytest.mark.parametrize("override, message", [
    ("train.learnig_rate=1e-4", "unknown config key 'train.learnig_rate' (did you mean 'learning_rate'?)"),
    ("methd=dr-lora", "unknown config key 'methd' (did you mean 'method'?)"),
    ("method=drlora", "got 'drlora' (did you mean 'dr-lora'?)"),
    ("train.lr_scheduler=cosin", "did you mean 'cosine'?"),
    ("drlora.r_targt=12", "unknown config key 'drlora.r_targt' (did you mean 'r_target'?)"),
    ("drlora.importance=prod", "importance must be one of ('product', 'sum'), got 'prod' (did you mean 'product'?)"),
    ("train.batch_size=eight", "train.batch_size must be a number, got 'eight'"),
    ("train.batch_size=2.5", "train.batch_size must be an integer"),
    ("train.batch_size=0", "train.batch_size must be at least 1"),
    ("resume=maybe", "resume must be true or false"),
    ("data=siqa", "data is a section; set its keys"),
    ("drlora.r_target=64", "drlora.r_init <= drlora.r_target <= drlora.r_max"),
    ("train.max_steps", "is not key=value"),
])
def test_bad_keys_and_values_are_one_sentence(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_overwrite_and_resume_together_are_refused():
    with pytest.raises(ConfigError, match="contradict"):
        load_config(None, ["overwrite=true", "resume=true"])


def test_missing_and_invalid_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listed)


def test_every_key_is_documented_in_help_and_show(capsys):
    text = describe(RunConfig())
    for key in ("model:", "output_dir:", "learning_rate:", "eval_limit:", "r_target:", "growth_interval: auto",
                "gamma:", "mixed_precision:"):
        assert key in text
    assert all("#" in line for line in text.splitlines() if line.strip())  # every line carries its help
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "learning_rate: 2.0e-05  # Peak learning rate" in capsys.readouterr().out
    assert main(["config", "--show", "train.max_steps=7", "drlora.r_target=12"]) == 0
    shown = capsys.readouterr().out
    assert "max_steps: 7  #" in shown and "r_target: 12  #" in shown


def test_cli_config_error_is_exit_2(capsys):
    assert main(["config", "train.learnig_rate=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("drlora: error: unknown config key 'train.learnig_rate'") and "\n" not in err


@pytest.mark.parametrize("override, message", [
    ("drlora.r_init=20", "ranks must satisfy drlora.r_init <= drlora.r_target <= drlora.r_max, got drlora.r_init=20, "
                         "drlora.r_target=16, drlora.r_max=32."),
    ("drlora.signal=importanc", "drlora.signal must be one of ('routing*importance', 'importance', 'routing'), got "
                                "'importanc' (did you mean 'importance'?)."),
    ("drlora.lora_dropout=1.5", "drlora.lora_dropout must be in [0, 1), got 1.5."),
])
def test_drlora_section_errors_name_the_key_with_one_prefix(override, message, capsys):
    """DRLoRAConfig's own checks, with its field names spelt as the recipe's keys; the CLI adds the only prefix."""
    assert main(["train", override]) == 2
    assert capsys.readouterr().err == f"drlora: error: {message}\n"


def test_config_help_names_every_builtin_task():
    from drlora.builtin.tasks import TASKS

    (line,) = [line for line in describe(RunConfig()).splitlines() if line.strip().startswith("train: [")]
    assert f"builtin task names ({', '.join(TASKS)})" in line


def test_a_run_saved_before_a_key_existed_resumes_when_the_key_keeps_its_default():
    import yaml

    from drlora.recipe.config import RunConfig, to_yaml
    from drlora.recipe.run_dir import config_differences

    saved = yaml.safe_load(to_yaml(RunConfig()))
    del saved["train"]["gradient_checkpointing"], saved["drlora"]["adapter_dtype"]  # a folder of drlora 0.2
    assert config_differences(saved, RunConfig()) == []
    changed = RunConfig()
    changed.drlora = {"adapter_dtype": "base"}
    assert config_differences(saved, changed) == ["drlora.adapter_dtype was None, now 'base'"]
