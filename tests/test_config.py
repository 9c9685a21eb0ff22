"""config.yaml loading and validation: errors name the key path and the allowed values."""
from __future__ import annotations

import pytest
import yaml

from cluster.config import ConfigError, load_config
from conftest import ROOT, base_config


def test_project_config_loads_with_three_tiers_and_default_models():
    cfg = load_config(ROOT / "config.yaml")
    assert cfg.tier_names == ["VRAM12", "VRAM6", "CPU"]
    assert cfg.cpu_tier == "CPU"
    assert cfg.tiers["VRAM12"].min_vram == 10 * 10**9
    assert cfg.models["minilm"].backend == "sentence_transformers"
    assert cfg.models["gemma-270m"].backend == "llamacpp"
    assert [w.name for w in cfg.local.workers] == ["pc1", "pc2", "cpu"]
    assert cfg.fallback_chain("VRAM12") == ["VRAM12", "VRAM6", "CPU"]
    assert cfg.fallback_chain("CPU") == ["CPU"]


def test_every_key_in_config_yaml_is_commented():
    # every key name is explained at least once: a comment on its line, or right above it
    lines = (ROOT / "config.yaml").read_text().splitlines()
    documented, seen = set(), set()
    for i, line in enumerate(lines):
        s = line.strip().removeprefix("- ")
        if not s or s.startswith("#") or ":" not in s:
            continue
        key = s.split(":", 1)[0].strip()
        seen.add(key)
        if "#" in line or (i and lines[i - 1].strip().startswith("#")):
            documented.add(key)
    # model, tier and worker names are values of the user's choosing, explained by their section
    names = {"VRAM12", "VRAM6", "CPU", "minilm", "gemma-270m"}
    assert seen - documented - names == set()


def test_typo_key_names_the_path_and_allowed_keys():
    data = base_config()
    data["models"]["minilm"]["tierr"] = data["models"]["minilm"].pop("tier")
    with pytest.raises(ConfigError) as e:
        load_config(data)
    msg = str(e.value)
    assert "models.minilm.tierr" in msg
    assert "tier" in msg and "backend" in msg  # the allowed keys are listed


def test_unknown_tier_names_known_tiers():
    data = base_config()
    data["models"]["gemma-270m"]["tier"] = "VRAM8"
    with pytest.raises(ConfigError) as e:
        load_config(data)
    msg = str(e.value)
    assert "models.gemma-270m.tier" in msg and "VRAM8" in msg
    assert "VRAM12" in msg and "VRAM6" in msg and "CPU" in msg


def test_unknown_tier_in_fallback_and_local_workers():
    data = base_config()
    data["routing"]["fallback"]["VRAM12"] = ["VRAM6", "GPU"]
    data["local"]["workers"][0]["tier"] = "BIG"
    with pytest.raises(ConfigError) as e:
        load_config(data)
    msg = str(e.value)
    assert "routing.fallback.VRAM12[1]" in msg and "'GPU'" in msg
    assert "local.workers[0].tier" in msg and "'BIG'" in msg


def test_wrong_type_names_the_key():
    data = base_config()
    data["tiers"]["VRAM6"]["slots"] = "many"
    with pytest.raises(ConfigError) as e:
        load_config(data)
    assert "tiers.VRAM6.slots" in str(e.value)


def test_bad_size_names_the_key():
    data = base_config()
    data["tiers"]["VRAM12"]["min_vram"] = "twelve gigs"
    with pytest.raises(ConfigError) as e:
        load_config(data)
    assert "tiers.VRAM12.min_vram" in str(e.value)


def test_unknown_backend_is_an_error():
    data = base_config()
    data["models"]["minilm"]["backend"] = "onnx"
    with pytest.raises(ConfigError) as e:
        load_config(data)
    msg = str(e.value)
    assert "models.minilm.backend" in msg and "llamacpp" in msg


def test_environment_variable_selects_the_file(tmp_path, monkeypatch):
    data = base_config()
    data["scheduler"]["port"] = 9999
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("AICLUSTER_CONFIG", str(path))
    cfg = load_config()
    assert cfg.scheduler.port == 9999
    assert cfg.path == str(path)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiers: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


def test_unknown_model_lists_known_models():
    cfg = load_config(base_config())
    with pytest.raises(ConfigError) as e:
        cfg.model("llama-70b")
    assert "llama-70b" in str(e.value) and "minilm" in str(e.value) and "gemma-270m" in str(e.value)


def test_the_model_cache_size_is_a_size():
    data = base_config()
    data["worker"]["model_cache_size"] = "40GB"
    assert load_config(data).worker.model_cache_size == 40 * 10**9
    data["worker"]["model_cache_size"] = "lots"
    with pytest.raises(ConfigError, match=r"worker\.model_cache_size.*a size like"):
        load_config(data)
