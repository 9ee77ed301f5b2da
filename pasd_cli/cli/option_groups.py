"""Typer options declared once and shared by several commands.

Typer reads a command's signature; a group replaces one parameter of the command (say `batch`)
with its own options and calls the command with them built into one value (a settings object).
Groups stack, so `upscale` and `stylize` share the batch, diffusion and caption options.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from typing import Any

# (name, default with its Typer declaration, annotation), in the order --help lists them.
Parameter = tuple[str, Any, Any]


def option_group(target: str, parameters: list[Parameter], build: Callable[..., Any]) -> Callable:
    """A decorator that replaces the command's `target` parameter with `parameters` and passes
    `build(**their values)` as `target`."""
    names = [name for name, _, _ in parameters]

    def decorator(command: Callable) -> Callable:
        signature = inspect.signature(command)
        if target not in signature.parameters:
            raise TypeError(f"{command.__name__} has no parameter {target!r}")
        hints = typing.get_type_hints(command)
        own = [
            p.replace(annotation=hints.get(p.name, p.annotation))
            for p in signature.parameters.values()
            if p.name != target
        ]
        shared = [
            inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=annotation)
            for name, default, annotation in parameters
        ]

        @functools.wraps(command)
        def wrapper(**kwargs):
            value = build(**{name: kwargs.pop(name) for name in names})
            return command(**{target: value}, **kwargs)

        # Parameters without a default (other groups' targets) must come first.
        required = [p for p in own if p.default is inspect.Parameter.empty]
        ordered = [*required, *shared, *(p for p in own if p not in required)]
        wrapper.__signature__ = signature.replace(parameters=ordered)
        wrapper.__annotations__ = {p.name: p.annotation for p in ordered}
        return wrapper

    return decorator
