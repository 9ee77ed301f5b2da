"""The model store: manifests (`manifests.py`), the folder on disk and its install records
(`local.py`), downloads (`hub.py`, `hub_bases.py`), bundles (`bundle.py`), and the one resolver
that turns what a command names into local paths (`resolve.py`). Nothing here imports torch."""

from .identity import model_identity
from .local import (
    Record,
    Store,
    fetch_command,
    may_download,
    not_fetched_because,
    offline_requested,
    runs_at_terminal,
    store_root,
    user_cache_dir,
)
from .manifests import (
    BASE_MODEL,
    CAPTION_MODEL,
    CLASSIFY_MODEL,
    COLORIZE_PASD,
    KINDS,
    LCM_LORA,
    PASD_MODEL,
    STYLIZE_PASD,
    Manifest,
    default_models,
    get_manifest,
    load_manifests,
    manifests_dir,
    with_needs,
)
from .resolve import Kind, Located, MissingModels, ModelRef, Origin, Resolution, ResolvedModel, locate, resolve

__all__ = [
    "BASE_MODEL",
    "CAPTION_MODEL",
    "CLASSIFY_MODEL",
    "COLORIZE_PASD",
    "KINDS",
    "LCM_LORA",
    "PASD_MODEL",
    "STYLIZE_PASD",
    "Kind",
    "Located",
    "Manifest",
    "MissingModels",
    "ModelRef",
    "Origin",
    "Record",
    "Resolution",
    "ResolvedModel",
    "Store",
    "default_models",
    "fetch_command",
    "get_manifest",
    "load_manifests",
    "locate",
    "manifests_dir",
    "may_download",
    "model_identity",
    "not_fetched_because",
    "offline_requested",
    "resolve",
    "runs_at_terminal",
    "store_root",
    "user_cache_dir",
    "with_needs",
]
