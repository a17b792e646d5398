"""`pipeline export-features` on synthetic caches: rows/s, bytes on disk (per row, and against the HDF5 cache), the
peak memory of the whole command, and the compressions it could have used (what chose zstd + BYTE_STREAM_SPLIT).

    python bench/parquet_export.py [--rows 10000 100000] [--cache features/x.h5]

`run()` is what `make bench` calls for its row; `compressions()` is the table in docs/export-features.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.api import export_features  # noqa: E402
from pipeline.cache.header import Header  # noqa: E402
from pipeline.cache.identity import generated_config  # noqa: E402
from pipeline.cache.record import Record  # noqa: E402
from pipeline.cache.writer import write_atomic  # noqa: E402
from pipeline.hub import parquet  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe import RSS_PROBE  # noqa: E402


def post_relu_rows(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Rows shaped like VGG16's average-pooled features (non-negative, most small, a long tail), as float16: their
    compression is what an export of a real cache meets, unlike Gaussian noise's."""
    rng = np.random.default_rng(seed)
    return (rng.gamma(0.6, 1.5, (n, dim)) * (rng.random((n, dim)) > 0.05)).astype(np.float16)


def synthetic_cache(path: Path, n: int, dim: int) -> Path:
    """A float16 cache of n rows in 10 classes, 80% train and 20% val, written by the real writer."""
    rows = post_relu_rows(n, dim)
    records = [Record("train" if i % 5 else "val", f"{i:07d}.jpg", i % 10, 1, 1, f"{i:064x}") for i in range(n)]
    config = generated_config()
    header = Header(fingerprint=config.fingerprint(), config=config, class_names=[f"class {i}" for i in range(10)],
                    feature_dim=dim)
    write_atomic(path, header, records, lambda rs: rows[[int(r.path[:7]) for r in rs]], "float16")
    return path


def export_row(tmp: Path, n: int, dim: int) -> dict:
    """One export of an n-row cache: rows/s of the library call (the cache opened, every part written and synced),
    bytes on disk, and the peak memory of the same export run as a command."""
    cache = synthetic_cache(tmp / f"cache-{n}.h5", n, dim)
    start = time.perf_counter()
    summary = export_features(cache, tmp / f"export-{n}")
    seconds = time.perf_counter() - start
    probe = subprocess.run([sys.executable, "-c", RSS_PROBE, "export-features", str(cache), "--out",
                            str(tmp / f"rss-{n}")], capture_output=True, text=True, cwd=tmp, check=True)
    peak_kb = json.loads(probe.stdout.strip().splitlines()[-1])["peak_kb"]
    cache_bytes = cache.stat().st_size
    return {"rows": n, "dim": dim, "seconds": round(seconds, 3), "rows_per_s": round(n / seconds),
            "files": len(summary.files), "bytes": summary.bytes, "bytes_per_row": round(summary.bytes / n, 1),
            "cache_bytes": cache_bytes, "cache_bytes_per_row": round(cache_bytes / n, 1),
            "parquet_over_cache": round(summary.bytes / cache_bytes, 3), "float32_bytes": n * dim * 4,
            "command_peak_rss_mb": round(peak_kb / 1024, 1)}


def run(tmp: Path, rows=(10_000, 100_000), dim: int = 512) -> dict:
    """`make bench`'s row: export rows/s and size on disk for each cache size."""
    return {"machine": machine(), "block_bytes": parquet.BLOCK_BYTES, "compression": parquet.COMPRESSION,
            "embedding_encoding": parquet.EMBEDDING_ENCODING, "exports": [export_row(tmp, n, dim) for n in rows]}


def compressions(tmp: Path, cache: Path | None = None, rows: int = 20_000, dim: int = 512) -> list[dict]:
    """Every (compression, encoding of the embedding values) pair on one cache (a synthetic one by default): bytes
    on disk against float32, and export rows/s. Sets the module's two constants for the time of each export."""
    cache = cache or synthetic_cache(tmp / "compressions.h5", rows, dim)
    chosen = parquet.COMPRESSION, parquet.EMBEDDING_ENCODING
    table = []
    try:
        for compression in ("none", "snappy", "lz4", "zstd"):
            for encoding in ("PLAIN", "BYTE_STREAM_SPLIT"):
                parquet.COMPRESSION, parquet.EMBEDDING_ENCODING = compression, encoding
                out = tmp / f"c-{cache.stem}-{compression}-{encoding}"
                start = time.perf_counter()
                summary = export_features(cache, out)
                seconds = time.perf_counter() - start
                float32_bytes = summary.rows * summary.dim * 4
                table.append({"cache": cache.name, "compression": compression, "encoding": encoding,
                              "bytes": summary.bytes, "of_float32": round(summary.bytes / float32_bytes, 3),
                              "rows_per_s": round(summary.rows / seconds)})
    finally:
        parquet.COMPRESSION, parquet.EMBEDDING_ENCODING = chosen
    return table


def machine() -> str:
    try:
        flags = Path("/proc/cpuinfo").read_text()
        names = (line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name"))
        model = next(names, "")
        extras = [f for f in ("avx512_bf16", "amx_bf16") if f in flags.split()]
    except OSError:
        model, extras = platform.processor(), []
    return f"{model or platform.machine()}, {os.cpu_count()} cores{', ' + ', '.join(extras) if extras else ''}"


def markdown(result: dict, table: list[dict]) -> str:
    lines = [f"machine: {result['machine']}; {result['compression']} + {result['embedding_encoding']}, blocks of "
             f"{result['block_bytes'] >> 20} MB", "",
             "| rows x dim | export rows/s | Parquet bytes/row | HDF5 cache bytes/row | Parquet / cache | files | "
             "command peak RSS |", "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {e['rows']:,} x {e['dim']} | {e['rows_per_s']:,} | {e['bytes_per_row']} | "
              f"{e['cache_bytes_per_row']} | {e['parquet_over_cache']} | {e['files']} | {e['command_peak_rss_mb']} MB |"
              for e in result["exports"]]
    lines += ["", "| cache | compression | embedding encoding | bytes / float32 | export rows/s |",
              "| --- | --- | --- | --- | --- |"]
    lines += [f"| {t['cache']} | {t['compression']} | {t['encoding']} | {t['of_float32']} | {t['rows_per_s']:,} |"
              for t in table]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--cache", type=Path, help="a real cache to compare the compressions on too")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(Path(tmp), tuple(args.rows), args.dim)
        table = compressions(Path(tmp), dim=args.dim)
        if args.cache:
            table += compressions(Path(tmp), args.cache)
    print(markdown(result, table))


if __name__ == "__main__":
    main()
