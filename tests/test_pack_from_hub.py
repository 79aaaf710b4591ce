"""`pack --model ORG/NAME` reads a repo id through huggingface_hub's cache. Nothing here reaches
the network: HF_HUB_OFFLINE=1 and HF_HUB_CACHE point at a cache these tests build in a temp
folder, laid out as huggingface_hub writes it (models--ORG--NAME/refs, snapshots/HASH/ of
symbolic links into blobs/); scan_cache_dir, huggingface_hub's own reader, checks the layout.
The hub's online errors (gated, not found, no such revision) are raised by a stand-in for
snapshot_download."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import coordinator_cli
from coordinator.tools.hub_checkpoint import HubSettings, hub_cache_dir, is_repo_id, progress_bars

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


def add_to_hub_cache(cache: Path, repo_id: str, folder: Path, commit: str, *,
                     refs: tuple[str, ...] = ("main",)) -> Path:
    """Put `folder`'s files in `cache` as snapshot `commit` of model `repo_id`, as huggingface_hub's
    downloads do: each file a blob named by its hash, linked from snapshots/COMMIT/; each ref a
    file holding the commit (no newline, as huggingface_hub writes it)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in sorted(folder.iterdir()):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copyfile(path, repo / "blobs" / digest)
        (snapshot / path.name).symlink_to(Path("..", "..", "blobs", digest))
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache, with every HF_* setting pointing inside tmp_path and offline mode on."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def manifest_of(store: Path) -> dict:
    return json.loads((store / "manifest.json").read_text())


def assert_one_line_error(result, code: int, *needles: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_the_hand_made_cache_is_one_huggingface_hub_reads(hub_cache, tiny_model_dir):
    from huggingface_hub import scan_cache_dir

    add_to_hub_cache(hub_cache, "org/tiny", tiny_model_dir, COMMIT)
    (repo,) = scan_cache_dir(hub_cache).repos
    assert (repo.repo_id, repo.repo_type) == ("org/tiny", "model")
    (revision,) = repo.revisions
    assert revision.commit_hash == COMMIT and revision.refs == frozenset({"main"})
    assert {file.file_name for file in revision.files} == {path.name for path in tiny_model_dir.iterdir()}


def test_a_cached_repo_id_packs_the_same_store_as_its_folder(hub_cache, tiny_model_dir, store16, tmp_path):
    add_to_hub_cache(hub_cache, "org/tiny", tiny_model_dir, COMMIT)
    result = coordinator_cli("pack", "--model", "org/tiny", "--out", tmp_path / "s", "--expert-bits", "16", "--quiet")
    assert result.returncode == 0, result.stderr
    packed, reference = manifest_of(tmp_path / "s"), manifest_of(store16)
    assert packed["model_id"] == reference["model_id"]
    assert packed == reference  # the same blobs, checksums and tokenizer files, read through the links


def test_revision_picks_that_commit_of_the_cached_repo(hub_cache, tiny_model_dir, tmp_path):
    add_to_hub_cache(hub_cache, "org/tiny", tiny_model_dir, COMMIT, refs=())
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(tiny_model_dir / "config.json", config_only)
    add_to_hub_cache(hub_cache, "org/tiny", config_only, OTHER_COMMIT)  # main: a commit without weights

    on_main = coordinator_cli("pack", "--model", "org/tiny", "--out", tmp_path / "main", "--quiet")
    assert_one_line_error(on_main, 3, OTHER_COMMIT, "no *.safetensors weights")
    result = coordinator_cli("pack", "--model", "org/tiny", "--revision", COMMIT, "--out", tmp_path / "s",
                             "--expert-bits", "16", "--quiet")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "s" / "manifest.json").is_file()


def test_a_repo_not_in_the_cache_is_one_line_saying_so(hub_cache, tmp_path):
    result = coordinator_cli("pack", "--model", "org/absent", "--out", tmp_path / "s")
    assert_one_line_error(result, 3, "org/absent", "not in the local cache", "HF_HUB_OFFLINE", str(hub_cache))
    assert not (tmp_path / "s").exists()


def test_offline_flag_alone_keeps_to_the_cache_and_says_so(hub_cache, tiny_model_dir, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    add_to_hub_cache(hub_cache, "org/tiny", tiny_model_dir, COMMIT)
    result = coordinator_cli("pack", "--model", "org/tiny", "--revision", "v9", "--offline", "--out", tmp_path / "s")
    assert_one_line_error(result, 3, "org/tiny (revision v9)", "not in the local cache; run without --offline")


@pytest.mark.parametrize("model", ["org/bad name", "org/a--b", "org/name.git"])
def test_a_malformed_repo_id_is_one_line_naming_it(hub_cache, model, tmp_path):
    result = coordinator_cli("pack", "--model", model, "--out", tmp_path / "s")
    assert_one_line_error(result, 3, model, "no such model folder", "not a Hugging Face repo id")


@pytest.mark.parametrize("model", ["./missing", "/no/such/model", "missing"])
def test_a_missing_path_still_says_only_no_such_model_folder(hub_cache, model, tmp_path):
    result = coordinator_cli("pack", "--model", model, "--out", tmp_path / "s")
    assert_one_line_error(result, 3, f"{model}: no such model folder")
    assert "repo id" not in result.stderr


def test_an_existing_folder_wins_over_a_repo_id_of_the_same_spelling(hub_cache, tiny_model_dir, tmp_path, monkeypatch):
    (tmp_path / "org").mkdir()
    shutil.copytree(tiny_model_dir, tmp_path / "org" / "tiny")
    monkeypatch.chdir(tmp_path)  # nothing named org/tiny is in the cache: only the folder can pack
    result = coordinator_cli("pack", "--model", "org/tiny", "--out", tmp_path / "s", "--expert-bits", "16", "--quiet")
    assert result.returncode == 0, result.stderr


def test_revision_with_a_local_folder_is_refused(hub_cache, tiny_model_dir, tmp_path):
    result = coordinator_cli("pack", "--model", tiny_model_dir, "--revision", COMMIT, "--out", tmp_path / "s")
    assert_one_line_error(result, 2, "--revision", "local folder")


def hub_error(name: str):
    """One of huggingface_hub's HTTP errors, with the response it would carry."""
    import huggingface_hub.errors as errors
    import httpx2  # huggingface_hub 2.x's HTTP client: its errors carry an httpx2 response

    status = 500 if name == "HfHubHTTPError" else 404
    response = httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/org/x"))
    return getattr(errors, name)(f"{status} Client Error", response=response)


@pytest.mark.parametrize("name, needles", [
    ("GatedRepoError", ["gated", "https://huggingface.co/org/x", "HF_TOKEN"]),
    ("RepositoryNotFoundError", ["no such repo on the Hugging Face Hub", "HF_TOKEN"]),
    ("RevisionNotFoundError", ["no revision v9", "--revision"]),
    ("HfHubHTTPError", ["answered 500"]),
])
def test_each_hub_error_is_one_line_naming_the_repo(hub_cache, monkeypatch, tmp_path, name, needles):
    import huggingface_hub

    error = hub_error(name)

    def refuse(*args, **kwargs):
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    result = coordinator_cli("pack", "--model", "org/x", "--revision", "v9", "--out", tmp_path / "s")
    assert_one_line_error(result, 3, "org/x", *needles)


def test_the_hub_unreachable_while_online_names_the_network(hub_cache, monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub.utils import LocalEntryNotFoundError

    def unreachable(*args, **kwargs):
        raise LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    result = coordinator_cli("pack", "--model", "org/x", "--out", tmp_path / "s")
    assert_one_line_error(result, 3, "org/x", "could not be reached", "not in the local cache")


def test_only_org_slash_name_spellings_count_as_repo_ids():
    assert all(map(is_repo_id, ["org/tiny", "mistralai/Mixtral-8x7B-Instruct-v0.1", "Qwen/Qwen3-30B-A3B", "a_b/c.d"]))
    assert not any(map(is_repo_id, ["tiny", "org/tiny/x", "/org/tiny", "./org", "org/", "org/a b", "org/a--b",
                                    "org/a..b", "org/x.git", "o/" + "x" * 95]))


def test_the_cache_folder_is_read_from_the_environment_as_huggingface_hub_does(tmp_path):
    assert hub_cache_dir({"HF_HUB_CACHE": "/c", "HF_HOME": "/h"}) == Path("/c")
    assert hub_cache_dir({"HF_HOME": "/h"}) == Path("/h/hub")
    assert hub_cache_dir({"XDG_CACHE_HOME": "/x"}) == Path("/x/huggingface/hub")
    assert hub_cache_dir({}) == Path.home() / ".cache" / "huggingface" / "hub"
    assert HubSettings.from_environment(environ={"HF_HUB_OFFLINE": "1"}).offline
    assert not HubSettings.from_environment(environ={"HF_HUB_OFFLINE": "0"}).offline
    assert HubSettings.from_environment(offline=True, environ={}).offline_setting == "--offline"


def test_quiet_hides_the_hub_bars_for_the_call_only():
    from huggingface_hub.utils import are_progress_bars_disabled

    if are_progress_bars_disabled() or os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"):
        pytest.skip("huggingface_hub's bars are off in this environment")
    with progress_bars(shown=False):
        assert are_progress_bars_disabled()
    assert not are_progress_bars_disabled()
