import pytest

from vfmbench.config import RunConfig, build_dataclass, config_hash, parse_set, resolve
from vfmbench.errors import UserError


def test_layers_compose_in_order():
    cfg = resolve([{"data": {"resolution": 64, "num_workers": 8}}, {"data": {"resolution": 128}}, parse_set("vfm.layers=[0, 12, -1]")])
    assert cfg.data.resolution == 128 and cfg.data.num_workers == 8
    assert cfg.vfm.layers == [0, 12, -1]


def test_unknown_key_names_key_and_suggestion():
    with pytest.raises(UserError) as e:
        resolve([parse_set("data.resolutoin=64")])
    assert "data.resolutoin" in str(e.value) and "resolution" in str(e.value)
    with pytest.raises(UserError, match="nonexistent"):
        resolve([parse_set("nonexistent.key=1")])


@pytest.mark.parametrize("item,msg", [
    ("data.resolution=abc", "integer"),
    ("data.resolution=1.5", "integer"),
    ("run.smoke=yes please", "true or false"),
    ("vfm.layers=3", "list"),
    ("data=5", "section"),
    ("tokenizer.train.lr=[1]", "number"),
])
def test_wrong_types_are_errors(item, msg):
    with pytest.raises(UserError, match=msg):
        resolve([parse_set(item)])


def test_set_values_parse_as_yaml():
    cfg = resolve([parse_set("tokenizer.train.lr=1e-4"), parse_set("run.smoke=true"), parse_set("diffusion.sample.cfg_interval=[0.1, 0.9]")])
    assert cfg.tokenizer.train.lr == 1e-4 and cfg.run.smoke is True and cfg.diffusion.sample.cfg_interval == [0.1, 0.9]
    with pytest.raises(UserError, match="key=value"):
        parse_set("no-equals-sign")


def test_unknown_stage_rejected():
    with pytest.raises(UserError, match="did you mean 'tokenizer'"):
        resolve([{"run": {"stages": ["tokeniser"]}}])


def test_config_hash_is_stable_and_sensitive():
    a, b = RunConfig().to_dict(), RunConfig().to_dict()
    assert config_hash(a) == config_hash(b)
    b["data"]["resolution"] = 128
    assert config_hash(a) != config_hash(b)


def test_build_dataclass_nested_defaults_are_independent():
    x = build_dataclass(RunConfig, {})
    y = build_dataclass(RunConfig, {})
    x.vfm.layers.append(1)
    assert y.vfm.layers == []
