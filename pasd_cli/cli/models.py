"""`pasd download` and `pasd models ...`: fetch, list, verify, remove, export and import models.

Results go to stdout (paths, table rows, or one JSON object per line with --json); progress and
notes go to stderr. Every failure is a ModelError (exit code 3), mapped by `app.main`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from ..errors import ModelError

if TYPE_CHECKING:
    from ..store import Store
from .options import MODELS_DIR_HELP

models_app = typer.Typer(
    help="List, verify, remove, export and import downloaded models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _store(models_dir: Optional[Path]) -> Store:
    from ..store import Store, store_root

    return Store(store_root(models_dir))


def download_command(
    names: Optional[list[str]] = typer.Argument(
        None,
        help="Model names (default: what `pasd upscale` uses), "
        "or hub repo ids (owner/name) of bases for "
        "`pasd stylize`.",
    ),
    models_dir: Optional[Path] = typer.Option(None, "--models-dir", help=MODELS_DIR_HELP),
) -> None:
    """Download models (and the models they need) into the store, or repair damaged ones."""
    from ..store import default_models, with_needs
    from ..store.hub import download
    from ..store.hub_bases import download_hub_base, is_repo_id

    store = _store(models_dir)
    repo_ids = [n for n in names or () if is_repo_id(n)]
    names = [n for n in names or () if n not in repo_ids]
    wanted = with_needs(names, store.manifests) if names else [] if repo_ids else default_models()
    show_bar = sys.stderr.isatty()  # asked for explicitly: a bar when someone watches, lines otherwise
    for name in wanted:
        download(store, name, say=_say, show_bar=show_bar)
        print(store.model_path(name), flush=True)
    for repo_id in repo_ids:
        print(download_hub_base(store.root, repo_id, say=_say, show_bar=show_bar), flush=True)


@models_app.command("list")
def list_models(
    as_json: bool = typer.Option(False, "--json", help="One JSON object per model, one per line."),
    models_dir: Optional[Path] = typer.Option(None, "--models-dir", help=MODELS_DIR_HELP),
) -> None:
    """Every known model: installed or not, size on disk, path."""
    from ..store import default_models
    from ..store.hub import human_size

    store = _store(models_dir)
    defaults = set(default_models())
    rows = []
    for name, manifest in sorted(store.manifests.items()):
        problems = store.problems(name)
        record = store.read_record(name)
        state = "installed" if not problems else ("missing" if problems == ["not installed"] else "damaged")
        rows.append(
            {
                "name": name,
                "kind": manifest.kind,
                "default": name in defaults,
                "state": state,
                "installed": not problems,
                "size": record.size if record else None,
                "path": str(store.model_path(name)),
                "repo_id": manifest.repo_id,
                "revision": manifest.revision,
                "commit": record.commit if record else None,
                "needs": list(manifest.needs),
                "license": manifest.license,
                "description": manifest.description,
            }
        )
    if as_json:
        for row in rows:
            print(json.dumps(row), flush=True)
        return
    width = max(len(str(r["name"])) for r in rows) + (2 if any(r["default"] for r in rows) else 0)
    for row in rows:
        label = f"{row['name']}" + (" *" if row["default"] else "")
        size = human_size(row["size"]) if isinstance(row["size"], int) else "-"
        print(f"{label:<{width}}  {row['kind']:<10}  {row['state']:<9}  {size:>9}  {row['path']}", flush=True)
    _say(f"store: {store.root}   (* = used by default)")


@models_app.command("verify")
def verify_models(
    name: Optional[str] = typer.Argument(None, help="A model name (default: every installed model)."),
    models_dir: Optional[Path] = typer.Option(None, "--models-dir", help=MODELS_DIR_HELP),
) -> None:
    """Re-hash installed files against the sizes and sha256 recorded at download; no network."""
    from ..store import fetch_command
    from ..store.hub import human_size

    store = _store(models_dir)
    if name is not None:
        store.manifest(name)
        names = [name]
    else:
        names = [n for n in sorted(store.manifests) if store.model_dir(n).exists()]
        if not names:
            _say(f"no models installed in {store.root}")
            return
    failed = {}
    for model in names:
        problems = store.problems(model, full=True)
        if problems:
            failed[model] = problems
            for problem in problems:
                _say(f"{model}: {problem}")
        else:
            record = store.read_record(model)
            assert record is not None  # no problems: the record is there
            print(f"{model}: ok ({len(record.files)} files, {human_size(record.size)})", flush=True)
    if failed:
        summary = "; ".join(
            f"{m}: {ps[0]}" + (f" (+{len(ps) - 1} more)" if len(ps) > 1 else "") for m, ps in failed.items()
        )
        raise ModelError(f"verification failed: {summary}", hint=f"repair with: {fetch_command(failed, store.root)}")


@models_app.command("path")
def model_path(
    name: Optional[str] = typer.Argument(None, help="A model name (default: print the store folder)."),
    models_dir: Optional[Path] = typer.Option(None, "--models-dir", help=MODELS_DIR_HELP),
) -> None:
    """Print the store folder, or the folder of one model."""
    store = _store(models_dir)
    print(store.model_path(name) if name else store.root, flush=True)


@models_app.command("remove")
def remove(
    name: str = typer.Argument(..., help="The model to delete from the store."),
    models_dir: Optional[Path] = typer.Option(None, "--models-dir", help=MODELS_DIR_HELP),
) -> None:
    """Delete a model's files from the store."""
    from ..store.bundle import remove_model

    store = _store(models_dir)
    if remove_model(store, name):
        _say(f"{name}: removed from {store.root}")
        _prune_converted(models_dir)
    else:
        _say(f"{name}: not in {store.root}; nothing to remove")


@models_app.command("export")
def export(
    name: str = typer.Argument(..., help="The installed model to export."),
    file: Path = typer.Argument(..., help="Bundle to write (.tar, or .tar.gz to compress)."),
    needs: bool = typer.Option(
        True, "--with-needs/--without-needs", help="Also bundle the models it needs (e.g. the SD 1.5 base)."
    ),
    models_dir: Optional[Path] = typer.Option(None, "--models-dir", help=MODELS_DIR_HELP),
) -> None:
    """Write an installed model (verified first) to a bundle for a machine without network."""
    from ..store import with_needs
    from ..store.bundle import export_models

    store = _store(models_dir)
    names = with_needs([name], store.manifests) if needs else [store.manifest(name).name]
    export_models(store, names, file, say=_say)
    print(file, flush=True)


@models_app.command("import")
def import_(
    file: Path = typer.Argument(..., help="A bundle written by `pasd models export`."),
    models_dir: Optional[Path] = typer.Option(None, "--models-dir", help=MODELS_DIR_HELP),
) -> None:
    """Install the models of a bundle, after checking every file's size and sha256."""
    from ..store.bundle import import_bundle

    store = _store(models_dir)
    for name in import_bundle(store, file, say=_say):
        print(store.model_path(name), flush=True)


def _prune_converted(models_dir: Optional[Path]) -> None:
    """The converted copies of the weights a removal took away (nn/converted_weights.py)."""
    from ..store import converted_dir

    folder = converted_dir(models_dir)
    if not folder.is_dir():  # nothing to prune: no torch to import
        return
    from ..nn.converted_weights import ConvertedWeights

    removed = ConvertedWeights(folder).prune()
    if removed:
        copies = "1 converted copy" if len(removed) == 1 else f"{len(removed)} converted copies"
        _say(f"also removed {copies} of its weights from {folder}")
