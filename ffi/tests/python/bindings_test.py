"""The Python bindings, driven as an app would, against a real server the Rust test started.

Run by ffi/tests/bindings.rs, which passes, in the environment:
  PEERSYNC_SERVER      ws:// URL of the server
  PEERSYNC_STORE       directory for this phone's encrypted store
  PEERSYNC_CODE        a one-time enrollment code for PEERSYNC_WORKER
  PEERSYNC_WORKER      the worker this phone records for
  PEERSYNC_TEAMMATE    a teammate's worker id (assigned to the person registered here)
  PEERSYNC_OTHER       a person another device registered and assigned to this worker
  PEERSYNC_OTHER_NOTES the notes of the visit that device recorded for them
  PEERSYNC_OUT         file to write this phone's device id to (JSON)
and a phase as the first argument: `main` (everything) or `wiped` (after the test revoked
this device: the next sync must wipe it).
Exits non-zero, with the failed assertion, if anything is not as an app must find it.
"""

import asyncio
import datetime
import json
import os
import sys

import peersync_ffi as ps

KEY = bytes(range(32))
UTC = datetime.timezone.utc


class Recorder(ps.DeviceListener):
    def __init__(self):
        self.progress = []
        self.states = []
        self.changed = []

    def on_progress(self, progress):
        self.progress.append(progress)

    def on_state(self, state):
        self.states.append(state)

    def on_records_changed(self, person_ids):
        self.changed.extend(person_ids)


def visit(n, mode="in_person", follow_up=None):
    return ps.NewVisit(
        id=f"py-v{n}",
        started_at=datetime.datetime(2026, 11, 2 + n, 10, 0, tzinfo=UTC),
        duration_min=30 + n,
        mode=mode,
        setting="community",
        activities=["support"],
        notes=f"python visit {n}",
        follow_up=follow_up,
    )


async def eventually(what, predicate, seconds=10):
    """Subscribers hear events on their own thread: wait (bounded) until `predicate` holds."""
    for _ in range(seconds * 20):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {seconds} s: {what}")


async def raises(kind, coro):
    """Await `coro`; it must fail with PeersyncError.<kind>. Returns the message."""
    try:
        await coro
    except kind as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - report any other error as the failure it is
        raise AssertionError(f"expected {kind.__name__}, got {type(e).__name__}: {e}") from e
    raise AssertionError(f"expected {kind.__name__}, the call succeeded")


async def main_phase(env):
    config = ps.SyncConfig(server_url=env["PEERSYNC_SERVER"])

    # A key that is not 32 bytes is refused before anything touches the disk.
    msg = await raises(ps.PeersyncError.Invalid, ps.Device.open(env["PEERSYNC_STORE"] + "-short", b"123"))
    assert "32 bytes" in msg, msg

    # A store made with one key does not open with another.
    other = env["PEERSYNC_STORE"] + "-keyed"
    first = await ps.Device.open(other, KEY)
    await raises(ps.PeersyncError.NotEnrolled, first.register_person(
        ps.NewPerson(alias="x", year_of_birth=1990, record=True, share_with_coordinator=True, research=False)))
    del first
    import gc
    gc.collect()
    await raises(ps.PeersyncError.WrongKey, ps.Device.open(other, bytes(32)))

    device = await ps.Device.open(env["PEERSYNC_STORE"], KEY)
    enrollment = await device.enroll(config, env["PEERSYNC_CODE"], "python phone")
    assert enrollment.worker == env["PEERSYNC_WORKER"], enrollment
    assert device.worker() == env["PEERSYNC_WORKER"]

    subscriber = Recorder()
    subscription = device.subscribe(subscriber)

    # Offline: register a person, record visits and a check-in.
    person = await device.register_person(ps.NewPerson(
        id="py-p1", alias="Asha", year_of_birth=1988, workers=[env["PEERSYNC_TEAMMATE"]],
        record=True, share_with_coordinator=True, research=False))
    assert person.id == "py-p1" and env["PEERSYNC_TEAMMATE"] in person.workers, person
    for n in range(1, 4):
        v = await device.record_visit("py-p1", visit(n, follow_up="2026-12-01" if n == 3 else None))
        assert v.by == env["PEERSYNC_WORKER"] and v.notes == f"python visit {n}", v
    checkin = await device.record_checkin("py-p1", ps.NewCheckin(
        wellbeing=[3, 4, 3, 4, 3, 4, 3], distress=2, coping=4, social_support=3, self_efficacy=4,
        quality_of_life=3, housing="stable", employment="volunteering", hospital_nights_28d=0))
    assert checkin.by == env["PEERSYNC_WORKER"]
    edited = await device.edit_visit("py-p1", "py-v2", ps.VisitEdit(duration_min=75, notes="amended"))
    assert edited.duration_min == 75 and edited.notes == "amended", edited
    consent = await device.set_consent("py-p1", ps.ConsentChange(research=True))
    assert consent.research and consent.record, consent
    # One notice per durable write: register, three visits, check-in, edit, consent.
    await eventually(f"7 change notices for py-p1, got {subscriber.changed}",
                     lambda: subscriber.changed.count("py-p1") == 7)
    await asyncio.sleep(0.2)
    assert subscriber.changed.count("py-p1") == 7, subscriber.changed

    pending = await device.pending_changes()
    assert pending.documents == 1 and pending.changes >= 6, pending
    due = await device.follow_ups_due("2026-12-31")
    assert [f.person_id for f in due] == ["py-p1"] and due[0].due == "2026-12-01", due

    # Invalid input: a typed error naming the field; nothing is written.
    msg = await raises(ps.PeersyncError.Invalid, device.record_visit("py-p1", visit(9, mode="teleport")))
    assert "mode" in msg and "in_person" in msg, msg
    await raises(ps.PeersyncError.Invalid, device.record_visit("py-p1", visit(8, follow_up="2026-13-45")))
    await raises(ps.PeersyncError.Invalid, device.follow_ups_due("tomorrow"))
    await raises(ps.PeersyncError.NotFound, device.record_visit("nobody", visit(7)))
    await raises(ps.PeersyncError.NotFound, device.person("nobody"))
    await raises(ps.PeersyncError.AlreadyExists, device.record_visit("py-p1", visit(1)))
    record = await device.person("py-p1")
    assert sorted(v.id for v in record.visits) == ["py-v1", "py-v2", "py-v3"], record.visits
    assert record.checkins[0].housing == "stable"

    # Sync: progress and state reach both the call's listener and the subscriber.
    listener = Recorder()
    report = await device.sync(config, listener)
    assert report.docs_sent == 1 and report.docs_received >= 1 and not report.refused, report
    assert any(p.is_CONNECTED() for p in listener.progress), listener.progress
    assert any(p.is_SENDING() for p in listener.progress), listener.progress
    assert listener.states[0].is_CONNECTING() and listener.states[-1].is_FINISHED(), listener.states
    assert listener.states[-1].report == report
    assert env["PEERSYNC_OTHER"] in listener.changed, listener.changed
    # Subscribers too have heard all of the sync when it returns (no waiting needed).
    assert subscriber.states and subscriber.states[-1].is_FINISHED(), subscriber.states
    assert env["PEERSYNC_OTHER"] in subscriber.changed, subscriber.changed

    # Another device's record arrived, with its visit.
    other = await device.person(env["PEERSYNC_OTHER"])
    assert env["PEERSYNC_OTHER_NOTES"] in [v.notes for v in other.visits], other.visits
    people = await device.people()
    assert {p.id for p in people} == {"py-p1", env["PEERSYNC_OTHER"]}, people
    mine = next(p for p in people if p.id == "py-p1")
    assert mine.visits == 3 and mine.checkins == 1 and mine.next_follow_up == "2026-12-01", mine
    assert (await device.pending_changes()).documents == 0

    # A cancelled subscription hears nothing more.
    subscription.cancel()
    await asyncio.sleep(0.3)  # anything queued before the cancel is delivered
    heard = len(subscriber.changed)
    await device.record_visit("py-p1", visit(4))
    await asyncio.sleep(0.3)
    assert len(subscriber.changed) == heard, subscriber.changed[heard:]
    await device.sync(config, None)

    # Live sync starts and stops cleanly.
    live = await device.start_live_sync(config)
    await asyncio.sleep(0.3)
    assert not live.is_finished()
    await live.stop()
    assert live.is_finished()

    with open(env["PEERSYNC_OUT"], "w") as f:
        json.dump({"device_id": await device.device_id()}, f)


async def wiped_phase(env):
    config = ps.SyncConfig(server_url=env["PEERSYNC_SERVER"])
    device = await ps.Device.open(env["PEERSYNC_STORE"], KEY)
    assert len(await device.people()) == 2
    listener = Recorder()
    await raises(ps.PeersyncError.Wiped, device.sync(config, listener))
    assert listener.states[-1].is_WIPED(), listener.states
    assert device.is_wiped()
    await raises(ps.PeersyncError.Wiped, device.record_visit("py-p1", visit(5)))
    await raises(ps.PeersyncError.Wiped, device.person("py-p1"))


if __name__ == "__main__":
    phase = sys.argv[1] if len(sys.argv) > 1 else "main"
    asyncio.run({"main": main_phase, "wiped": wiped_phase}[phase](os.environ))
    print(f"python bindings: {phase} phase passed")
