"""DreamBooth benchmark parsing (google/dreambooth's prompts_and_classes.txt format) and work sharding."""

import os
from pathlib import Path

import pytest
from eval_helpers import CLASSES, LIVE_TEMPLATES, OBJECT_MIDDLE, OBJECT_TEMPLATES, prompts_file_text
from PIL import Image

from eval.prompts import LIVE_CLASSES, load_benchmark, parse_prompts_and_classes, shard


def make_dataset(root: Path, subjects=("backpack", "bear_plushie", "dog", "teapot"), newline="\n") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "prompts_and_classes.txt").write_bytes(prompts_file_text(newline).encode())
    for name in subjects:
        (root / name).mkdir()
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 100, 0, 0)).save(root / name / f"{i:02d}.jpg")
    return root


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_parse_prompt_file(tmp_path, newline):
    path = make_dataset(tmp_path, subjects=(), newline=newline) / "prompts_and_classes.txt"
    table = parse_prompts_and_classes(path)
    assert table.classes == CLASSES
    assert table.object_templates == tuple(OBJECT_TEMPLATES) and table.live_templates == tuple(LIVE_TEMPLATES)


def test_prompt_lists_follow_the_class(tmp_path):
    subjects = {s.name: s for s in load_benchmark(make_dataset(tmp_path / "db"))}
    dog, backpack, bear = subjects["dog"], subjects["backpack"], subjects["bear_plushie"]
    assert dog.is_live and not backpack.is_live and not bear.is_live
    assert len(dog.prompts) == len(backpack.prompts) == 25
    assert dog.prompts[0] == "a qwe dog in the jungle"
    assert dog.prompts[10] == "a qwe dog wearing a red hat"
    assert backpack.prompts[10] == "a qwe backpack with a wheat field in the background"
    assert backpack.prompts[19] == "a qwe backpack on top of a white rug"
    assert backpack.prompts[10:20] == tuple(t.format("qwe", "backpack") for t in OBJECT_MIDDLE)
    assert not any(("wearing" in p or "outfit" in p) for p in backpack.prompts)
    assert bear.prompts[24] == "a cube shaped qwe stuffed animal"
    assert [p.name for p in dog.image_paths] == ["00.jpg", "01.jpg"]


def test_token_and_subject_selection(tmp_path):
    root = make_dataset(tmp_path)
    everything = load_benchmark(root)
    assert [s.name for s in everything] == ["backpack", "bear_plushie", "dog", "teapot"]  # only folders present
    (teapot,) = load_benchmark(root, token="sks", subjects=["teapot"])
    assert teapot.prompts[0] == "a sks teapot in the jungle"


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        load_benchmark(tmp_path / "nowhere")
    (tmp_path / "bare").mkdir()
    with pytest.raises(FileNotFoundError, match="prompts_and_classes.txt"):
        load_benchmark(tmp_path / "bare")
    root = make_dataset(tmp_path / "db")
    with pytest.raises(ValueError, match="unknown subject"):
        load_benchmark(root, subjects=["dog", "unicorn"])
    with pytest.raises(FileNotFoundError, match="cat"):
        load_benchmark(root, subjects=["cat"])
    (root / "cat").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        load_benchmark(root, subjects=["cat"])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "prompts_and_classes.txt").write_text("Classes\n\nsubject_name,class\ndog,dog\n")
    with pytest.raises(ValueError, match="Object Prompts"):
        parse_prompts_and_classes(broken / "prompts_and_classes.txt")


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_shard_covers_every_job_once(tmp_path, world_size):
    subjects = load_benchmark(make_dataset(tmp_path))
    jobs = [(s.name, prompt, image) for s in subjects for prompt in range(len(s.prompts)) for image in range(4)]
    shards = [shard(jobs, rank, world_size) for rank in range(world_size)]
    flat = [job for part in shards for job in part]
    assert sorted(flat) == sorted(jobs) and len(set(flat)) == len(jobs)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert shards == [shard(jobs, rank, world_size) for rank in range(world_size)]  # deterministic


def test_shard_rejects_bad_rank():
    with pytest.raises(ValueError):
        shard([1, 2], 2, 2)
    with pytest.raises(ValueError):
        shard([1, 2], 0, 0)


SHARED_DATASET = Path(os.environ.get("HRA_DREAMBOOTH_DIR", "/work/shared/datasets/dreambooth"))


@pytest.mark.skipif(not (SHARED_DATASET / "prompts_and_classes.txt").is_file(), reason="no DreamBooth copy here")
def test_real_prompt_file():
    table = parse_prompts_and_classes(SHARED_DATASET / "prompts_and_classes.txt")
    assert len(table.classes) == 30 and len(set(table.classes.values())) == 15
    assert sum(c in LIVE_CLASSES for c in table.classes.values()) == 9
    assert table.object_templates == tuple(OBJECT_TEMPLATES) and table.live_templates == tuple(LIVE_TEMPLATES)
