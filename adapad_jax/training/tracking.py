"""Where a run's numbers go besides metrics.jsonl: TensorBoard event files (no TensorFlow) and Weights & Biases.

``open_run_log`` gives the trainer a ``RunLog``: every record written to metrics.jsonl is also written as
scalars (``train/loss``, ``train/lr``, ``train/grad_norm``, ``train/total_rank``, ... and ``eval/<metric>``)
to TensorBoard event files in the output directory (``logging.tensorboard``) and to a W&B run
(``logging.wandb_project``). Per-module ranks go to ``ranks/<module>`` whenever they change, and the rank
heatmap ``ranks.png`` as the image ``ranks``. Sinks open lazily at the first write, so a Trainer that only
restores and exports writes nothing.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from adapad_jax.training.outputs import MetricsWriter

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

    def __init__(self, logdir: Path, purge_step: int | None):
        """``purge_step``: a resumed run's first step; TensorBoard drops older files' events from there on."""
        from tensorboardX import SummaryWriter

        # The file name has the time in seconds; the suffix keeps a resume within the same second from
        # overwriting the previous file (and keeps the files in write order).
        self.writer = SummaryWriter(logdir=str(logdir), purge_step=purge_step, flush_secs=30,
                                    filename_suffix=f".{time.time_ns()}")

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


class WandbSink:
    """The same scalars and images in a Weights & Biases run; a resumed run continues the same W&B run."""

    def __init__(self, project: str, output_dir: Path, config: Any):
        import wandb

        id_file = output_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
        id_file.write_text(run_id + "\n")
        self.wandb = wandb
        self.run = wandb.init(project=project, id=run_id, resume="allow", name=output_dir.name, dir=str(output_dir),
                              config=json.loads(config.to_json()) if hasattr(config, "to_json") else dict(config))

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
        super().__init__(Path(output_dir) / "metrics.jsonl", enabled=enabled)
        self.output_dir, self.config = Path(output_dir), config
        logging = config.get("logging") if config is not None else None
        self.tensorboard = bool(logging.get("tensorboard", False)) if logging is not None else False
        self.wandb_project = str(logging.get("wandb_project", "")) if logging is not None else ""
        self.last_eval: dict[str, Any] = {}
        self._sinks: list[Any] | None = None
        self._purge_step: int | None = None
        self._ranks: dict[str, int] | None = None

    def sinks(self) -> list[Any]:
        """The open sinks (opened at the first call; none when not ``enabled``)."""
        if self._sinks is None:
            self._sinks = []
            if self.enabled and self.tensorboard:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                self._sinks.append(TensorBoardSink(self.output_dir, self._purge_step))
            if self.enabled and self.wandb_project:
                self._sinks.append(WandbSink(self.wandb_project, self.output_dir, self.config))
        return self._sinks

    def write(self, record: Mapping[str, Any]) -> None:
        """Append to metrics.jsonl and send the record's scalars to every sink."""
        if "eval" in record:
            self.last_eval = dict(record["eval"])
        super().write(record)
        if not self.enabled:
            return
        values = scalars_of(record)
        for sink in self.sinks():
            sink.scalars(int(record["step"]), values)
            if "eval" in record:
                sink.flush()  # evaluations are rare and worth seeing at once

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
        """Drop metrics.jsonl records after ``step``; TensorBoard events after it are dropped via ``purge_step``."""
        super().truncate_after(step)
        if self._sinks is None:
            self._purge_step = step + 1

    def close(self) -> None:
        """Close every sink (all of them, also after one fails); the first failure is raised."""
        sinks, self._sinks = self._sinks or [], None
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
