"""The `pasd` command line: the Typer app, its commands, and the one place that maps errors to
exit codes and prints them in one style (`error: <what>`, then `hint: <what to do>`).

Heavy libraries (torch, diffusers) are imported inside command bodies so `pasd --help` is fast.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import typer
from typer.core import TyperCommand, TyperGroup

from ..errors import Interrupted, PasdError
from ..interrupts import install as install_interrupts
from .colorize import colorize
from .models import download_command, models_app
from .option_groups import BATCH
from .options import CHOICES
from .stylize import stylize
from .upscale import upscale

EXIT_CODES_HELP = (
    "Exit codes: 0 all done or skipped, 1 some inputs failed, 2 usage, "
    "3 model or weights, 4 device or resources, 130 interrupted."
)
# How the command line names the settings and arguments that errors from the engine and the
# store name by `field`.
OPTIONS = {"trust_pickle": "--trust-pickle", "loras": "--lora", "style": "--style", "scale": "--scale"}


class _FlagHelp:
    """-h is a flag: no `<bool>` after it in --help, and it sits in the last panel."""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            option.metavar = ""
            option.rich_help_panel = BATCH if isinstance(self, TyperCommand) else None
        return option


class Command(_FlagHelp, TyperCommand):
    pass


class Group(_FlagHelp, TyperGroup):
    pass


def _version(value: bool) -> None:
    if value:
        from ..imageio.metadata import software

        print(software())
        raise typer.Exit()


app = typer.Typer(
    name="pasd",
    cls=Group,
    help="Restore and enlarge images with Pixel-Aware Stable Diffusion (PASD).\n\n" + EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, metavar="", help="Print the version and exit."
    ),
) -> None:
    """Restore and enlarge images with Pixel-Aware Stable Diffusion (PASD)."""


app.command(epilog=EXIT_CODES_HELP, cls=Command)(upscale)
app.command(epilog=EXIT_CODES_HELP, cls=Command)(stylize)
app.command(epilog=EXIT_CODES_HELP, cls=Command)(colorize)
app.command("download", epilog=EXIT_CODES_HELP, cls=Command)(download_command)
app.add_typer(models_app, name="models", cls=Group)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _one_line(text: str) -> str:
    """One line, whatever a library's message that ended up in ours looks like."""
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


def hint_for(exc: PasdError) -> str | None:
    """The error's hint, with the option that does what it says when the error names a setting."""
    option = OPTIONS.get(exc.field or "")
    if option is None:
        return exc.hint
    return f"{exc.hint} ({option})" if exc.hint else f"see {option}"


def _given(args: Sequence[str], flags: Sequence[str]) -> str | None:
    """The value last given on the command line for an option with these flags."""
    value = None
    for index, arg in enumerate(args):
        for flag in flags:
            if arg == flag and index + 1 < len(args):
                value = args[index + 1]
            elif flag.startswith("--") and arg.startswith(flag + "="):
                value = arg[len(flag) + 1 :]
    return value


def usage_error(exc: Any, args: Sequence[str]) -> tuple[str, str | None]:
    """(error, hint) for a usage error of the option parser, in our style."""
    param = getattr(exc, "param", None)
    ctx = getattr(exc, "ctx", None)
    hint = f"see: {ctx.command_path} -h" if ctx is not None else None
    if param is None or type(exc).__name__ == "MissingParameter":
        return _one_line(exc.format_message()), hint
    flags = [f for f in getattr(param, "opts", ()) if f.startswith("-")]
    name = max(flags, key=len) if flags else getattr(param, "human_readable_name", "")
    value = _given(args, flags)
    choices = CHOICES.get(getattr(param, "name", ""))
    if choices is not None:
        listed = ", ".join(str(choice.value) for choice in choices)
        return f"{name} {value}: choose from {listed}" if value is not None else f"{name}: choose from {listed}", hint
    message = exc.message.removeprefix("Value error, ")
    return (f"{name} {value}: {message}" if value is not None else f"{name}: {message}"), hint


def _fail(message: str, hint: str | None, code: int, epilogue: str | None = None) -> NoReturn:
    _say("error: " + _one_line(message))
    if hint:
        _say("hint: " + _one_line(hint))
    if epilogue:
        _say(epilogue)
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> None:
    # Our handlers replace KeyboardInterrupt, which the option parser would turn into exit code 1.
    install_interrupts()
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        code = app(args=args, prog_name="pasd", standalone_mode=False)
    except Interrupted as exc:
        _fail(str(exc), None, exc.exit_code)
    except PasdError as exc:
        _fail(str(exc), hint_for(exc), exc.exit_code, exc.epilogue)
    except typer.TyperException as exc:  # the option parser's: usage errors (2), aborts
        if isinstance(exc, typer.Abort):
            _fail("aborted", None, 1)
        if type(exc).__name__ == "NoArgsIsHelpError":  # the help, already shown, is the answer
            if exc.format_message().strip():
                _say(exc.format_message())
            sys.exit(2)
        message, hint = usage_error(exc, args)
        _fail(message, hint, getattr(exc, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
