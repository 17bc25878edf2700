"""`restwise device today` and `restwise device checkin`: the daily coach on the device.

Registered into the device CLI by ``client/cli.py`` (``register(app)``). The CLI helpers
(store options, opening the store, error -> exit code) come from ``client/cli_support.py``.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Optional

import typer
from rich.panel import Panel
from rich.text import Text

from restwise.client.cli_support import KeystoreOpt, PassFileOpt, StoreOpt, console, device_errors, open_store
from restwise.client.dataset import daily_data, train_local_model
from restwise.common.errors import ModelError
from restwise.models.coach import CoachError, coach_today
from restwise.models.metrics import CHECKIN_FIELDS
from restwise.models.registry import WARNING, get_architecture, known_models

BAND_STYLE = {"green": "bold green", "yellow": "bold yellow", "red": "bold red"}
CHECKIN_SOURCE = "restwise_coach"


def _parse_day(value: Optional[str], option: str) -> Optional[str]:
    if value is None:
        return None
    try:
        return dt.date.fromisoformat(value).isoformat()
    except ValueError:
        raise typer.BadParameter(f"{option} must be a day written YYYY-MM-DD") from None


def stored_models(store):
    """(readiness model, its status, warning weights) from the models the store holds, by the
    registry (``Architecture.coach_model``): of the readiness models (the network trained in
    a federated run, a linear head delivered after a release) the most recently stored one;
    an unreadable stored model is skipped and said so."""
    readiness, warning, unreadable = [], None, []
    for name in known_models():
        architecture = get_architecture(name)
        row = store.load_model_state(architecture.state_name)
        if row is None:
            continue
        blob, meta = row
        try:
            model = architecture.coach_model(blob)
        except ModelError:
            unreadable.append(name)
            continue
        if model is None:
            continue
        if architecture.coach_role == WARNING:
            warning = model
        else:
            readiness.append((int((meta or {}).get("stored_at", 0)), name, model, meta or {}))
    if not readiness:
        status = "stored model unreadable: using rules only" if unreadable else "none"
        return None, status, warning
    _, name, model, meta = max(readiness, key=lambda item: item[0])
    return model, "stored ({}): {}".format(meta.get("trained", "unknown origin"), name), warning


def advise(store, day: Optional[str] = None, *, train_local: bool = False):
    """(advice, note, model_status) for ``day`` (default: the calendar day if the store has
    data up to it, else the last day with data)."""

    data = daily_data(store)
    note = None
    calendar_today = dt.date.today().isoformat()
    if day is None:
        if data.days[-1] >= calendar_today or (
            dt.date.fromisoformat(calendar_today) - dt.date.fromisoformat(data.days[-1])
        ).days <= 2:
            day = calendar_today
        else:
            day = data.days[-1]
            note = f"Your latest data is from {day}; showing the advice for that day."
    model, model_status, warning_weights = stored_models(store)
    if train_local:
        model, n = train_local_model(store)
        model_status = f"trained on this device ({n} days)"

    override = any(r["day"] == day and r["is_override"] for r in store.checkins())
    try:
        advice = coach_today(data, model, today=day, override=override, warning_weights=warning_weights)
    except CoachError as exc:
        if model is None:
            raise
        advice = coach_today(data, None, today=day, override=override, warning_weights=warning_weights)
        model_status = f"not used ({exc})"
    return advice, note, model_status


def print_advice(console, advice, note: Optional[str], model_status: str) -> None:
    body = Text()
    body.append(f"{advice.readiness}", style=BAND_STYLE[advice.band])
    body.append(" / 100   ")
    body.append(advice.band.upper(), style=BAND_STYLE[advice.band])
    body.append("\nToday's training: ")
    body.append(advice.recommendation, style="bold")
    body.append("\n")
    for reason in advice.reasons:
        body.append(f"\n  • {reason}")
    body.append(
        f"\n\nConfidence: {advice.confidence_label} ({advice.confidence:.2f}); "
        f"baseline days: {advice.baseline_days}; "
        + ("rules only" if advice.rules_only else "rules + your model")
    )
    body.append(f"\nModel: {model_status}", style="dim")
    if getattr(advice, "model_note", None):
        body.append(f"\n{advice.model_note}", style="dim")
    warning = getattr(advice, "warning", None)
    if warning:
        body.append("\n\n")
        body.append_text(warning_text(warning))
    console.print(Panel(body, title=f"Readiness for {advice.day}", expand=False))
    if note:
        console.print(note)
    console.print(
        "Disagree? Record how you feel: restwise device checkin --readiness N --override",
        style="dim",
    )


def warning_text(warning: dict):
    """The 7-day warning block: the risk, the warning only above its operating point, what
    raises the risk, the literature's rules as reasons, and the measured record."""
    out = Text()
    if warning.get("risk") is None:
        out.append(f"Next 7 days: {warning.get('note') or 'no risk yet'}", style="dim")
        return out
    pct, point = round(100 * warning["risk"]), round(100 * warning["operating_point"])
    if warning["shown"]:
        out.append(f"Warning: risk of a low week in the next 7 days {pct}%", style="bold yellow")
        out.append(f" (the coach warns above {point}%). Consider a lighter week; talk to your coach.")
    else:
        out.append(f"Next 7 days: risk of a low week {pct}% (no warning: the coach warns above {point}%)")
    for reason in warning.get("reasons") or ():
        out.append(f"\n  • {reason}")
    for reason in warning.get("rule_reasons") or ():
        out.append(f"\n  • {reason} (a reason, not a verdict)")
    if warning["shown"]:
        out.append(f"\nRecord: {warning['record']}.", style="dim")
    return out


def register(app: typer.Typer) -> None:
    """Add `today` and `checkin` to the device CLI."""

    @app.command()
    def today(
        store: Optional[Path] = StoreOpt,
        passphrase_file: Optional[Path] = PassFileOpt,
        keystore: Optional[Path] = KeystoreOpt,
        day: Optional[str] = typer.Option(
            None, "--day", help="Advice for this day (YYYY-MM-DD). Default: today, or the last "
            "day with data when your data ends earlier."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
        train_local: bool = typer.Option(
            False, "--train-local", help="First train your personal model on this device "
            "(no federation) and keep it in the store."
        ),
    ) -> None:
        """Today's readiness (0-100), what to change in today's training, and why, stated
        against your own baseline."""
        wanted = _parse_day(day, "--day")
        with device_errors():
            with open_store(store, passphrase_file, keystore) as s:
                with device_errors(also=(CoachError,)):
                    advice, note, model_status = advise(s, wanted, train_local=train_local)
        if as_json:
            out = advice.to_dict()
            out["note"] = note
            out["model"] = model_status
            console.print_json(json.dumps(out))
        else:
            print_advice(console, advice, note, model_status)

    @app.command()
    def checkin(
        readiness: Optional[float] = typer.Option(None, "--readiness", help="Readiness to train, 0-10."),
        fatigue: Optional[float] = typer.Option(None, "--fatigue", help="1-5, 5 = very fresh."),
        soreness: Optional[float] = typer.Option(None, "--soreness", help="1-5, 5 = not sore."),
        stress: Optional[float] = typer.Option(None, "--stress", help="1-5, 5 = very relaxed."),
        mood: Optional[float] = typer.Option(None, "--mood", help="1-5, 5 = very good."),
        sleep_quality: Optional[float] = typer.Option(None, "--sleep-quality", help="1-5, 5 = very good."),
        sleep_hours: Optional[float] = typer.Option(None, "--sleep-hours", help="Hours slept last night."),
        day: Optional[str] = typer.Option(None, "--day", help="Day the answers are about (default: today)."),
        override: bool = typer.Option(
            False, "--override", help="You disagree with the coach: your readiness answer is kept "
            "as a correction and used as a training label."
        ),
        store: Optional[Path] = StoreOpt,
        passphrase_file: Optional[Path] = PassFileOpt,
        keystore: Optional[Path] = KeystoreOpt,
    ) -> None:
        """Record how you feel today. With --override your answer corrects the coach."""
        the_day = _parse_day(day, "--day") or dt.date.today().isoformat()
        values = {
            "readiness": readiness, "fatigue": fatigue, "soreness": soreness, "stress": stress,
            "mood": mood, "sleep_quality": sleep_quality, "sleep_hours": sleep_hours,
        }
        values = {k: v for k, v in values.items() if v is not None}
        if not values:
            raise typer.BadParameter("give at least one answer, e.g. --readiness 6")
        if override and "readiness" not in values:
            raise typer.BadParameter("--override needs your own --readiness (it becomes the label)")
        for name, value in values.items():
            lo, hi = CHECKIN_FIELDS[name]
            if not lo <= value <= hi:
                option = "--" + name.replace("_", "-")
                raise typer.BadParameter(f"{option} must be between {lo:g} and {hi:g}")
        with device_errors():
            with open_store(store, passphrase_file, keystore) as s:
                s.upsert_checkin(the_day, values, source=CHECKIN_SOURCE, is_override=override)
        console.print(
            f"Recorded your check-in for {the_day} ({len(values)} answer(s))"
            + ("; kept as your correction of the coach." if override else ".")
        )


__all__ = ["register", "advise", "print_advice", "warning_text", "stored_models"]
