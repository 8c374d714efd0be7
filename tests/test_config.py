"""Config parsing and validation: typed values, fractions, clear errors naming the key."""

from __future__ import annotations

import pytest

from bdat_ray.config import (
    Config,
    ConfigError,
    build_config,
    describe_keys,
    from_flat,
    leaf_keys,
    parse_value,
)

REQUIRED_KEYS = [
    "data.name",
    "data.path",
    "model.name",
    "model.width",
    "train.epochs",
    "train.batch_size",
    "train.lr",
    "train.seed",
    "device",
    "attack.name",
    "attack.poison_rate",
    "attack.target",
    "attack.label_mode",
    "attack.trigger",
    "at.threat",
    "at.eps",
    "at.steps",
    "at.step_size",
]


def test_required_keys_exist():
    assert set(REQUIRED_KEYS) <= set(leaf_keys())


def test_defaults_are_the_quickstart_and_paper_values():
    cfg = Config()
    assert (cfg.data.name, cfg.attack.name, cfg.at.threat) == ("digits", "badnets", "none")
    assert cfg.attack.target == 2  # CAT paper
    assert (cfg.train.lr, cfg.train.momentum, cfg.train.weight_decay) == (0.1, 0.9, 5e-4)


@pytest.mark.parametrize(
    ("key", "raw", "expected"),
    [
        ("at.eps", "8/255", 8 / 255),
        ("at.eps", " 16 / 255 ", 16 / 255),
        ("at.eps", "0.03", 0.03),
        ("at.eps", "1e-2", 0.01),
        ("at.eps", 0.5, 0.5),
        ("at.eps", "none", None),
        ("train.epochs", "7", 7),
        ("train.epochs", 7.0, 7),
        ("at.random_start", "false", False),
        ("at.random_start", "yes", True),
        ("at.threat", "none", "none"),  # a choice, not a null
        ("data.path", "null", None),
    ],
)
def test_values_are_parsed_by_type(key, raw, expected):
    assert parse_value(key, raw) == expected


@pytest.mark.parametrize(
    ("pairs", "key", "fragment"),
    [
        (["at.epz=0.1"], "at.epz", "did you mean at.eps"),
        (["train.epochs=ten"], "train.epochs", "integer"),
        (["train.epochs=2.5"], "train.epochs", "integer"),
        (["at.eps=__import__('os')"], "at.eps", "number"),
        (["at.eps=1/0"], "at.eps", "number"),
        (["at.eps=-0.1"], "at.eps", "≥ 0"),
        (["attack.poison_rate=1.5"], "attack.poison_rate", "[0, 1]"),
        (["attack.target=-1"], "attack.target", "≥ 0"),
        (["attack.name=trojan"], "attack.name", "one of"),
        (["at.threat=linf", "at.eps=0"], "at.eps", "> 0"),
        (["model.width=0"], "model.width", "> 0"),
        (["device=tpu"], "device", "cuda"),
        (["noequals"], "noequals", "KEY=VALUE"),
    ],
)
def test_bad_input_names_the_key(pairs, key, fragment):
    with pytest.raises(ConfigError) as err:
        build_config(None, pairs)
    assert err.value.key == key
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_yaml_nested_and_flat_keys_merge_with_overrides(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("train:\n  epochs: 3\nat.threat: linf\nat:\n  eps: 4/255\n")
    cfg = build_config(file, ["at.eps=2/255"])
    assert (
        cfg.train.epochs == 3 and cfg.at.threat == "linf" and cfg.at.eps == pytest.approx(2 / 255)
    )


def test_yaml_errors_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        build_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="mapping"):
        build_config(bad)


def test_flat_round_trip_and_hash():
    cfg = from_flat({"at.threat": "linf", "at.eps": "8/255", "train.epochs": 3})
    again = from_flat(cfg.to_flat())
    assert again == cfg and again.hash() == cfg.hash()
    assert cfg.replace({"train.epochs": 4}).hash() != cfg.hash()


def test_help_lists_every_key_with_default_and_unit():
    text = describe_keys()
    for key in leaf_keys():
        assert f"  {key}=" in text
    assert "attack.poison_rate=0.05 [fraction]" in text


def components(**flat):
    from bdat_ray.config import at_components

    return [(c.threat, c.eps, c.weight) for c in at_components(from_flat(flat).at)]


def test_single_threat_budget_precedence():
    assert components(**{"at.threat": "none"}) == []
    assert components(**{"at.threat": "linf"}) == [("linf", None, 1.0)]  # threat default
    assert components(**{"at.threat": "linf", "at.linf.eps": "4/255"}) == [("linf", 4 / 255, 1.0)]
    assert components(**{"at.threat": "linf", "at.eps": "8/255", "at.linf.eps": "4/255"}) == [
        ("linf", 8 / 255, 1.0)
    ]


def test_cat_preset_is_the_papers_composite():
    assert components(**{"at.threat": "cat"}) == [("linf", 2 / 255, 0.5), ("spatial", 0.025, 0.5)]


def test_composite_weights_one_float_sweeps_a_two_way_mix():
    flat = {
        "at.threat": "composite",
        "at.components": "linf,spatial",
        "at.linf.eps": "2/255",
        "at.spatial.eps": 0.05,
    }
    assert components(**flat) == [("linf", 2 / 255, 0.5), ("spatial", 0.05, 0.5)]
    weighted = components(**flat, **{"at.linf.weight": 0.3})
    assert [w for *_, w in weighted] == pytest.approx([0.3, 0.7])


@pytest.mark.parametrize(
    ("flat", "key"),
    [
        (
            {"at.threat": "composite", "at.components": "linf,spatial", "at.linf.eps": 0.01},
            "at.spatial.eps",
        ),
        ({"at.threat": "composite", "at.components": "linf,warp"}, "at.components"),
        ({"at.threat": "composite", "at.components": "linf"}, "at.components"),
        ({"at.threat": "cat", "at.eps": 0.1}, "at.eps"),
        ({"at.threat": "cat", "at.linf.weight": 0, "at.spatial.weight": 0}, "at.linf.weight"),
        ({"at.threat": "spatial", "at.eps": 0}, "at.eps"),
        ({"at.threat": "cat", "at.spatial.weight": -1}, "at.spatial.weight"),
    ],
)
def test_composite_errors_name_the_key(flat, key):
    with pytest.raises(ConfigError) as err:
        from_flat(flat)
    assert err.value.key == key
