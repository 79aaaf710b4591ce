"""`pack --model`: a local checkpoint folder, or a Hugging Face repo id read through
huggingface_hub's cache (downloaded there first unless offline).

Knows which string is which and how to turn a repo id into a snapshot folder; knows nothing
about what is inside the folder (coordinator/tools/checkpoint.py reads it). Only config.json,
safetensors, their index and the tokenizer files are asked for, so a pickle checkpoint is never
downloaded. Every hub failure becomes one StoreError naming the repo and what to do.

huggingface_hub reads HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE once, when it is imported;
HubSettings.from_environment reads them when pack runs and passes them as explicit cache_dir= and
local_files_only=, so the folder and the mode we report are the ones used."""

from __future__ import annotations

import contextlib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from common.errors import ConfigError, StoreError

from .checkpoint import TOKENIZER_FILES

# ORG/NAME as the Hub spells it: letters, digits, '-', '_', '.'; no '--' or '..' (the cache uses
# '--' as its separator), no '.git' ending, at most 96 characters (huggingface_hub's own rules).
REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")

WANTED_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", *TOKENIZER_FILES]

TRUE_VALUES = {"1", "ON", "YES", "TRUE"}  # what huggingface_hub counts as a set flag


def is_repo_id(text: str) -> bool:
    return (len(text) <= 96 and REPO_ID.fullmatch(text) is not None
            and "--" not in text and ".." not in text and not text.endswith(".git"))


@dataclass(frozen=True)
class HubSettings:
    """Where and how a repo id is read: `revision` (branch, tag or commit hash; None is main),
    `offline` (only the cache, never the network; `offline_setting` names what asked for it) and
    the hub cache folder."""

    cache_dir: Path
    revision: str | None = None
    offline: bool = False
    offline_setting: str = "--offline"

    @classmethod
    def from_environment(cls, *, revision: str | None = None, offline: bool = False,
                         environ: Mapping[str, str] | None = None) -> HubSettings:
        """The settings huggingface_hub would take from the environment, read now (see the module
        docstring); `offline=True` (the --offline flag) wins over HF_HUB_OFFLINE."""
        environ = os.environ if environ is None else environ
        offline_by_environment = any(environ.get(name, "").upper() in TRUE_VALUES
                                     for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
        return cls(
            cache_dir=hub_cache_dir(environ),
            revision=revision,
            offline=offline or offline_by_environment,
            offline_setting="--offline" if offline else "HF_HUB_OFFLINE=1",
        )


def hub_cache_dir(environ: Mapping[str, str]) -> Path:
    """huggingface_hub's cache folder: HF_HUB_CACHE, else the legacy HUGGINGFACE_HUB_CACHE, else
    HF_HOME/hub, else $XDG_CACHE_HOME (or ~/.cache)/huggingface/hub."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if environ.get(name):
            return Path(os.path.expandvars(environ[name])).expanduser()
    if environ.get("HF_HOME"):
        home = Path(os.path.expandvars(environ["HF_HOME"])).expanduser()
    else:
        home = Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "huggingface"
    return home / "hub"


def checkpoint_folder(model: str | Path, hub: HubSettings | None = None, *, progress: bool = True) -> Path:
    """The checkpoint folder `model` names: itself when it is a folder, else the cached snapshot of
    the repo id it spells (downloaded first unless offline). Anything else is a StoreError."""
    if Path(model).is_dir():
        if hub is not None and hub.revision is not None:
            raise ConfigError(f"--revision {hub.revision}: {model} is a local folder; --revision picks a commit "
                              "of a Hugging Face repo id (ORG/NAME)")
        return Path(model)
    text = str(model)
    if not is_repo_id(text):
        if text.startswith((".", "/", "~")) or text.count("/") != 1:  # meant as a path: say only that
            raise StoreError(f"{text}: no such model folder")
        raise StoreError(f"{text}: no such model folder, and not a Hugging Face repo id "
                         "(ORG/NAME of letters, digits, '-', '_' and '.')")
    return download_snapshot(text, hub or HubSettings.from_environment(), progress=progress)


def download_snapshot(repo_id: str, hub: HubSettings, *, progress: bool = True) -> Path:
    """snapshot_download of the files pack reads, each hub error turned into one line."""
    import huggingface_hub
    from huggingface_hub.utils import (GatedRepoError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError,
                                       OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)

    name = repo_id if hub.revision is None else f"{repo_id} (revision {hub.revision})"
    try:
        with progress_bars(shown=progress):
            folder = huggingface_hub.snapshot_download(
                repo_id, revision=hub.revision, cache_dir=hub.cache_dir, local_files_only=hub.offline,
                allow_patterns=WANTED_FILES)
    except GatedRepoError:  # before RepositoryNotFoundError, its parent
        raise StoreError(f"{repo_id}: a gated repo on the Hugging Face Hub; accept its terms at "
                         f"https://huggingface.co/{repo_id} and log in (hf auth login, or set HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise StoreError(f"{repo_id}: no such repo on the Hugging Face Hub, or a private one; check the name, "
                         "or log in (hf auth login, or set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise StoreError(f"{repo_id}: no revision {hub.revision} on the Hugging Face Hub; pass a branch, tag "
                         "or commit hash that exists to --revision") from None
    except LocalEntryNotFoundError as err:
        offline = hub.offline or isinstance(err.__cause__, OfflineModeIsEnabled)
        if not offline:
            raise StoreError(f"{name}: the Hugging Face Hub could not be reached and the repo is not in the local "
                             f"cache {hub.cache_dir}; check the network, or set HF_HUB_CACHE to a cache that "
                             "holds it") from None
        setting = hub.offline_setting if hub.offline else "HF_HUB_OFFLINE=1"
        raise StoreError(f"{name}: not in the local cache; run without {setting} on a machine with network, "
                         f"or set HF_HUB_CACHE (looked in {hub.cache_dir})") from None
    except HFValidationError as err:
        raise ConfigError(f"{name}: {err}") from None
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else "an error"
        raise StoreError(f"{name}: the Hugging Face Hub answered {status}; try again later "
                         f"({first_line(err)})") from None
    except transport_errors() as err:
        raise StoreError(f"{name}: download from the Hugging Face Hub failed ({type(err).__name__}: "
                         f"{first_line(err)}); check the network and the free space of {hub.cache_dir}") from None
    return Path(folder)


def transport_errors() -> tuple[type[BaseException], ...]:
    """Network and disk errors during a download. requests' errors (huggingface_hub < 1.0) are
    OSErrors; httpx's (1.x) and httpx2's (2.x) are not, so their base class is added when that
    client is the one loaded."""
    errors: list[type[BaseException]] = [OSError]
    for client in ("httpx2", "httpx"):
        module = sys.modules.get(client)
        if module is not None and hasattr(module, "HTTPError"):
            errors.append(module.HTTPError)
    return tuple(errors)


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


@contextlib.contextmanager
def progress_bars(*, shown: bool):
    """huggingface_hub's download bars, hidden for the call when not `shown` (pack --quiet)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if shown or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()
