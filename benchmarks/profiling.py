"""Device time per HLO op from a ``jax.profiler`` trace, attributed through the ops' jax name stacks.

Shared by ``train_step.py --profile`` and ``attention.py --profile``. On GPU, XLA's command buffers must be
off (``XLA_FLAGS=--xla_gpu_enable_command_buffer=``, set before the backend starts) for every kernel to be
its own trace event; both scripts do that when asked to profile.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import re
import shutil
import statistics
import tempfile
import time
import warnings

import jax


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """Instruction name -> jax name stack (``metadata op_name``) of every instruction in compiled HLO text."""
    names = {}
    for match in re.finditer(r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = [^\n]*?op_name="([^"]*)"', hlo_text, re.M):
        names[match.group(1)] = match.group(2)
    return names


def _stats(event) -> dict:
    with warnings.catch_warnings():  # jax 0.11: "builtin type event_stats has no __module__ attribute"
        warnings.simplefilter("ignore", DeprecationWarning)
        return dict(event.stats)


def device_op_events(trace_dir: str):
    """(HLO op name, start ns, duration ns, hlo module or None) of every op event in the trace under
    ``trace_dir``, and the names of the trace's lines.

    Where a device plane has an "XLA Ops" line (one event per HLO instruction run), those events count;
    otherwise every event that carries an ``hlo_op`` stat does: the kernel events of the GPU stream lines
    (what jax 0.11.2 wrote on the H100, with command buffers off) or the thunk events of the CPU.
    """
    from jax.profiler import ProfileData

    planes = [plane for path in glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
              for plane in ProfileData.from_file(path).planes]
    lines_seen = sorted({f"{plane.name}:{line.name}" for plane in planes for line in plane.lines})
    op_lines = [line for plane in planes if plane.name.startswith("/device:") for line in plane.lines
                if line.name == "XLA Ops"]
    events = []
    if op_lines:
        for line in op_lines:
            for e in line.events:
                events.append((e.name, e.start_ns, e.duration_ns, _stats(e).get("hlo_module")))
    else:
        for plane in planes:
            for line in plane.lines:
                for e in line.events:
                    stats = _stats(e)
                    if "hlo_op" in stats:
                        events.append((str(stats["hlo_op"]), e.start_ns, e.duration_ns, stats.get("hlo_module")))
    return events, lines_seen


def call_spans_ns(events, calls: int) -> list[float]:
    """Per call, the time from its first op event's start to its last one's end, for ``calls`` calls run one
    after another with a host synchronisation between them: the events are split at the ``calls - 1``
    widest idle gaps. Against the summed op durations, a span shows how long the device sat idle inside a
    call (launch gaps); against the host's wall time per call, what the dispatch and the synchronisation
    add outside it."""
    if not events or calls < 1:
        return []
    ordered = sorted((start, start + duration) for _, start, duration, _ in events)
    gaps, end_so_far = [], ordered[0][1]
    for index in range(1, len(ordered)):
        gaps.append((ordered[index][0] - end_so_far, index))
        end_so_far = max(end_so_far, ordered[index][1])
    cuts = sorted(index for _, index in sorted(gaps, reverse=True)[:calls - 1])
    spans = []
    for lo, hi in zip([0] + cuts, cuts + [len(ordered)]):
        group = ordered[lo:hi]
        spans.append(max(end for _, end in group) - group[0][0])
    return spans


@dataclasses.dataclass
class Trace:
    """What :func:`traced_op_times` measured: total ns per (HLO op, jax name stack), the number of op
    events, the trace's line names, and per call the device span (:func:`call_spans_ns`) and the host
    wall time (call to ``block_until_ready`` returning, profiler on)."""
    by_op: collections.Counter
    n_events: int
    lines_seen: list
    span_ns: list
    wall_ns: list

    def median_ms(self, values) -> float:
        return round(statistics.median(values) / 1e6, 4) if values else float("nan")


def traced_op_times(run, pool, hlo_text: str, calls: int = 5, keep_trace: str | None = None) -> Trace:
    """Runs ``run(*pool[i % len(pool)])`` ``calls`` times under the profiler, each call synchronised.

    Returns a :class:`Trace`, restricted to the events of ``hlo_text``'s module where the trace names
    modules. ``keep_trace``: a folder to copy the raw trace into (for a timeline viewer)."""
    op_names = hlo_op_names(hlo_text)
    trace_dir = tempfile.mkdtemp(prefix="blossom_profile_")
    wall_ns = []
    with jax.profiler.trace(trace_dir):
        for i in range(calls):
            start = time.perf_counter_ns()
            jax.block_until_ready(run(*pool[i % len(pool)]))
            wall_ns.append(time.perf_counter_ns() - start)
    events, lines_seen = device_op_events(trace_dir)
    if keep_trace:
        shutil.copytree(trace_dir, keep_trace, dirs_exist_ok=True)
    module = re.match(r"HloModule ([\w.\-]+)", hlo_text)
    if module:
        events = [e for e in events if e[3] is None or e[3] == module.group(1)]
    by_op = collections.Counter()
    for name, _, duration_ns, _ in events:
        op = name.lstrip("%").split(" ")[0].split("=")[0].strip()
        by_op[(op, op_names.get(op) or "")] += duration_ns
    return Trace(by_op, len(events), lines_seen, call_spans_ns(events, calls), wall_ns)
