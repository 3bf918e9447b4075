"""HRA Studio end to end: `python -m app` on the tiny demo model, driven through its named API with gradio_client,
training with the real DreamBooth trainer (training/dreambooth_hra.py) in its own process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from app.jobs import REQUEST_FILE  # noqa: E402
from hra_diffusion.families import BY_NAME  # noqa: E402
from hra_diffusion.train import read_request  # noqa: E402
from hra_diffusion.train.loop import SETTINGS_FILE  # noqa: E402

pytestmark = pytest.mark.slow  # a real app process and real trainer runs

REPO = Path(__file__).resolve().parents[1]
PHOTOS = sorted((REPO / "tests" / "fixtures" / "subjects" / "dog").glob("*.jpg"))
FINAL = ("done", "stopped", "cancelled", "failed", "interrupted")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`python -m app` in a subprocess on a data folder; restartable, killable like a crashed app."""

    def __init__(self, data_dir: Path, demo_world: bool = False) -> None:
        """``demo_world=False``: the tiny random model (HRA_DEMO_WORLD=none), for the app's mechanics, fast."""
        self.data_dir = data_dir
        self.env = {**os.environ, **({} if demo_world else {"HRA_DEMO_WORLD": "none"})}
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 180.0) -> Client:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}/"
        log = open(self.data_dir.parent / f"app-{port}.log", "wb")  # noqa: SIM115 (closed with the process)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app", "--port", str(port), "--data-dir", str(self.data_dir)],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,  # its trainers join its group
            env=self.env,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, Path(log.name).read_text()[-3000:]
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    if response.status == 200:
                        return Client(self.url, verbose=False)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.3)
        raise AssertionError(f"the app did not answer within {timeout} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)

    def crash(self) -> None:
        """SIGKILL the app and its trainer at once, like a power cut: nobody gets to save anything."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(60)

    def get(self, path: str) -> int:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("studio") / "data")
    srv.client = srv.start()
    yield srv
    srv.stop()


def train(client: Client, files: list[Path], steps: int, **kw) -> dict:
    """The /train endpoint by keyword; unnamed parameters keep the page's defaults (the demo's 64 px, r = 8, ...)."""
    return client.predict(photos=[handle_file(str(p)) for p in files], steps=steps, **kw, api_name="/train")


def wait(client: Client, job_id: str, until, timeout: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.predict(job_id, api_name="/job_status")
        if until(job):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not get there in {timeout} s: {job}")


def generate(client: Client, adapter: str = "", n: int = 1) -> list[dict]:
    return client.predict(prompt="a photo of sks dog", adapter=adapter, steps=4, num_images=n, api_name="/generate")


def bad_files(folder: Path) -> list[Path]:
    folder.mkdir(exist_ok=True)
    corrupt = folder / "corrupt.jpg"
    corrupt.write_bytes(PHOTOS[0].read_bytes()[:300])
    fake = folder / "fake.png"
    fake.write_text("this is a text file")
    huge = folder / "huge.png"
    Image.new("1", (10_000, 10_000)).save(huge)
    return [corrupt, fake, huge]


def test_train_generate_list_download(server, tmp_path):
    client = server.client
    job = train(client, [*PHOTOS, *bad_files(tmp_path)], steps=4)
    reasons = {r["file"]: r["reason"] for r in job["rejected"]}
    assert set(reasons) == {"corrupt.jpg", "fake.png", "huge.png"}
    assert "truncated or corrupt" in reasons["corrupt.jpg"] and "not an image" in reasons["fake.png"]
    assert "over the limit" in reasons["huge.png"]
    assert job["settings"]["photos"] == len(PHOTOS) and job["status"] in ("queued", "running")

    seen_steps = set()
    done = wait(client, job["id"], lambda j: seen_steps.add(j["step"]) or j["status"] in FINAL)
    assert done["status"] == "done", done["message"]
    assert done["step"] == done["max_steps"] == 4 and done["progress"] == 1.0 and done["loss"] > 0
    assert done["samples"] and all(Path(p).is_relative_to(server.data_dir) for p in done["samples"])
    name = done["result"]

    # the job's request is exactly what the trainer ran with (it records its resolved settings beside the adapter);
    # the one default left to the model is filled in from its family: SD's attention targets
    folder = server.data_dir / "jobs" / job["id"]
    request = read_request(folder / REQUEST_FILE)
    assert request["hra_target_modules"] is None
    targets = ",".join(BY_NAME["sd"].default_targets)
    assert read_request(folder / "out" / SETTINGS_FILE) == {**request, "hra_target_modules": targets}
    assert request["max_train_steps"] == 4 and request["instance_prompt"] == "a photo of sks dog"

    [info] = [a for a in client.predict(api_name="/list_adapters") if a["name"] == name]
    assert info["instance_prompt"] == "a photo of sks dog" and info["steps"] == 4 and info["r"] == 8
    assert info["kind"] == "subject" and Path(info["base_model"]).is_relative_to(server.data_dir)

    t0 = time.monotonic()
    images = generate(client, name, n=2)
    print(f"generate (2 images, 4 steps) through the API: {time.monotonic() - t0:.2f} s")
    assert len(images) == 2 and Image.open(images[0]["image"]).size == (64, 64)

    native = client.predict(name, "hra", api_name="/download_adapter")
    assert Path(native).read_bytes() == (server.data_dir / "adapters" / f"{name}.safetensors").read_bytes()
    kohya = client.predict(name, "lora-kohya", api_name="/download_adapter")
    with safe_open(kohya, framework="pt") as handle:
        assert any(key.startswith("lora_unet_") and key.endswith(".lora_down.weight") for key in handle.keys())


def test_bad_uploads_are_refused_with_reasons(server, tmp_path):
    with pytest.raises(AppError, match=r"no usable photos .*corrupt\.jpg: could not decode.*fake\.png: not an image"):
        train(server.client, bad_files(tmp_path)[:2], steps=2)
    with pytest.raises(AppError, match="odd number of reflections"):
        train(server.client, PHOTOS, steps=2, r=3)
    with pytest.raises(AppError, match="subject token"):
        train(server.client, PHOTOS, steps=2, token="a b")


def test_cancel_stops_within_seconds_and_keeps_a_usable_adapter(server):
    client = server.client
    job = train(client, PHOTOS, steps=100_000)
    wait(client, job["id"], lambda j: j["step"] >= 2)
    waiting = train(client, PHOTOS, steps=2)
    assert waiting["status"] == "queued" and waiting["position"] == 1
    assert client.predict(waiting["id"], api_name="/cancel")["status"] == "cancelled"  # dropped at once
    t0 = time.monotonic()
    client.predict(job["id"], api_name="/cancel")
    stopped = wait(client, job["id"], lambda j: j["status"] in FINAL, timeout=60)
    took = time.monotonic() - t0
    print(f"stop took {took:.1f} s")
    assert stopped["status"] == "stopped" and took < 30, (stopped, took)
    assert stopped["result"] in [a["name"] for a in client.predict(api_name="/list_adapters")]
    assert len(generate(client, stopped["result"])) == 1
    assert client.predict(waiting["id"], api_name="/job_status")["attempts"] == 0, "a cancelled job never runs"


def test_only_the_data_folder_is_served(server):
    name = server.client.predict(api_name="/list_adapters")[0]["name"]
    inside = server.data_dir / "adapters" / f"{name}.safetensors"
    assert server.get(f"gradio_api/file={inside}") == 200
    for outside in ("/etc/passwd", REPO / "pyproject.toml", REPO / "app" / "studio.py", Path.home() / ".bashrc",
                    server.data_dir / ".." / ".." / "x", f"{server.data_dir}/../app-0.log"):  # fmt: skip
        assert server.get(f"gradio_api/file={outside}") in (403, 404), outside
    for name in ("../../etc/passwd", "/etc/passwd", "..", "x/../../y"):
        with pytest.raises(AppError, match="not an adapter name"):
            server.client.predict(name, "hra", api_name="/download_adapter")


def test_restart_keeps_jobs_and_adapters_and_resumes_an_interrupted_job(server):
    client = server.client
    running = train(client, PHOTOS, steps=8)  # a checkpoint every 2 steps
    wait(client, running["id"], lambda j: j["checkpoint"] is not None)
    before_jobs = {j["id"]: j["status"] for j in client.predict(api_name="/list_jobs")}
    before_adapters = sorted(a["name"] for a in client.predict(api_name="/list_adapters"))
    server.crash()

    client = server.client = server.start()
    after = {j["id"]: j for j in client.predict(api_name="/list_jobs")}
    crashed = after.pop(running["id"])
    assert crashed["status"] == "interrupted" and "resume" in crashed["message"] and crashed["checkpoint"]
    assert {k: v["status"] for k, v in after.items()} == {k: v for k, v in before_jobs.items() if k != running["id"]}
    assert set(before_adapters) <= {a["name"] for a in client.predict(api_name="/list_adapters")}
    checkpoint_step = int(crashed["checkpoint"].rsplit("-", 1)[1])

    client.predict(running["id"], api_name="/resume")
    resumed = wait(client, running["id"], lambda j: j["status"] in FINAL)
    assert resumed["status"] == "done" and resumed["step"] == 8 and resumed["attempts"] == 2, resumed
    folder = server.data_dir / "jobs" / running["id"]
    assert "--resume_from_checkpoint latest" in (folder / "train.log").read_text()
    events = [json.loads(line) for line in (folder / "progress-2.jsonl").read_text().splitlines()]
    first_step = next(e["step"] for e in events if e["event"] == "step")
    assert first_step > checkpoint_step >= 2, "continued from the checkpoint, not from the start"
    assert len(generate(client, resumed["result"])) == 1

    # A clean stop (SIGTERM, like Ctrl-C) during a run: the trainer saves, the job comes back interrupted.
    busy = train(client, PHOTOS, steps=100_000)
    wait(client, busy["id"], lambda j: j["step"] >= 1)
    server.stop()
    client = server.client = server.start()
    assert client.predict(running["id"], api_name="/job_status")["status"] == "done"
    stopped = client.predict(busy["id"], api_name="/job_status")
    assert stopped["status"] == "interrupted" and stopped["result"] and stopped["step"] >= 1
    adapters = [a["name"] for a in client.predict(api_name="/list_adapters")]
    assert resumed["result"] in adapters and stopped["result"] in adapters


def test_login_and_the_warning_without_one(tmp_path):
    """--auth puts Gradio's login in front of everything; listening beyond localhost without it warns at start."""
    env = {**os.environ, "HRA_DEMO_WORLD": "none"}
    port = free_port()
    log = tmp_path / "auth.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "app", "--port", str(port), "--data-dir", str(tmp_path / "a"),
                                 "--auth", "ann:secret"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                urllib.request.urlopen(url, timeout=5).close()
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.3)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url + "config", timeout=10)
        assert refused.value.code == 401
        assert "WARNING" not in log.read_text()
    finally:
        proc.terminate()
        proc.wait(60)

    loud = subprocess.Popen([sys.executable, "-m", "app", "--host", "127.0.0.2", "--port", str(free_port()),
                             "--data-dir", str(tmp_path / "b")], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    try:
        first = loud.stderr.readline()
        while first and "WARNING" not in first:
            first = loud.stderr.readline()
        assert "has no login" in first and "--auth USER:PASSWORD" in first
    finally:
        loud.terminate()
        loud.wait(60)
