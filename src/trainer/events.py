"""A TensorBoard event file written by hand: scalars, a purge marker for resumed runs, HParams,
images, histograms and a model graph.

TensorBoard's protos are imported when an :class:`EventFile` is made (or first written to), not
with this module.
"""

from __future__ import annotations

import itertools
import numbers
import os
import struct
import time
from pathlib import Path
from typing import Any

__all__ = ["EventFile", "hparam_value"]

# the names tensorboard.plugins.hparams.metadata defines (importing it costs ~0.3 s)
_HPARAMS_PLUGIN = "hparams"
_SESSION_START_TAG, _SESSION_END_TAG = "_hparams_/session_start_info", "_hparams_/session_end_info"
_FILE_NUMBERS = itertools.count()  # the name's last part, as TensorBoard's writers number theirs


def _masked_crc32c(data: bytes) -> int:
    """The TFRecord checksum: CRC-32C, rotated and offset."""
    x = _crc32c(data)
    return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _crc32c(data: bytes) -> int:
    # resolved on first use, then replaced: this runs twice per event
    global _crc32c
    try:
        from google_crc32c import value as _crc32c
    except ImportError:  # pragma: no cover - google-crc32c is a dependency; TensorBoard's own is pure Python
        from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import crc32c as _crc32c
    return _crc32c(data)


def hparam_value(value: Any) -> int | float | str:
    """A number or a string for TensorBoard's HParams tab (None, bools and lists become strings).

    Integers stay numbers although the HParams table prints every number with 5 significant
    digits (JavaScript's ``toPrecision(5)``: 64 shows as ``64.000``): only numbers get the tab's
    min/max filter, numeric sorting and a numeric axis in its plots; as strings, 128 sorts before 64.
    """
    if isinstance(value, bool):
        return str(value)  # as torch's SummaryWriter.add_hparams shows them
    if isinstance(value, (int, float, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return str(value)


class EventFile:
    """A TensorBoard event file, written in the calling thread.

    What ``torch.utils.tensorboard.SummaryWriter`` writes, without its writer thread and queue:
    that writer checksums every event in pure Python on a thread that competes with the training
    loop for the GIL, and its queue of 10 makes the loop wait; a log point cost ~110 us, a whole
    step of a small model. Here a log point is one event, checksummed in C, buffered, and flushed
    at epoch ends and at most every `flush_secs`.
    """

    def __init__(self, folder: Path, *, purge_step: int | None = None, flush_secs: float = 10.0) -> None:
        import socket

        from tensorboard.compat.proto import event_pb2, summary_pb2

        self._Event, self._Summary = event_pb2.Event, summary_pb2.Summary
        # the name TensorBoard's own writer uses; time, pid and number keep a resumed run's file apart
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(_FILE_NUMBERS)}"
        self.path = Path(folder) / name
        self._file = open(self.path, "xb")
        self.flush_secs = flush_secs
        self._flushed = time.monotonic()
        self._write(self._Event(wall_time=time.time(), file_version="brain.Event:2"))
        if purge_step is not None:
            # TensorBoard drops the points at or after purge_step that earlier files hold
            self._write(self._Event(step=purge_step, wall_time=time.time(), file_version="brain.Event:2"))
            SessionLog = event_pb2.SessionLog
            self._write(self._Event(step=purge_step, wall_time=time.time(), session_log=SessionLog(status=SessionLog.START)))
        self.flush()

    def _write(self, event: Any) -> None:
        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        self._file.write(header + struct.pack("<I", _masked_crc32c(header)) + data + struct.pack("<I", _masked_crc32c(data)))

    def add_summary(self, summary: Any, step: int, wall_time: float | None = None) -> None:
        """Append a ``Summary`` proto as one event at `step` (logged at `wall_time`, default now)."""
        self._write(self._Event(wall_time=time.time() if wall_time is None else wall_time, step=step, summary=summary))
        if time.monotonic() - self._flushed > self.flush_secs:
            self.flush()

    def add_scalars(self, values: dict[str, float], step: int, wall_time: float | None = None) -> None:
        """Several scalars of one step as one event (TensorBoard shows each tag as its own chart)."""
        Value = self._Summary.Value
        self.add_summary(self._Summary(value=[Value(tag=tag, simple_value=v) for tag, v in values.items()]), step, wall_time)

    def add_hparams(self, hparams: dict[str, Any], step: int) -> None:
        """The HParams plugin's session start (these values, see :func:`hparam_value`) and end (success).

        Built here rather than with ``torch.utils.tensorboard.summary.hparams``, whose imports
        (TensorBoard's tensor utilities, boto3) cost ~0.3 s at the end of every run.
        """
        from tensorboard.compat.proto.summary_pb2 import SummaryMetadata
        from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

        start = plugin_data_pb2.SessionStartInfo()
        for key, value in hparams.items():
            value = hparam_value(value)
            if isinstance(value, str):
                start.hparams[str(key)].string_value = value
            else:
                start.hparams[str(key)].number_value = value
        end = plugin_data_pb2.SessionEndInfo(status=api_pb2.Status.Value("STATUS_SUCCESS"))
        for tag, data in (
            (_SESSION_START_TAG, plugin_data_pb2.HParamsPluginData(session_start_info=start, version=0)),
            (_SESSION_END_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=end, version=0)),
        ):
            plugin = SummaryMetadata.PluginData(plugin_name=_HPARAMS_PLUGIN, content=data.SerializeToString())
            value = self._Summary.Value(tag=tag, metadata=SummaryMetadata(plugin_data=plugin))
            self.add_summary(self._Summary(value=[value]), step)

    def add_image(self, tag: str, png: bytes, *, width: int, height: int, step: int) -> None:
        """One PNG image (RGB, `width` x `height` pixels) for TensorBoard's Images tab, as
        ``SummaryWriter.add_image`` writes it (a ``Summary.Image`` value)."""
        image = self._Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=png)
        self.add_summary(self._Summary(value=[self._Summary.Value(tag=tag, image=image)]), step)

    def add_histograms(self, histograms: dict[str, dict[str, Any]], step: int) -> None:
        """Histograms of one step as one event, for the Histograms and Distributions tabs: each a
        dict of ``min, max, num, sum, sum_squares`` and ``bucket_limit`` (each bucket's right edge),
        ``bucket`` (its count), the fields of TensorBoard's ``HistogramProto``."""
        from tensorboard.compat.proto.summary_pb2 import HistogramProto

        Value = self._Summary.Value
        values = [Value(tag=tag, histo=HistogramProto(**fields)) for tag, fields in histograms.items()]
        self.add_summary(self._Summary(value=values), step)

    def add_graph(self, graph_def: bytes) -> None:
        """A serialized ``GraphDef`` for the Graphs tab (TensorBoard shows the last one a run wrote)."""
        self._write(self._Event(wall_time=time.time(), graph_def=graph_def))

    def flush(self) -> None:
        self._file.flush()
        self._flushed = time.monotonic()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
