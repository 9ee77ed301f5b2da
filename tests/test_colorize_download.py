"""`pasd download pasd-light-color` against the loopback hub (tests/hub_server.py): the checkpoint
and its scheduler folder land where the engine reads them, so `pasd colorize` runs offline by the
model's name; a hub laid out otherwise than the manifest's guesses gives one line naming the
manifest field to fix."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import COLOR_INPUT, COLOR_REFERENCE, REFERENCE, TINY_COLOR
from hub_server import FakeHub, Repo, clean_env, tiny_hub_repos
from PIL import Image
from test_download import one_error, pasd

from pasd_cli.errors import ModelError
from pasd_cli.store import Store, load_manifests
from pasd_cli.store.hub import download

MANIFESTS = load_manifests()
PASD_REPO = "yangtao9009/PASD"
COLOR_MODEL = TINY_COLOR.parent  # pasd_light_color/: checkpoint-180000/ and scheduler/
# fp32 as the reference was made: --dtype auto is bf16 on a CPU with bf16 matrix instructions.
RELEASED_RUN = ["--steps", "2", "--seed", "1234", "--guidance", "9", "--process-size", "64", "--luma", "released"]
RELEASED_RUN += ["--dtype", "fp32"]


def color_files(folder: str = "pasd_light_color", checkpoint: str = "checkpoint-180000") -> dict[str, bytes]:
    """The tiny colorization model as the hub would hold it under `folder`."""
    files = {}
    for path in sorted(COLOR_MODEL.rglob("*")):
        if path.is_file():
            rel = path.relative_to(COLOR_MODEL).as_posix().replace("checkpoint-180000", checkpoint)
            files[f"{folder}/{rel}"] = path.read_bytes()
    return files


def hub_with(files: dict[str, bytes]) -> FakeHub:
    repos = tiny_hub_repos(REFERENCE)
    repos[PASD_REPO] = Repo({**repos[PASD_REPO].files, **files})
    return FakeHub(repos)


def wanted(*names: str) -> Counter:
    return Counter(f"{MANIFESTS[n].repo_id}/{p}" for n in names for p in MANIFESTS[n].repo_paths)


def test_download_puts_the_scheduler_beside_the_checkpoint_then_colorize_runs_offline(tmp_path):
    with hub_with(color_files()) as hub:
        env = clean_env(tmp_path, hub)
        proc = pasd("download", "pasd-light-color", env=env)
        assert proc.returncode == 0, proc.stderr
        store = tmp_path / "store"
        checkpoint = store / "pasd-light-color" / "pasd_light_color" / "checkpoint-180000"
        assert proc.stdout.split() == [str(checkpoint), str(store / "sd15")]
        assert Counter(hub.downloads()) == wanted("pasd-light-color", "sd15")  # each needed file once
        scheduler = checkpoint.parent / "scheduler" / "scheduler_config.json"
        assert scheduler.read_bytes() == (COLOR_MODEL / "scheduler" / "scheduler_config.json").read_bytes()

        requests_before = len(hub.requests)
        out = tmp_path / "out"
        run = pasd("colorize", COLOR_INPUT, "-o", out, "--offline", "--caption", "none", *RELEASED_RUN, env=env)
        assert run.returncode == 0, run.stderr
        assert len(hub.requests) == requests_before  # by the model's name, from the store, no network
    written = np.asarray(Image.open(out / "color_public_input.png")).astype(int)
    diff = np.abs(written - np.asarray(Image.open(COLOR_REFERENCE / "color_public_output.png")).astype(int))
    assert diff.max() <= 3 and diff.mean() < 0.05


def test_a_wrong_folder_guess_names_the_subfolder_field(tmp_path):
    with hub_with(color_files(folder="pasd_color")) as hub:
        line = one_error(pasd("download", "pasd-light-color", env=clean_env(tmp_path, hub)))
        assert hub.downloads() == []
    assert f"folder pasd_light_color not found in {PASD_REPO}@main" in line
    assert "the manifest's subfolder 'pasd_light_color' is an unconfirmed guess: fix `subfolder` in " in line
    assert "pasd-light-color.json" in line and "pasd_color" in line  # what the hub holds instead
    assert not (tmp_path / "store" / "pasd-light-color").exists()


@pytest.mark.parametrize(
    "files,field,holds",
    [
        (color_files(checkpoint="checkpoint-200000"), "`entry`", "checkpoint-200000, scheduler"),
        (
            {k: v for k, v in color_files().items() if "/scheduler/" not in k},
            "`files`",
            None,
        ),
    ],
    ids=["checkpoint-number", "no-scheduler"],
)
def test_wrong_checkpoint_or_missing_file_names_the_field(tmp_path, files, field, holds):
    with hub_with(files) as hub:
        with pytest.raises(ModelError) as caught:
            download(Store(tmp_path), "pasd-light-color", endpoint=hub.url)
        assert hub.downloads() == []
    message = str(caught.value)
    assert "\n" not in message and f"fix {field}" in message and f"not found in {PASD_REPO}@main" in message
    if holds is not None:
        assert "is an unconfirmed guess" in message and f"(pasd_light_color holds: {holds})" in message
    else:
        assert "file pasd_light_color/scheduler/scheduler_config.json not found" in message
    assert caught.value.hint is not None and "/tree/main/pasd_light_color" in caught.value.hint


def test_the_manifest_lays_out_the_engines_folders():
    manifest = MANIFESTS["pasd-light-color"]
    root = Path("/store/pasd-light-color")
    checkpoint = root / manifest.entry_path
    assert set(manifest.unconfirmed) == {"subfolder", "entry"}
    assert {str(root / p) for p in manifest.repo_paths} >= {str(checkpoint.parent / "scheduler/scheduler_config.json")}
    assert all(str(root / p).startswith(str(checkpoint)) for p in manifest.repo_paths if "/unet/" in p)
