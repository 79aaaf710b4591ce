"""Bad input exits non-zero with one line naming the file or setting, no traceback, and
nothing of the user's is written over. The commands run in this process (`coordinator_cli`: the
same `main` as `python -m coordinator`, without a new interpreter's seconds of imports)."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from common.store.manifest import Manifest, expert_file_name
from conftest import coordinator_cli


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def store_copy(store16, tmp_path) -> Path:
    copy = tmp_path / "store"
    shutil.copytree(store16, copy)
    return copy


def generate(store, *extra):
    return coordinator_cli("generate", "--store", store, "--prompt", "Hello world", "--max-new-tokens", "4",
                           "--cache-experts", "8", *extra)


def test_pack_of_a_missing_model_folder_names_it(tmp_path):
    result = coordinator_cli("pack", "--model", tmp_path / "no-such-model", "--out", tmp_path / "store")
    assert_one_line_error(result, "no-such-model", "no such model folder")
    assert not (tmp_path / "store").exists()


def test_pack_refuses_to_write_over_a_non_empty_folder(tiny_model_dir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    result = coordinator_cli("pack", "--model", tiny_model_dir, "--out", out, "--quiet")
    assert_one_line_error(result, str(out), "not empty")
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "precious"
    assert not any(p.name.startswith(".mine.partial") for p in tmp_path.iterdir())


def test_pack_of_a_pickle_checkpoint_is_refused(tiny_model_dir, tmp_path):
    model = tmp_path / "pickled"
    model.mkdir()
    shutil.copy(tiny_model_dir / "config.json", model)
    (model / "pytorch_model.bin").write_bytes(b"not read")
    result = coordinator_cli("pack", "--model", model, "--out", tmp_path / "store")
    assert_one_line_error(result, "pytorch_model.bin", "pickle")


def test_missing_manifest_is_named(store_copy):
    (store_copy / "manifest.json").unlink()
    assert_one_line_error(generate(store_copy), "manifest.json", "missing")


def test_unknown_format_version_is_refused(store_copy):
    path = store_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["format_version"] = 99
    path.write_text(json.dumps(manifest))
    assert_one_line_error(generate(store_copy), "manifest.json", "format version 99")


def test_truncated_expert_file_is_named(store_copy):
    path = store_copy / expert_file_name(1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_one_line_error(generate(store_copy), expert_file_name(1))


def _flip_a_bit_in_every_blob(store: Path, layer: int) -> None:
    manifest = Manifest.read(store)
    path = store / expert_file_name(layer)
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    blob = manifest.layout.nbytes
    for expert in range(manifest.model.num_experts):
        data[header + expert * blob + blob // 3] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("source", ["ram", "disk"])
def test_bit_flipped_expert_file_fails_its_checksum(store_copy, source):
    _flip_a_bit_in_every_blob(store_copy, layer=2)
    result = generate(store_copy, "--source", source)
    assert_one_line_error(result, expert_file_name(2), "checksum")


def test_corrupt_dense_file_fails_its_checksum(store_copy):
    path = store_copy / "dense.safetensors"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01
    path.write_bytes(bytes(data))
    assert_one_line_error(generate(store_copy), "dense.safetensors", "checksum")


def test_zero_cache_experts_is_refused(store16):
    before = hashlib.sha256((store16 / "manifest.json").read_bytes()).hexdigest()
    result = coordinator_cli("generate", "--store", store16, "--prompt", "hi", "--cache-experts", "0")
    assert_one_line_error(result, "--cache-experts 0")
    assert hashlib.sha256((store16 / "manifest.json").read_bytes()).hexdigest() == before


def test_generate_json_reports_new_tokens_and_stats(store16):
    result = coordinator_cli("generate", "--store", store16, "--prompt", "Hello world", "--max-new-tokens", "6",
                             "--greedy", "--cache-experts", "2", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert 1 <= len(report["token_ids"]) <= 6
    assert result.stdout.startswith(report["text"])
    for key in ("tokens_per_s", "cache_hits", "cache_misses", "prefetch_hits", "prefetch_wasted", "bytes_fetched"):
        assert key in report["stats"]


@pytest.fixture(scope="module")
def sharded_model(tiny_model_dir, tmp_path_factory):
    """The tiny checkpoint saved again in several shards with an index file."""
    from transformers import MixtralForCausalLM

    out = tmp_path_factory.mktemp("sharded") / "model"
    MixtralForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(out, max_shard_size="4MB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, out)
    assert (out / "model.safetensors.index.json").is_file()
    return out


def test_a_sharded_checkpoint_packs_to_the_same_store(sharded_model, store16, tmp_path):
    result = coordinator_cli("pack", "--model", sharded_model, "--out", tmp_path / "s", "--expert-bits", "16", "--quiet")
    assert result.returncode == 0, result.stderr
    assert Manifest.read(tmp_path / "s").model_id == Manifest.read(store16).model_id


def test_a_shard_missing_from_the_index_is_named(sharded_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(sharded_model, model)
    victim = sorted(model.glob("model-*.safetensors"))[1]
    victim.unlink()
    result = coordinator_cli("pack", "--model", model, "--out", tmp_path / "s")
    assert_one_line_error(result, victim.name, "missing")
