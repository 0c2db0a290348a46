"""Device time per HLO op from a ``jax.profiler`` trace, attributed through the ops' jax name stacks.

Shared by ``train_step.py --profile`` and ``attention.py --profile``. On GPU, XLA's command buffers must be
off (``XLA_FLAGS=--xla_gpu_enable_command_buffer=``, set before the backend starts) for every kernel to be
its own trace event; both scripts do that when asked to profile.
"""

from __future__ import annotations

import collections
import glob
import re
import tempfile
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
    """(HLO op name, duration ns, hlo module or None) of every op event in the trace under ``trace_dir``,
    and the names of the trace's lines.

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
                events.append((e.name, e.duration_ns, _stats(e).get("hlo_module")))
    else:
        for plane in planes:
            for line in plane.lines:
                for e in line.events:
                    stats = _stats(e)
                    if "hlo_op" in stats:
                        events.append((str(stats["hlo_op"]), e.duration_ns, stats.get("hlo_module")))
    return events, lines_seen


def traced_op_times(run, pool, hlo_text: str, calls: int = 5):
    """Runs ``run(*pool[i % len(pool)])`` ``calls`` times under the profiler.

    Returns (Counter {(HLO op, jax name stack): total ns}, number of events, trace line names), restricted
    to the events of ``hlo_text``'s module where the trace names modules."""
    op_names = hlo_op_names(hlo_text)
    trace_dir = tempfile.mkdtemp(prefix="blossom_profile_")
    with jax.profiler.trace(trace_dir):
        for i in range(calls):
            jax.block_until_ready(run(*pool[i % len(pool)]))
    events, lines_seen = device_op_events(trace_dir)
    module = re.match(r"HloModule ([\w.\-]+)", hlo_text)
    if module:
        events = [e for e in events if e[2] is None or e[2] == module.group(1)]
    by_op = collections.Counter()
    for name, duration_ns, _ in events:
        op = name.lstrip("%").split(" ")[0].split("=")[0].strip()
        by_op[(op, op_names.get(op) or "")] += duration_ns
    return by_op, len(events), lines_seen
