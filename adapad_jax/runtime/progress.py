"""Progress a user can watch: a tqdm bar on a terminal, plain lines where there is none (SLURM, nohup, CI).

``run`` activates one ``Reporter`` for the whole run (``reporting``); the trainer, tokenisation and evaluation
ask ``current()`` for it, so library calls outside a run stay quiet. Modes:

- ``bar``: tqdm bars (training, tokenisation, evaluation); evaluation results are printed above the bar.
- ``lines``: one flushed line every ``train.log_every_steps`` (step, loss, lr, total rank, live slots, steps/s,
  ETA), one per evaluation as it lands, and occasional lines for tokenisation and evaluation passes.
- ``off``: nothing.

``ADAPAD_PROGRESS=bar|lines|off`` overrides the choice (``1`` means ``bar``, as before).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import datetime
import math
import os
import sys
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, TextIO

MODES = ("bar", "lines", "off")
ENV_VAR = "ADAPAD_PROGRESS"
# In lines mode a long pass (tokenisation, evaluation) reports at most this often, and once when done.
LINE_INTERVAL_S = 30.0


def choose_mode(
    enabled: bool, streams: tuple[TextIO, ...] | None = None, environ: Mapping[str, str] | None = None
) -> str:
    """``off`` when not ``enabled``; else ``$ADAPAD_PROGRESS`` if set; else ``bar`` when stdout and stderr are both
    a terminal with a width, ``lines`` when either goes to a file or pipe (``> log.txt`` gets the lines, not a bar's
    remains) or to a terminal of width 0, where tqdm draws nothing (a pseudo-terminal nobody sized, e.g.
    ``script -q -c ...`` run by a job wrapper)."""
    if not enabled:
        return "off"
    forced = (os.environ if environ is None else environ).get(ENV_VAR, "").strip().lower()
    if forced in MODES:
        return forced
    if forced in ("1", "true", "yes"):
        return "bar"
    streams = (sys.stdout, sys.stderr) if streams is None else streams
    return "bar" if all(_can_draw_bar(s) for s in streams) else "lines"


def _can_draw_bar(stream: TextIO) -> bool:
    """``stream`` is a terminal with a width (a stream without a file descriptor counts by ``isatty`` alone)."""
    if not getattr(stream, "isatty", lambda: False)():
        return False
    try:
        return os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, OSError, ValueError):  # no real descriptor (io.UnsupportedOperation is an OSError)
        return True


def _print_flushed(text: str) -> None:
    print(text, flush=True)


@dataclasses.dataclass(frozen=True)
class Reporter:
    """Where progress goes: ``mode`` (see module doc) and the line sink used in ``lines`` mode."""

    mode: str = "off"
    log: Callable[[str], None] = _print_flushed

    def line(self, text: str) -> None:
        """Emit one line now (and flush stdout, so a file or pipe shows it at once)."""
        if self.mode == "off":
            return
        if self.mode == "bar":
            from tqdm.auto import tqdm

            tqdm.write(text)
            return
        self.log(text)
        sys.stdout.flush()


_CURRENT: contextvars.ContextVar[Reporter | None] = contextvars.ContextVar("adapad_progress", default=None)


def current() -> Reporter:
    """The active reporter (``off`` outside ``reporting``)."""
    return _CURRENT.get() or Reporter("off")


@contextlib.contextmanager
def reporting(reporter: Reporter) -> Iterator[Reporter]:
    """Make ``reporter`` the active one inside the block."""
    token = _CURRENT.set(reporter)
    try:
        yield reporter
    finally:
        _CURRENT.reset(token)


def silence() -> None:
    """Turn progress off for the rest of the enclosing ``reporting`` block (processes other than 0)."""
    _CURRENT.set(Reporter("off"))


def format_duration(seconds: float) -> str:
    """``3725.2`` -> ``"1:02:05"``; ``"?"`` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    return str(datetime.timedelta(seconds=int(round(seconds))))


def format_train_line(record: Mapping[str, Any], total_steps: int, steps_per_second: float) -> str:
    """``step 20/100 | loss 0.6931 | lr 1.00e-03 | total rank 26 | live slots 3 | 4.21 steps/s | ETA 0:00:19``."""
    step = int(record["step"])
    eta = (total_steps - step) / steps_per_second if steps_per_second > 0 else float("nan")
    return " | ".join([
        f"step {step}/{total_steps}",
        f"loss {float(record['loss']):.4f}",
        f"lr {float(record['lr']):.2e}",
        f"total rank {int(record['total_rank'])}",
        f"live slots {int(record['live_slots'])}",
        f"{steps_per_second:.2f} steps/s",
        f"ETA {format_duration(eta)}",
    ])


def format_eval_line(step: int, metrics: Mapping[str, Any], label: str = "eval") -> str:
    """``eval step 20 | accuracy 0.5000 | f1 0.6667`` (numeric metrics only)."""
    parts = [f"{label} step {int(step)}"]
    parts += [f"{k} {float(v):.4f}" for k, v in metrics.items()
              if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return " | ".join(parts)


class TrainProgress:
    """Progress of ``Trainer.train``: a tqdm bar, or a line per logged step and per evaluation."""

    def __init__(self, reporter: Reporter, total: int, initial: int, desc: str):
        """``initial``: the step training starts from (a resumed run's checkpoint step)."""
        self.reporter, self.total = reporter, int(total)
        self.bar = None
        if reporter.mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
        self._mark = (int(initial), time.perf_counter())

    def logged(self, record: Mapping[str, Any]) -> None:
        """A logged train step (the metrics.jsonl record): update the bar's postfix or print a line."""
        step, now = int(record["step"]), time.perf_counter()
        last_step, last_time = self._mark
        rate = (step - last_step) / (now - last_time) if now > last_time else float("nan")
        self._mark = (step, now)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{float(record['loss']):.4f}", lr=f"{float(record['lr']):.2e}",
                                 L=int(record["live_slots"]), rank=int(record["total_rank"]))
        elif self.reporter.mode == "lines":
            self.reporter.line(format_train_line(record, self.total, rate))

    def advance(self, steps: int = 1) -> None:
        """``steps`` more steps done."""
        if self.bar is not None:
            self.bar.update(steps)

    def evaluated(self, step: int, metrics: Mapping[str, Any]) -> None:
        """An evaluation landed: print its metrics (above the bar on a terminal)."""
        self.reporter.line(format_eval_line(step, metrics))
        self._mark = (self._mark[0], time.perf_counter())  # evaluation time is not training speed

    def close(self) -> None:
        """Close the bar."""
        if self.bar is not None:
            self.bar.close()


def train_progress(enabled: bool, total: int, initial: int, desc: str) -> TrainProgress:
    """The trainer's progress: the active reporter's, or (called outside a run) a bar/lines chosen here."""
    reporter = _CURRENT.get()
    if not enabled:
        reporter = Reporter("off")
    elif reporter is None:
        reporter = Reporter(choose_mode(True))
    return TrainProgress(reporter, total, initial, desc)


def iterate(iterable: Iterable, total: int, desc: str, unit: str = "it") -> Iterator:
    """Yield from ``iterable`` while reporting progress: a transient tqdm bar, or a line every
    ``LINE_INTERVAL_S`` and one when done (``desc: 12/12 chunks in 0.3 s``)."""
    reporter = current()
    if reporter.mode == "bar":
        from tqdm.auto import tqdm

        yield from tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
        return
    if reporter.mode == "off":
        yield from iterable
        return
    start = last = time.perf_counter()
    done = 0
    for item in iterable:
        yield item
        done += 1
        now = time.perf_counter()
        if now - last >= LINE_INTERVAL_S and done < total:
            eta = (total - done) * (now - start) / done
            reporter.line(f"{desc}: {done}/{total} {unit} ({100 * done / max(total, 1):.0f}%), "
                          f"ETA {format_duration(eta)}")
            last = now
    reporter.line(f"{desc}: {done}/{total} {unit} in {time.perf_counter() - start:.1f} s")
