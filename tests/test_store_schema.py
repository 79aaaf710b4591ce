"""A hand-edited manifest is refused with one line that names the manifest and the field it
broke (exit code 3 from the CLI, no traceback), before anything of the store is used."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import coordinator_cli

from common.errors import StoreError
from common.store.manifest import Manifest
from common.store.reader import ExpertStore


def layout_index(manifest: dict, name: str) -> int:
    return [t["name"] for t in manifest["blob_layout"]["tensors"]].index(name)


def drop_model_id(m):
    del m["model_id"]


def zero_hidden_size(m):
    m["model"]["hidden_size"] = 0


def int64_dtype(m):
    m["dtype"] = "int64"


def int64_tensor(m):
    m["blob_layout"]["tensors"][1]["dtype"] = "int64"


def overlapping_offsets(m):
    m["blob_layout"]["tensors"][1]["offset"] = m["blob_layout"]["tensors"][0]["offset"]


def offset_past_the_end(m):
    m["blob_layout"]["tensors"][-1]["offset"] = m["blob_layout"]["nbytes"]


def negative_shape(m):
    m["blob_layout"]["tensors"][0]["shape"][0] *= -1


def top_k_above_experts(m):
    m["model"]["top_k"] = 9


def negative_context(m):
    m["model"]["max_position_embeddings"] = -2048


def number_as_string(m):
    m["model"]["num_layers"] = "4"


def kv_heads_not_dividing(m):
    m["model"]["num_kv_heads"] = 3


def file_climbing_out(m):
    m["experts"][5]["file"] = "../x"


def absolute_file(m):
    m["experts"][5]["file"] = "/etc/passwd"


def dense_file_in_a_folder(m):
    m["dense"]["file"] = "sub/dense.safetensors"


def shape_not_of_the_model(m):
    m["blob_layout"]["tensors"][0]["shape"] = [17, 128]


def expert_listed_twice(m):
    m["experts"][1] = dict(m["experts"][0])


def bool_as_number(m):
    m["model"]["tie_word_embeddings"] = 0


def edited_but_valid(m):
    m["model"]["rope_theta"] = 10000.0


EDITS = [
    (drop_model_id, "model_id is missing"),
    (zero_hidden_size, "model.hidden_size 0 is below 1"),
    (int64_dtype, "dtype 'int64' is not one of"),
    (int64_tensor, "blob_layout.tensors[1].dtype 'int64' is not one of"),
    (overlapping_offsets, "overlaps blob_layout.tensors[0]"),
    (offset_past_the_end, "runs past blob_layout.nbytes"),
    (negative_shape, "blob_layout.tensors[0].shape[0] -"),
    (top_k_above_experts, "model.top_k 9 is above model.num_experts 8"),
    (negative_context, "model.max_position_embeddings -2048 is below 1"),
    (number_as_string, "model.num_layers '4' (str) should be an integer"),
    (kv_heads_not_dividing, "model.num_kv_heads 3 does not divide model.num_heads 4"),
    (file_climbing_out, "experts[5].file '../x' is not a plain file name"),
    (absolute_file, "experts[5].file '/etc/passwd' is not a plain file name"),
    (dense_file_in_a_folder, "dense.file 'sub/dense.safetensors' is not a plain file name"),
    (shape_not_of_the_model, "blob_layout.tensors[0] (w13.weight).shape [17, 128] does not match the model config"),
    (expert_listed_twice, "experts[1] lists layer 0 expert 0 again"),
    (bool_as_number, "model.tie_word_embeddings 0 (int) should be true or false"),
    (edited_but_valid, "model_id"),
]


def edited_manifest_folder(store: Path, folder: Path, edit) -> Path:
    """A folder holding only the store's manifest, edited: enough for Manifest.read."""
    manifest = json.loads((store / "manifest.json").read_text())
    edit(manifest)
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return folder


@pytest.mark.parametrize("edit,words", EDITS, ids=[edit.__name__ for edit, _ in EDITS])
def test_a_hand_edited_manifest_is_refused_naming_the_field(store16, tmp_path, edit, words):
    folder = edited_manifest_folder(store16, tmp_path / "store", edit)
    with pytest.raises(StoreError) as refused:
        Manifest.read(folder)
    message = str(refused.value)
    assert message.startswith(f"{folder / 'manifest.json'}: "), message
    assert words in message, message
    assert "\n" not in message


def test_a_quantized_layout_with_a_wrong_plane_shape_is_named(store4, tmp_path):
    def edit(m):
        m["blob_layout"]["tensors"][layout_index(m, "w2.codes.p0")]["shape"][1] += 1

    with pytest.raises(StoreError, match=r"\(w2.codes.p0\).shape .* does not match the model config"):
        Manifest.read(edited_manifest_folder(store4, tmp_path / "store", edit))


def test_an_unedited_manifest_reads_as_before(store16, store4):
    for store in (store16, store4):
        manifest = Manifest.read(store)
        assert manifest.to_dict()["model_id"] == json.loads((store / "manifest.json").read_text())["model_id"]


def test_a_store_without_its_dense_file_is_named_when_it_opens(store16, tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(store16, copy)
    (copy / "dense.safetensors").unlink()
    with pytest.raises(StoreError, match="dense.safetensors: missing from the store"):
        ExpertStore(copy, with_experts=False)


def test_an_experts_file_cut_inside_its_blobs_is_named_when_it_opens(store16, tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(store16, copy)
    path = copy / "experts-00003.safetensors"
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 1)
    with pytest.raises(StoreError, match=r"experts-00003.safetensors: is \d+ bytes, layer 3 expert 7 needs bytes"):
        ExpertStore(copy)


CLI_EDITS = [drop_model_id, top_k_above_experts, number_as_string, file_climbing_out, absolute_file, offset_past_the_end]


@pytest.mark.parametrize("edit", CLI_EDITS, ids=[edit.__name__ for edit in CLI_EDITS])
def test_generate_on_a_hand_edited_manifest_prints_one_line_and_exits_3(store16, tmp_path, edit):
    copy = tmp_path / "store"
    shutil.copytree(store16, copy)
    (tmp_path / "x").write_bytes(b"outside the store")
    path = copy / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest, indent=1))
    result = coordinator_cli("generate", "--store", copy, "--prompt", "Hello", "--max-new-tokens", "2")
    assert result.returncode == StoreError.exit_code == 3, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: "), result.stderr
    assert dict(EDITS)[edit] in lines[0]
