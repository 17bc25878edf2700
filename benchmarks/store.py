"""Encrypted device store vs plain sqlite3, same schema, same run.

    python benchmarks/store.py            # 1,000,000 observations
    python benchmarks/store.py --quick    # 100,000

Measures (targets from the foundation issue):
  insert N observations in one transaction      SQLCipher / sqlite3 <= 1.2x
  cold 30-day range read of one metric          SQLCipher / sqlite3 <= 1.7x
      ("cold" = a freshly opened connection: empty page cache, pages decrypted on read;
       the OS file cache is warm for both, which is the fair comparison on one machine)
  open time with the raw key                     < 5 ms
Each timing is the median of several repetitions; both databases are built in this run.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sqlcipher3 import dbapi2 as sqlcipher

from restwise.client.keys import FAST_INSECURE_ARGON2
from restwise.client.store import (
    DB_NAME,
    DeviceStore,
    Observation,
    connect_raw,
    MIGRATIONS,
    insert_observations,
    split_sql,
    probe_database,
    tune_connection,
    create_plain_sqlite,
    record_key,
)

METRICS = ("heart_rate", "resting_heart_rate", "hrv_rmssd", "steps")
UNITS = {"heart_rate": "bpm", "resting_heart_rate": "bpm", "hrv_rmssd": "ms", "steps": "count"}
T0 = 1_600_000_000


def rows(n: int):
    # Heart rate every ~minute over ~2 years, the other metrics interleaved.
    for i in range(n):
        metric = METRICS[0] if i % 10 else METRICS[(i // 10) % 4]
        yield Observation(
            metric=metric, ts=T0 + i * 60, value=50.0 + (i * 7919) % 90, unit=UNITS[metric],
            source="bench", device="watch", tz_offset_min=60, record_key=record_key("bench", i),
        )


def plain_insert(path: Path, n: int) -> float:
    """The same insert code path as the encrypted store (multi-row statements), on sqlite3,
    so the ratio measures encryption and nothing else."""
    conn = create_plain_sqlite(path)
    t = time.perf_counter()
    conn.execute("BEGIN")
    insert_observations(conn, rows(n), None)
    conn.execute("COMMIT")
    dt = time.perf_counter() - t
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return dt


def unkeyed_sqlcipher_insert(path: Path, n: int) -> float:
    """The sqlcipher3 library with no key (no encryption): separates the cost of the library
    build from the cost of encryption itself."""
    conn = sqlcipher.connect(str(path), isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    tune_connection(conn)
    for stmt in split_sql(MIGRATIONS[0]):
        conn.execute(stmt)
    t = time.perf_counter()
    conn.execute("BEGIN")
    insert_observations(conn, rows(n), None)
    conn.execute("COMMIT")
    dt = time.perf_counter() - t
    conn.close()
    return dt


def cipher_insert(folder: Path, n: int) -> tuple[float, DeviceStore]:
    store = DeviceStore.create(folder, "bench", argon2=FAST_INSECURE_ARGON2)
    t = time.perf_counter()
    store.add_observations(rows(n))
    dt = time.perf_counter() - t
    return dt, store


RANGE_Q = "SELECT ts, value FROM observations WHERE metric = ? AND ts >= ? AND ts < ? ORDER BY ts"


def range_args(n: int) -> tuple:
    mid = T0 + (n // 2) * 60
    return ("heart_rate", mid, mid + 30 * 86400)


def cold_read_plain(path: Path, n: int) -> tuple[float, int]:
    t = time.perf_counter()
    conn = sqlite3.connect(str(path))
    tune_connection(conn)
    out = conn.execute(RANGE_Q, range_args(n)).fetchall()
    dt = time.perf_counter() - t
    conn.close()
    return dt, len(out)


def cold_read_cipher(path: Path, key: bytes, n: int) -> tuple[float, int]:
    t = time.perf_counter()
    conn = connect_raw(path, key)
    tune_connection(conn)
    out = conn.execute(RANGE_Q, range_args(n)).fetchall()
    dt = time.perf_counter() - t
    conn.close()
    return dt, len(out)


def open_time(path: Path, key: bytes) -> float:
    t = time.perf_counter()
    conn = connect_raw(path, key)
    probe_database(conn)
    dt = time.perf_counter() - t
    conn.close()
    return dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100,000 rows instead of 1,000,000")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    n = args.rows or (100_000 if args.quick else 1_000_000)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ins_plain, ins_cipher, ins_unkeyed = [], [], []
        for r in range(args.repeats):
            p = tmp / f"plain{r}.db"
            ins_plain.append(plain_insert(p, n))
            ins_unkeyed.append(unkeyed_sqlcipher_insert(tmp / f"unkeyed{r}.db", n))
            dt, store = cipher_insert(tmp / f"cipher{r}", n)
            ins_cipher.append(dt)
            key = store._key
            store.close()
        plain_path, cipher_path = tmp / f"plain{args.repeats - 1}.db", tmp / f"cipher{args.repeats - 1}" / DB_NAME

        reads_plain, reads_cipher, opens = [], [], []
        for _ in range(max(5, args.repeats)):
            dtp, np_ = cold_read_plain(plain_path, n)
            dtc, nc = cold_read_cipher(cipher_path, key, n)
            assert np_ == nc and nc > 0, (np_, nc)
            reads_plain.append(dtp)
            reads_cipher.append(dtc)
            opens.append(open_time(cipher_path, key))

    mi_p, mi_c = statistics.median(ins_plain), statistics.median(ins_cipher)
    mr_p, mr_c = statistics.median(reads_plain), statistics.median(reads_cipher)
    mo = statistics.median(opens)
    res = [
        ("insert", f"{n:,} rows", mi_p, mi_c, mi_c / mi_p, 1.2),
        ("cold 30-day read", f"{nc:,} rows", mr_p, mr_c, mr_c / mr_p, 1.7),
    ]
    print(f"restwise store benchmark: {n:,} observations, median of {args.repeats}+ runs, "
          f"python {sys.version.split()[0]}, {os.cpu_count()} cpus")
    print(f"{'what':<18}{'size':>14}{'sqlite3 s':>12}{'sqlcipher s':>13}{'ratio':>8}{'target':>8}  met")
    for what, size, p, c, ratio, target in res:
        print(f"{what:<18}{size:>14}{p:>12.4f}{c:>13.4f}{ratio:>8.2f}{target:>8.1f}  {'yes' if ratio <= target else 'NO'}")
    print(f"open with raw key: {mo * 1000:.2f} ms (target < 5 ms)  {'yes' if mo < 0.005 else 'NO'}")
    mi_u = statistics.median(ins_unkeyed)
    print(f"insert throughput: sqlite3 {n / mi_p:,.0f} rows/s, sqlcipher {n / mi_c:,.0f} rows/s")
    print(f"where the insert ratio comes from: sqlcipher3 library without a key {mi_u:.4f} s "
          f"({mi_u / mi_p:.2f}x sqlite3); encryption itself {mi_c / mi_u:.2f}x on top of that")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
