"""The command line's machinery, shared by the commands of ``pipeline.py``: click parameter types, the command
and group classes (an option given twice is refused, an old spelling noted), the error boundary (the library's errors,
:data:`flow.api.USER_ERRORS`, become one ``Error: ...`` line and exit code 2, once per torchrun job) and the entry
point. No library work happens here; the library is imported inside the commands, so ``--help`` needs no torch.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import time

import click


class FiniteFloat(click.FloatRange):
    """A float within bounds that is neither NaN nor infinite."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


class NonEmptyPath(click.Path):
    """``click.Path`` that refuses the empty string (which would silently mean the current folder)."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            self.fail("an empty path is not allowed.", param, ctx)
        return super().convert(value, param, ctx)


class Command(click.Command):
    """Refuses an option given twice (click would keep the last one silently) and says when a deprecated spelling
    (:data:`DEPRECATED`) was used; option values are skipped, not taken for options."""

    def parse_args(self, ctx, args):
        seen: dict[str, str] = {}
        value_next = False
        for arg in args:
            if value_next or arg == "--" or not arg.startswith("--"):
                value_next = False
                if arg == "--":
                    break
                continue
            name = arg.split("=", 1)[0]
            param = next((p for p in self.params if isinstance(p, click.Option) and name in p.opts + p.secondary_opts),
                         None)
            value_next = param is not None and not param.is_flag and "=" not in arg
            if param is not None and not param.multiple and param.name in seen:
                if seen[param.name] == name:
                    raise click.UsageError(f"{name} given twice; give it once", ctx)
                raise click.UsageError(f"{seen[param.name]} and {name} given together (one option); give one of "
                                       "them", ctx)
            if param is not None:
                seen[param.name] = name
            if name in DEPRECATED:
                click.echo(f"note: {name} is deprecated; use {DEPRECATED[name]}", err=True)
        return super().parse_args(ctx, args)


class Group(click.Group):
    command_class = Command

    def get_command(self, ctx, cmd_name):
        if cmd_name in DEPRECATED:
            if not ctx.meta.get("sanf_ad.deprecated_noted"):  # click looks a command up more than once
                click.echo(f"note: '{cmd_name}' is deprecated; use '{DEPRECATED[cmd_name]}'", err=True)
                ctx.meta["sanf_ad.deprecated_noted"] = True
            cmd_name = DEPRECATED[cmd_name]
        return super().get_command(ctx, cmd_name)


#: The commands that run as torchrun jobs (``command(job=True)``); the others refuse to start under torchrun.
JOB_COMMANDS: list[str] = []
#: Old spellings that still work, with the new ones: ``run`` (the command) is ``sweep`` ("run" is a run folder),
#: ``--features`` is ``--transform`` ("features" are the cached tokens), ``--no-caff`` is ``--method sanf-nocaff``.
DEPRECATED = {"run": "sweep", "--features": "--transform", "--no-caff": "--method sanf-nocaff"}


class InputError(click.ClickException):
    """A one-line ``Error: ...`` and exit code 2 (bad input: argument, file, data)."""

    exit_code = 2


class ArgumentError(InputError):
    """An :class:`InputError` found from the command line alone, so every rank of a torchrun job finds it at the
    same point: rank 0 reports it, the other ranks exit 2 without repeating it."""


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    if "Original Traceback" in text:  # an exception re-raised from a DataLoader worker
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text.splitlines()[0] if text else type(err).__name__


def command(fn=None, *, job: bool = False):
    """A command whose library errors (:data:`flow.api.USER_ERRORS`) print one line and exit 2. With ``job``, it may
    run as a torchrun job and receives the :class:`extract.distributed.DistContext` as ``job``: a command-line error
    (:class:`ArgumentError`, alike on every rank) is printed by rank 0 alone, other errors by their rank."""
    if fn is None:
        return functools.partial(command, job=job)
    if job:
        JOB_COMMANDS.append(fn.__name__)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from extract.distributed import SINGLE, JobError
        from extract.distributed import job as job_session
        from flow.api import USER_ERRORS

        def one_line(err: BaseException) -> click.ClickException:
            if not isinstance(err, JobError):
                return InputError(_one_line(err))
            if err.silent:  # a job's error on another rank: rank 0 says what failed where, this rank nothing
                raise click.exceptions.Exit(InputError.exit_code) from None
            return InputError((f"[rank {err.rank}] " if err.rank else "") + _one_line(err))

        world_size = os.environ.get("WORLD_SIZE", "1")
        if not job and world_size.isdigit() and int(world_size) > 1:  # every rank would do the whole work
            raise ArgumentError(f"{click.get_current_context().info_name} does not run as a torchrun job (WORLD_SIZE "
                                f"{world_size}): start it as one process; {', '.join(JOB_COMMANDS)} run as jobs")
        try:
            with job_session(kwargs.get("device", "auto")) if job else contextlib.nullcontext(SINGLE) as ctx:
                try:
                    try:
                        return fn(*args, **kwargs, **({"job": ctx} if job else {}))
                    except USER_ERRORS as err:
                        raise one_line(err) from None
                except click.ClickException as err:  # in a job, printed inside it, before any rank exits
                    if not ctx.distributed:
                        raise
                    if isinstance(err, ArgumentError):
                        ctx.mark_failed()  # every rank is here: meet at the end, after rank 0 has printed
                        if not ctx.is_main:
                            raise click.exceptions.Exit(err.exit_code) from None
                    err.show()
                    raise click.exceptions.Exit(err.exit_code) from None
        except JobError as err:  # the job's environment, checked before the ranks connect
            raise one_line(err) from None

    return wrapper


def checked(make, *args, **kwargs):
    """``make(*args, **kwargs)`` (a configuration), its ValueError an :class:`ArgumentError`: found from the command
    line alone, so every rank of a torchrun job finds it alike."""
    try:
        return make(*args, **kwargs)
    except ValueError as err:
        raise ArgumentError(str(err)) from None


def old_spellings(transform, features, no_caff=False, method=None):
    """``--transform`` (or its old spelling ``--features``; None when neither is given) and ``--method`` (or
    ``--no-caff``), each given once."""
    if features is not None and transform is not None:
        raise ArgumentError("--features is the old spelling of --transform; give only --transform")
    if no_caff and method not in (None, "sanf-nocaff"):
        raise ArgumentError(f"--no-caff means --method sanf-nocaff; got --method {method}")
    return transform or features, method or ("sanf-nocaff" if no_caff else "sanf")


def options(*decorators):
    def apply(fn):
        for decorator in reversed(decorators):
            fn = decorator(fn)
        return fn

    return apply


def comma_list(choices=None, low: int | None = None, high: int | None = None, hints: dict[str, str] | None = None):
    """A click callback turning ``"a,b"`` into a list of names (one of ``choices``) or of integers in low..high,
    each checked, duplicates dropped; an empty list is refused. ``hints``: what to say of a value not among
    ``choices`` that users may expect there."""

    def check(item: str):
        if choices is not None:
            if item not in choices:
                hint = f" ({hints[item]})" if hints and item in hints else ""
                raise ValueError(f"{item!r} is not one of {', '.join(choices)}{hint}")
            return item
        if not item.isascii() or not item.isdigit() or not low <= int(item) <= high:
            raise ValueError(f"{item!r} is not an integer in {low}..{high}")
        return int(item)

    def convert(ctx, param, value):
        if value is None:
            return None
        try:
            out = [check(v.strip()) for v in str(value).split(",") if v.strip()]
        except ValueError as err:
            raise click.BadParameter(str(err), ctx, param) from None
        if not out:
            raise click.BadParameter("give at least one value", ctx, param)
        return list(dict.fromkeys(out))

    return convert


def run(cli: click.Group) -> None:
    """Run the command line ``cli``. On the ranks other than 0 of a torchrun job, a usage error (the same command line
    on every rank) is left to rank 0 to print."""
    name = os.path.basename(sys.argv[0])
    if os.environ.get("RANK", "0") == "0" or os.environ.get("WORLD_SIZE", "1") == "1":
        cli(prog_name=name)
        return
    try:
        code = cli.main(prog_name=name, standalone_mode=False)
    except (click.UsageError, ArgumentError) as err:
        time.sleep(1.0)  # let rank 0 print it before torchrun stops the job
        sys.exit(err.exit_code)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except click.exceptions.Abort:
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
