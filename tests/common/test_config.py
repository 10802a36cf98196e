"""RunConfig / SiteConfig: coercion, defaults and one error listing every problem."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from common.config import RunConfig
from common.config_fields import ConfigError
from common.site_config import SiteConfig

ROOT = Path(__file__).resolve().parents[2]


class TestRunConfig:
    def test_defaults_match_pyproject(self):
        with open(ROOT / "pyproject.toml", "rb") as fh:
            table = tomllib.load(fh)["tool"]["flwr"]["app"]["config"]
        assert RunConfig.from_mapping(table) == RunConfig()
        assert set(table) == set(RunConfig().to_mapping())

    def test_coerces_cli_strings(self):
        cfg = RunConfig.from_mapping({"num-server-rounds": "5", "dp": "false", "labels": "a, b ,c", "task": "multiclass"})
        assert cfg.num_server_rounds == 5 and cfg.dp is False
        assert cfg.labels == ("a", "b", "c") and cfg.num_outputs == 3

    def test_every_problem_listed_at_once(self):
        with pytest.raises(ConfigError) as info:
            RunConfig.from_mapping({"model": "resnet", "image-size": 8, "batch-size": "x", "bogus": 1})
        msg = str(info.value)
        assert len(info.value.problems) == 4  # unknown key, bad int, bad model, bad size
        assert "bogus" in msg and "batch-size" in msg
        with pytest.raises(ConfigError) as info:
            RunConfig.from_mapping({"model": "resnet", "image-size": 8, "strategy": "fedsgd", "delta": 0.5})
        assert len(info.value.problems) == 4
        for key in ("model", "image-size", "strategy", "delta"):
            assert f"`{key}`" in str(info.value)

    def test_binary_needs_exactly_one_label(self):
        with pytest.raises(ConfigError, match="exactly one positive"):
            RunConfig.from_mapping({"labels": "a,b"})

    def test_operating_point_is_validated_with_the_rest(self):
        """Issue 20: the rule for the exported threshold is a run setting, checked in one place."""
        cfg = RunConfig.from_mapping({"operating-point": "sensitivity:0.95"})
        assert cfg.operating.rule == "sensitivity" and cfg.operating.target == 0.95
        assert str(RunConfig().operating) == "youden"
        with pytest.raises(ConfigError) as info:
            RunConfig.from_mapping({"operating-point": "sensitivity:95", "model": "resnet"})
        assert len(info.value.problems) == 2 and "`operating-point`" in str(info.value) and "sensitivity:0.95" in str(info.value)
        for bad in ("specificity", "recall:0.9", "youden:1", "specificity:1.0"):
            with pytest.raises(ConfigError, match="operating-point"):
                RunConfig.from_mapping({"operating-point": bad})

    def test_robust_model_settings_and_their_ranges(self):
        """Issue 22's defaults: equalised images, 4 views per training image, 2x2 read-out; the average off."""
        run = RunConfig()
        assert (run.intensity, run.views, run.pool, run.border, run.weight_average) == ("equalise", 4, 2, 0.0, 0.0)
        assert run.model_kwargs()["intensity"] == "equalise" and run.model_kwargs()["pool"] == 2
        assert run.feature_views == 4
        assert RunConfig(head="cnn").feature_views == 1 and RunConfig(model="mobilenet_v2").feature_views == 1
        with pytest.raises(ConfigError) as err:
            RunConfig.from_mapping({"intensity": "clahe", "views": 9, "pool": 0, "border": 0.5, "weight-average": 1.0})
        for key in ("`intensity`", "`views`", "`pool`", "`border`", "`weight-average`"):
            assert key in str(err.value)

    def test_round_trip_mapping(self):
        cfg = RunConfig(model="densenet121", labels=("x", "y"), task="multilabel")
        assert RunConfig.from_mapping(cfg.to_mapping()) == cfg


class TestSiteConfig:
    def test_valid(self, tmp_path):
        cfg = SiteConfig.from_mapping({"data-dir": str(tmp_path), "state-dir": str(tmp_path / "s"), "site-name": "h1"})
        assert cfg.max_epsilon == 10.0 and cfg.data_dir == tmp_path

    def test_missing_and_bad(self, tmp_path):
        with pytest.raises(ConfigError) as info:
            SiteConfig.from_mapping({"data-dir": str(tmp_path / "nope"), "site-name": "bad name!", "max-epsilon": -1})
        msg = str(info.value)
        assert "`state-dir` is required" in msg
        with pytest.raises(ConfigError) as info:
            SiteConfig.from_mapping(
                {"data-dir": str(tmp_path / "nope"), "state-dir": "s", "site-name": "bad name!", "max-epsilon": -1}
            )
        msg = str(info.value)
        assert "data-dir" in msg and "site-name" in msg and "max-epsilon" in msg

    def test_label_policy_joins_the_runs_and_the_sites_settings(self, tmp_path):
        site = SiteConfig.from_mapping({"data-dir": str(tmp_path), "state-dir": str(tmp_path / "s"), "site-name": "h1",
                                        "label-map": "Pleural effusion=Effusion"})
        policy = site.label_policy(RunConfig(label_column="subtype", uncertain="positive", blank="ignore"))
        assert policy.label_column == "subtype" and policy.uncertain == "positive" and policy.blank == "ignore"
        assert policy.federation_name("PLEURAL_EFFUSION") == "Effusion"
        with pytest.raises(ConfigError, match="uncertain.*expected one of ignore, positive, negative"):
            RunConfig.from_mapping({"uncertain": "maybe"})
        with pytest.raises(ConfigError, match="label-map"):
            SiteConfig.from_mapping({"data-dir": str(tmp_path), "state-dir": "s", "site-name": "h1", "label-map": "a=;b"})


class TestPosWeight:
    """pos-weight is a run setting (the coordinator's), checked with everything else."""

    def test_none_one_or_one_per_label(self):
        base = {"task": "multilabel", "labels": "Effusion,Infiltration,Atelectasis"}
        assert RunConfig.from_mapping(base).pos_weights == ()
        assert RunConfig.from_mapping({**base, "pos-weight": "4"}).pos_weights == (4.0, 4.0, 4.0)
        assert RunConfig.from_mapping({**base, "pos-weight": "1,4,6"}).pos_weights == (1.0, 4.0, 6.0)
        assert RunConfig.from_mapping({**base, "pos-weight": [1, 4, 6]}).pos_weights == (1.0, 4.0, 6.0)  # a TOML list

    @pytest.mark.parametrize(("raw", "words"), [
        ({"task": "multilabel", "labels": "a,b,c", "pos-weight": "1,2"}, "2 weights for 3 labels"),
        ({"task": "multilabel", "labels": "a,b", "pos-weight": "1,-2"}, "(0, 1000]"),
        ({"task": "multilabel", "labels": "a,b", "pos-weight": "auto"}, "one number per label"),
        ({"task": "multiclass", "labels": "a,b", "pos-weight": "2"}, "multiclass"),
    ])
    def test_bad_values_are_listed_with_the_fix(self, raw, words):
        with pytest.raises(ConfigError) as err:
            RunConfig.from_mapping({**raw, "image-size": 7})
        assert words in str(err.value) and "image-size" in str(err.value)  # every problem at once
