"""Where a model's files are: a local folder or .gguf file as given, or a Hugging Face hub id.

Rule: `--model` that exists on this machine is used as it is. Otherwise `org/name` (optionally
`org/name@revision`) is a hub repository, resolved by `huggingface_hub.snapshot_download` into the
hub cache (`HF_HOME` / `HF_HUB_CACHE`), fetching only what the engine reads (configs, tokenizer
files, safetensors weights, Mistral's params.json and tokenizer.model*), with `HF_TOKEN` for gated
repositories; with `HF_HUB_OFFLINE=1` it is found in the cache without any network. Every process
that opens the model (the ingress, each replica, each rank) resolves it itself, so nodes that share
no disk each fill their own cache. A repository that cannot be had raises CheckpointError with a
sentence that says why.
"""

import re
from pathlib import Path

from .config import CheckpointError

HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "tokenizer.model.v*", "*.jinja", "*.txt"]
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")


def is_hub_id(model: str) -> bool:
    return _HUB_ID.fullmatch(str(model)) is not None and not Path(model).exists()


def resolve_model(model: str | Path, show_progress: bool = False) -> Path:
    """The local folder or .gguf file holding `model`."""
    path = Path(model)
    if path.exists():
        return path
    match = _HUB_ID.fullmatch(str(model))
    if match is None:
        raise CheckpointError(f"model {str(model)!r} is neither a local folder or .gguf file nor a hub id (org/name)")
    return _download(match["repo"], match["revision"], show_progress)


def _download(repo: str, revision: str | None, show_progress: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hub
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    where = f"{repo}" + (f"@{revision}" if revision else "")
    was_disabled = are_progress_bars_disabled()
    if not show_progress:
        disable_progress_bars()
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=HUB_FILES))
    except hub.GatedRepoError:
        raise CheckpointError(f"{where} is a gated repository: accept its terms on the hub and set HF_TOKEN") from None
    except hub.RepositoryNotFoundError:
        raise CheckpointError(f"{where}: no such repository on the hub (or it is private: set HF_TOKEN)") from None
    except hub.RevisionNotFoundError:
        raise CheckpointError(f"{where}: the repository has no revision {revision!r}") from None
    except hub.LocalEntryNotFoundError:
        raise CheckpointError(f"{where} is not in the hub cache and the hub cannot be reached (HF_HUB_OFFLINE is "
                              "set, or there is no network): download it once, or point --model at a folder") from None
    except (hub.HfHubHTTPError, OSError) as exc:
        raise CheckpointError(f"{where} could not be downloaded: {exc}") from None
    finally:
        if not show_progress and not was_disabled:
            enable_progress_bars()
