"""Typer options declared once and shared by several commands.

Typer reads a command's signature. `with_options` replaces each parameter of the command that
names a group (`batch: BatchSettings`) with the group's options, and calls the command with the
value the group builds from them (a settings object). The options are ordered by help panel, so
`--help` shows the panels in `PANELS` order whatever the groups.
"""

from __future__ import annotations

import functools
import inspect
import math
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

import typer

# Help panels, in the order --help shows them.
INPUT_OUTPUT = "Input/output"
MODEL = "Model"
DIFFUSION = "Diffusion"
PROMPTS = "Prompts"
TILING = "Tiling and memory"
BATCH = "Batch"
PANELS = ("Arguments", INPUT_OUTPUT, MODEL, DIFFUSION, PROMPTS, TILING, BATCH)

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Param:
    """One command-line parameter: its Python name (unique among a command's options), its type,
    and its Typer declaration."""

    name: str
    annotation: Any
    declaration: Any
    panel: str

    @property
    def flags(self) -> tuple[str, ...]:
        return tuple(getattr(self.declaration, "param_decls", ()) or ())

    @property
    def choices(self) -> type[Enum] | None:
        annotation = self.annotation
        return annotation if isinstance(annotation, type) and issubclass(annotation, Enum) else None


def _finite(value: Any) -> Any:
    """Python reads "inf", "nan" and "1e999" as floats; no setting means anything with them."""
    numbers = value if isinstance(value, (list, tuple)) else [value]
    if any(isinstance(number, float) and not math.isfinite(number) for number in numbers):
        raise typer.BadParameter("must be a finite number")
    return value


def _is_float(annotation: Any) -> bool:
    return annotation is float or (typing.get_origin(annotation) is not None and float in typing.get_args(annotation))


def option(name: str, annotation: Any, default: Any, *flags: str, panel: str, help: str, **extra: Any) -> Param:
    """A Typer option in `panel`. Choices (an Enum) match case-insensitively; flags get no
    `<bool>` placeholder; a number must be finite (every command's, checked here once)."""
    if annotation is bool:
        extra.setdefault("metavar", "")
    if _is_float(annotation):
        extra.setdefault("callback", _finite)
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        extra.setdefault("case_sensitive", False)
    return Param(name, annotation, typer.Option(default, *flags, help=help, rich_help_panel=panel, **extra), panel)


def argument(name: str, annotation: Any, default: Any, *, panel: str, help: str, **extra: Any) -> Param:
    return Param(name, annotation, typer.Argument(default, help=help, rich_help_panel=panel, **extra), panel)


@dataclass(frozen=True)
class Group:
    """Options that build one value: `build(**their values)`."""

    params: Sequence[Param]
    build: Callable[..., Any]


def with_options(**groups: Group) -> Callable[[F], F]:
    """Replace the command's parameters named like `groups` by each group's options; the command
    is called with the values the groups build."""

    def decorator(command: F) -> F:
        signature = inspect.signature(command)
        missing = set(groups) - set(signature.parameters)
        if missing:
            raise TypeError(f"{command.__name__} has no parameter {sorted(missing)[0]!r}")
        hints = typing.get_type_hints(command)
        own = [
            p.replace(annotation=hints.get(p.name, p.annotation))
            for p in signature.parameters.values()
            if p.name not in groups
        ]
        params = sorted((p for g in groups.values() for p in g.params), key=lambda p: PANELS.index(p.panel))
        names = [p.name for p in params]
        duplicates = {n for n in names if names.count(n) > 1} | (set(names) & {p.name for p in own})
        if duplicates:
            raise TypeError(f"{command.__name__}: option names used twice: {sorted(duplicates)}")
        shared = [
            inspect.Parameter(p.name, inspect.Parameter.KEYWORD_ONLY, default=p.declaration, annotation=p.annotation)
            for p in params
        ]

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            values = {
                target: group.build(**{p.name: kwargs.pop(p.name) for p in group.params})
                for target, group in groups.items()
            }
            return command(**values, **kwargs)

        ordered = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + shared
        wrapper.__signature__ = signature.replace(parameters=ordered, return_annotation=signature.return_annotation)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in ordered}
        return typing.cast(F, wrapper)

    return decorator
