"""Where a run's numbers go besides metrics.jsonl: TensorBoard event files (no TensorFlow) and Weights & Biases.

``open_run_log`` gives the trainer a ``RunLog``: every record written to metrics.jsonl is also written as
scalars (``train/loss``, ``train/lr``, ``train/grad_norm``, ``train/total_rank``, ... and ``eval/<metric>``)
to TensorBoard event files in the output directory (``logging.tensorboard``) and to a W&B run
(``logging.wandb``). Per-module ranks go to ``ranks/<module>`` whenever they change, the best main metric so far
to ``best/<metric>`` and ``best/step``, the rank heatmap ``ranks.png`` as the image ``ranks``, and the resolved
config as TensorBoard text ``config`` (W&B: the run's config). Sinks open lazily at the first write, so a
Trainer that only restores and exports writes nothing; ``RunLog.start`` opens W&B before any compute, so a W&B
that cannot start stops the run with one line.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from adapad_jax.config.schema import ConfigError
from adapad_jax.outputs.rank_outputs import MetricsWriter
from adapad_jax.outputs.layout import METRICS_FILE

# Train-record fields logged as scalars (the rest of a record, e.g. slot_losses, is logged per slot).
TRAIN_SCALARS = ("loss", "lr", "grad_norm", "orth_penalty", "total_rank", "live_slots", "seconds_per_step")
WANDB_ID_FILE = "wandb_run_id"


def scalars_of(record: Mapping[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record -> ``{tag: value}``: ``train/<field>``, ``train/slot_loss/<i>``, ``eval/<metric>``."""
    scalars: dict[str, float] = {}
    for name in TRAIN_SCALARS:
        if name in record:
            scalars[f"train/{name}"] = float(np.asarray(record[name]))
    if "slot_losses" in record:
        for i, value in enumerate(np.asarray(record["slot_losses"]).reshape(-1)):
            scalars[f"train/slot_loss/{i}"] = float(value)
    for name, value in (record.get("eval") or {}).items():
        if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
            scalars[f"eval/{name}"] = float(value)
    return scalars


class TensorBoardSink:
    """Scalars and images into tfevents files in ``logdir`` (tensorboardX; TensorFlow is not needed)."""

    def __init__(self, logdir: Path, purge_step: int | None, config: Any = None):
        """``purge_step``: a resumed run's first step; TensorBoard drops older files' events from there on.
        ``config``: written as the text ``config`` (at the run's first step), so a board of many runs tells
        them apart."""
        from tensorboardX import SummaryWriter

        # The file name has the time in seconds; the suffix keeps a resume within the same second from
        # overwriting the previous file (and keeps the files in write order).
        # max_queue: once the disk is full tensorboardX's writer thread stops draining its queue, and add_scalar
        # then blocks when the queue is full; a deep queue lets the run reach the checkpoint's one-line failure.
        self.writer = SummaryWriter(logdir=str(logdir), purge_step=purge_step, flush_secs=30, max_queue=10000,
                                    filename_suffix=f".{time.time_ns()}")
        if config is not None:
            text = json.dumps(config_dict(config), indent=2)
            self.writer.add_text("config", f"```\n{text}\n```", global_step=(purge_step or 1) - 1)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Write ``values`` at ``step``."""
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)

    def image(self, tag: str, path: Path, step: int) -> None:
        """Write the image file ``path`` (PNG) at ``step``."""
        import matplotlib.image

        pixels = matplotlib.image.imread(str(path))  # PNG -> float [H, W, 3 or 4] in [0, 1]
        rgb = np.clip(np.round(pixels[..., :3] * 255), 0, 255).astype(np.uint8)
        self.writer.add_image(tag, rgb, global_step=step, dataformats="HWC")

    def flush(self) -> None:
        """Write pending events to disk."""
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file; after a failed flush (disk full) the file is abandoned, so that
        neither tensorboardX's writer thread nor its exit handler tries again."""
        try:
            self.writer.close()
        except BaseException:
            self._abandon()
            raise

    def _abandon(self) -> None:
        for file_writer in (self.writer.all_writers or {}).values():
            events = file_writer.event_writer  # tensorboardX EventFileWriter
            if events._closed:
                continue
            events._closed = True  # its atexit cleanup and later flushes become no-ops
            with contextlib.suppress(Exception):
                events._worker.stop()
            with contextlib.suppress(Exception):
                events._ev_writer._py_recordio_writer.close()
        self.writer.file_writer = self.writer.all_writers = None


def config_dict(config: Any) -> dict[str, Any]:
    """The resolved config as plain JSON types."""
    return json.loads(config.to_json()) if hasattr(config, "to_json") else dict(config)


def wandb_wanted(logging: Any) -> bool:
    """W&B is on: ``logging.wandb``, or a ``logging.wandb_project`` given."""
    return logging is not None and bool(logging.get("wandb", False) or logging.get("wandb_project", ""))


def wandb_run_id(output_dir: Path) -> str:
    """This output_dir's W&B run id (made at its first run and kept in ``wandb_run_id``, so a resume continues it)."""
    id_file = output_dir / WANDB_ID_FILE
    if id_file.is_file() and id_file.read_text().strip():
        return id_file.read_text().strip()
    run_id = secrets.token_hex(4)
    id_file.write_text(run_id + "\n")
    return run_id


def wandb_init_kwargs(logging: Any, output_dir: Path) -> dict[str, Any]:
    """``wandb.init`` arguments from ``logging.wandb_*``; project / entity fall back to $WANDB_PROJECT /
    $WANDB_ENTITY (as transformers' WandbCallback reads them), the name to output_dir's name."""
    tags = [tag.strip() for tag in str(logging.get("wandb_tags", "")).split(",") if tag.strip()]
    return {
        "project": logging.get("wandb_project", "") or os.environ.get("WANDB_PROJECT") or None,
        "entity": logging.get("wandb_entity", "") or os.environ.get("WANDB_ENTITY") or None,
        "name": logging.get("wandb_name", "") or output_dir.name,
        "tags": tags or None,
        "group": logging.get("wandb_group", "") or None,
    }


class WandbSink:
    """The same scalars and images in a Weights & Biases run; a resumed run continues the same W&B run."""

    def __init__(self, logging: Any, output_dir: Path, config: Any):
        """Start the W&B run (in ``output_dir/wandb``); ConfigError with W&B's reason when it cannot start."""
        import wandb

        output_dir.mkdir(parents=True, exist_ok=True)
        self.wandb = wandb
        try:
            self.run = wandb.init(id=wandb_run_id(output_dir), resume="allow", dir=str(output_dir),
                                  **wandb_init_kwargs(logging, output_dir))
            # allow_val_change: a resumed run may change a field (e.g. a longer train.num_steps).
            self.run.config.update(config_dict(config), allow_val_change=True)
        except Exception as err:  # noqa: BLE001 - W&B raises its own errors, pydantic's, OSError, ...
            reason = " ".join(str(err).split()) or type(err).__name__
            raise ConfigError(f"W&B (logging.wandb) did not start: {reason} (log in with `wandb login` or set "
                              "WANDB_MODE=offline; or turn W&B off: --config.logging.wandb=False "
                              "--config.logging.wandb_project='')") from None

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Log ``values`` at ``step``."""
        self.run.log(dict(values), step=step)

    def image(self, tag: str, path: Path, step: int) -> None:
        """Log the image file ``path`` (at W&B's current step: W&B drops steps lower than the last one logged,
        and the exported step can be an earlier, best one)."""
        self.run.log({tag: self.wandb.Image(str(path)), "exported_step": step})

    def flush(self) -> None:
        """Nothing to do (W&B sends in the background)."""

    def close(self) -> None:
        """Finish the W&B run."""
        self.run.finish()


class RunLog(MetricsWriter):
    """metrics.jsonl plus the TensorBoard / W&B sinks; ``last_eval`` is the newest evaluation written."""

    def __init__(self, output_dir: Path, config: Any = None, enabled: bool = True):
        super().__init__(Path(output_dir) / METRICS_FILE, enabled=enabled)
        self.output_dir, self.config = Path(output_dir), config
        self.logging = config.get("logging") if config is not None else None
        self.tensorboard = bool(self.logging.get("tensorboard", False)) if self.logging is not None else False
        self.wandb = wandb_wanted(self.logging)
        self.last_eval: dict[str, Any] = {}
        self._last_eval_step: int | None = None
        self._best: tuple[int, float] | None = None  # (step, value) of the best main metric so far
        self._sinks: list[Any] | None = None
        self._wandb_sink: WandbSink | None = None
        self._purge_step: int | None = None
        self._ranks: dict[str, int] | None = None

    def start(self) -> None:
        """Start W&B now (before any compute), so one that cannot start stops the run with one line."""
        if self.enabled and self.wandb and self._wandb_sink is None:
            self._wandb_sink = WandbSink(self.logging, self.output_dir, self.config)

    def sinks(self) -> list[Any]:
        """The open sinks (opened at the first call; none when not ``enabled``)."""
        if self._sinks is None:
            self._sinks = []
            if self.enabled and self.tensorboard:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                self._sinks.append(TensorBoardSink(self.output_dir, self._purge_step, self.config))
            self.start()
            if self._wandb_sink is not None:
                self._sinks.append(self._wandb_sink)
        return self._sinks

    def write(self, record: Mapping[str, Any]) -> None:
        """Append to metrics.jsonl and send the record's scalars to every sink (a final evaluation of the step
        whose evaluation was just written is not written again)."""
        if "eval" in record:
            step, metrics = int(record["step"]), dict(record["eval"])
            if record.get("final") and step == self._last_eval_step and metrics == self.last_eval:
                return
            self.last_eval, self._last_eval_step = metrics, step
        super().write(record)
        if not self.enabled:
            return
        values = scalars_of(record)
        if "eval" in record:
            values.update(self._new_best(int(record["step"]), record["eval"]))
        for sink in self.sinks():
            sink.scalars(int(record["step"]), values)
            if "eval" in record:
                sink.flush()  # evaluations are rare and worth seeing at once

    def _main_metric(self) -> tuple[str, str] | None:
        """(key, 'max' or 'min') of the task's main metric, or None without a config."""
        if self.config is None:
            return None
        from adapad_jax.metrics import main_metric
        from adapad_jax.config.validation import task_spec_for

        return main_metric(task_spec_for(self.config))

    def _new_best(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        """``{best/<metric>, best/step}`` when this evaluation beats (or ties, later) the best so far, else {}."""
        main = self._main_metric()
        value = metrics.get(main[0]) if main is not None else None
        if not isinstance(value, (int, float, np.number)) or not np.isfinite(value):
            return {}
        key, mode = main
        if self._best is not None and (value < self._best[1] if mode == "max" else value > self._best[1]):
            return {}
        self._best = (step, float(value))
        return {f"best/{key}": float(value), "best/step": float(step)}

    def write_ranks(self, step: int, ranks: Mapping[str, int]) -> None:
        """Per-module ranks as ``ranks/<module>`` scalars, when they differ from the last ones written."""
        if not self.enabled or dict(ranks) == self._ranks:
            return
        self._ranks = dict(ranks)
        for sink in self.sinks():
            sink.scalars(step, {f"ranks/{name}": float(rank) for name, rank in ranks.items()})

    def write_image(self, tag: str, path: str | Path, step: int) -> None:
        """An image file (e.g. ranks.png) at ``step``."""
        if not self.enabled or not Path(path).is_file():
            return
        for sink in self.sinks():
            sink.image(tag, Path(path), step)
            sink.flush()

    def truncate_after(self, step: int) -> None:
        """Drop metrics.jsonl records after ``step``; TensorBoard events after it are dropped via ``purge_step``.
        The best evaluation among the kept records stays the one to beat."""
        super().truncate_after(step)
        if self._sinks is None:
            self._purge_step = step + 1
        if self.enabled and self.path.is_file():
            for line in self.path.read_text().splitlines():
                record = json.loads(line) if line.strip() else {}
                if "eval" in record and not record.get("final"):
                    self._new_best(int(record["step"]), record["eval"])

    def close(self) -> None:
        """Close every sink (all of them, also after one fails); the first failure is raised."""
        sinks = self._sinks or ([self._wandb_sink] if self._wandb_sink is not None else [])
        self._sinks, self._wandb_sink = None, None
        first: Exception | None = None
        for sink in sinks:
            try:
                sink.close()
            except Exception as err:  # noqa: BLE001 - the others still close
                first = first or err
        if first is not None:
            raise first


def open_run_log(output_dir: str | Path, config: Any, enabled: bool = True) -> RunLog:
    """The trainer's metric log for ``output_dir`` with the sinks ``config.logging`` asks for."""
    return RunLog(Path(output_dir), config, enabled=enabled)
