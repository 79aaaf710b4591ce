"""What pack does not implement it refuses in one line, before writing anything: a checkpoint
tensor no family reader uses (the silent wrong output of a `mixtral` config carrying q/k norms),
an activation or rope type it does not run, a model type it has no family for; and a store that
names an unknown family is refused by name when it opens."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import coordinator_cli


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def copy_model(source, target):
    shutil.copytree(source, target)
    return target


def assert_nothing_written(out):
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] == []


def test_a_tensor_the_family_does_not_read_is_refused_by_name(tiny_model_dir, tmp_path):
    model = copy_model(tiny_model_dir, tmp_path / "model")
    weights = load_file(model / "model.safetensors")
    weights["model.layers.1.self_attn.q_norm.weight"] = torch.ones(32)  # a Qwen3-style norm under a mixtral config
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "store"
    result = coordinator_cli("pack", "--model", model, "--out", out, "--quiet")
    assert result.returncode == 2
    line = one_error_line(result)
    assert "model.layers.1.self_attn.q_norm.weight" in line and "mixtral" in line and "model.safetensors" in line
    assert_nothing_written(out)


@pytest.mark.parametrize("setting,value,named", [
    ("hidden_act", "gelu", "hidden_act 'gelu'"),
    ("rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}, "rope_type 'linear'"),
    ("model_type", "dbrx", "model_type 'dbrx' is not supported"),
])
def test_a_config_setting_pack_does_not_implement_is_refused_in_one_line(tiny_model_dir, tmp_path, setting, value, named):
    model = copy_model(tiny_model_dir, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config[setting] = value
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "store"
    result = coordinator_cli("pack", "--model", model, "--out", out, "--quiet")
    assert result.returncode == 2
    assert named in one_error_line(result)
    assert_nothing_written(out)


def test_a_store_of_an_unknown_family_is_refused_by_name(store16, tmp_path):
    store = shutil.copytree(store16, tmp_path / "store")
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["model"]["family"] = "dbrx"
    (store / "manifest.json").write_text(json.dumps(manifest))
    result = coordinator_cli("generate", "--store", store, "--prompt", "Hello", "--max-new-tokens", "2")
    assert result.returncode == 3
    line = one_error_line(result)
    assert "model.family" in line and "dbrx" in line
