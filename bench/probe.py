"""A whole command in a child process, and its peak resident memory as the kernel counts it: what several `make
bench` rows report (bench.py's rows 7 and 12, parquet_export.py's row 17)."""

from __future__ import annotations

# Run as `python -c RSS_PROBE <pipeline arguments>`: its last line of stdout is {"peak_kb": ...}. VmHWM, not
# ru_maxrss: Linux carries ru_maxrss across exec, so it would report the benchmark's own peak.
RSS_PROBE = """
import json, sys
from pipeline.cli import app
try:
    app(sys.argv[1:], standalone_mode=False)
finally:
    hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
    print(json.dumps({"peak_kb": hwm}))
"""
