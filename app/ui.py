"""The Gradio page and the named API endpoints, built from a :class:`~app.studio.Studio`; wiring only.

:func:`build` makes the page one tab at a time (``_train_tab``, ``_generate_tab``, ``_adapters_tab``, then
``_api_endpoints``); each lays out its components and wires them to a :class:`Handlers` method, which turns the page's
values into one Studio call.

Endpoints for scripts and ``gradio_client``: train, job_status, list_jobs, cancel, resume, generate, list_adapters,
download_adapter, import_adapter, delete_adapter. Library errors (a bad photo, a wrong base model) reach the user as
their message through ``gr.Error``.
"""

from __future__ import annotations

import functools
import html
import math
import re
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import gradio as gr
import pandas as pd

from hra_diffusion.control import CONTROL_KIND

from .host import CONTROL_TYPES, DOWNLOADS, HRA_FILE
from .jobs import ACTIVE
from .photos import MAX_PHOTO_BYTES, open_photo
from .studio import Studio
from .training_service import MAX_PHOTOS, TrainForm

USER_ERRORS = (ValueError, KeyError, OSError)  # the library's errors (bad photo, wrong base model) subclass these
JOB_COLUMNS = ["job", "status", "step", "loss", "subject", "queued at", "adapter"]
ADAPTER_COLUMNS = ["name", "kind", "base model", "instance prompt", "steps", "r", "created", "KB"]
WORLD_NOTE = (
    "**Demo world.** No base model was given, so HRA Studio runs its demo world: a small Stable Diffusion trained "
    "from nothing on toy pictures (balls, cubes, cups, toys, houses and dogs in eight scenes, 64 px), so you can "
    "watch HRA learn a subject on a laptop. Pick a demo subject below and press Start training; the samples turn "
    "into it within a few minutes. The shelf also holds `demo-world-canny`, a control adapter for this world: pick "
    "it on the Generate tab with a picture of the world, and the image follows the picture's edges. For real "
    "pictures start it with a Stable Diffusion 1.x/2.x, SDXL, SD3/3.5 or "
    "FLUX.1 model: "
    "`python -m app --base-model runwayml/stable-diffusion-v1-5` (a hub id) or `--base-model /path/to/folder`."
)
DEMO_NOTE = (
    "**Demo model.** No base model was given, so HRA Studio runs a tiny built-in model with random weights: "
    "everything works (training, stopping, adapters, exports) but it draws noise. For real pictures start it with "
    "a Stable Diffusion 1.x/2.x, SDXL, SD3/3.5 or FLUX.1 model: "
    "`python -m app --base-model runwayml/stable-diffusion-v1-5` (a hub id) or "
    "`--base-model /path/to/diffusers/folder`."
)


ABSOLUTE_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][^\s'\"\\/:]+)+[\\/]([^\s'\"\\/:]+)")


def _message(err: Exception) -> str:
    """The error's text for a browser: server paths shortened to their file name (they tell a visitor about the
    server's disk, and the user knows which file they sent)."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return ABSOLUTE_PATH.sub(r"\1", text)


def _user_errors(fn: Callable) -> Callable:
    """Show expected failures as their message in the page / the API answer instead of a bare 'Error'."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as err:
            raise gr.Error(_message(err), print_exception=False) from err

    return wrapper


def _in_page(fn: Callable, message_index: int, n_outputs: int) -> Callable:
    """A page handler whose expected failures land as text in its message output (index ``message_index``) and
    leave its other outputs as they were: gr.Error would paint every output with a red "Error" badge."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as err:
            outputs = [gr.skip()] * n_outputs
            outputs[message_index] = f"**Not done:** {_message(err)}"
            return tuple(outputs)

    return wrapper


def _sample_caption(path: str) -> str:
    """'step 40' for validation/step-40/0.png, the trainer's layout."""
    match = re.search(r"step-(\d+)", path)
    return f"step {match.group(1)}" if match else ""


def _loss_frame(job: dict[str, Any] | None) -> pd.DataFrame:
    """The loss per step for gr.LinePlot; typed columns even when empty, or the plot takes values for categories."""
    history = (job or {}).get("history", [])
    return pd.DataFrame({"step": pd.Series([h[0] for h in history], dtype="float64"),
                         "loss": pd.Series([h[1] for h in history], dtype="float64")})


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"


def _progress_html(job: dict[str, Any] | None) -> str:
    if job is None:
        return "<div id='job-progress' data-status='none'>No job yet: upload photos and press Start training.</div>"
    status = job["status"]
    parts = [f"<b>{html.escape(job['id'])}</b>", f"<b>{status}</b>"]
    if job["position"]:
        parts.append(f"number {job['position']} in the queue")
    if job["max_steps"]:
        parts.append(f"step {job['step']}/{job['max_steps']}")
    if job["loss"] is not None:
        parts.append(f"loss {job['loss']:.4f}")
    if job["settings"].get("lambda_orth") and job.get("history"):
        parts.append(f"orthogonality {job['history'][-1][2]:.3g}")  # the regularizer's term, when it is on
    if status in ACTIVE and job["eta_s"] is not None:
        parts.append(f"{_clock(job['eta_s'])} left")
    if job["result"]:
        parts.append(f"adapter <code>{html.escape(job['result'])}</code>")
    message = f"<pre>{html.escape(job['message'])}</pre>" if job["message"] else ""
    if job.get("logs"):
        message += f"<small>TensorBoard: <code>tensorboard --logdir {html.escape(job['logs'])}</code></small>"
    return (
        f"<div id='job-progress' data-status='{status}'>{' · '.join(parts)}"
        f"<progress value='{job['progress']:.3f}' max='1' style='width:100%'></progress>{message}</div>"
    )


def _job_rows(jobs: list[dict[str, Any]]) -> list[list[Any]]:
    return [
        [
            j["id"],
            j["status"] + (f" (#{j['position']})" if j["position"] else ""),
            f"{j['step']}/{j['max_steps']}" if j["max_steps"] else "",
            f"{j['loss']:.4f}" if j["loss"] is not None else "",
            f"{j['settings']['token']} {j['settings']['class_noun']}",
            time.strftime("%m-%d %H:%M:%S", time.localtime(j["created"])),
            j["result"] or "",
        ]
        for j in jobs
    ]


def _adapter_rows(adapters: list[dict[str, Any]]) -> list[list[Any]]:
    keys = ["name", "kind", "base_model", "instance_prompt", "steps", "r", "created", "size_kb"]
    blank = [""] * (len(keys) - 3)
    return [[a["name"], "unreadable", a["error"], *blank] if "error" in a else [a[k] for k in keys] for a in adapters]


def _number(value: Any, label: str, kind: type = float) -> Any:
    """A field's number as ``kind``; ValueError naming the field when it is empty, not finite or not whole."""
    number = float(_given(value, f"{label} is empty"))
    if not math.isfinite(number):
        raise ValueError(f"{label} must be a finite number, got {value}")
    if kind is int and not number.is_integer():
        raise ValueError(f"{label} must be a whole number, got {value}")
    return kind(number)


def _control_photo(path: str | None) -> Any:
    """The uploaded control image, held to the photos' limits before it is decoded (None: no control image)."""
    return None if path is None else open_photo(path)


def _given(value: Any, message: str) -> Any:
    """``value``, or ValueError(message) for what an emptied box or an unmade choice sends: None or ""."""
    if value is None or value == "":
        raise ValueError(message)
    return value


class Handlers:
    """What the page's events and the API endpoints call: each turns the page's values into one ``studio`` call and
    its answer into what the page shows. The tab functions below only lay out components and wire them to these."""

    def __init__(self, studio: Studio) -> None:
        self.studio = studio
        self.defaults = studio.defaults()  # the Train form's starting values

    # ----------------------------------------------------------------------------------------------------- train

    def job_view(self, job_id: str | None) -> tuple[Any, ...]:
        """The picked job, else the one running (a reopened page follows it, not the newest cancelled one)."""
        jobs = self.studio.list_jobs()
        active = [j for j in jobs if j["status"] in ACTIVE]
        job = next((j for j in jobs if j["id"] == job_id), None) or next(
            (j for j in active if j["status"] != "queued"), active[-1] if active else jobs[0] if jobs else None)
        samples = [(p, _sample_caption(p)) for p in job["samples"][-8:]] if job else []
        return _progress_html(job), samples, _loss_frame(job), _job_rows(jobs), job and job["id"]

    def train(self, photos: list[str] | None, token: str, class_noun: str, steps: float, r: float, lr: float,
              lam: float, resolution: float, prior: bool, seed: float) -> dict[str, Any]:  # fmt: skip
        settings = TrainForm(
            token=(token or "").strip(),
            class_noun=(class_noun or "").strip(),
            steps=_number(steps, "Steps", int),
            r=_number(r, "r", int),
            learning_rate=_number(lr, "Learning rate"),
            lambda_orth=_number(lam, "λ"),
            resolution=_number(resolution, "Resolution", int),
            prior_preservation=bool(prior),
            seed=_number(seed, "Seed", int),
            num_class_images=self.defaults.num_class_images,
            preview_steps=self.defaults.preview_steps,
        )
        return self.studio.train(photos or [], settings)

    def check_uploads(self, photos: list[str] | None) -> tuple[list[str], str]:
        good, rejected = self.studio.check_photos(photos or [])
        lines = [f"- **{r['file']}**: {r['reason']}" for r in rejected]
        if len(good) > MAX_PHOTOS:
            lines.insert(0, f"- {len(good)} photos: at most {MAX_PHOTOS} are used per run")
        head = f"**{len(good)} photo(s) accepted.**" if good else ""
        return [str(p) for p in good], "\n".join([head, *(["Rejected:", *lines] if lines else [])])

    def start(self, *inputs: Any) -> tuple[str, str]:
        job = self.train(*inputs)
        skipped = f" ({len(job['rejected'])} file(s) skipped, see the list above)" if job["rejected"] else ""
        return f"Job `{job['id']}` submitted{skipped}; its progress is below.", job["id"]

    @staticmethod
    def pick_job(evt: gr.SelectData) -> str:
        return evt.row_value[0]

    def stop_selected(self, job_id: str | None) -> None:
        self.studio.cancel(_given(job_id, "no job to stop"))

    def resume_selected(self, job_id: str | None) -> None:
        self.studio.resume(_given(job_id, "no job to resume"))

    # -------------------------------------------------------------------------------------------------- generate

    def generate(self, prompt: str, adapter: str | None, negative: str, seed: float, steps: float, guidance: float,
                 num_images: float, strength: float, control_adapter: str | None = None, control_image: Any = None,
                 control_type: str = "canny", control_scale: float = 1.0) -> list[Any]:  # fmt: skip
        """The None defaults make the control inputs optional for API clients (gradio reads them from here)."""
        return self.studio.generate(
            prompt,
            adapter or None,
            negative or "",
            _number(seed, "Seed", int),
            _number(steps, "Steps", int),
            _number(guidance, "Guidance"),
            _number(num_images, "Images", int),
            _number(strength, "Adapter strength"),
            control_adapter or None,
            _control_photo(control_image),
            control_type,
            _number(control_scale, "Control strength"),
        )

    def prompt_for(self, name: str | None, prompt: str) -> str:
        """A newly picked adapter brings its own instance prompt (its token), as a LoRA brings its trigger word."""
        info = next((a for a in self.studio.list_adapters() if a["name"] == name and "error" not in a), None)
        return (info or {}).get("instance_prompt") or prompt

    def preview_condition(self, image: str | None, control_type: str) -> Any:
        return self.studio.condition(_control_photo(image), control_type) if image is not None else None

    # -------------------------------------------------------------------------------------------------- adapters

    def adapters_view(self, shelf_pick: str | None = None, gen_pick: str | None = None,
                      control_pick: str | None = None) -> tuple[Any, ...]:  # fmt: skip
        """The table and the three adapter pickers, keeping picks that still exist (else: the newest)."""
        rows = self.studio.list_adapters()
        names = [a["name"] for a in rows]
        subjects = [a["name"] for a in rows if a.get("kind") != CONTROL_KIND]
        controls = [a["name"] for a in rows if a.get("kind") == CONTROL_KIND]
        return (
            _adapter_rows(rows),
            gr.update(choices=names, value=shelf_pick if shelf_pick in names else (names or [None])[0]),
            gr.update(choices=[("(none: base model)", ""), *subjects],
                      value=gen_pick if gen_pick in subjects else (subjects or [""])[0]),
            gr.update(choices=controls, value=control_pick if control_pick in controls else (controls or [None])[0]),
            gr.update(visible=bool(controls)),
        )  # fmt: skip

    def download_adapter(self, name: str, fmt: str) -> str:
        return str(self.studio.export_adapter(name, fmt))

    def import_adapter(self, upload: str | None) -> dict[str, Any]:
        return self.studio.import_adapter(_given(upload, "choose a .safetensors adapter file first"))

    def import_in_page(self, upload: str | None) -> tuple[Any, ...]:
        info = self.import_adapter(upload)
        return f"Imported **{info['name']}** ({info['kind']} adapter).", *self.adapters_view(info["name"])

    def delete_adapter(self, name: str) -> dict[str, Any]:
        self.studio.delete_adapter(name)
        return {"deleted": name}

    def delete_in_page(self, name: str | None) -> tuple[Any, ...]:
        self.delete_adapter(_given(name, "choose an adapter first"))
        return f"Deleted **{name}**.", *self.adapters_view()


def build(studio: Studio) -> gr.Blocks:
    """The whole page, one tab at a time, then the API-only endpoints; every handler is a :class:`Handlers` method."""
    h = Handlers(studio)
    with gr.Blocks(title="HRA Studio", delete_cache=(600, 3600)) as demo:
        gr.Markdown(
            "# HRA Studio\nTeach Stable Diffusion a subject from a few photos with Householder Reflection "
            f"Adaptation, then generate with it. Base model: `{studio.base_label}`."
        )
        if studio.demo:
            gr.Markdown(WORLD_NOTE if studio.world else DEMO_NOTE, elem_id="demo-note")
        train_inputs = _train_tab(h)
        pickers = _generate_tab(h)
        upload = _adapters_tab(h, demo, pickers)
        _api_endpoints(h, train_inputs, upload)
    return demo


# ------------------------------------------------------------------------------------------------------- train tab


def _train_tab(h: Handlers) -> list[Any]:
    """Photos, settings and Start, then the followed job; returns the /train endpoint's inputs."""
    with gr.Tab("Train", id="train"):
        with gr.Row():
            photos, examples = _photos_column(h)
            fields, start_btn, start_msg = _settings_column(h.defaults)
        selected = gr.State(None)  # the followed job's id
        view = _jobs_panel(h, selected)
    gr.Timer(1.0).tick(h.job_view, selected, view, queue=False, api_visibility="private")
    token, class_noun = fields[:2]
    for button, example in examples:
        button.click(lambda e=example: (e["photos"], h.defaults.token, e["class_noun"]), None,
                     [photos, token, class_noun], api_visibility="private")  # fmt: skip
    inputs = [photos, *fields]
    start_btn.click(_in_page(h.start, 0, 2), inputs, [start_msg, selected], api_visibility="private")
    return inputs


def _photos_column(h: Handlers) -> tuple[gr.File, list[tuple[gr.Button, dict[str, Any]]]]:
    """The photos, checked as they arrive, and a button per demo subject (with the subject it fills in)."""
    with gr.Column():
        photos = gr.File(
            label=f"Photos of your subject (1-{MAX_PHOTOS}; JPEG, PNG, WebP; {MAX_PHOTO_BYTES >> 20} MB each at most)",
            file_count="multiple",
            file_types=["image"], height=160, elem_id="photos",
        )  # fmt: skip
        preview = gr.Gallery(label="Accepted photos", columns=6, height=160, elem_id="photo-preview")
        upload_report = gr.Markdown(elem_id="upload-report")
        examples, buttons = h.studio.demo_subjects(), []
        if examples:
            gr.Markdown("**Demo subjects** (photos the base model has never seen): click one to use it.")
            with gr.Row():
                buttons = [gr.Button(e["name"].replace("_", " "), size="sm", elem_id=f"example-{e['name']}")
                           for e in examples]  # fmt: skip
    photos.change(h.check_uploads, photos, [preview, upload_report], api_visibility="private")
    return photos, list(zip(buttons, examples))


def _settings_column(d: TrainForm) -> tuple[list[Any], gr.Button, gr.Markdown]:
    """The Train form's fields in /train's order (token, class_noun, steps, r, lr, lam, resolution, prior, seed),
    the Start button and its message."""
    with gr.Column():
        with gr.Row():
            token = gr.Textbox(d.token, label="Subject token", info="a rare word meaning your subject")
            class_noun = gr.Textbox(d.class_noun, label="Class noun", info="what it is: dog, mug, person")
        with gr.Row():
            steps = gr.Number(d.steps, label="Steps", precision=0, minimum=1, elem_id="train-steps")
            r = gr.Number(d.r, label="r (reflections)", precision=0, minimum=1)
            resolution = gr.Number(d.resolution, label="Resolution", precision=0, minimum=32, step=8)
        with gr.Row():
            lr = gr.Number(d.learning_rate, label="Learning rate")
            lam = gr.Number(d.lambda_orth, label="λ (orthogonality)", minimum=0)
            seed = gr.Number(d.seed, label="Seed", precision=0)
        prior = gr.Checkbox(d.prior_preservation, label="Prior preservation (makes class images first)")
        start_btn = gr.Button("Start training", variant="primary", elem_id="start-train")
        start_msg = gr.Markdown(elem_id="start-msg")
    return [token, class_noun, steps, r, lr, lam, resolution, prior, seed], start_btn, start_msg


def _jobs_panel(h: Handlers, selected: gr.State) -> list[Any]:
    """The followed job (progress, samples, live loss), Stop and Resume, and the jobs table; returns what the
    page's timer refreshes from :meth:`Handlers.job_view`."""
    progress = gr.HTML(_progress_html(None), elem_id="progress-box")
    with gr.Row():
        stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-job")
        resume_btn = gr.Button("Resume from last checkpoint", elem_id="resume-job")
    with gr.Row():
        samples = gr.Gallery(label="Samples during training", columns=4, height=220, object_fit="contain",
                             elem_id="samples", scale=2)
        loss_plot = gr.LinePlot(_loss_frame(None), x="step", y="loss", height=220,
                                label="Loss (live)", elem_id="loss-plot", scale=1)
    job_table = gr.Dataframe(headers=JOB_COLUMNS, label="Jobs (click one to follow it)", interactive=False)
    job_table.select(h.pick_job, None, selected, api_visibility="private")
    stop_btn.click(_user_errors(h.stop_selected), selected, None, api_visibility="private")
    resume_btn.click(_user_errors(h.resume_selected), selected, None, api_visibility="private")
    return [progress, samples, loss_plot, job_table, selected]


# ---------------------------------------------------------------------------------------------------- generate tab


class _Pickers(NamedTuple):
    """The Generate tab's adapter pickers, which the Adapters tab keeps in step with the shelf."""

    tab: gr.Tab
    adapter: gr.Dropdown
    control_adapter: gr.Dropdown
    control_box: gr.Accordion


def _generate_tab(h: Handlers) -> _Pickers:
    """Adapter, prompt and numbers, the optional control image, the gallery; the /generate endpoint."""
    with gr.Tab("Generate", id="generate") as tab:
        with gr.Row():
            with gr.Column():
                adapter = gr.Dropdown([("(none: base model)", "")], value="", label="Adapter",
                                      allow_custom_value=True, elem_id="gen-adapter")  # fmt: skip
                prompt = gr.Textbox(h.defaults.instance_prompt, label="Prompt", elem_id="gen-prompt")
                negative = gr.Textbox("", label="Negative prompt")
                with gr.Row():
                    seed = gr.Number(0, label="Seed", precision=0)
                    steps = gr.Number(25, label="Steps", precision=0, minimum=1, maximum=150, elem_id="g-steps")
                    guidance = gr.Number(7.5, label="Guidance", minimum=0)
                with gr.Row():
                    num_images = gr.Slider(1, 8, 1, step=1, label="Images")
                    strength = gr.Slider(0, 1, 1, step=0.05, label="Adapter strength")
                control_box, control = _control_box(h)
                gen_btn = gr.Button("Generate", variant="primary", elem_id="generate")
            gallery = gr.Gallery(label="Images", columns=2, height=480, format="png", elem_id="gallery",
                                 buttons=["download", "fullscreen"])  # fmt: skip
    inputs = [prompt, adapter, negative, seed, steps, guidance, num_images, strength, *control]
    gen_btn.click(_user_errors(h.generate), inputs, gallery, api_name="generate")
    adapter.change(h.prompt_for, [adapter, prompt], prompt, api_visibility="private")
    return _Pickers(tab, adapter, control[0], control_box)


def _control_box(h: Handlers) -> tuple[gr.Accordion, list[Any]]:
    """The control inputs (adapter, image, preprocessing, strength), hidden until a control adapter is on the shelf;
    the condition map the adapter sees is shown beside the image."""
    with gr.Accordion("Control (layout from an image)", open=False, visible=False) as box:
        control_adapter = gr.Dropdown([], label="Control adapter", allow_custom_value=True)
        with gr.Row():
            # a path, not an image: gradio would decode it before open_photo's limits (image_mode=None: no convert)
            control_image = gr.Image(type="filepath", image_mode=None, height=200, elem_id="control-image",
                                     label=f"Control image ({MAX_PHOTO_BYTES >> 20} MB at most)")
            condition = gr.Image(type="pil", label="What the adapter sees", height=200, interactive=False,
                                 elem_id="condition")  # fmt: skip
        with gr.Row():
            control_type = gr.Radio(list(CONTROL_TYPES), value="canny", label="Preprocessing",
                                    info="canny: edges of a photo; none: already a condition map")
            control_scale = gr.Slider(0, 2, 1, step=0.05, label="Control strength")
    gr.on([control_image.change, control_type.change], _user_errors(h.preview_condition),
          [control_image, control_type], condition, api_visibility="private")  # fmt: skip
    return box, [control_adapter, control_image, control_type, control_scale]


# ---------------------------------------------------------------------------------------------------- adapters tab


def _adapters_tab(h: Handlers, demo: gr.Blocks, pickers: _Pickers) -> gr.File:
    """The shelf's table, download, delete and import, kept in step with the Generate tab's pickers; the
    /download_adapter endpoint. Returns the import's upload (the /import_adapter endpoint's input)."""
    with gr.Tab("Adapters", id="adapters") as tab:
        table = gr.Dataframe(headers=ADAPTER_COLUMNS, label="Adapters", interactive=False, wrap=True,
                             elem_id="adapter-table")
        with gr.Row():
            chosen = gr.Dropdown(label="Adapter", allow_custom_value=True, elem_id="shelf-adapter")
            fmt = gr.Radio([(f"{k}: {v}", k) for k, v in DOWNLOADS.items()], value=HRA_FILE, label="Download as")
        with gr.Row():
            download_btn = gr.Button("Prepare download", variant="primary")
            delete_btn = gr.Button("Delete", variant="stop")
        download = gr.File(label="Download", interactive=False, height=80)
        with gr.Accordion("Import an adapter file", open=False):
            upload = gr.File(label="HRA Studio adapter (.safetensors)", file_types=[".safetensors"], height=120,
                             elem_id="import-file")
            import_btn = gr.Button("Import")
        message = gr.Markdown(elem_id="shelf-msg")
    shelf = [table, chosen, pickers.adapter, pickers.control_adapter, pickers.control_box]
    for event in (demo.load, tab.select, pickers.tab.select):
        event(h.adapters_view, [chosen, pickers.adapter, pickers.control_adapter], shelf, api_visibility="private")
    download_btn.click(_user_errors(h.download_adapter), [chosen, fmt], download, api_name="download_adapter")
    delete_btn.click(_in_page(h.delete_in_page, 0, 1 + len(shelf)), chosen, [message, *shelf],
                     api_visibility="private")
    import_btn.click(_in_page(h.import_in_page, 0, 1 + len(shelf)), upload, [message, *shelf],
                     api_visibility="private")
    return upload


# --------------------------------------------------------------------------------------------------------- the API


def _api_endpoints(h: Handlers, train_inputs: list[Any], upload: gr.File) -> None:
    """The API-only endpoints: the page's inputs where it has them, a JSON answer."""
    api_out = gr.JSON(visible=False)
    gr.Button(visible=False).click(_user_errors(h.train), train_inputs, api_out, api_name="train")
    gr.Button(visible=False).click(_user_errors(h.import_adapter), upload, api_out, api_name="import_adapter")
    studio = h.studio
    for fn, name in (
        (studio.job_status, "job_status"),
        (studio.list_jobs, "list_jobs"),
        (studio.cancel, "cancel"),
        (studio.resume, "resume"),
        (studio.list_adapters, "list_adapters"),
        (h.delete_adapter, "delete_adapter"),
    ):
        gr.api(_user_errors(fn), api_name=name)
