
from huggingface_hub import ModelCard

from hra_diffusion.model_card import common_settings, write_model_card
from hra_diffusion.train import TrainSettings


def test_card_front_matter_reads_back_with_awkward_prompts(tmp_path):
    prompt = 'a "sks" dog: close-up # 2'
    path = write_model_card(
        tmp_path,
        base_model="runwayml/stable-diffusion-v1-5",
        front_matter={"instance_prompt": prompt},
        tags=("dreambooth",),
        title="t",
        body="intro",
        settings={"steps": 4, "HRA r": 8},
        usage="print(1)",
        notes="after the code",
    )
    card = ModelCard.load(path)  # huggingface_hub's own parser: the card must read back as the Hub would read it
    assert card.data.base_model == "runwayml/stable-diffusion-v1-5"
    assert card.data.to_dict()["instance_prompt"] == prompt
    assert card.data.tags == ["stable-diffusion", "diffusers", "hra", "dreambooth"]
    text = path.read_text()
    assert "| steps | 4 |\n| HRA r | 8 |" in text
    assert text.index("```python\nprint(1)\n```") < text.index("after the code")
    assert not list(tmp_path.glob("*.tmp*")), "written atomically, nothing left beside it"


def test_common_settings_take_the_run_values(tmp_path):
    settings = TrainSettings(pretrained_model_name_or_path="m", output_dir=str(tmp_path), resolution=512, hra_r=6,
                             hra_apply_GS=True, hra_lambda=1e-4, hra_target_modules="to_q", seed=3,
                             learning_rate=5e-4, train_batch_size=2, gradient_accumulation_steps=4)
    rows = common_settings(settings, steps=100)
    assert rows["steps"] == 100 and rows["HRA r"] == 6
    assert rows["strictly orthogonal (GS)"] == "yes, identity_start form"
    assert rows["batch size x accumulation"] == "2 x 4" and rows["learning rate"] == 5e-4 and rows["seed"] == 3
