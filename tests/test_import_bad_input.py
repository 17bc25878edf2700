"""Bad input across the Fitbit, Garmin FIT, Open mHealth and check-in CSV importers: zip
bombs, files of the wrong type, absurd values, malformed files, mutated files (hypothesis),
and the command line's exit codes. The invariant everywhere: a clear ImportFailedError or a
counted, explained skip, and after a refused import the store is exactly as before."""

from __future__ import annotations

import importlib.util
import json
import random
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from restwise.client.errors import (
    ImportFailedError,
    MalformedInputError,
    NothingImportedError,
    UnknownFormatError,
)
from restwise.client.importers import get_importer, run_import
from restwise.client.store import DeviceStore

FIXTURES = Path(__file__).parent / "fixtures"
FITBIT = FIXTURES / "fitbit" / "MyFitbitData" / "Alex"
# The console script of the environment running the tests (/work/venv/bin/restwise here).
RESTWISE = Path(sys.executable).parent / "restwise"

_spec = importlib.util.spec_from_file_location("fit_encoder", FIXTURES / "garmin_fit" / "fit_encoder.py")
fe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fe)


def snapshot(store: DeviceStore) -> tuple:
    """Everything an import could change: the summary and every row of the data tables."""
    c = store.conn
    return (
        store.summary(),
        c.execute("SELECT metric, ts, end_ts, tz_offset_min, value, unit, source, record_key "
                  "FROM observations ORDER BY id").fetchall(),
        c.execute("SELECT * FROM checkins ORDER BY day").fetchall(),
        c.execute("SELECT * FROM sessions ORDER BY id").fetchall(),
        c.execute("SELECT count(*) FROM imports").fetchone(),
    )


def fit_activity(start_unix: int = 1717225200, serial: int = 1) -> bytes:
    fit = fe.FitFile()
    fit.message(fe.FILE_ID, [(0, fe.ENUM, 4), (1, fe.UINT16, 1), (3, fe.UINT32Z, serial),
                             (4, fe.UINT32, fe.fit_time(start_unix))])
    fit.message(fe.USER_PROFILE, [(1, fe.ENUM, 0), (8, fe.UINT8, 55)])
    fit.message(fe.ZONES_TARGET, [(1, fe.UINT8, 185)])
    beats = [900, 950] * 15
    for i in range(0, len(beats), 5):
        fit.message(fe.HRV, [(0, fe.UINT16, beats[i:i + 5])])
    fit.message(fe.SESSION, [(253, fe.UINT32, fe.fit_time(start_unix + 1800)),
                             (2, fe.UINT32, fe.fit_time(start_unix)), (7, fe.UINT32, 1_800_000),
                             (8, fe.UINT32, 1_800_000), (11, fe.UINT16, 250), (16, fe.UINT8, 140),
                             (5, fe.ENUM, 2)])
    fit.message(fe.ACTIVITY, [(253, fe.UINT32, fe.fit_time(start_unix + 1800)),
                              (5, fe.UINT32, fe.fit_time(start_unix + 1800 + 7200))])
    return fit.to_bytes()


@pytest.fixture
def seeded(new_store):
    """A store that already holds data from each format, so 'unchanged' means something."""
    run_import(new_store, FITBIT)
    run_import(new_store, FIXTURES / "open_mhealth" / "datapoints.json")
    run_import(new_store, FIXTURES / "checkin_csv" / "checkins.csv")
    return new_store


# ---------------------------------------------------------------------------- zip bombs
def _fitbit_like_zip(path: Path, bomb_bytes: int | None = None) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(FITBIT / "Sleep" / "sleep_score.csv", "Fitbit/Sleep/sleep_score.csv")
        if bomb_bytes:
            with zf.open("Fitbit/Physical Activity/heart_rate-2024-01-01.json", "w") as fh:
                fh.write(b'[{"dateTime": "01/01/24 00:00:00", "value": {"bpm": 60}}')
                block = b" " * (1 << 20)
                for _ in range(bomb_bytes >> 20):
                    fh.write(block)
                fh.write(b"]")


def _patch_central_size(path: Path, member: str, new_size: int) -> None:
    """Rewrite the uncompressed size a zip's central directory states for ``member``."""
    data = bytearray(path.read_bytes())
    name = member.encode()
    pos = 0
    while True:
        pos = data.index(b"PK\x01\x02", pos)
        name_len = struct.unpack_from("<H", data, pos + 28)[0]
        if data[pos + 46: pos + 46 + name_len] == name:
            struct.pack_into("<I", data, pos + 24, new_size)
            break
        pos += 4
    path.write_bytes(bytes(data))


def test_zip_bomb_that_really_expands_is_refused(seeded, tmp_path):
    bomb = tmp_path / "bomb.zip"
    _fitbit_like_zip(bomb, bomb_bytes=72 << 20)  # 72 MiB of spaces deflate ~1000:1
    assert bomb.stat().st_size < 1 << 20
    before = snapshot(seeded)
    with pytest.raises(MalformedInputError, match="zip bomb"):
        run_import(seeded, bomb)
    assert snapshot(seeded) == before


def test_zip_member_claiming_a_huge_size_is_refused(seeded, tmp_path):
    bomb = tmp_path / "claims.zip"
    _fitbit_like_zip(bomb, bomb_bytes=1 << 20)
    _patch_central_size(bomb, "Fitbit/Physical Activity/heart_rate-2024-01-01.json", 0xFFFFFFF0)
    before = snapshot(seeded)
    with pytest.raises(MalformedInputError, match="zip bomb"):
        run_import(seeded, bomb)
    assert snapshot(seeded) == before


def test_zip_member_expanding_beyond_its_stated_size_is_refused(seeded, tmp_path):
    bomb = tmp_path / "lies.zip"
    _fitbit_like_zip(bomb, bomb_bytes=1 << 20)
    _patch_central_size(bomb, "Fitbit/Physical Activity/heart_rate-2024-01-01.json", 4096)
    before = snapshot(seeded)
    with pytest.raises(MalformedInputError):
        run_import(seeded, bomb, get_importer("fitbit"), strict=True)
    assert snapshot(seeded) == before
    # Without --strict the lying member is read no further than it claims, found damaged,
    # and listed; the rest of the archive imports.
    report = run_import(seeded, bomb, get_importer("fitbit"))
    assert report.skipped_files == [
        ("Fitbit/Physical Activity/heart_rate-2024-01-01.json", "damaged inside the archive")]
    assert report.duplicates >= 1 and "heart_rate" not in report.inserted  # sleep score: seeded


# ---------------------------------------------------------------------------- wrong type
PNG = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00"
       b"\x90wS\xde\x00\x00\x00\x0cIDATx\x9cc\xf8\xff\xff?\x00\x05\xfe\x02\xfe\xa7\x9a\xa0\xa0"
       b"\x00\x00\x00\x00IEND\xaeB`\x82")


@pytest.mark.parametrize("name,content", [
    ("photo.png", PNG),
    ("empty.json", b""),
    ("noise.bin", random.Random(7).randbytes(8192)),
    ("noise.fit", b"\x0e\x20" + random.Random(8).randbytes(4000)),  # not a FIT header
    ("text.csv", b"just,some\nwords,here\n"),
])
def test_wrong_file_type_is_an_unknown_format(seeded, tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    before = snapshot(seeded)
    with pytest.raises(UnknownFormatError):
        run_import(seeded, path)
    assert snapshot(seeded) == before


def test_zip_holding_only_a_picture_is_an_unknown_format(seeded, tmp_path):
    path = tmp_path / "photos.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a.png", PNG)
    with pytest.raises(UnknownFormatError):
        run_import(seeded, path)


# ---------------------------------------------------------------------------- absurd values
DATE_SKIP = "date before 2000 or in the future"


def test_absurd_fitbit_values_are_counted_skips(new_store, tmp_path):
    folder = tmp_path / "fitbit"
    folder.mkdir()
    (folder / "heart_rate-2024-01-01.json").write_text(json.dumps([
        {"dateTime": "01/01/24 07:00:00", "value": {"bpm": 900, "confidence": 3}},
        {"dateTime": "1900-01-01T07:00:00", "value": {"bpm": 60, "confidence": 3}},
        {"dateTime": "2100-01-01T07:00:00", "value": {"bpm": 60, "confidence": 3}},
        {"dateTime": "01/01/24 07:00:05", "value": {"bpm": 61, "confidence": 3}},
    ]))
    (folder / "exercise-0.json").write_text(json.dumps([
        {"logId": 1, "activityName": "Run", "startTime": "01/01/24 17:00:00", "duration": -600000,
         "heartRateZones": [{"name": "Cardio", "minutes": 10}]},
    ]))
    report = run_import(new_store, folder)
    assert report.skipped == {"heart_rate: implausible value": 1, DATE_SKIP: 2,
                              "workout_duration: implausible value": 1,
                              "session: implausible duration or load": 1}
    assert [v for _t, v, _e, _o in new_store.observations("heart_rate")] == [61.0]
    assert new_store.sessions() == [] and new_store.observations("workout_duration") == []


def test_absurd_open_mhealth_values_are_counted_skips(new_store, tmp_path):
    def hr(bpm, when):
        return {"heart_rate": {"value": bpm, "unit": "beats/min"},
                "effective_time_frame": {"date_time": when}}
    path = tmp_path / "points.json"
    path.write_text(json.dumps([
        hr(900, "2024-01-01T07:00:00Z"), hr(60, "1900-01-01T07:00:00Z"),
        hr(60, "2100-01-01T07:00:00Z"), hr(58, "2024-01-01T07:00:00Z"),
        {"step_count": -50, "effective_time_frame": {"time_interval": {
            "start_date_time": "2024-01-01T07:00:00Z", "end_date_time": "2024-01-01T08:00:00Z"}}},
    ]))
    report = run_import(new_store, path)
    assert report.skipped == {"heart_rate: implausible value": 1, DATE_SKIP: 2,
                              "steps: implausible value": 1}
    assert new_store.observations("heart_rate") == [(1704092400, 58.0, None, 0)]
    assert new_store.observations("steps") == []


def test_absurd_checkin_values_are_counted_skips(new_store, tmp_path):
    path = tmp_path / "checkins.csv"
    path.write_text("date,readiness,rpe,minutes\n1900-01-01,5,,\n2100-01-01,5,,\n"
                    "2024-01-01,5,6,-30\n2024-01-02,5,6,30\n")
    report = run_import(new_store, path)
    assert report.skipped == {DATE_SKIP: 2, "session: implausible duration or load": 1}
    assert [c["day"] for c in new_store.checkins()] == ["2024-01-01", "2024-01-02"]
    assert [(s["day"], s["load"]) for s in new_store.sessions()] == [("2024-01-02", 180.0)]


def test_absurd_fit_dates_are_counted_skips(new_store, tmp_path):
    # (FIT times below 0x10000000, i.e. before mid-1998, mean "seconds since power-on";
    # 1999 is the earliest absolute time a FIT file can state.)
    folder = tmp_path / "fit"
    folder.mkdir()
    (folder / "old.fit").write_bytes(fit_activity(start_unix=915_148_800, serial=1))  # 1999-01-01
    (folder / "future.fit").write_bytes(fit_activity(start_unix=4_102_444_800, serial=2))  # 2100
    # Nothing left to store: the import says so (exit 9) with the reasons, store unchanged.
    with pytest.raises(NothingImportedError) as info:
        run_import(new_store, folder)
    report = info.value.report
    assert report.total_inserted == 0
    # per file: workout_duration, workout_energy, training_load, hrv_rmssd and the session
    assert report.skipped == {DATE_SKIP: 10}
    assert "date before 2000 or in the future (10)" in str(info.value)
    assert new_store.summary()["observations"] == {}
    assert new_store.summary()["imports"] == 0


# ---------------------------------------------------------------------------- malformed
def _malformed_cases(tmp_path: Path) -> list[tuple[str, Path]]:
    cases = []
    folder = tmp_path / "fitbit_bad"
    folder.mkdir()
    (folder / "sleep-2024-01-01.json").write_text('[{"logId": 1, "startTime": "2024-01-01T22:00')
    (folder / "resting_heart_rate-2024-01-01.json").write_text('[{"dateTime": "01/01/24 00:00:00"}]')
    cases.append(("fitbit", folder))
    omh = tmp_path / "omh.json"
    omh.write_text('{"header": {"schema_id": {"name": "heart-rate"}}, "body": {"heart_rate": ')
    cases.append(("open_mhealth", omh))
    csv_file = tmp_path / "checkins.csv"
    csv_file.write_text('date,readiness\n2024-01-01,"5\n2024-01-02,6\n')
    cases.append(("checkin_csv", csv_file))
    fit = bytearray(fit_activity())
    fit[-5] ^= 0x01  # file CRC no longer matches
    fit_path = tmp_path / "bad.fit"
    fit_path.write_bytes(bytes(fit))
    cases.append(("garmin_fit", fit_path))
    truncated = tmp_path / "truncated.fit"
    truncated.write_bytes(fit_activity()[:120])
    cases.append(("garmin_fit", truncated))
    return cases


def test_malformed_files_are_refused_and_the_store_is_unchanged(seeded, tmp_path):
    for fmt, path in _malformed_cases(tmp_path):
        before = snapshot(seeded)
        with pytest.raises(MalformedInputError) as info:
            # auto-detection picks the format, the parser refuses (a folder: --strict, so one
            # damaged file refuses it all; without it the others would be imported)
            run_import(seeded, path, strict=path.is_dir())
        assert path.name in str(info.value) or fmt == "fitbit", fmt
        assert snapshot(seeded) == before, fmt


# ---------------------------------------------------------------------------- mutations
def _valid_inputs() -> dict[str, list[tuple[str, bytes]]]:
    return {
        "fitbit": [
            ("sleep-2024-03-01.json", (FITBIT / "Sleep" / "sleep-2024-03-01.json").read_bytes()),
            ("exercise-0.json", (FITBIT / "Physical Activity" / "exercise-0.json").read_bytes()),
            ("sleep_score.csv", (FITBIT / "Sleep" / "sleep_score.csv").read_bytes()),
        ],
        "garmin_fit": [("a.fit", fit_activity())],
        "open_mhealth": [
            ("points.json", (FIXTURES / "open_mhealth" / "datapoints.json").read_bytes()),
            ("heart-rate.jsonl", (FIXTURES / "open_mhealth" / "heart-rate.jsonl").read_bytes()),
        ],
        "checkin_csv": [("checkins.csv", (FIXTURES / "checkin_csv" / "checkins.csv").read_bytes())],
    }


VALID = _valid_inputs()


def _drop_key(data: bytes, rnd: random.Random) -> bytes:
    try:
        doc = json.loads(data)
    except ValueError:
        return data
    dicts = []

    def walk(node):
        if isinstance(node, dict):
            dicts.append(node)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(doc)
    dicts = [d for d in dicts if d]
    if dicts:
        target = rnd.choice(dicts)
        del target[rnd.choice(sorted(target))]
    return json.dumps(doc).encode()


def mutate(data: bytes, how: str, seed: int) -> bytes:
    rnd = random.Random(seed)
    if how == "truncate":
        return data[: rnd.randrange(len(data))]
    if how in ("flip", "flip_fit_crc"):
        out = bytearray(data)
        for _ in range(rnd.randint(1, 4)):
            out[rnd.randrange(len(out))] ^= 1 << rnd.randrange(8)
        if how == "flip_fit_crc" and len(out) > 16:
            # Recompute the file CRC so the FIT parser meets damaged content, not just a CRC.
            body = bytes(out[:-2])
            out[-2:] = struct.pack("<H", fe.fit_crc(body))
        return bytes(out)
    if how == "drop_line":
        lines = data.split(b"\n")
        del lines[rnd.randrange(len(lines))]
        return b"\n".join(lines)
    if how == "drop_key":
        return _drop_key(data, rnd)
    if how == "junk":
        pos = rnd.randrange(len(data) + 1)
        return data[:pos] + rnd.randbytes(rnd.randint(1, 16)) + data[pos:]
    raise AssertionError(how)


MUTATIONS = ["truncate", "flip", "drop_line", "drop_key", "junk"]


def _check_mutated_import(store, tmp_path, fmt, name, data, auto) -> None:
    case = tmp_path / "case"
    case.mkdir(exist_ok=True)
    path = case / name
    path.write_bytes(data)
    before = snapshot(store)
    try:
        run_import(store, path, None if auto else get_importer(fmt))
    except ImportFailedError:
        assert snapshot(store) == before
    # anything else propagates and fails the test


@pytest.mark.parametrize("fmt", sorted(VALID))
def test_mutated_inputs_raise_only_import_errors(new_store, tmp_path, fmt):
    mutations = MUTATIONS + (["flip_fit_crc"] * 2 if fmt == "garmin_fit" else [])

    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(which=st.integers(0, len(VALID[fmt]) - 1), how=st.sampled_from(mutations),
           seed=st.integers(0, 2**32 - 1), auto=st.booleans())
    def run(which, how, seed, auto):
        name, data = VALID[fmt][which]
        _check_mutated_import(new_store, tmp_path, fmt, name, mutate(data, how, seed), auto)

    run()


def test_real_fitbit_samples_survive_mutation(new_store, tmp_path, shared_data):
    folder = shared_data / "formats" / "fitbit"
    if not folder.is_dir():
        pytest.skip("no Fitbit samples")
    samples = sorted(p for p in folder.iterdir() if p.suffix in (".json", ".csv"))
    rnd = random.Random(3)
    for i in range(40):
        sample = samples[i % len(samples)]
        data = mutate(sample.read_bytes(), MUTATIONS[i % len(MUTATIONS)], rnd.randrange(2**32))
        _check_mutated_import(new_store, tmp_path, "fitbit", sample.name, data, auto=bool(i % 2))


# ---------------------------------------------------------------------------- command line
@pytest.fixture
def cli_store(tmp_path, fast_argon2):
    folder = tmp_path / "cli-store"
    DeviceStore.create(folder, "correct horse", argon2=fast_argon2).close()
    passfile = tmp_path / "pass.txt"
    passfile.write_text("correct horse\n")
    return folder, passfile


def _cli_import(path: Path, store: Path, passfile: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(RESTWISE), "device", "import", str(path), "--store", str(store),
         "--passphrase-file", str(passfile), "--quiet"],
        capture_output=True, text=True, timeout=120,
    )


def test_cli_exit_codes_and_no_file_values_in_messages(cli_store, tmp_path):
    if not RESTWISE.exists():
        pytest.skip("the restwise command is not installed next to this Python")
    store, passfile = cli_store
    ok = _cli_import(FIXTURES / "checkin_csv" / "checkins.csv", store, passfile)
    assert ok.returncode == 0, ok.stderr
    assert "checkin_csv" in ok.stdout

    marker = "4711.5"  # a value that must never be echoed back
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text(f"date,readiness\n2024-01-01,{marker},{marker}\n")
    bad_json = tmp_path / "points.json"
    bad_json.write_text('[{"heart_rate": {"value": 4711.5, "unit": "beats/min"}, "effective_ti')
    bad_fit = tmp_path / "bad.fit"
    data = bytearray(fit_activity())
    data[-3] ^= 0xFF
    bad_fit.write_bytes(bytes(data))
    picture = tmp_path / "photo.png"
    picture.write_bytes(PNG)
    for path in (bad_csv, bad_json, bad_fit, picture):
        res = _cli_import(path, store, passfile)
        assert res.returncode == 6, (path.name, res.stderr)
        assert "Traceback" not in res.stderr
        assert marker not in res.stderr and marker not in res.stdout
        assert path.name in res.stderr
