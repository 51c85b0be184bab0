"""Bounded feature state: names that never log in cannot grow it, rows unused past their
horizon are dropped, and neither changes what the engine computes for the principals that do
log in. Also: the state file's previous version still loads, and a state copy taken for a
background write is the state of the moment it was taken."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from detector.errors import ModelError
from detector.features import kernel as K
from detector.features.engine import (
    MODEL_FEATURES,
    PEER_PREFIX,
    UNKNOWN_PRINCIPAL,
    FeatureEngine,
)
from detector.features.settings import FeatureSettings, StateBounds
from detector.scoring import artefact
from detector.testing import make_events

T0 = datetime(2026, 1, 5, tzinfo=UTC)
ROOT = Path(__file__).resolve().parents[1]
COMPARED = list(dict.fromkeys([*K.OUT_COLUMNS, *MODEL_FEATURES]))
SPRAY_ADDRESS = np.log1p(10)  # the failed-login features' "signal present" values (PLAUSIBLE)
SPRAY_PRINCIPAL = np.log1p(5)


def work(user: str, days: list[int], ip: str, *, per_day: int = 24) -> list[dict[str, object]]:
    """A principal's day: a login, then parameterised reads, 08:00-18:00."""
    rows: list[dict[str, object]] = []
    for d in days:
        start = T0 + timedelta(days=d, hours=8)
        rows.append(login(user, start - timedelta(minutes=1), ip))
        for k in range(per_day):
            rows.append(
                {
                    "event_time": start + timedelta(minutes=k * 600 / per_day),
                    "db_user": user,
                    "client_ip": ip,
                    "client_app": "web",
                    "session_id": f"{user}-{d}-{k // 6}",
                    "objects": ["public.accounts"],
                    "rows_returned": 20 + k % 5,
                    "statement_text": "SELECT * FROM public.accounts WHERE client_id = $1",
                }
            )
    return rows


def login(user: str, at: datetime, ip: str, *, ok: bool = True) -> dict[str, object]:
    return {
        "event_time": at,
        "db_user": user,
        "client_ip": ip,
        "action": "login" if ok else "login_failed",
        "command": None,
        "statement_text": None,
        "session_id": f"conn-{user}-{at.timestamp():.0f}",
    }


def spray(
    names: list[str], start: datetime, *, addresses: list[str], every_s: float = 0.5
) -> list[dict[str, object]]:
    """One failed login per name, in turn from each address."""
    return [
        login(name, start + timedelta(seconds=i * every_s), addresses[i % len(addresses)], ok=False)
        for i, name in enumerate(names)
    ]


def ordered(rows: list[dict[str, object]]) -> pl.DataFrame:
    return make_events(sorted(rows, key=lambda r: r["event_time"]))  # type: ignore[arg-type,return-value]


def in_batches(engine: FeatureEngine, events: pl.DataFrame, size: int) -> pl.DataFrame:
    frames = [engine.transform(events.slice(i, size)) for i in range(0, events.height, size)]
    return pl.concat(frames)


def assert_same(a: pl.DataFrame, b: pl.DataFrame) -> None:
    assert a.shape == b.shape
    np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), rtol=1e-9, atol=1e-9)


REAL = ["app_api", "analyst_1", "analyst_2", "support_7", "bob", "analyst_1003"]


def mixed_stream() -> pl.DataFrame:
    """Four days of work of principals that log in (two analysts in one peer group), their
    own mistyped passwords, and sprays of names that never log in: names of the analysts'
    peer group, common admin names, and two names sprayed before they first log in for real
    (bob, analyst_1003). The sprays come days apart, so sprayed names go idle past a day."""
    rows: list[dict[str, object]] = []
    rows += work("app_api", [0, 1, 2, 3], "10.0.0.5", per_day=40)
    rows += work("analyst_1", [0, 1, 2, 3], "10.0.1.11")
    rows += work("analyst_2", [0, 1, 3], "10.0.1.12")
    rows += work("support_7", [1, 2, 3], "10.0.2.7")
    rows += work("bob", [3], "10.0.1.20")
    rows += work("analyst_1003", [3], "10.0.1.21")
    for d in (1, 3):
        at = T0 + timedelta(days=d, hours=12)
        rows += [
            login("analyst_1", at + timedelta(seconds=k), "10.0.1.11", ok=False) for k in (0, 3)
        ]
    addresses = [f"203.0.113.{k}" for k in range(1, 5)]
    names = [f"analyst_{n}" for n in range(1000, 1060)] + ["admin", "root", "postgres", "bob"]
    rows += spray(names, T0 + timedelta(days=1, hours=2), addresses=addresses)
    rows += spray(
        [f"guess{n}" for n in range(80)], T0 + timedelta(days=2, hours=3), addresses=addresses
    )
    rows += spray(names[:40], T0 + timedelta(days=3, hours=1), addresses=addresses[:2])
    return ordered(rows)


def test_names_that_never_log_in_change_nothing_for_the_principals_that_do() -> None:
    """Bounded (40 names of their own, forgotten after an hour idle, fed in small batches) and
    unbounded (one batch, nothing folded or dropped), every feature of every event of the
    principals that log in is the same; for a name sprayed before its first real login, all
    but its own count of failed logins before that login."""
    events = mixed_stream()
    bounded = FeatureEngine(bounds=StateBounds(max_unproven=40, unproven_idle_s=3600.0))
    small = in_batches(bounded, events, 97)
    unbounded = FeatureEngine(bounds=StateBounds(max_unproven=10**9, unproven_idle_s=1e12))
    whole = unbounded.transform(events)
    assert bounded.events_folded_ > 0 and bounded.rows_dropped_ > 0  # both happened
    assert unbounded.events_folded_ == 0 and unbounded.rows_dropped_ == 0
    assert len(bounded.principals_) < len(unbounded.principals_)
    for user in REAL:
        mine = (pl.col("db_user") == user) & (pl.col("action") != "login_failed")
        first_ok = whole.filter(mine)["event_time"].min()
        keep = (pl.col("db_user") == user) & (pl.col("event_time") >= first_ok)
        a, b = small.filter(keep).select(COMPARED), whole.filter(keep).select(COMPARED)
        assert a.height > 20
        if user in ("bob", "analyst_1003"):  # sprayed before it first got in
            a, b = a.drop("failed_logins_principal_1h"), b.drop("failed_logins_principal_1h")
        assert_same(a, b)
    # the sprayed peer-group names reached no peer group: its row is the same either way,
    # and holds the events of the members that had got in, no more
    group_b = bounded.principals_[PEER_PREFIX + "analyst"]
    group_u = unbounded.principals_[PEER_PREFIX + "analyst"]
    np.testing.assert_allclose(
        bounded.state_[group_b, : K.S_KEY], unbounded.state_[group_u, : K.S_KEY]
    )
    np.testing.assert_allclose(bounded.highs_[group_b], unbounded.highs_[group_u])
    members = events.filter(pl.col("db_user").is_in(["analyst_1", "analyst_2", "analyst_1003"]))
    got_in = members.filter(
        (pl.col("db_user") != "analyst_1003") | (pl.col("action") != "login_failed")
    )
    assert bounded.state_[group_b, K.S_SEEN] == got_in.height


def test_a_spray_of_new_names_keeps_the_state_bounded_and_still_shows() -> None:
    """3,000 new names, 100 a batch: the principal table stops growing at the bound, and the
    sprayed attempts still carry the spray in their failed-login features, from a few
    addresses (per address) and from one address per name (per principal, shared)."""
    bound = 50
    engine = FeatureEngine(bounds=StateBounds(max_unproven=bound))
    engine.transform(ordered(work("app_api", [0, 1], "10.0.0.5")))
    real_rows = len(engine.principals_)
    names = [f"user{n:05d}" for n in range(3000)]
    few = spray(names[:1500], T0 + timedelta(days=2), addresses=["198.51.100.7", "198.51.100.8"])
    many = spray(
        names[1500:],
        T0 + timedelta(days=2, minutes=20),
        addresses=[f"10.{n // 250}.{n % 250}.9" for n in range(1500)],
    )
    sizes, capacity, flagged = [], [], []
    stream = ordered([*few, *many])
    for i in range(0, stream.height, 100):
        feats = engine.transform(stream.slice(i, 100))
        sizes.append(len(engine.principals_))
        capacity.append(engine.state_.shape[0])
        flagged.append(feats.slice(50))  # past the first attempts of each part
    assert max(sizes) <= real_rows + bound + 1  # + the shared row of the names past the bound
    assert sizes[-1] == sizes[len(sizes) // 3]  # flat while the names keep coming
    assert capacity[-1] == capacity[len(capacity) // 3]
    assert engine.events_folded_ == len(names) - bound
    assert engine.principals_.keys() >= {"app_api", UNKNOWN_PRINCIPAL}
    part_few = pl.concat(flagged[: len(flagged) // 2])
    part_many = pl.concat(flagged[len(flagged) // 2 + 1 :])
    assert (part_few["failed_logins_address_1h"] > SPRAY_ADDRESS).all()
    assert (part_many["failed_logins_address_1h"] < np.log1p(2)).all()  # one try per address
    assert (part_many["failed_logins_principal_1h"] > SPRAY_PRINCIPAL).all()
    # a brute force on the real account after the spray is flagged as before, per principal
    # and per address
    at = T0 + timedelta(days=2, hours=2)
    guesses = [
        login("app_api", at + timedelta(seconds=2 * k), "192.0.2.99", ok=False) for k in range(30)
    ]
    feats = engine.transform(ordered(guesses))
    assert feats["failed_logins_principal_1h"][-1] > np.log1p(25)
    assert feats["failed_logins_address_1h"][-1] > np.log1p(25)


def test_rows_idle_past_their_horizon_are_dropped_without_changing_a_result() -> None:
    """A name that only failed is dropped a day after it went quiet (making room under the
    bound), a principal unseen for more than idle_days days of the stream too; cutting the
    stream into batches (so rows are dropped between them) gives the same features as one
    batch, and the returning principal is judged as a new one."""
    rows = [*work("app_api", list(range(8)), "10.0.0.5"), *work("ann", [0, 1, 7], "10.0.3.1")]
    rows += spray(["ghost", "admin"], T0 + timedelta(hours=3), addresses=["203.0.113.50"])
    rows += spray(["ghost"], T0 + timedelta(days=4, hours=3), addresses=["203.0.113.50"])
    events = ordered(rows)
    bounds = StateBounds(idle_days=3, max_unproven=2)  # ghost and admin fill it on day 0
    whole = FeatureEngine(bounds=bounds).transform(events)
    engine = FeatureEngine(bounds=bounds)
    seen_ghost, seen_ann = [], []
    frames = []
    for day in range(8):
        part = events.filter(
            (pl.col("event_time") >= T0 + timedelta(days=day))
            & (pl.col("event_time") < T0 + timedelta(days=day + 1))
        )
        frames.append(in_batches(engine, part, 50))
        seen_ghost.append("ghost" in engine.principals_)
        seen_ann.append("ann" in engine.principals_)
    assert seen_ghost == [True, False, False, False, True, False, False, False]
    assert seen_ann == [True, True, True, True, True, False, False, True]
    assert_same(pl.concat(frames).select(COMPARED), whole.select(COMPARED))
    assert engine.events_folded_ == 0  # dropped rows make room: ghost's return has its own
    back = whole.filter(
        (pl.col("db_user") == "ann") & (pl.col("event_time") > T0 + timedelta(days=7))
    )
    assert back["new_principal"][0] == 1.0  # after 5 days of the stream without it
    kept = FeatureEngine().transform(events)  # the default horizon (180 days) keeps it
    back_kept = kept.filter(
        (pl.col("db_user") == "ann") & (pl.col("event_time") > T0 + timedelta(days=7))
    )
    assert back_kept["new_principal"][0] == 0.0


def test_a_stream_gap_is_not_idleness() -> None:
    """Days without any event do not count towards the horizon: a stream that resumes after
    a month keeps its principals."""
    rows = [*work("app_api", [0, 1], "10.0.0.5"), *work("ann", [0, 1], "10.0.3.1")]
    rows += [*work("app_api", [40, 41], "10.0.0.5"), *work("ann", [41], "10.0.3.1")]
    engine = FeatureEngine(bounds=StateBounds(idle_days=2))
    feats = in_batches(engine, ordered(rows), 40)
    assert engine.rows_dropped_ == 0
    assert feats.filter(pl.col("db_user") == "ann")["new_principal"].max() == 0.0


def _v1_files(new: Path, old: Path) -> None:
    """The state in ``new`` rewritten in the layout of state version 1."""
    old.mkdir()
    with np.load(new / "state.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["principal_state"] = arrays["principal_state"][:, : K.N_STATE_V1]
    np.savez_compressed(old / "state.npz", **arrays)
    meta = json.loads((new / "state.json").read_text())
    for key in ("state_version", "clock", "events_folded", "rows_dropped"):
        del meta[key]
    (old / "state.json").write_text(json.dumps(meta))


def test_state_version_1_still_loads_and_continues_alike(tmp_path: Path) -> None:
    """A version-1 file (no row bookkeeping, pair entries keyed by row number) continues like
    the engine it came from. The stream before the save holds principals that log in only, in
    the order of their row numbers, which is what version 1 wrote."""
    first = ordered(
        [
            *work("app_api", [0, 1], "10.0.0.5"),
            *work("support_3", [0, 1], "10.0.2.3"),
            *work("support_4", [1], "10.0.2.4"),
        ]
    )
    later = ordered(
        [
            *work("app_api", [2], "10.0.0.5"),
            *work("support_4", [2], "10.0.2.9"),
            *spray(
                ["support_3", "nobody"], T0 + timedelta(days=2, hours=1), addresses=["203.0.113.5"]
            ),
        ]
    )
    engine = FeatureEngine()
    engine.transform(first)
    engine.save_state(tmp_path / "v2")
    saved = np.load(tmp_path / "v2" / "state.npz")["principal_state"]
    assert (saved[:, K.S_KEY] == np.arange(saved.shape[0])).all()
    _v1_files(tmp_path / "v2", tmp_path / "v1")
    from_v1 = FeatureEngine()
    from_v1.load_state(tmp_path / "v1")
    assert_same(from_v1.transform(later).select(COMPARED), engine.transform(later).select(COMPARED))


def test_the_shipped_models_state_loads_as_principals_that_got_in(tmp_path: Path) -> None:
    """The bundled model's state (written by this version; version 1 files are covered by
    test_state_version_1_still_loads_and_continues_alike) holds principals that got in, keyed
    by their rows, and survives a save and load unchanged."""
    art = artefact.load(ROOT / "models" / "default")
    engine = FeatureEngine(FeatureSettings(**art.metadata["feature_spec"]["settings"]))
    engine.load_state(art.path)
    n = len(engine.principals_)
    assert (engine.state_[:n, K.S_PROVEN] == 1.0).all()
    keys = engine.state_[:n, K.S_KEY]
    assert len(set(keys.tolist())) == n and (keys < engine.clock_[K.C_NEXT_KEY]).all()
    engine.save_state(tmp_path)
    again = FeatureEngine(FeatureSettings(**art.metadata["feature_spec"]["settings"]))
    again.load_state(tmp_path)
    assert again.principals_ == engine.principals_
    np.testing.assert_array_equal(again.state_[:n], engine.state_[:n])
    np.testing.assert_array_equal(again.clock_, engine.clock_)


def test_a_state_version_from_the_future_is_refused(tmp_path: Path) -> None:
    engine = FeatureEngine()
    engine.transform(ordered(work("app_api", [0], "10.0.0.5")))
    engine.save_state(tmp_path)
    meta = json.loads((tmp_path / "state.json").read_text())
    meta["state_version"] = 99
    (tmp_path / "state.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="state version 99"):
        FeatureEngine().load_state(tmp_path)


def test_a_state_copy_is_the_state_when_it_was_taken(tmp_path: Path) -> None:
    """The copy a background snapshot writes does not move with the engine: written after the
    engine went on, it equals a save made when it was taken, and restores the same future."""
    first = ordered(
        [*work("app_api", [0], "10.0.0.5"), *spray(["x1", "x2"], T0, addresses=["203.0.113.1"])]
    )
    later = ordered(work("app_api", [1], "10.0.0.5"))
    engine = FeatureEngine()
    engine.transform(first)
    copy = engine.snapshot_state()
    engine.save_state(tmp_path / "then")
    expected = engine.transform(later)
    copy.write(tmp_path / "copy")
    meta = {d: json.loads((tmp_path / d / "state.json").read_text()) for d in ("copy", "then")}
    assert meta["copy"] == meta["then"]
    with (
        np.load(tmp_path / "copy" / "state.npz") as c,
        np.load(tmp_path / "then" / "state.npz") as t,
    ):
        assert sorted(c.files) == sorted(t.files)
        for name in c.files:
            np.testing.assert_array_equal(c[name], t[name])
    restored = FeatureEngine()
    restored.load_state(tmp_path / "copy")
    assert_same(restored.transform(later).select(COMPARED), expected.select(COMPARED))
