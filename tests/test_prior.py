"""The public prior: fitting, the file (provenance, sha256, spec version), refusal of a
mismatching file, the shipped prior, cross-fitting, and `restwise model prior|show`."""

from __future__ import annotations

import hashlib
import json
import tomllib

import numpy as np
import pytest
from typer.testing import CliRunner

from restwise.models import linear_head as lh
from restwise.models import prior as pr
from restwise.models.evaluation import LastValue, ProtocolConfig, evaluate
from restwise.models.features import DailyData
from restwise.models.synthetic import synthetic_person

from .conftest import REPO

NAN = float("nan")


def synthetic_days(n_persons: int, n_days: int = 160, seed0: int = 40) -> dict[str, DailyData]:
    out = {}
    for k in range(n_persons):
        rows = synthetic_person(seed0 + k, n_days)
        cols = {key: [NAN if getattr(r, key) is None else getattr(r, key) for r in rows]
                for key in ("readiness", "fatigue", "soreness", "stress", "mood", "sleep_quality",
                            "rmssd_ms", "resting_hr", "sleep_minutes")}
        cols["load"] = [r.session_minutes * r.session_rpe for r in rows]
        out[f"p{k:02d}"] = DailyData([r.day for r in rows], cols)
    return out


@pytest.fixture(scope="module")
def cohort():
    return synthetic_days(20, 140)


@pytest.fixture(scope="module")
def fitted(cohort):
    return pr.fit_prior([pr.PublicCohort("soccermon", cohort)], ("readiness", "mood"), command="test")


def test_fitted_prior_has_provenance_and_round_trips(fitted, tmp_path):
    t = fitted.target("readiness")
    assert t.persons == {"soccermon": 20} and t.rows["soccermon"] > 20 * 100
    assert t.ridge_lambda in pr.RIDGE_GRID and np.all(t.tau2 > 0) and t.person_variance > 0
    path = tmp_path / "prior.json"
    path.write_text(fitted.to_json())
    loaded = pr.load_prior(path)
    data = json.loads(path.read_text())
    assert loaded.sha256 == data["sha256"] and len(loaded.sha256) == 64
    assert data["feature_spec_version"] == lh.FEATURE_SPEC_VERSION
    assert data["feature_spec_sha256"] == lh.feature_spec_sha256()
    assert data["datasets"][0]["licence"] == "CC BY 4.0" and "Midoglu" in data["datasets"][0]["citation"]
    assert data["datasets"][0]["rows_used"]["readiness"] == t.rows["soccermon"]
    np.testing.assert_array_equal(loaded.target("readiness").weights, t.weights)
    with pytest.raises(pr.PriorError, match="no weights for target 'stress'"):
        loaded.weights_for("stress")


def _content_hash(payload: dict) -> str:
    """The file's documented hash: sha256 of the canonical JSON of everything but "sha256"."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def test_a_prior_that_does_not_match_is_refused(fitted, tmp_path):
    good = json.loads(fitted.to_json())
    edited = json.loads(json.dumps(good))
    edited["targets"]["readiness"]["weights"][0] += 0.5  # tampered, hash kept
    (tmp_path / "a.json").write_text(json.dumps(edited))
    with pytest.raises(pr.PriorError, match="sha256 does not match"):
        pr.load_prior(tmp_path / "a.json")
    # another spec version, re-hashed so only the version is wrong
    other = {k: v for k, v in good.items() if k != "sha256"}
    other["feature_spec_version"] = lh.FEATURE_SPEC_VERSION + 1
    other["sha256"] = _content_hash(other)
    (tmp_path / "b.json").write_text(json.dumps(other))
    with pytest.raises(pr.PriorError, match="feature spec version 2"):
        pr.load_prior(tmp_path / "b.json")
    other["feature_spec_version"] = lh.FEATURE_SPEC_VERSION
    other["feature_spec_sha256"] = "0" * 64
    other.pop("sha256")
    other["sha256"] = _content_hash(other)
    (tmp_path / "c.json").write_text(json.dumps(other))
    with pytest.raises(pr.PriorError, match="another feature spec"):
        pr.load_prior(tmp_path / "c.json")
    (tmp_path / "ok.json").write_text(json.dumps(good))
    with pytest.raises(pr.PriorError, match="not the expected"):
        pr.load_prior(tmp_path / "ok.json", expected_sha256="f" * 64)
    runner = CliRunner()
    from restwise.cli import app

    r = runner.invoke(app, ["model", "show", "--prior", str(tmp_path / "a.json")])
    assert r.exit_code == 1 and "sha256 does not match" in r.output
    r = runner.invoke(app, ["model", "show", "--prior", str(tmp_path / "ok.json")])
    assert r.exit_code == 0 and "verified" in r.output
    # The planner never loads a prior that fails its checks either (exit 1, the reason named).
    r = runner.invoke(app, ["privacy", "plan", "--cohort", "47", "--epsilon", "4", "--prior", str(tmp_path / "b.json")])
    assert r.exit_code == 1 and "feature spec version 2" in r.output


def test_shipped_prior_is_pinned_packaged_and_complete():
    prior = pr.load_prior()  # verifies hash, pin and spec
    assert prior.sha256 == pr.SHIPPED_PRIOR_SHA256
    raw = json.loads((REPO / "models" / pr.SHIPPED_PRIOR).read_text())
    assert raw["sha256"] == pr.SHIPPED_PRIOR_SHA256
    assert set(prior.targets) == {"readiness", "fatigue"}
    assert prior.target("readiness").persons == {"soccermon": 50}  # LifeSnaps asks no readiness
    assert set(prior.target("fatigue").persons) == {"soccermon", "lifesnaps"}
    assert {d["name"] for d in prior.datasets} == {"soccermon", "lifesnaps"}
    assert all(d["licence"] == "CC BY 4.0" for d in prior.datasets)
    assert (REPO / "models" / pr.SHIPPED_PRIOR).stat().st_size < 64_000  # a small file
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "priors/*.json" in pyproject["tool"]["setuptools"]["package-data"]["restwise.models"]
    # the readiness prior mean-reverts: a high answer today predicts a lower tomorrow
    w = prior.target("readiness").weights
    assert w[lh.FEATURE_NAMES.index("answer_today")] < 0


def test_cross_fitting_never_scores_a_person_with_their_own_data(cohort, monkeypatch):
    seen = []
    real = pr.fit_target_prior

    def spy(target, cohorts, seed=0, **kw):
        seen.append({p for c in cohorts for p in c.days})
        return real(target, cohorts, seed=seed, **kw)

    monkeypatch.setattr(pr, "fit_target_prior", spy)
    assignment = pr.cross_fitted_priors("soccermon", cohort, "readiness")
    halves = pr.cross_fit_halves(list(cohort))
    assert halves == {p: i % 2 for i, p in enumerate(sorted(cohort))}
    assert len(seen) == 2
    for person, group in assignment.person_group.items():
        h = int(group.split()[-1])
        assert person not in seen[h]  # the prior that scores them was fitted without them
        assert halves[person] == h


def test_public_prior_row_is_epsilon_zero_and_beats_a_zero_model(cohort, fitted):
    assignment = pr.shipped_assignment(fitted, "readiness", list(cohort))
    res = evaluate(cohort, {"last value": LastValue(), "public prior": pr.PublicPriorMethod(assignment)},
                   config=ProtocolConfig(bootstrap=100))
    row = res.method("public prior")
    assert row.epsilon == 0.0 and res.method("last value").epsilon is None
    assert row.persons_better + row.persons_worse <= len(res.persons)
    assert row.paired_vs_last_value["mean"] == pytest.approx(row.mae - res.method("last value").mae)


def test_model_prior_command_refuses_a_folder_without_public_data(tmp_path):
    from restwise.cli import app

    r = CliRunner().invoke(app, ["model", "prior", "--data", str(tmp_path), "--out", str(tmp_path / "p.json")])
    assert r.exit_code == 1 and "no public dataset" in r.output
    assert not (tmp_path / "p.json").exists()


@pytest.mark.slow
@pytest.mark.realdata
def test_model_prior_command_rebuilds_the_shipped_prior(shared_data, tmp_path):
    from restwise.cli import app

    # SoccerMon alone is the whole readiness prior (LifeSnaps asks no readiness question)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "soccermon").symlink_to(shared_data / "soccermon")
    out = tmp_path / "prior.json"
    r = CliRunner().invoke(app, ["model", "prior", "--data", str(tmp_path / "data"), "--out", str(out),
                                 "--target", "readiness"])
    assert r.exit_code == 0, r.output
    rebuilt, shipped = pr.load_prior(out).target("readiness"), pr.load_prior().target("readiness")
    np.testing.assert_allclose(rebuilt.weights, shipped.weights, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(rebuilt.tau2, shipped.tau2, rtol=1e-9)
    assert rebuilt.persons == shipped.persons and rebuilt.rows == shipped.rows
