from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub.utils import filter_repo_objects

from hra_diffusion.hub import HubError, create_hub_repo, push_run


class RecordingApi:
    """Stands in for HfApi (no network here): records the calls and answers as the Hub does."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return SimpleNamespace(repo_id=f"someone/{repo_id}" if "/" not in repo_id else repo_id)

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/abc")


def test_push_uploads_the_run_without_checkpoints_or_caches(tmp_path):
    files = [
        "hra_adapter.safetensors", "README.md", "sample_grid.png", "validation/step-4/00.png",
        "logs/dreambooth-hra/events.out.tfevents.1", "progress.jsonl",
        "checkpoint-4/adapter_weights.safetensors", "checkpoint-4/random_states_0.pkl",
        "cache/conditions/a.png", "hra_adapter.safetensors.tmp", ".lock",
    ]  # fmt: skip
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    api = RecordingApi()
    repo = create_hub_repo("dog-hra", api=api)
    assert repo == "someone/dog-hra" and api.calls[0][2]["exist_ok"] is True
    assert push_run(tmp_path, repo, api=api) == "https://huggingface.co/someone/dog-hra/commit/abc"
    upload = api.calls[1][1]
    assert upload["repo_id"] == repo and Path(upload["folder_path"]) == tmp_path
    sent = set(filter_repo_objects(files, ignore_patterns=upload["ignore_patterns"]))  # the Hub client's own filter
    assert sent == {
        "hra_adapter.safetensors", "README.md", "sample_grid.png", "validation/step-4/00.png",
        "logs/dreambooth-hra/events.out.tfevents.1", "progress.jsonl",
    }  # fmt: skip


def test_hub_failures_say_what_to_do(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match=r"could not create or open the Hub repo 'me/dog'.*hf auth login"):
        create_hub_repo("me/dog")

    class Failing(RecordingApi):
        def upload_folder(self, **kwargs):
            raise ConnectionError("network is unreachable")

    with pytest.raises(HubError, match=r"files are complete on disk: upload them later with `hf upload me/dog"):
        push_run(tmp_path, "me/dog", api=Failing())
