"""``--push_to_hub``: a finished run's folder (adapter, model card, samples, logs) as a Hugging Face model repo.

The repo is created when training starts, so a bad token or no network fails in seconds rather than after hours;
the upload happens once, at the end, and leaves out what only resuming needs (checkpoints, caches).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Checkpoints and condition-map caches are for resuming here; half-written files are never anyone's.
UPLOAD_IGNORE = ["checkpoint-*", "cache/*", "*.tmp", ".*"]


class HubError(RuntimeError):
    """The Hub refused or could not be reached."""


def _api(token: str | None, api: Any = None) -> Any:
    if api is not None:
        return api
    from huggingface_hub import HfApi

    return HfApi(token=token)


def create_hub_repo(repo_id: str, token: str | None = None, *, private: bool | None = None, api: Any = None) -> str:
    """Create (or reuse) the model repo ``repo_id``; returns its full id ("user/name")."""
    try:
        return _api(token, api).create_repo(repo_id, private=private, exist_ok=True).repo_id
    except Exception as err:  # network errors, HTTP errors and offline mode all end here
        raise HubError(
            f"--push_to_hub: could not create or open the Hub repo {repo_id!r} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). Log in with `hf auth login` (or pass --hub_token), "
            "check the network and that HF_HUB_OFFLINE is unset, or leave out --push_to_hub."
        ) from err


def push_run(output_dir: str | Path, repo_id: str, token: str | None = None, *, api: Any = None) -> str:
    """Upload ``output_dir`` to ``repo_id`` in one commit, without checkpoints or caches; returns the commit URL."""
    try:
        info = _api(token, api).upload_folder(
            repo_id=repo_id,
            folder_path=str(output_dir),
            commit_message="HRA Studio: end of training",
            ignore_patterns=UPLOAD_IGNORE,
        )
    except Exception as err:
        raise HubError(
            f"--push_to_hub: uploading {output_dir} to {repo_id!r} failed ({type(err).__name__}: {err}). The run's "
            f"files are complete on disk: upload them later with `hf upload {repo_id} {output_dir} "
            + " ".join(f"--exclude '{pattern}'" for pattern in UPLOAD_IGNORE)
            + "`."
        ) from err
    return str(getattr(info, "commit_url", info))
