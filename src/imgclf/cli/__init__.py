"""The command line: arguments -> settings -> one library call, with the events drawn on the
terminal (and written to ``--events FILE.jsonl``), and SIGINT/SIGTERM turned into a stop.

Exit status: 0 done, 1 nothing to do (or predict: not one file could be read), 2 a user error (one
line naming the cause), 3 stopped (resumable), 130 interrupted at once (fetch: stopped by Ctrl-C),
141 the reader of the output went away (``imgclf predict ... | head``), quietly.
"""

from __future__ import annotations

import signal
import sys

from imgclf.cli import render
from imgclf.cli.commands import HANDLERS, Context
from imgclf.cli.parser import build_parser
from imgclf.core.errors import ImgclfError, Stopped
from imgclf.core.events import JsonLines, Message, StopToken, tee


class _StopOnSignal:
    """SIGINT and SIGTERM set the stop token: the work ends after its current step (training
    writes a checkpoint). A second signal of the same kind has its usual effect at once."""

    def __init__(self, stop: StopToken, events) -> None:
        self.stop, self.events, self._previous = stop, events, {}

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        self.stop.set(f"{name} received")
        self.events(Message("warning", f"{name} received: stopping after this step (send it again to quit at once)"))
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __enter__(self) -> _StopOnSignal:
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (main() called from a thread): no handlers
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a bad argument (already said in one line)
        return int(exc.code or 0)
    render.prepare_streams()
    terminal = render.Terminal()
    sink = JsonLines(args.events) if getattr(args, "events", None) else None
    events = tee(terminal, sink) if sink else terminal
    stop = StopToken()
    try:
        with _StopOnSignal(stop, events):
            return HANDLERS[args.command](args, Context(events, stop))
    except ImgclfError as exc:
        render.error_line(str(exc).replace("\n", " "))
        return 2
    except BrokenPipeError:  # the reader went away (predict ... | head): end quietly, as cat does
        render.quiet_stdout()
        return 141
    except OSError as exc:
        if exc.filename is None:  # not about a path the user gave: a bug, keep its traceback
            raise
        render.error_line(f"{exc.filename}: {exc.strerror or exc}")
        return 2
    except Stopped as exc:
        render.error_line(f"stopped ({exc.reason})")
        return 3
    except KeyboardInterrupt:
        render.error_line("interrupted")
        return 130
    finally:
        if sink is not None:
            sink.close()


if __name__ == "__main__":
    sys.exit(main())
