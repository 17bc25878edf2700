"""Apple Health importer: value-level round trips on a hand-written iOS 16 export (with the
broken DTD those exports carry), zip / folder / plain xml, idempotent re-import, real
samples, hostile and damaged input (store unchanged), a property test over mutated
exports, and the real CLI."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from restwise.client.errors import ImportFailedError, MalformedInputError, UnknownFormatError
from restwise.client.importers import InputSource, run_import
from restwise.client.importers.apple_health import (
    AppleHealthImporter,
    AppleTimeParser,
    apple_record_key,
    looks_like_health_data,
)
from restwise.client.store import DeviceStore, record_key

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "apple_health" / "export_ios16.xml"
FIXTURE_BYTES = FIXTURE.read_bytes()
# Strings from the fixture that must never be printed (device names, birth date, sex).
PRIVATE_STRINGS = ("Test Watch", "Test Phone", "Test Cuff", "1990-06-15", "HKBiologicalSexFemale")

EXPECTED_COUNTS = {
    "heart_rate": 3, "resting_heart_rate": 1, "hrv_sdnn": 2, "respiratory_rate": 1,
    "vo2max": 1, "steps": 2, "active_energy": 3,
    "sleep_in_bed": 1, "sleep_asleep": 2, "sleep_awake": 1, "sleep_light": 1,
    "sleep_deep": 1, "sleep_rem": 1,
    "workout_duration": 2, "workout_energy": 2, "workout_distance": 2,
}
EXPECTED_SKIPS = {
    "daily activity summary (totals come from the records)": 1,
    "date before 2000 or in the future": 1,
    "heart_rate: implausible value": 1,
    "heart_rate: unreadable value": 1,
    "heart_rate: unrecognised rate unit": 1,
    "record type not used by Restwise": 2,  # BodyMass, the blood-pressure Correlation
    "sleep: unknown stage": 1,
}


def ts(text: str) -> int:
    return int(dt.datetime.strptime(text, "%Y-%m-%d %H:%M:%S %z").timestamp())


def values(store: DeviceStore, metric: str) -> list[float]:
    return [v for _, v, _, _ in store.observations(metric)]


def snapshot(store: DeviceStore) -> tuple:
    """Everything a failed import could have touched, as comparable data."""
    c = store.conn
    rows = c.execute(
        "SELECT metric, ts, end_ts, tz_offset_min, local_day, value, unit, source, device, "
        "record_key FROM observations ORDER BY record_key"
    ).fetchall()
    counts = tuple(
        c.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
        for t in ("observations", "sessions", "checkins", "imports")
    )
    return counts, rows, store.summary()


def write_zip(path: Path, xml: bytes, member: str = "apple_health_export/export.xml") -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("apple_health_export/export_cda.xml",
                   '<?xml version="1.0"?><ClinicalDocument><section/></ClinicalDocument>')
        z.writestr("apple_health_export/workout-routes/route_2023-01-05.gpx", "<gpx/>")
        z.writestr("__MACOSX/apple_health_export/._export.xml", b"\x00\x05\x16\x07")
        z.writestr(member, xml)
    return path


# ---------------------------------------------------------------------------- the fixture
def test_fixture_reproduces_the_ios16_dtd_defect():
    import xml.etree.ElementTree as ET

    from lxml import etree

    with pytest.raises(ET.ParseError):
        ET.fromstring(FIXTURE_BYTES)
    with pytest.raises(etree.XMLSyntaxError):
        etree.fromstring(FIXTURE_BYTES, etree.XMLParser(load_dtd=False, resolve_entities=False))


def test_round_trip_counts_values_and_skips(new_store):
    report = run_import(new_store, FIXTURE)
    assert report.format == "apple_health"
    assert dict(report.inserted) == EXPECTED_COUNTS
    assert dict(report.skipped) == EXPECTED_SKIPS
    assert report.duplicates == 0
    assert (report.first_day, report.last_day) == ("2023-01-03", "2023-01-07")
    summary = new_store.summary()["observations"]
    assert {m: d["count"] for m, d in summary.items()} == EXPECTED_COUNTS

    # Heart rate: count/min as is, count/s x 60; the 900 bpm record is not stored and
    # the HR nested in the blood-pressure Correlation (77) is not a separate record.
    assert sorted(values(new_store, "heart_rate")) == [58.0, 62.0, 90.0]
    assert values(new_store, "resting_heart_rate") == [48.0]
    # SDNN stays SDNN (ms, s -> ms); nothing lands in RMSSD.
    assert values(new_store, "hrv_sdnn") == pytest.approx([45.5, 52.1])
    assert "hrv_rmssd" not in summary
    assert values(new_store, "respiratory_rate") == [14.5]
    assert values(new_store, "vo2max") == [48.2]
    assert summary["vo2max"]["unit"] == "mL/kg/min"
    assert values(new_store, "steps") == [1200.0, 300.0]
    assert values(new_store, "active_energy") == pytest.approx([10.0, 25.0, 30.0])  # kJ, kcal, Cal
    # Sleep stages: value = minutes of the segment.
    assert values(new_store, "sleep_in_bed") == [480.0]
    assert values(new_store, "sleep_light") == [120.0]  # AsleepCore
    assert values(new_store, "sleep_deep") == [60.0]
    assert values(new_store, "sleep_rem") == [60.0]
    assert values(new_store, "sleep_awake") == [5.0]
    assert values(new_store, "sleep_asleep") == [420.0, 175.0]  # Asleep (old), AsleepUnspecified
    # Workouts: iOS 16 statistics (kJ, km) and old attributes (hr, mi, kcal).
    assert values(new_store, "workout_duration") == pytest.approx([30.5, 90.0])
    assert values(new_store, "workout_energy") == pytest.approx([1255.2 / 4.184, 500.0])
    assert values(new_store, "workout_distance") == pytest.approx([5200.0, 16093.44])
    assert new_store.sessions() == []  # no RPE in Apple exports: no invented session load


def test_time_zones_give_the_local_day(new_store):
    run_import(new_store, FIXTURE)
    hr = {v: (t, off) for t, v, _, off in new_store.observations("heart_rate")}
    # 00:30 at +0100 is 23:30 UTC the day before: the local day is the 6th.
    assert hr[58.0] == (ts("2023-01-06 00:30:00 +0100"), 60)
    assert dict(
        (v, d) for d, v, _, _ in new_store.daily_observations("heart_rate")
    )[58.0] == "2023-01-06"
    # 21:00 at -0500 is 02:00 UTC the next day: the local day stays the 5th.
    steps = {v: (d, t, e) for d, v, t, e in new_store.daily_observations("steps")}
    assert steps[300.0] == ("2023-01-05", ts("2023-01-05 21:00:00 -0500"),
                            ts("2023-01-05 21:05:00 -0500"))
    offsets = dict(new_store.conn.execute(
        "SELECT value, tz_offset_min FROM observations WHERE metric = 'steps'").fetchall())
    assert offsets == {1200.0: 60, 300.0: -300}
    # Point records keep no end; interval records do.
    assert new_store.observations("heart_rate")[0][2] is None
    assert new_store.observations("sleep_in_bed")[0][2] == ts("2023-01-05 06:30:00 +0100")


def test_workout_uses_its_recorded_time_zone(new_store):
    run_import(new_store, FIXTURE)
    rows = new_store.conn.execute(
        "SELECT ts, tz_offset_min, local_day FROM observations WHERE metric = 'workout_duration' "
        "ORDER BY ts").fetchall()
    # Written as 17:00 +0100 (the phone's zone at export), run in Auckland (+1300 in
    # January): 05:00 on the 6th there.
    assert rows[0] == (ts("2023-01-05 17:00:00 +0100"), 13 * 60, "2023-01-06")
    # An unknown zone name falls back to the offset written in the date.
    assert rows[1] == (ts("2023-01-07 10:00:00 +0100"), 60, "2023-01-07")


def test_device_is_stored_but_never_in_the_report(new_store):
    report = run_import(new_store, FIXTURE)
    devices = {d for (d,) in new_store.conn.execute("SELECT DISTINCT device FROM observations")}
    assert devices == {"Test Watch", "Test Phone"}
    text = repr(report.as_dict())
    assert not any(s in text for s in PRIVATE_STRINGS)


def test_reimport_is_idempotent(new_store):
    first = run_import(new_store, FIXTURE)
    before = snapshot(new_store)[1]
    second = run_import(new_store, FIXTURE)
    assert second.total_inserted == 0
    assert second.duplicates == first.total_inserted == sum(EXPECTED_COUNTS.values())
    assert snapshot(new_store)[1] == before


def test_record_key_is_the_stores_record_key():
    assert apple_record_key("HKQuantityTypeIdentifierHeartRate", "Jo’s Watch", "a", "b", "62") == \
        record_key("apple_health", "HKQuantityTypeIdentifierHeartRate", "Jo’s Watch", "a", "b", "62")
    assert apple_record_key("t", None, "a", "b", None) == record_key("apple_health", "t", None, "a", "b", None)


# ---------------------------------------------------------------------------- containers
def test_zip_folder_and_plain_xml_import_the_same_rows(tmp_path, fast_argon2):
    zpath = write_zip(tmp_path / "export.zip", FIXTURE_BYTES)
    folder = tmp_path / "unzipped"
    with zipfile.ZipFile(zpath) as z:
        z.extractall(folder)
    results = []
    for i, path in enumerate((FIXTURE, zpath, folder)):
        with DeviceStore.create(tmp_path / f"s{i}", "pw", argon2=fast_argon2) as store:
            report = run_import(store, path)
            assert report.format == "apple_health"
            assert dict(report.inserted) == EXPECTED_COUNTS
            results.append(snapshot(store)[1])
    assert results[0] == results[1] == results[2]


def test_member_found_by_content_not_name(tmp_path, new_store):
    # Some iPhones translate the file name; the export is recognised by its root element.
    zpath = write_zip(tmp_path / "export.zip", FIXTURE_BYTES, member="apple_health_export/Exportieren.xml")
    assert dict(run_import(new_store, zpath).inserted) == EXPECTED_COUNTS


def test_sniff(tmp_path):
    imp = AppleHealthImporter()
    gpx = tmp_path / "route.xml"
    gpx.write_text('<?xml version="1.0"?><gpx version="1.1"><trk/></gpx>')
    csv = tmp_path / "checkins.csv"
    csv.write_text("date,readiness\n2023-01-05,7\n")
    cda_only = tmp_path / "cda.zip"
    with zipfile.ZipFile(cda_only, "w") as z:
        z.writestr("apple_health_export/export_cda.xml", "<ClinicalDocument/>")
    for path, expected in ((FIXTURE, True), (write_zip(tmp_path / "e.zip", FIXTURE_BYTES), True),
                           (gpx, False), (csv, False), (cda_only, False)):
        source = InputSource(path)
        try:
            assert imp.sniff(source) is expected, path.name
        finally:
            source.close()
    assert looks_like_health_data(b'\xef\xbb\xbf<?xml version="1.0"?>\n<HealthData locale="en">')
    assert not looks_like_health_data(b"<Other><HealthData/></Other>")


# ---------------------------------------------------------------------------- parsing details
def test_time_parser_is_strict():
    parse = AppleTimeParser()
    assert parse("2023-01-05 07:31:02 +0100") == (ts("2023-01-05 07:31:02 +0100"), 60)
    assert parse("2023-07-05 23:59:59 -0930") == (ts("2023-07-05 23:59:59 -0930"), -570)
    assert parse("2024-02-29 00:00:00 +0000") == (ts("2024-02-29 00:00:00 +0000"), 0)
    for bad in ("2023-02-29 00:00:00 +0000", "2023-13-01 00:00:00 +0000", "2023-01-05 24:00:00 +0000",
                "2023-01-05 07:61:00 +0000", "2023-01-05 07:31:02 +01:00", "2023-01-05T07:31:02 +0100",
                "2023-01-05 07:31:02 +0175", "2023-01-05  7:31:02 +0100", "２０２３-01-05 07:31:02 +0100",
                "", None):
        assert parse(bad) is None, bad


def test_vertical_tab_in_device_name_is_tolerated(tmp_path, new_store):
    path = tmp_path / "export.xml"
    path.write_bytes(FIXTURE_BYTES.replace(b'sourceName="Test Phone"', b'sourceName="Test\x0b Phone"'))
    assert dict(run_import(new_store, path).inserted) == EXPECTED_COUNTS


def test_external_entities_are_never_resolved(tmp_path, new_store):
    secret = tmp_path / "secret.txt"
    secret.write_text("71")
    before = snapshot(new_store)
    for doctype in (f'<!DOCTYPE HealthData [<!ENTITY xxe SYSTEM "file://{secret}">]>',
                    '<!DOCTYPE HealthData [<!ENTITY a "1"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]>'):
        ref = "&xxe;" if "xxe" in doctype else "&b;"
        path = tmp_path / "x.xml"
        path.write_text(
            f'<?xml version="1.0"?>\n{doctype}\n<HealthData locale="en">\n'
            f'<Record type="HKQuantityTypeIdentifierHeartRate" sourceName="W" unit="count/min" '
            f'startDate="2023-01-05 07:31:02 +0100" endDate="2023-01-05 07:31:02 +0100" value="{ref}"/>\n'
            "</HealthData>\n"
        )
        with pytest.raises(MalformedInputError) as err:
            run_import(new_store, path)
        assert "xxe" not in str(err.value) and secret.name not in str(err.value)
    assert snapshot(new_store) == before


def test_external_dtd_is_never_loaded(tmp_path, new_store):
    path = tmp_path / "x.xml"
    path.write_text(
        '<?xml version="1.0"?>\n<!DOCTYPE HealthData SYSTEM "http://127.0.0.1:9/evil.dtd">\n'
        '<HealthData locale="en">\n'
        '<Record type="HKQuantityTypeIdentifierStepCount" sourceName="W" unit="count" '
        'startDate="2023-01-05 07:31:02 +0100" endDate="2023-01-05 07:35:02 +0100" value="12"/>\n'
        "</HealthData>\n"
    )
    assert dict(run_import(new_store, path).inserted) == {"steps": 1}


# ---------------------------------------------------------------------------- damaged input
def test_damaged_files_leave_the_store_unchanged(tmp_path, new_store):
    run_import(new_store, FIXTURE)
    before = snapshot(new_store)
    cut = FIXTURE_BYTES.index(b"HKCategoryValueSleepAnalysisAsleepREM")
    body = FIXTURE_BYTES.index(b"<HealthData locale")
    zbytes = write_zip(tmp_path / "ok.zip", FIXTURE_BYTES.replace(b"value=\"62\"", b"value=\"63\"")).read_bytes()
    cases = {
        "truncated.xml": (FIXTURE_BYTES[:cut], MalformedInputError),
        "garbage-after.xml": (FIXTURE_BYTES + b"<junk/>", MalformedInputError),
        "garbage-inside.xml": (FIXTURE_BYTES[:cut] + b"\x00\xff<<>>" + FIXTURE_BYTES[cut:], MalformedInputError),
        "endless-doctype.xml": (FIXTURE_BYTES[:body].replace(b"]>", b"") + b"<!-- x -->" * 10, MalformedInputError),
        "random.bin": (os.urandom(5000), UnknownFormatError),
        "empty.xml": (b"", UnknownFormatError),
        "truncated.zip": (zbytes[: len(zbytes) // 2], UnknownFormatError),
        # A zip whose member is damaged in the middle: CRC / inflate error while streaming.
        "damaged.zip": (zbytes[:200] + bytes(b ^ 0x5A for b in zbytes[200:1200]) + zbytes[1200:],
                        ImportFailedError),
    }
    for name, (content, error) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(error) as err:
            run_import(new_store, path)
        assert not any(s in str(err.value) for s in PRIVATE_STRINGS), name
        assert snapshot(new_store) == before, name


def _patch_zip_headers(data: bytes, *, flag_bits: int = 0, method: int | None = None) -> bytes:
    """Set general-purpose flag bits / the compression method in every local and central
    header (zipfile cannot write encrypted or Deflate64 members)."""
    buf = bytearray(data)
    for sig, flag_at, method_at in ((b"PK\x03\x04", 6, 8), (b"PK\x01\x02", 8, 10)):
        i = buf.find(sig)
        while i >= 0:
            buf[i + flag_at] |= flag_bits
            if method is not None:
                buf[i + method_at: i + method_at + 2] = method.to_bytes(2, "little")
            i = buf.find(sig, i + 4)
    return bytes(buf)


def test_unreadable_zip_members_are_refused(tmp_path, new_store):
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("apple_health_export/export.xml", FIXTURE_BYTES)
    before = snapshot(new_store)
    for name, content in (("encrypted.zip", _patch_zip_headers(good.read_bytes(), flag_bits=1)),
                          ("deflate64.zip", _patch_zip_headers(good.read_bytes(), method=9))):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(UnknownFormatError):
            run_import(new_store, path)
        with pytest.raises(MalformedInputError):
            run_import(new_store, path, AppleHealthImporter())
        assert snapshot(new_store) == before


def _mutate(data: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    buf = bytearray(data)
    for kind, a, b in ops:
        if not buf:
            break
        i = a % len(buf)
        if kind == "truncate":
            del buf[i:]
        elif kind == "flip":
            buf[i] ^= (b % 255) + 1
        elif kind == "delete_lines":
            lines = bytes(buf).split(b"\n")
            j = a % len(lines)
            del lines[j: j + 1 + b % 3]
            buf = bytearray(b"\n".join(lines))
        elif kind == "insert":
            buf[i:i] = bytes([b % 256]) * (1 + b % 4)
    return bytes(buf)


_OPS = st.lists(
    st.tuples(st.sampled_from(["truncate", "flip", "delete_lines", "insert"]),
              st.integers(0, 10**7), st.integers(0, 10**4)),
    min_size=1, max_size=4,
)


@pytest.fixture(scope="module")
def property_store(tmp_path_factory):
    from restwise.client.keys import FAST_INSECURE_ARGON2

    folder = tmp_path_factory.mktemp("prop") / "store"
    store = DeviceStore.create(folder, "pw", argon2=FAST_INSECURE_ARGON2)
    run_import(store, FIXTURE)
    yield store
    store.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_OPS, as_zip=st.booleans(), explicit=st.booleans())
def test_mutated_exports_import_or_fail_cleanly(property_store, tmp_path, ops, as_zip, explicit):
    store = property_store
    data = _mutate(FIXTURE_BYTES, ops)
    with tempfile.TemporaryDirectory(dir=tmp_path) as d:
        if as_zip:
            # Mutate the archive bytes themselves (headers, compressed stream, CRC).
            good = write_zip(Path(d) / "good.zip", FIXTURE_BYTES).read_bytes()
            path = Path(d) / "export.zip"
            path.write_bytes(_mutate(good, ops))
        else:
            path = Path(d) / "export.xml"
            path.write_bytes(data)
        before = snapshot(store)
        try:
            # Auto-detection, or the format named on the command line (sniff, then parse).
            run_import(store, path, AppleHealthImporter() if explicit else None)
        except ImportFailedError as exc:
            assert snapshot(store) == before
            assert not any(s in str(exc) for s in PRIVATE_STRINGS)


# ---------------------------------------------------------------------------- real samples
@pytest.mark.realdata
def test_real_samples_import(shared_data, new_store):
    folder = shared_data / "formats" / "apple_health"
    if not folder.is_dir():
        pytest.skip("no Apple Health samples in the shared data")
    dogsheep = run_import(new_store, folder / "dogsheep_export.xml")
    assert dict(dogsheep.inserted) == {
        "heart_rate": 1, "workout_duration": 1, "workout_energy": 1, "workout_distance": 1,
    }
    assert dict(dogsheep.skipped) == {
        "record type not used by Restwise": 1,
        "daily activity summary (totals come from the records)": 2,
    }
    tdda = run_import(new_store, folder / "tdda_export6s3sample.xml")
    assert dict(tdda.inserted) == {
        "steps": 10, "workout_duration": 1, "workout_energy": 1, "workout_distance": 1,
    }
    assert dict(tdda.skipped) == {
        "record type not used by Restwise": 5,
        "daily activity summary (totals come from the records)": 2,
    }
    assert (tdda.first_day, tdda.last_day) == ("2014-09-13", "2016-04-02")
    assert new_store.observations("heart_rate") == [(ts("2018-09-10 02:28:55 -0700"), 72.0, None, -420)]
    assert sum(values(new_store, "steps")) == 2517.0
    assert values(new_store, "workout_distance") == pytest.approx([0.0, 0.4971749504535062 * 1609.344])
    assert values(new_store, "workout_duration") == pytest.approx([31.73680251737436, 5.19412346680959])
    assert run_import(new_store, folder / "tdda_export6s3sample.xml").total_inserted == 0


# ---------------------------------------------------------------------------- the real CLI
def test_cli_import_exit_codes_and_no_values_printed(tmp_path, fast_argon2):
    store_dir = tmp_path / "store"
    DeviceStore.create(store_dir, "correct horse", argon2=fast_argon2).close()
    passfile = tmp_path / "pass"
    passfile.write_text("correct horse\n")
    restwise = Path(sys.executable).parent / "restwise"
    cmd = [str(restwise), "device", "import"]
    opts = ["--store", str(store_dir), "--passphrase-file", str(passfile), "--quiet"]
    env = {**os.environ, "COLUMNS": "200"}

    ok = subprocess.run(cmd + [str(FIXTURE)] + opts, capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "heart_rate" in ok.stdout and "hrv_sdnn" in ok.stdout
    assert not any(s in ok.stdout + ok.stderr for s in PRIVATE_STRINGS)

    broken = tmp_path / "export.xml"
    broken.write_bytes(FIXTURE_BYTES[: FIXTURE_BYTES.index(b"AsleepDeep")])
    bad = subprocess.run(cmd + [str(broken)] + opts, capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 6
    assert "not well-formed" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert not any(s in bad.stdout + bad.stderr for s in PRIVATE_STRINGS + ("AsleepDeep",))
    with DeviceStore.open(store_dir, "correct horse") as s:
        assert s.summary()["imports"] == 1
        assert {m: d["count"] for m, d in s.summary()["observations"].items()} == EXPECTED_COUNTS
