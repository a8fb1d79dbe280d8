"""``opentrans-hf`` console entry point: ``opentrans-hf [--debug] COMMAND [ARGS]``.

Every job lives in ``opentrans_hf.commands`` (an arguments dataclass + ``run``); this only dispatches
and turns failures into one line on stderr: exit status 2 for bad arguments, 1 for a run that failed,
the full traceback with ``--debug`` (anywhere on the command line) or ``OPENTRANS_HF_DEBUG=1``. The jobs
run with the library's log at INFO (their progress lines, on stderr; ``OPENTRANS_HF_VERBOSITY=warning``
quiets them); their results are printed on stdout.
"""

from __future__ import annotations

import os
import sys
import traceback

from opentrans_hf.commands import COMMANDS, ArgumentError, command_module, parse_args
from opentrans_hf.utils import logging
from opentrans_hf.utils.distributed import check_launch
from opentrans_hf.utils.io import WriteError
from opentrans_hf.utils.version import __version__

DEBUG_ENV = "OPENTRANS_HF_DEBUG"


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: opentrans-hf [--debug] {{{','.join(COMMANDS)}}} [ARGS]  (opentrans-hf {__version__})", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    lines += ["", "`opentrans-hf COMMAND --help` lists a command's arguments, defaults and choices.",
              f"--debug (or {DEBUG_ENV}=1): full tracebacks instead of one-line errors."]
    return "\n".join(lines)


def _debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    debug = os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes", "on")
    if "--debug" in argv:
        debug = True
        argv = [a for a in argv if a != "--debug"]
    return debug, argv


def _one_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    if isinstance(err, KeyError) and len(err.args) == 1:
        text = str(err.args[0])
    first = text.splitlines()[0] if text else ""
    # keep one line: long multi-line messages (e.g. from a library) are cut to their first line
    more = " (more with --debug)" if len(text.splitlines()) > 1 else ""
    # our own errors read as sentences; anything else (TypeError, LinAlgError, ...) says what it is
    plain = (ValueError, OSError, FileNotFoundError, NotADirectoryError, FileExistsError, ArgumentError, WriteError)
    kind = "" if type(err) in plain else f"{type(err).__name__}: "
    return f"{kind}{first}{more}"


def main(argv: list[str] | None = None) -> int:
    """Run ``opentrans-hf``; returns the exit status (0 ok, 1 failed run, 2 bad arguments)."""
    debug, argv = _debug_requested(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"opentrans-hf {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"opentrans-hf: error: unknown command {name!r}; choose one of {', '.join(COMMANDS)}\n\n{_usage()}",
              file=sys.stderr)
        return 2
    try:
        args = parse_args(name, rest)
        check_launch()  # a launch that started fewer processes than it asked for: before anything loads
    except SystemExit as exit_:  # argparse: --help (0) or a usage error it already printed (2)
        return int(exit_.code or 0)
    except (ArgumentError, FileNotFoundError, ValueError) as err:
        if debug:
            traceback.print_exc()
        print(f"opentrans-hf {name}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    try:
        with logging.job_verbosity():  # INFO: the job says what it does (unless OPENTRANS_HF_VERBOSITY says otherwise)
            command_module(name).run(args)
    except KeyboardInterrupt:
        print(f"opentrans-hf {name}: interrupted", file=sys.stderr)
        return 130
    except ArgumentError as err:  # found when the job starts (its output directory), before anything loads
        if debug:
            traceback.print_exc()
        print(f"opentrans-hf {name}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - the CLI's job is to turn any failure into one clear line
        if debug:
            traceback.print_exc()
        print(f"opentrans-hf {name}: error: {_one_line(err)}", file=sys.stderr)
        return 1
    finally:
        _close_process_group()
    return 0


def _close_process_group() -> None:
    """Under ``accelerate launch``, take the process group down before the interpreter exits: left to
    interpreter shutdown, gloo's threads can abort a finished process ("terminate called without an
    active exception", exit -6) and turn a successful run into a failed launch."""
    dist = sys.modules.get("torch.distributed")
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - closing is best effort; the job's own result stands
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
