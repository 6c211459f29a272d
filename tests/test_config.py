import pytest

from cortexcraft.cli import main
from cortexcraft.config import build_config, parse_overrides, preset_names
from cortexcraft.errors import CortexCraftError


def test_overrides_by_bare_name_and_by_section_get_their_types():
    config = build_config("cpu", ["n_layer=8", "train.lr=1e-3", "tie_weights=true", "top_p=null", "dtype=float32"])
    assert config.model.n_layer == 8 and config.train.lr == 1e-3 and config.model.tie_weights is True
    assert config.sample.top_p is None and config.train.dtype == "float32"
    assert config.preset == "cpu"


def test_overrides_as_a_nested_dict_as_flow_parameters_pass_them():
    config = build_config("micro", {"model": {"n_layer": 2}, "train": {"max_iters": 7}})
    assert (config.model.n_layer, config.train.max_iters, config.model.n_embd) == (2, 7, 384)


def test_every_preset_validates_and_keeps_untouched_defaults():
    for name in preset_names():
        config = build_config(name)
        assert config.preset == name
        assert config.model.ff_width == (config.model.d_ff or 4 * config.model.n_embd)


@pytest.mark.parametrize("overrides, message", [
    (["n_layr=3"], "unknown setting 'n_layr'"),
    (["seed=3"], "ambiguous; write it as one of train.seed, sample.seed"),
    (["n_layer"], "is not key=value"),
    (["optim.lr=1"], "unknown section 'optim'"),
    (["n_layer=0"], "model.n_layer: Input should be greater than 0"),
    (["norm=middle"], "model.norm: Input should be 'pre' or 'post'"),
    (["n_embd=100", "n_head=3"], "n_embd=100 is not divisible by n_head=3"),
])
def test_bad_overrides_give_one_line_errors_naming_the_problem(overrides, message):
    with pytest.raises(CortexCraftError) as info:
        build_config("cpu", overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_several_problems_are_reported_together():
    with pytest.raises(CortexCraftError) as info:
        build_config("cpu", ["lr=-1", "dropout=1.5"])
    assert "train.lr" in str(info.value) and "model.dropout" in str(info.value)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(CortexCraftError, match="unknown preset 'gpt5'.*cpu"):
        build_config("gpt5")


def test_parse_overrides_keeps_strings_that_are_not_json():
    assert parse_overrides(["source=/data/my file.txt", "prompts=[\"a\", \"b\"]"]) == {
        "data": {"source": "/data/my file.txt"}, "sample": {"prompts": ["a", "b"]}}


def test_the_cli_reports_a_bad_config_in_one_line_and_exits_2(tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--set", "n_head=7"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("cortexcraft train: error: invalid config:") and "n_head=7" in err
    assert "\n" not in err
    assert not (tmp_path / "run").exists()
