"""The model store without a network: manifests, where the store is, when downloads are allowed,
NAME-or-path resolution, and the manifests inside a built wheel."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from pasd_cli import store as settings
from pasd_cli.errors import ModelError
from pasd_cli.store import (
    KINDS,
    Kind,
    ModelRef,
    Store,
    default_models,
    load_manifests,
    manifests_dir,
    may_download,
    offline_requested,
    resolve,
    runs_at_terminal,
    store_root,
    user_cache_dir,
    with_needs,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
SPEC_TABLE = {"pasd", "pasd-light", "pasd-rrdb", "pasd-light-rrdb", "pasd-light-color", "sd15"}


def test_every_released_model_has_a_valid_manifest():
    manifests = load_manifests()
    assert SPEC_TABLE <= set(manifests)
    for name, m in manifests.items():
        assert m.kind in KINDS
        assert m.repo_id.count("/") == 1 and m.revision and m.license and m.files
        assert len(set(m.files)) == len(m.files), name
        assert all(need in manifests for need in m.needs), name
        if m.kind == "pasd":
            assert m.needs == ("sd15",) and m.repo_id == "yangtao9009/PASD"
            assert {"unet/diffusion_pytorch_model.safetensors", "controlnet/diffusion_pytorch_model.safetensors"} <= {
                f.removeprefix(m.entry + "/") if m.entry else f for f in m.files
            }, name
    # The PASD UNet carries the whole SD UNet: the 3.4 GB base UNet is never fetched.
    assert not any(f.startswith("unet/") for f in manifests["sd15"].files)
    assert manifests["pasd-light-color"].note  # the checkpoint path is a guess, and says so


def test_manifest_files_are_data_only():
    assert manifests_dir() == REPO_ROOT / "models"
    assert sorted(p.suffix for p in manifests_dir().iterdir()) == [".json"] * len(list(manifests_dir().iterdir()))


def test_defaults_are_the_settings_defaults_and_their_needs():
    assert default_models() == [settings.PASD_MODEL, settings.BASE_MODEL, settings.CAPTION_MODEL]
    assert load_manifests()[settings.CAPTION_MODEL].kind == "captioner"
    assert load_manifests()[settings.CLASSIFY_MODEL].kind == "classifier"
    assert with_needs(["pasd-light"]) == ["pasd-light", "sd15"]
    assert with_needs(["sd15", "pasd"]) == ["sd15", "pasd"]


def test_store_root_precedence(tmp_path):
    env = {"PASD_HOME": str(tmp_path / "home"), "HOME": str(tmp_path)}
    assert store_root(tmp_path / "flag", env) == tmp_path / "flag"
    assert store_root(None, env) == tmp_path / "home"
    assert store_root(None, {"HOME": str(tmp_path)}) == user_cache_dir({"HOME": str(tmp_path)})


@pytest.mark.parametrize(
    "platform, env, expected",
    [
        ("linux", {"HOME": "/h"}, "/h/.cache/pasd"),
        ("linux", {"HOME": "/h", "XDG_CACHE_HOME": "/x"}, "/x/pasd"),
        ("darwin", {"HOME": "/h"}, "/h/Library/Caches/pasd"),
        ("win32", {"HOME": "/h", "LOCALAPPDATA": "/l"}, "/l/pasd/Cache"),
    ],
)
def test_user_cache_dir_follows_platform_conventions(platform, env, expected):
    assert user_cache_dir(env, platform) == Path(expected)


@pytest.mark.parametrize(
    "flag, env, offline",
    [
        (False, {}, False),
        (True, {}, True),
        (False, {"PASD_OFFLINE": "1"}, True),
        (False, {"HF_HUB_OFFLINE": "true"}, True),
        (False, {"HF_HUB_OFFLINE": "0", "PASD_OFFLINE": ""}, False),
    ],
)
def test_offline_is_requested_by_flag_or_environment(flag, env, offline):
    assert offline_requested(flag, env) is offline


class _Stream:
    def __init__(self, tty: bool):
        self.tty = tty

    def isatty(self):
        return self.tty


@pytest.mark.parametrize(
    "stdin_tty, stderr_tty, offline, downloads",
    [
        (True, True, False, True),  # a person at a terminal: fetch with a progress bar
        (True, True, True, False),  # --offline / PASD_OFFLINE / HF_HUB_OFFLINE
        (False, True, False, False),  # cron, `< /dev/null`, a service
        (True, False, False, False),  # stderr to a log file
        (False, False, False, False),
    ],
)
def test_auto_download_only_at_a_terminal_and_online(stdin_tty, stderr_tty, offline, downloads):
    interactive = runs_at_terminal(_Stream(stdin_tty), _Stream(stderr_tty))
    assert may_download(offline, interactive) is downloads


def pasd_ref(spec: str) -> ModelRef:
    return ModelRef(spec, Kind.PASD, "--pasd")


def test_paths_pass_through_and_names_need_installing(tmp_path):
    folder = tmp_path / "my-checkpoint"
    folder.mkdir()
    assert resolve([pasd_ref(str(folder))], models_dir=tmp_path / "store").path(pasd_ref(str(folder))) == folder
    with pytest.raises(ModelError, match="unknown model name"):
        resolve([pasd_ref("no-such-model")], models_dir=tmp_path / "store")
    with pytest.raises(ModelError, match="no such file"):
        resolve([pasd_ref("./missing")], models_dir=tmp_path / "store")
    with pytest.raises(ModelError) as err:
        resolve([pasd_ref("pasd"), ModelRef("sd15", Kind.BASE, "--base")], models_dir=tmp_path / "store", offline=True)
    assert "'pasd'" in str(err.value) and "'sd15'" in str(err.value)
    assert err.value.hint == f"fetch with: pasd download pasd sd15 --models-dir {tmp_path / 'store'}"


def test_a_truncated_file_makes_the_model_unusable(tmp_path):
    store = Store(tmp_path)
    folder = store.model_dir("sd15")
    manifest = store.manifest("sd15")
    from pasd_cli.store.local import Record, sha256_file

    files = {}
    for rel in manifest.repo_paths:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(rel.encode() * 10)
        files[rel] = {"size": (folder / rel).stat().st_size, "sha256": sha256_file(folder / rel)}
    store.write_record(Record("sd15", manifest.repo_id, "main", "c" * 40, "", "", files))
    assert store.problems("sd15") == [] and store.problems("sd15", full=True) == []
    victim = folder / "vae" / "config.json"
    victim.write_bytes(victim.read_bytes()[:-3])
    assert store.problems("sd15") == [
        f"vae/config.json: size {files['vae/config.json']['size'] - 3}, expected {files['vae/config.json']['size']}"
    ]


def test_wheel_ships_the_manifests_and_finds_them(tmp_path):
    setuptools = pytest.importorskip("setuptools")  # built without isolation: no index needed
    if int(setuptools.__version__.split(".")[0]) < 69:
        pytest.skip("pyproject needs setuptools>=69 to build")
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(REPO_ROOT),
            "-w",
            str(tmp_path),
            "--no-deps",
            "--no-build-isolation",
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    wheel = next(tmp_path.glob("pasd-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(n).name for n in names if n.startswith("pasd_cli/models/")}
    assert shipped == {f"{name}.json" for name in load_manifests()}
    assert not any(n.startswith("models/") for n in names)  # no top-level `models` package
    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    probe = (
        "import json, pasd_cli, pasd_cli.store as s; "
        "print(json.dumps([pasd_cli.__file__, str(s.manifests_dir()), sorted(s.load_manifests())]))"
    )
    run = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(unpacked), "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    package_file, found_dir, names_found = json.loads(run.stdout)
    assert Path(package_file).is_relative_to(unpacked)
    assert Path(found_dir) == unpacked / "pasd_cli" / "models"
    assert names_found == sorted(load_manifests())
