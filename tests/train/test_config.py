"""se3tutor.train.config: every option is written once, in TrainConfig, and the command line
is derived from it."""

import dataclasses

import pytest

from se3tutor.train.config import SetupError, TrainConfig, check_config, config_from_args, parser


def test_the_command_line_without_arguments_gives_the_default_config():
    assert config_from_args([]) == TrainConfig()


def test_every_field_is_a_flag_with_the_fields_help():
    actions = {action.dest: action for action in parser()._actions}
    for field in dataclasses.fields(TrainConfig):
        assert field.name in actions, field.name
        assert actions[field.name].help == field.metadata["help"]
        assert actions[field.name].option_strings[0] == "--" + field.name.replace("_", "-")


def test_flags_parse_to_the_fields_types():
    config = config_from_args(
        ["--shells", "2", "3", "4", "--lr", "0.5", "--threads", "3", "--no-resume", "--amp"]
    )
    assert config.shells == (2, 3, 4) and config.lr == 0.5 and config.threads == 3
    assert config.resume is False and config.amp is True


def test_choices_come_from_the_fields_metadata():
    with pytest.raises(SystemExit):
        config_from_args(["--dtype", "float16"])


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(epochs=0), "epochs must be >= 1"),
        (dict(lr=-1.0), "lr must be > 0"),
        (dict(irreps_hidden="8x1o"), "need 0e"),
        (dict(validation_fraction=1.0), r"validation_fraction must be in \[0, 1\)"),
    ],
)
def test_check_config_names_the_bad_option(change, message):
    with pytest.raises(SetupError, match=message):
        check_config(dataclasses.replace(TrainConfig(), **change))
