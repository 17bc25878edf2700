"""Garmin FIT importer: fixtures built with a small FIT encoder (tests/fixtures/garmin_fit),
the real public samples in ../shared/data/formats/garmin_fit, malformed files."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from restwise.client.errors import MalformedInputError
from restwise.client.importers import ImportOptions, get_importer, run_import
from restwise.client.importers.garmin_fit import rmssd

_spec = importlib.util.spec_from_file_location(
    "fit_encoder", Path(__file__).parent / "fixtures" / "garmin_fit" / "fit_encoder.py"
)
fe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fe)

T0 = 1717225200  # 2024-06-01T07:00:00Z
INVALID_U16 = 0xFFFF


def rr_with_artefacts() -> list[int]:
    """800/840 ms alternating (every clean successive difference is 40 ms, so RMSSD = 40)
    with three artefacts the filter must remove: 2500 ms and 250 ms (out of range) and a
    1200 ms beat (a 50 % jump, e.g. a missed beat)."""
    rr = [800, 840] * 25
    rr.insert(10, 2500)
    rr.insert(21, 250)
    rr.insert(32, 1200)
    return rr


def activity_fit(*, local_offset_s: int | None = 3600, load_peak: float | None = None,
                 rr: list[int] | None = None, serial: int = 4242, with_start: bool = True) -> bytes:
    fit = fe.FitFile()
    fit.message(fe.FILE_ID, [(0, fe.ENUM, 4), (1, fe.UINT16, 1), (2, fe.UINT16, 2697),
                             (3, fe.UINT32Z, serial), (4, fe.UINT32, fe.fit_time(T0))])
    fit.message(fe.USER_PROFILE, [(1, fe.ENUM, 1), (8, fe.UINT8, 50)])
    fit.message(fe.ZONES_TARGET, [(1, fe.UINT8, 190)])
    beats = rr_with_artefacts() if rr is None else rr
    for i in range(0, len(beats), 5):
        chunk = beats[i:i + 5]
        fit.message(fe.HRV, [(0, fe.UINT16, chunk + [INVALID_U16] * (5 - len(chunk)))])
    session = [(253, fe.UINT32, fe.fit_time(T0 + 3600)),
               *([(2, fe.UINT32, fe.fit_time(T0))] if with_start else []),
               (7, fe.UINT32, 3_600_000), (8, fe.UINT32, 3_000_000), (9, fe.UINT32, 1_000_000),
               (11, fe.UINT16, 600), (16, fe.UINT8, 150), (5, fe.ENUM, 1)]
    if load_peak is not None:
        session.append((168, fe.SINT32, round(load_peak * 65536)))
    fit.message(fe.SESSION, session)
    if local_offset_s is not None:
        fit.message(fe.ACTIVITY, [(253, fe.UINT32, fe.fit_time(T0 + 3600)),
                                  (5, fe.UINT32, fe.fit_time(T0 + 3600 + local_offset_s)),
                                  (0, fe.UINT32, 3_000_000), (1, fe.UINT16, 1)])
    return fit.to_bytes()


def monitoring_fit() -> tuple[bytes, int]:
    fit = fe.FitFile()
    # A full time whose low 16 bits are near the top, so the compressed times below wrap.
    base = fe.fit_time(T0)
    base = base - (base & 0xFFFF) + 0xFFF0
    fit.message(fe.FILE_ID, [(0, fe.ENUM, 32), (1, fe.UINT16, 1), (3, fe.UINT32Z, 777),
                             (4, fe.UINT32, base)])
    fit.message(fe.MONITORING_INFO, [(253, fe.UINT32, base), (0, fe.UINT32, base - 6 * 3600)])
    fit.message(fe.MONITORING, [(253, fe.UINT32, base), (27, fe.UINT8, 60)])
    fit.message(fe.MONITORING, [(26, fe.UINT16, (base + 8) & 0xFFFF), (27, fe.UINT8, 62)])
    fit.message(fe.MONITORING, [(26, fe.UINT16, (base + 32) & 0xFFFF), (27, fe.UINT8, 64)])
    fit.message(fe.MONITORING, [(26, fe.UINT16, (base + 92) & 0xFFFF), (27, fe.UINT8, 254)])
    fit.message(fe.MONITORING_HR_DATA, [(253, fe.UINT32, base + 100), (1, fe.UINT8, 48)])
    day_end = base + 20 * 3600
    for activity_type, steps, active_ms, kcal in ((6, 5000, 1_800_000, 150), (1, 1000, 600_000, 80)):
        fit.message(fe.MONITORING, [(253, fe.UINT32, day_end), (5, fe.ENUM, activity_type),
                                    (3, fe.UINT32, steps), (4, fe.UINT32, active_ms),
                                    (19, fe.UINT16, kcal), (29, fe.UINT16, 1440)])
    return fit.to_bytes(), base + fe.FIT_EPOCH


def sleep_fit() -> bytes:
    fit = fe.FitFile()
    t = fe.fit_time(T0 - 8 * 3600)
    fit.message(fe.FILE_ID, [(0, fe.ENUM, 32), (1, fe.UINT16, 1), (3, fe.UINT32Z, 99),
                             (4, fe.UINT32, t)])
    for offset, level in ((0, 2), (1800, 3), (3600, 4), (4500, 1), (4800, 2), (6000, 0), (6600, 1)):
        fit.message(fe.SLEEP_LEVEL, [(253, fe.UINT32, t + offset), (0, fe.ENUM, level)])
    fit.message(fe.SLEEP_ASSESSMENT, [(6, fe.UINT8, 82)])
    return fit.to_bytes()


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def rows(store, metric):
    return store.observations(metric)


# ---------------------------------------------------------------------------- the encoder
def test_encoder_output_is_read_back_by_fitdecode(tmp_path):
    import fitdecode

    path = write(tmp_path, "a.fit", activity_fit())
    names = []
    with fitdecode.FitReader(str(path), check_crc=fitdecode.CrcCheck.RAISE) as reader:
        for frame in reader:
            if isinstance(frame, fitdecode.FitDataMessage):
                names.append(frame.name)
                if frame.name == "session":
                    assert frame.get_value("total_timer_time") == 3000.0
                    assert frame.get_value("sport") == "running"
    assert names.count("hrv") == 11 and names[0] == "file_id" and names[-1] == "activity"


# ---------------------------------------------------------------------------- RMSSD
def test_rmssd_filters_artefacts():
    value, pairs = rmssd([float(x) for x in rr_with_artefacts()])
    assert value == pytest.approx(40.0)
    # 50 clean beats have 49 differences; an inserted artefact replaces one of them by two
    # rejected ones
    assert pairs == 49 - 3


def test_rmssd_needs_enough_clean_pairs():
    assert rmssd([800.0, 840.0] * 5)[0] is None


# ---------------------------------------------------------------------------- activity
def test_activity_session_hrv_and_banister_load(new_store, tmp_path):
    path = write(tmp_path, "run.fit", activity_fit())
    report = run_import(new_store, path)
    assert report.format == "garmin_fit"
    assert dict(report.inserted) == {
        "workout_duration": 1, "workout_energy": 1, "workout_distance": 1, "training_load": 1,
        "session": 1, "hrv_rmssd": 1,
    }
    ((ts, value, _end, off),) = rows(new_store, "hrv_rmssd")
    assert (ts, off) == (T0, 60) and value == pytest.approx(40.0)
    ((ts, minutes, end, off),) = rows(new_store, "workout_duration")
    assert (ts, end, off, minutes) == (T0, T0 + 3600, 60, 50.0)
    assert rows(new_store, "workout_distance")[0][1] == 10_000.0
    assert rows(new_store, "workout_energy")[0][1] == 600.0
    # Banister TRIMP, male: minutes x HRr x 0.64 e^(1.92 HRr), HRr = (150-50)/(190-50)
    hrr = 100 / 140
    expected = 50 * hrr * 0.64 * math.exp(1.92 * hrr)
    (session,) = new_store.sessions()
    assert session["load"] == pytest.approx(expected, abs=1e-3)
    assert session["minutes"] == 50.0 and session["kind"] == "running"
    assert session["day"] == "2024-06-01" and session["start_ts"] == T0
    assert rows(new_store, "training_load")[0][1] == pytest.approx(expected, abs=1e-3)


def test_session_without_start_time_starts_at_end_minus_elapsed(new_store, tmp_path):
    run_import(new_store, write(tmp_path, "run.fit", activity_fit(with_start=False)))
    assert new_store.sessions()[0]["start_ts"] == T0
    assert rows(new_store, "workout_duration")[0][:3] == (T0, 50.0, T0 + 3600)


def test_device_training_load_wins_over_trimp(new_store, tmp_path):
    run_import(new_store, write(tmp_path, "run.fit", activity_fit(load_peak=123.5)))
    assert new_store.sessions()[0]["load"] == pytest.approx(123.5)


def test_reimport_adds_nothing(new_store, tmp_path):
    path = write(tmp_path, "run.fit", activity_fit())
    first = run_import(new_store, path)
    again = run_import(new_store, path)
    assert again.total_inserted == 0
    assert again.duplicates == first.total_inserted


def test_offset_from_tz_option_when_file_has_none(new_store, tmp_path):
    path = write(tmp_path, "run.fit", activity_fit(local_offset_s=None))
    run_import(new_store, path, options=ImportOptions(tz="Europe/Oslo"))
    assert rows(new_store, "workout_duration")[0][3] == 120  # CEST in June


def test_too_few_beats_is_a_counted_skip(new_store, tmp_path):
    report = run_import(new_store, write(tmp_path, "r.fit", activity_fit(rr=[800, 840, 800])))
    assert report.skipped == {"hrv: too few clean beat intervals for RMSSD": 1}
    assert "hrv_rmssd" not in report.inserted


# ---------------------------------------------------------------------------- monitoring, sleep
def test_monitoring_heart_rate_daily_totals_and_compressed_times(new_store, tmp_path):
    data, base = monitoring_fit()
    report = run_import(new_store, write(tmp_path, "mon.fit", data))
    assert report.skipped == {"heart_rate: implausible value": 1}  # the 254 bpm sample
    hr = rows(new_store, "heart_rate")
    # the 16-bit times wrapped past 0xFFFF and still resolve to later instants
    assert [(ts - base, v) for ts, v, _e, _o in hr] == [(0, 60.0), (8, 62.0), (32, 64.0)]
    assert {o for *_x, o in hr} == {-360}
    assert rows(new_store, "resting_heart_rate")[0][1] == 48.0
    day_end = base + 20 * 3600
    ((ts, steps, end, _o),) = rows(new_store, "steps")
    assert (ts, end, steps) == (day_end - 86400, day_end, 6000.0)
    assert rows(new_store, "active_minutes")[0][1] == pytest.approx(40.0)
    assert rows(new_store, "active_energy")[0][1] == 230.0


def test_sleep_levels_become_stage_intervals(new_store, tmp_path):
    run_import(new_store, write(tmp_path, "sleep.fit", sleep_fit()))
    minutes = {m: [r[1] for r in rows(new_store, m)] for m in
               ("sleep_light", "sleep_deep", "sleep_rem", "sleep_awake", "sleep_score")}
    # the last level has no end, 'unmeasurable' is no stage
    assert minutes == {"sleep_light": [30.0, 20.0], "sleep_deep": [30.0], "sleep_rem": [15.0],
                       "sleep_awake": [5.0], "sleep_score": [82.0]}


def test_zip_of_fit_files(new_store, tmp_path):
    import zipfile

    archive = tmp_path / "garmin.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("Activity/run.fit", activity_fit())
        zf.writestr("Monitor/mon.fit", monitoring_fit()[0])
        zf.writestr("readme.txt", "not a FIT file")
    report = run_import(new_store, archive)
    assert report.format == "garmin_fit"
    assert report.inserted["session"] == 1 and report.inserted["steps"] == 1
    assert report.inserted["heart_rate"] == 3
    assert report.skipped_files == [("readme.txt", "not a format Restwise reads")]


# ---------------------------------------------------------------------------- malformed
@pytest.mark.parametrize("damage", ["flip", "truncate", "header_only", "bad_header_crc"])
def test_malformed_fit_is_refused_and_store_unchanged(new_store, tmp_path, damage):
    run_import(new_store, write(tmp_path, "ok.fit", activity_fit(serial=1)))
    before = new_store.summary()
    data = bytearray(activity_fit(serial=2))
    if damage == "flip":
        data[200] ^= 0x5A
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "header_only":
        data = data[:14]
    else:
        data[13] ^= 0xFF
    with pytest.raises(MalformedInputError):
        run_import(new_store, write(tmp_path, "bad.fit", bytes(data)), get_importer("garmin_fit"))
    assert new_store.summary() == before


def test_one_bad_file_in_a_folder_refuses_the_whole_folder(new_store, tmp_path):
    folder = tmp_path / "garmin"
    folder.mkdir()
    write(folder, "a.fit", activity_fit(serial=1))
    write(folder, "b.fit", activity_fit(serial=2)[:-1])
    with pytest.raises(MalformedInputError):
        run_import(new_store, folder, strict=True)
    assert new_store.summary()["observations"] == {}
    # without --strict the damaged file is listed and the good one imported
    report = run_import(new_store, folder)
    assert [m for m, _ in report.skipped_files] == ["b.fit"]
    assert report.inserted["session"] == 1


# ---------------------------------------------------------------------------- real samples
def test_real_garmin_samples(new_store, shared_data):
    folder = shared_data / "formats" / "garmin_fit"
    if not folder.is_dir():
        pytest.skip("no Garmin FIT samples")
    report = run_import(new_store, folder)
    assert report.format == "garmin_fit"
    assert dict(report.inserted) == {
        "hrv_rmssd": 2, "session": 2, "training_load": 2, "workout_distance": 2,
        "workout_duration": 2, "workout_energy": 2,
        "steps": 1, "active_minutes": 1, "active_energy": 1,
    }
    hrv = sorted(v for _t, v, _e, _o in rows(new_store, "hrv_rmssd"))
    assert hrv == [pytest.approx(16.375, abs=1e-3), pytest.approx(40.343, abs=1e-3)]
    assert {s["kind"] for s in new_store.sessions()} == {"running", "walking"}
    assert {s["day"] for s in new_store.sessions()} == {"2017-06-11"}  # PDT, from the file
    ((_ts, steps, _end, off),) = rows(new_store, "steps")
    assert (steps, off) == (3173.0, -360)  # 3142 walking + 31 running
    assert run_import(new_store, folder).total_inserted == 0
