"""Downloads through the real `pasd` command against a loopback hub (tests/hub_server.py) serving
the tiny PASD checkpoint, tiny SD base and tiny BLIP captioner in the released repos' layout.

"The network guard": every request that reaches the loopback hub is logged; the offline runs
keep HF_ENDPOINT pointed at it and must add zero requests to the log.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from conftest import LR_INPUT, REFERENCE, REFERENCE_ARGS, TINY_PASD, pasd_command
from hub_server import FakeHub, Fault, Repo, clean_env, tiny_hub_repos
from PIL import Image

from pasd_cli.errors import ModelError
from pasd_cli.store import Kind, Manifest, ModelRef, Store, load_manifests, resolve
from pasd_cli.store.hub import download

MANIFESTS = load_manifests()
PASD_REPO, SD_REPO = "yangtao9009/PASD", "stable-diffusion-v1-5/stable-diffusion-v1-5"
BLIP_REPO = MANIFESTS["blip"].repo_id
UNET_WEIGHTS = "pasd/checkpoint-100000/unet/diffusion_pytorch_model.safetensors"
CONTROLNET_WEIGHTS = "pasd/checkpoint-100000/controlnet/diffusion_pytorch_model.safetensors"
# Cheap settings for runs that must be refused: if a refusal ever regressed, the run stays short.
QUICK = ["--steps", "1", "--scale", "1", "--process-size", "64", "--device", "cpu", "--dtype", "fp32"]


@pytest.fixture
def hub(tiny_blip_dir):
    with FakeHub(tiny_hub_repos(REFERENCE, {BLIP_REPO: tiny_blip_dir})) as server:
        yield server


def pasd(*args, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*pasd_command(), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def one_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def wanted(*names: str) -> Counter:
    return Counter(f"{MANIFESTS[n].repo_id}/{p}" for n in names for p in MANIFESTS[n].repo_paths)


def install(hub: FakeHub, root: Path, names=("pasd", "sd15", "blip")) -> Store:
    store = Store(root)
    for name in names:
        download(store, name, endpoint=hub.url)
    return store


def assert_reference_image(path: Path, reference) -> None:
    from pasd_cli.engine.pipeline import image_to_tensor

    diff = (image_to_tensor(Image.open(path)).int() - reference["pipeline"]["final_uint8"].int()).abs()
    assert diff.max() <= 2 and diff.float().mean() < 0.05


def upscale_offline(tmp_path: Path, env: dict, *extra) -> subprocess.CompletedProcess:
    return pasd("upscale", LR_INPUT, "-o", tmp_path / "out", "--offline", *REFERENCE_ARGS, *extra, env=env)


# ---- Must show 1: exactly the needed files; then an offline upscale with zero requests ------------


def test_download_fetches_exactly_the_needed_files_then_upscale_runs_offline(tmp_path, hub, reference):
    env = clean_env(tmp_path, hub)
    proc = pasd("download", env=env)
    assert proc.returncode == 0, proc.stderr
    store = tmp_path / "store"
    assert proc.stdout.split() == [
        str(store / "pasd" / "pasd" / "checkpoint-100000"),
        str(store / "sd15"),
        str(store / "blip"),
    ]  # upscale captions by default: the captioner too
    assert Counter(hub.downloads()) == wanted("pasd", "sd15", "blip")  # each needed file once, nothing else
    assert (store / "pasd" / UNET_WEIGHTS).read_bytes() == (
        TINY_PASD / "unet" / "diffusion_pytorch_model.safetensors"
    ).read_bytes()
    assert not (store / "sd15" / "unet").exists() and not (store / "pasd" / "README.md").exists()

    listed = pasd("models", "list", "--json", env=env)
    rows = {row["name"]: row for row in map(__import__("json").loads, listed.stdout.splitlines())}
    assert rows["pasd"]["installed"] and rows["sd15"]["installed"] and not rows["pasd-light"]["installed"]
    assert rows["blip"]["installed"] and rows["blip"]["default"] and not rows["resnet-50"]["installed"]
    assert not (store / "blip" / "pytorch_model.bin").exists()
    assert rows["sd15"]["size"] == sum(len(hub.repos[SD_REPO].files[p]) for p in MANIFESTS["sd15"].repo_paths)
    assert rows["pasd"]["commit"] == hub.repos[PASD_REPO].commit

    requests_before = len(hub.requests)
    proc = upscale_offline(tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    assert len(hub.requests) == requests_before  # the network guard: not one request
    assert_reference_image(tmp_path / "out" / "lr_input.png", reference)


# ---- Must show 2: connection dropped midway; no partial file used; the rerun resumes --------------


def test_cut_connection_leaves_nothing_usable_and_the_rerun_finishes(tmp_path, hub):
    env = clean_env(tmp_path, hub)
    hub.drop[f"{PASD_REPO}/{UNET_WEIGHTS}"] = Fault(after_bytes=1_000_000, times=1000)
    proc = pasd("download", env=env)
    assert "was cut off" in one_error(proc) and UNET_WEIGHTS in proc.stderr
    first = Counter(hub.downloads())
    assert first[f"{PASD_REPO}/{UNET_WEIGHTS}"] >= 2  # huggingface_hub retried before giving up

    store = tmp_path / "store"
    assert not (store / "pasd" / UNET_WEIGHTS).exists()
    assert not list(store.rglob("*.incomplete")) and not (store / "pasd" / "pasd-model.json").exists()
    requests_before = len(hub.requests)
    refused = pasd("upscale", LR_INPUT, "-o", tmp_path / "out", "--offline", *QUICK, env=env)
    assert "'pasd' (not installed)" in one_error(refused)
    assert len(hub.requests) == requests_before

    hub.drop.clear()
    hub.requests.clear()
    proc = pasd("download", env=env)
    assert proc.returncode == 0, proc.stderr
    second = Counter(hub.downloads())
    finished_before = f"{PASD_REPO}/pasd/checkpoint-100000/unet/config.json"
    assert first[finished_before] == 1 and second[finished_before] == 0  # kept, not fetched again
    assert second == wanted("pasd", "sd15", "blip") - Counter([finished_before])
    assert pasd("models", "verify", env=env).returncode == 0


def test_cut_connection_is_resumed_within_the_run_by_a_range_request(tmp_path, hub):
    weights = os.urandom(25_000_000)  # larger than huggingface_hub's 10 MiB streaming chunk
    hub.repos["test/big"] = Repo({"weights.safetensors": weights})
    hub.drop["test/big/weights.safetensors"] = Fault(after_bytes=15_000_000, times=1)
    manifest = Manifest(
        name="big",
        kind="base",
        description="",
        repo_id="test/big",
        revision="main",
        subfolder="",
        files=("weights.safetensors",),
        license="test",
    )
    store = Store(tmp_path, manifests={"big": manifest})
    download(store, "big", endpoint=hub.url)
    gets = [r for r in hub.requests if r.method == "GET" and "/resolve/" in r.path]
    assert len(gets) == 2 and gets[0].range is None
    resumed_at = int(gets[1].range.removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= 15_000_000
    assert (tmp_path / "big" / "weights.safetensors").read_bytes() == weights
    assert store.problems("big", full=True) == []


# ---- Must show 3: a flipped byte is reported, refused, and repaired ---------------------------------


def test_flipped_byte_is_reported_by_verify_and_repaired_by_download(tmp_path, hub):
    env = clean_env(tmp_path, hub)
    install(hub, tmp_path / "store")
    victim = tmp_path / "store" / "pasd" / CONTROLNET_WEIGHTS
    with open(victim, "r+b") as f:
        f.seek(victim.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x01]))

    proc = pasd("models", "verify", env=env)
    line = one_error(proc)
    assert "pasd" in line and CONTROLNET_WEIGHTS in line and "sha256 mismatch" in line
    assert "hint: repair with: pasd download pasd" in proc.stderr
    assert "sd15: ok" in proc.stdout

    refused = pasd("upscale", LR_INPUT, "-o", tmp_path / "out", "--offline", *QUICK, env=env)
    assert "sha256 mismatch" in one_error(refused)

    hub.requests.clear()
    proc = pasd("download", env=env)
    assert proc.returncode == 0, proc.stderr
    assert hub.downloads() == [f"{PASD_REPO}/{CONTROLNET_WEIGHTS}"]  # only the damaged file
    assert pasd("models", "verify", "pasd", env=env).returncode == 0

    hub.requests.clear()
    again = pasd("download", env=env)  # intact models: re-hashed locally, no network
    assert again.returncode == 0 and "already installed and verified" in again.stderr
    assert hub.requests == []


# ---- Must show 4: offline with a model missing ------------------------------------------------------


@pytest.mark.parametrize("how", ["--offline", "PASD_OFFLINE=1", "HF_HUB_OFFLINE=1", "no terminal"])
def test_missing_models_offline_exit_3_naming_models_and_command(tmp_path, hub, how):
    flags = ["--offline"] if how == "--offline" else []
    extra = dict([how.split("=")]) if "=" in how else {}
    proc = pasd("upscale", LR_INPUT, "-o", tmp_path / "out", *flags, *QUICK, env=clean_env(tmp_path, hub, **extra))
    line = one_error(proc)
    assert all(f"'{name}' (not installed)" in line for name in ("pasd", "sd15", "blip"))  # the captioner too
    assert ("no terminal" if how == "no terminal" else "offline") in line
    assert "hint: fetch with: pasd download pasd sd15 blip\n" in proc.stderr
    assert hub.requests == []
    assert not (tmp_path / "out").exists()


def test_only_the_missing_model_is_named(tmp_path, hub):
    proc = pasd(
        "upscale",
        LR_INPUT,
        "-o",
        tmp_path / "out",
        "--offline",
        *QUICK,
        "--pasd",
        TINY_PASD,
        "--models-dir",
        tmp_path / "elsewhere",
        env=clean_env(tmp_path, hub),
    )
    assert "'sd15'" in one_error(proc) and "'pasd'" not in proc.stderr
    assert f"hint: fetch with: pasd download sd15 blip --models-dir {tmp_path / 'elsewhere'}" in proc.stderr
    assert hub.requests == []


# ---- Must show 5: export, import into an empty store, run ------------------------------------------


def test_export_then_import_into_an_empty_store_gives_a_working_model(tmp_path, hub, reference):
    env = clean_env(tmp_path)  # no HF_ENDPOINT: after the install below, nothing may use the network
    install(hub, tmp_path / "store")
    bundle = tmp_path / "pasd-bundle.tar"
    proc = pasd("models", "export", "pasd", bundle, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == str(bundle), proc.stderr

    empty = tmp_path / "air-gapped"
    proc = pasd("models", "import", bundle, "--models-dir", empty, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(empty / "pasd" / "pasd" / "checkpoint-100000"), str(empty / "sd15")]
    verified = pasd("models", "verify", "--models-dir", empty, env=env)
    assert verified.returncode == 0 and verified.stdout.count(": ok") == 2, verified.stderr

    hub.requests.clear()
    proc = upscale_offline(tmp_path, env, "--models-dir", empty)
    assert proc.returncode == 0, proc.stderr
    assert hub.requests == []
    assert_reference_image(tmp_path / "out" / "lr_input.png", reference)


def _flip_in_member(bundle: Path, member_name: str) -> None:
    with tarfile.open(bundle) as tar:
        member = tar.getmember(member_name)
    with open(bundle, "r+b") as f:
        f.seek(member.offset_data + member.size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
def test_damaged_bundle_installs_nothing(tmp_path, hub, damage):
    env = clean_env(tmp_path)
    install(hub, tmp_path / "store", names=("sd15",))
    bundle = tmp_path / "sd15.tar"
    assert pasd("models", "export", "sd15", bundle, env=env).returncode == 0
    if damage == "flipped byte":
        _flip_in_member(bundle, "sd15/vae/diffusion_pytorch_model.safetensors")
    else:
        bundle.write_bytes(bundle.read_bytes()[: bundle.stat().st_size // 2])
    target = tmp_path / "air-gapped"
    line = one_error(pasd("models", "import", bundle, "--models-dir", target, env=env))
    assert ("sha256 mismatch" if damage == "flipped byte" else "damaged or truncated bundle") in line
    assert Store(target).problems("sd15") == ["not installed"]
    assert not (target / "sd15").exists()


# ---- One-line errors, exit code 3 -------------------------------------------------------------------


def _closed_port_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_unknown_name(tmp_path, hub):
    assert "unknown model 'nope'" in one_error(pasd("download", "nope", env=clean_env(tmp_path, hub)))
    line = one_error(pasd("upscale", LR_INPUT, "-o", tmp_path / "o", "--pasd", "nope", env=clean_env(tmp_path)))
    assert "--pasd nope: unknown model name" in line


def test_repo_not_found(tmp_path, hub):
    del hub.repos[SD_REPO]
    line = one_error(pasd("download", "sd15", env=clean_env(tmp_path, hub)))
    assert f"repository {SD_REPO} not found at {hub.url}" in line


def test_file_not_found(tmp_path, hub):
    del hub.repos[SD_REPO].files["vae/config.json"]
    line = one_error(pasd("download", "sd15", env=clean_env(tmp_path, hub)))
    assert f"file vae/config.json not found in {SD_REPO}@main" in line
    assert hub.downloads() == []


def test_auth_refused_then_hf_token_honoured(tmp_path, hub):
    hub.repos[PASD_REPO].token = "s3cret"
    line = one_error(pasd("download", "pasd", env=clean_env(tmp_path, hub)))
    assert f"access to {PASD_REPO} refused (HTTP 401)" in line
    proc = pasd("download", "pasd", env=clean_env(tmp_path, hub, HF_TOKEN="s3cret"))
    assert proc.returncode == 0, proc.stderr
    assert {r.authorization for r in hub.requests if PASD_REPO in r.path} >= {"Bearer s3cret"}


def test_network_unreachable(tmp_path):
    endpoint = _closed_port_endpoint()
    line = one_error(pasd("download", "sd15", env=clean_env(tmp_path, HF_ENDPOINT=endpoint)))
    assert f"cannot reach {endpoint}" in line


def test_hash_mismatch_deletes_the_file(tmp_path, hub):
    hub.corrupt.add(f"{SD_REPO}/vae/diffusion_pytorch_model.safetensors")
    line = one_error(pasd("download", "sd15", env=clean_env(tmp_path, hub)))
    assert "hash mismatch for vae/diffusion_pytorch_model.safetensors of sd15" in line
    assert not (tmp_path / "store" / "sd15" / "vae" / "diffusion_pytorch_model.safetensors").exists()
    assert Store(tmp_path / "store").problems("sd15") == ["not installed"]


def test_disk_full_is_checked_before_downloading(tmp_path, hub):
    with pytest.raises(ModelError, match="not enough disk space: 1.7 MB to download, 1.0 kB free") as err:
        download(Store(tmp_path), "sd15", endpoint=hub.url, free_space=lambda path: 1000)
    assert err.value.exit_code == 3
    assert hub.downloads() == []
    needed = sum(len(hub.repos[SD_REPO].files[p]) for p in MANIFESTS["sd15"].repo_paths)
    download(Store(tmp_path), "sd15", endpoint=hub.url, free_space=lambda path: needed)  # exactly enough
    assert Counter(hub.downloads()) == wanted("sd15")


def test_remove_and_path(tmp_path, hub):
    env = clean_env(tmp_path)
    install(hub, tmp_path / "store", names=("sd15",))
    assert pasd("models", "path", env=env).stdout.strip() == str(tmp_path / "store")
    assert pasd("models", "path", "sd15", env=env).stdout.strip() == str(tmp_path / "store" / "sd15")
    assert pasd("models", "remove", "sd15", env=env).returncode == 0
    assert not (tmp_path / "store" / "sd15").exists()
    assert "not installed" in one_error(pasd("models", "verify", "sd15", env=env))


def test_remove_also_removes_the_converted_copies_of_its_weights(tmp_path, hub):
    import torch

    from pasd_cli.nn.converted_weights import ConvertedWeights

    env = clean_env(tmp_path)
    store = install(hub, tmp_path / "store", names=("pasd", "sd15"))
    copies = ConvertedWeights(store.root / ".converted")
    tensors = {"w": torch.ones(2, dtype=torch.bfloat16)}
    pasd_files = sorted(store.model_path("pasd").rglob("*.safetensors"))
    kept = copies.write(next(store.model_path("sd15").rglob("*.safetensors")), torch.bfloat16, tensors)
    for source in pasd_files:
        copies.write(source, torch.bfloat16, tensors)
    assert len(list(copies.folder.iterdir())) == len(pasd_files) + 1
    proc = pasd("models", "remove", "pasd", env=env)
    assert proc.returncode == 0, proc.stderr
    assert f"also removed {len(pasd_files)} converted copies of its weights" in proc.stderr + proc.stdout
    assert list(copies.folder.iterdir()) == [kept]  # another model's copy stays


# ---- At a terminal, a missing model is fetched on the fly, with a progress bar ---------------------


def _run_at_terminal(args, env) -> tuple[int, str, str]:
    """Run `pasd` with stdin and stderr on a pseudo-terminal; (exit code, stdout, terminal output)."""
    import threading

    pty = pytest.importorskip("pty")
    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    # A fresh pty is 0 columns wide, and tqdm draws nothing in 0 columns; a real terminal has a size.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(
        [*pasd_command(), *map(str, args)], stdin=slave, stdout=subprocess.PIPE, stderr=slave, env=env
    )
    os.close(slave)
    chunks: list[bytes] = []

    def drain():
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO once the child has closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    stdout, _ = proc.communicate(timeout=300)
    reader.join(timeout=10)
    os.close(master)
    return proc.returncode, stdout.decode(), b"".join(chunks).decode(errors="replace")


def test_interactive_resolution_downloads_what_is_missing(tmp_path, hub):
    folder = TINY_PASD
    refs = [ModelRef(str(folder), Kind.PASD, "--pasd"), ModelRef("sd15", Kind.BASE, "--base")]
    resolution = resolve(refs, models_dir=tmp_path, interactive=True, endpoint=hub.url)
    assert [resolution.path(ref) for ref in refs] == [folder, tmp_path / "sd15"]
    assert Counter(hub.downloads()) == wanted("sd15")
    hub.requests.clear()
    assert resolve(refs[1:], models_dir=tmp_path, offline=True).path(refs[1]) == tmp_path / "sd15"
    assert hub.requests == []


@pytest.mark.slow  # a full CLI run on a pseudo-terminal; the decision itself is tested in test_store.py
def test_at_a_terminal_missing_models_download_with_a_progress_bar(tmp_path, hub):
    code, stdout, terminal = _run_at_terminal(
        ["upscale", LR_INPUT, "-o", tmp_path / "out", *QUICK], clean_env(tmp_path, hub)
    )
    assert code == 0, terminal
    assert stdout.strip() == str(tmp_path / "out" / "lr_input.png")
    assert Counter(hub.downloads()) == wanted("pasd", "sd15", "blip")  # the captioner when it is needed
    assert "pasd: fetching 4 file(s)" in terminal and "sd15: fetching 10 file(s)" in terminal
    assert "blip: fetching 7 file(s)" in terminal
    assert "%|" in terminal  # tqdm's bar


def test_export_to_a_path_that_cannot_be_written_is_one_error_line(tmp_path, hub):
    env = clean_env(tmp_path)
    install(hub, tmp_path / "store", names=("sd15",))
    blocked = tmp_path / "notes.txt"
    blocked.write_text("a file where a folder would have to be")
    line = one_error(pasd("models", "export", "sd15", blocked / "sd15.tar", env=env))
    assert f"cannot write {blocked / 'sd15.tar'}" in line


# ---- The README's set-up-and-run command, as written, after its set-up part ----------------------


def readme_run_command() -> list[str]:
    """The README's 'Set up and run' line, split at `&&`."""
    text = (Path(__file__).parents[1] / "README.md").read_text()
    block = text.split("## Set up and run", 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0]
    return [part.strip() for part in block.strip().split("&&")]


def test_readme_run_command_downloads_then_upscales_with_every_default(tmp_path, hub):
    steps = readme_run_command()
    # The set-up part is what .ci/run does (installing here would need the network).
    assert steps[:4] == [
        "python3 -m venv .venv",
        ". .venv/bin/activate",
        "pip install torch==2.13.0",
        "pip install .",
    ], steps
    job = " && ".join(steps[4:])
    assert job == "pasd download && pasd upscale photo.jpg -o out/"
    # Every default but the diffusion's size and length: at --process-size 768 and 20 steps even
    # the tiny model takes over half an hour on two CPU cores. The captioner runs, as by default.
    job += " --process-size 96 --steps 2"
    Image.open(LR_INPUT).convert("RGB").crop((0, 0, 40, 24)).save(tmp_path / "photo.jpg", quality=90)
    env = clean_env(tmp_path, hub, PATH=f"{Path(pasd_command()[0]).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(
        ["bash", "-c", job],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    out = tmp_path / "out" / "photo.png"
    assert str(out) in proc.stdout or "out/photo.png" in proc.stdout, proc.stdout
    with Image.open(out) as image:  # default --scale 4
        assert image.size == (160, 96) and image.mode == "RGB"
    assert Counter(hub.downloads()) == wanted("pasd", "sd15", "blip")
