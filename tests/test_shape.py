"""The shape of the code (issue 11): packages in layers checked by import-linter, an engine that
is a library (no Typer, no Rich, no CLI words), a fast `--help` with every choice listed in
panels, one error style, and the README's Python example run as written."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import COLOR_INPUT, LR_INPUT, TINY_BASE, TINY_PASD, run_pasd
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
CHOICE_OPTIONS = {
    "--color-fix": ["wavelet", "adain", "none"],
    "--latent-blend": ["auto", "gaussian", "ramp"],
    "--device": ["auto", "cpu", "cuda", "mps", "cuda:N"],
    "--dtype": ["auto", "fp32", "fp16", "bf16"],
    "--format": ["png", "jpg", "webp", "tiff", "same"],
    "--on-exists": ["skip", "if-stale", "overwrite", "error"],
    "--caption": ["blip", "classify", "none"],
}
PANELS = ["Input/output", "Model", "Diffusion", "Prompts", "Tiling and memory", "Batch"]


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """import-linter's contracts (pyproject.toml) on the `pasd_cli` under `root`."""
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [str(lint), "--config", str(root / "pyproject.toml"), "--no-cache"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "COLUMNS": "250"},
    )


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tree")
    shutil.copytree(REPO / "pasd_cli", root / "pasd_cli", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def test_the_layering_contract_holds_on_the_real_tree(tree_copy):
    proc = lint_imports(tree_copy)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "BROKEN" not in proc.stdout and "KEPT" in proc.stdout


@pytest.mark.parametrize(
    "module, line, contract",
    [
        ("engine/noise.py", "import typer", "The engine is a library"),
        ("engine/noise.py", "import rich.console", "The engine is a library"),
        ("engine/noise.py", "from ..cli import app", "The engine is a library"),
        ("engine/noise.py", "from ..batch.plan import Job", "The engine is a library"),
        ("nn/paca.py", "from ..batch import runner", "The engine is a library"),
        ("store/local.py", "from ..batch import plan", "Layers"),
    ],
    ids=["engine-typer", "engine-rich", "engine-cli", "engine-batch", "nn-batch", "store-batch"],
)
def test_the_layering_contract_fails_on_an_injected_violation(tree_copy, tmp_path, module, line, contract):
    root = tmp_path / "tree"
    shutil.copytree(tree_copy, root)
    target = root / "pasd_cli" / module
    target.write_text(target.read_text() + f"\n{line}  # injected\n")
    proc = lint_imports(root)
    assert proc.returncode != 0, proc.stdout
    broken = [line for line in proc.stdout.splitlines() if "BROKEN" in line]
    assert any(contract in line for line in broken), proc.stdout


def _modules_after(code: str) -> set[str]:
    probe = f"import sys; {code}; print('\\n'.join(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    return {name.split(".")[0] for name in proc.stdout.split()}


def test_the_engine_imports_neither_typer_nor_rich_nor_torch_until_used():
    loaded = _modules_after("import pasd_cli.engine; from pasd_cli.engine import UpscaleSettings")
    assert {"typer", "rich", "click", "torch"}.isdisjoint(loaded), loaded & {"typer", "rich", "click", "torch"}
    assert "torch" in _modules_after("from pasd_cli.engine import PASDPipeline")  # the lazy name works


def test_the_api_functions_are_not_shadowed_by_their_modules():
    """engine/stylize.py and engine/colorize.py share their names with public functions."""
    import pasd_cli.engine
    import pasd_cli.engine.colorize
    import pasd_cli.engine.stylize
    from pasd_cli.engine import colorize, stylize
    from pasd_cli.engine.stylize import personalize

    assert callable(stylize) and callable(colorize) and callable(personalize)
    assert pasd_cli.engine.stylize is stylize and sys.modules["pasd_cli.engine.colorize"].colorize is not colorize


def test_colorize_through_the_public_api_is_the_engine_call(tiny_colorizer):
    from pasd_cli.engine import ColorizeSettings, colorize
    from pasd_cli.engine.colorize import colorize as engine_colorize

    with Image.open(COLOR_INPUT) as image:
        gray = image.convert("L")
    settings = ColorizeSettings(steps=1, process_size=64, seed=3)
    public, direct = colorize(tiny_colorizer, gray, settings), engine_colorize(tiny_colorizer, gray, settings)
    assert public.image.size == gray.size and public.image.tobytes() == direct.image.tobytes()
    assert public.luma_shift <= 1  # the exact merge keeps the input's luma


def test_help_does_not_import_torch():
    proc = run_pasd("upscale", "--help", env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert proc.returncode == 0
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert {"torch", "diffusers", "transformers"}.isdisjoint(imported)


@pytest.mark.parametrize("command", ["upscale", "stylize"])
def test_help_is_in_panels_lists_every_choice_and_shows_no_bool_placeholder(command):
    text = run_pasd(command, "-h", env={"COLUMNS": "120"}).stdout
    assert "<bool>" not in text
    titles = re.findall(r"╭─ (.+?) ─", text)
    assert titles == ["Arguments", *PANELS], titles
    for option, choices in CHOICE_OPTIONS.items():
        line = next(line for line in text.splitlines() if re.search(rf"{option}\b(?!-)", line))
        assert f"<{'|'.join(choices)}>" in line, line


def test_short_flags_and_version():
    text = run_pasd("upscale", "-h", env={"COLUMNS": "120"}).stdout
    for short, long in (("-s", "--scale"), ("-f", "--format"), ("-m", "--pasd"), ("-n", "--pasd"), ("-o", "--output")):
        assert any(long in line and short in line for line in text.splitlines()), (short, long)
    version = run_pasd("--version")
    assert version.returncode == 0 and re.fullmatch(r"pasd \S+\n", version.stdout)


def test_short_flags_work(tmp_path):
    image = tmp_path / "a.png"
    Image.new("RGB", (10, 8)).save(image)
    proc = run_pasd("upscale", image, "-o", tmp_path / "out", "-s", "3", "-f", "jpg", "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    assert '"output_size": [30, 24]' in proc.stdout and "a.jpg" in proc.stdout


@pytest.mark.parametrize(
    "args, error, hint",
    [
        (
            ["--format", "gif"],
            "error: --format gif: choose from png, jpg, webp, tiff, same",
            "hint: see: pasd upscale -h",
        ),
        (["--steps", "0"], "error: --steps 0: steps must be at least 1", None),
        (["--latent-overlap", "400"], "error: --latent-overlap 400: latent overlap must be in [0, latent tile)", None),
        (["--quality", "0"], "error: --quality 0: must be in [1, 100]", None),
        (["--nope"], "error: No such option: --nope", "hint: see: pasd upscale -h"),
        (["--steps", "many"], "error: --steps many:", "hint: see: pasd upscale -h"),
    ],
)
def test_usage_errors_come_in_one_style(tmp_path, args, error, hint):
    proc = run_pasd("upscale", LR_INPUT, "-o", tmp_path / "out", "--dry-run", *args)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert lines[0].startswith(error), proc.stderr
    assert len(lines) <= 2 and all(line.startswith(("error: ", "hint: ")) for line in lines), proc.stderr
    if hint:
        assert lines[1] == hint


def test_the_engine_names_settings_and_the_command_line_names_its_options(tmp_path):
    from pasd_cli.cli.app import hint_for
    from pasd_cli.engine.formats import refuse_untrusted_pickle
    from pasd_cli.errors import ModelError

    with pytest.raises(ModelError) as refused:
        refuse_untrusted_pickle(tmp_path / "x.ckpt", trust_pickle=False)
    assert refused.value.field == "trust_pickle" and "--" not in (refused.value.hint or "")
    assert hint_for(refused.value).endswith("(--trust-pickle)")


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1, "the README has one Python example"
    return blocks[0]


def test_the_readme_example_upscales_an_image_through_the_public_api(tmp_path, monkeypatch):
    """The README's example, run as written through the public API: only the folders and the
    photo are this repo's, and the settings class keeps every field but two cheaper defaults
    (the released 20 steps at 768 pixels take minutes on a 2-core CPU even for the tiny model)."""
    import pasd_cli.engine

    @dataclass(frozen=True)
    class QuickSettings(pasd_cli.engine.UpscaleSettings):
        steps: int = 2
        process_size: int = 112

    monkeypatch.setattr(pasd_cli.engine, "UpscaleSettings", QuickSettings)
    code = readme_example()
    places = {
        '"PASD/pasd/checkpoint-100000"': repr(str(TINY_PASD)),
        '"stable-diffusion-v1-5"': repr(str(TINY_BASE)),
        '"photo.jpg"': repr(str(LR_INPUT)),
    }
    for text, path in places.items():
        assert text in code, text
        code = code.replace(text, path)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    written = list(tmp_path.glob("*.png"))
    assert len(written) == 1
    with Image.open(LR_INPUT) as lr, Image.open(written[0]) as out:
        assert out.size == (lr.width * 2, lr.height * 2)
        assert len(set(out.convert("L").getdata())) > 16  # an image, not a blank


def test_one_resolver():
    """No other module turns a model name into a folder: only store/ calls the store's paths."""
    sources = {p: p.read_text() for p in (REPO / "pasd_cli").rglob("*.py")}
    resolving = re.compile(r"\b(model_path|model_dir|store_name|names_a_path|hub_store)\(")
    users = {p.relative_to(REPO / "pasd_cli").parts[0] for p, text in sources.items() if resolving.search(text)}
    assert users <= {"store", "cli"}, users
    cli_uses = {p.name for p, text in sources.items() if resolving.search(text) and "cli" in p.parts}
    assert cli_uses <= {"models.py"}, cli_uses  # `pasd models ...` and `pasd download` print the store's paths
    calls = [p for p, text in sources.items() if re.search(r"\bresolve\(\s*\[", text) or "store.resolve(" in text]
    assert {p.name for p in calls} == {"diffusion.py"}, calls
