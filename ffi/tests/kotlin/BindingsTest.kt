// The Kotlin bindings on the JVM, driven as an Android app would, against a real server the Rust
// test (ffi/tests/bindings.rs) started. Same environment contract as the Python program
// (ffi/tests/python/bindings_test.py); the phase is the first argument: `main` or `wiped`.
// Exits non-zero with the failed check if anything is not as an app must find it.

import java.io.File
import java.time.Instant
import java.util.Collections
import java.util.concurrent.CountDownLatch
import java.util.concurrent.atomic.AtomicInteger
import kotlin.concurrent.thread
import kotlin.system.exitProcess
import kotlinx.coroutines.delay
import kotlinx.coroutines.runBlocking
import org.peersync.*

val KEY = ByteArray(32) { (it * 7).toByte() }

fun check(ok: Boolean, what: () -> String) {
    if (!ok) throw AssertionError(what())
}

class Recorder : DeviceListener {
    val progress: MutableList<SyncProgress> = Collections.synchronizedList(mutableListOf())
    val states: MutableList<SyncState> = Collections.synchronizedList(mutableListOf())
    val changed: MutableList<String> = Collections.synchronizedList(mutableListOf())
    override fun onProgress(progress: SyncProgress) { this.progress.add(progress) }
    override fun onState(state: SyncState) { states.add(state) }
    override fun onRecordsChanged(personIds: List<String>) { changed.addAll(personIds) }
}

/** Subscribers hear events on their own thread: wait (bounded) until `ok` holds. */
fun eventually(what: String, ok: () -> Boolean) {
    val deadline = System.currentTimeMillis() + 10_000
    while (!ok()) {
        check(System.currentTimeMillis() < deadline) { "not within 10 s: $what" }
        Thread.sleep(50)
    }
}

/** Run `block`; it must throw a PeersyncException of type E. Returns its message. */
inline fun <reified E : PeersyncException> fails(block: () -> Unit): String {
    try {
        block()
    } catch (e: PeersyncException) {
        check(e is E) { "expected ${E::class.simpleName}, got ${e::class.simpleName}: ${e.message}" }
        return e.message ?: ""
    }
    throw AssertionError("expected ${E::class.simpleName}, the call succeeded")
}

fun visit(id: String, mode: String = "phone", followUp: String? = null) = NewVisit(
    id = id,
    startedAt = Instant.parse("2026-11-10T09:00:00Z"),
    durationMin = 20u,
    mode = mode,
    setting = "community",
    activities = listOf("support"),
    notes = "kotlin $id",
    followUp = followUp,
)

suspend fun mainPhase(env: Map<String, String>) {
    val config = SyncConfig(serverUrl = env.getValue("PEERSYNC_SERVER"))
    val me = env.getValue("PEERSYNC_WORKER")

    fails<PeersyncException.Invalid> { runBlocking { Device.open(env.getValue("PEERSYNC_STORE") + "-short", ByteArray(5)) } }

    val device = Device.open(env.getValue("PEERSYNC_STORE"), KEY)
    fails<PeersyncException.NotEnrolled> {
        runBlocking { device.registerPerson(NewPerson(alias = "x", yearOfBirth = 1990, record = true, shareWithCoordinator = true, research = false)) }
    }
    val enrollment = device.enroll(config, env.getValue("PEERSYNC_CODE"), "kotlin phone")
    check(enrollment.worker == me) { "enrolled as $enrollment" }

    val subscriber = Recorder()
    val subscription = device.subscribe(subscriber)

    val person = device.registerPerson(NewPerson(
        id = "kt-p1", alias = "Ravi", yearOfBirth = 1979, workers = listOf(env.getValue("PEERSYNC_TEAMMATE")),
        record = true, shareWithCoordinator = true, research = false))
    check(person.id == "kt-p1") { "$person" }
    val checkin = device.recordCheckin("kt-p1", NewCheckin(
        wellbeing = listOf(3, 3, 4, 4, 3, 2, 3), distress = 3, coping = 3, socialSupport = 4, selfEfficacy = 3,
        qualityOfLife = 3, housing = "temporary", employment = "unemployed", hospitalNights28d = 2u))
    check(checkin.by == me && checkin.wellbeing == listOf(3, 3, 4, 4, 3, 2, 3)) { "$checkin" }

    // A listener may call the device, even blocking on it, from inside its callbacks.
    val reentrant = AtomicInteger()
    val reentrantSubscription = device.subscribe(object : DeviceListener {
        override fun onProgress(progress: SyncProgress) {}
        override fun onState(state: SyncState) { runBlocking { device.pendingChanges() } }
        override fun onRecordsChanged(personIds: List<String>) {
            runBlocking { device.people() }
            reentrant.incrementAndGet()
        }
    })

    // Several threads of the app call one device at once: every write lands, nothing is torn.
    val threads = 8
    val perThread = 25
    val start = CountDownLatch(1)
    val failures = Collections.synchronizedList(mutableListOf<Throwable>())
    val reads = AtomicInteger()
    val workers = (0 until threads).map { t ->
        thread(name = "app-$t") {
            try {
                start.await()
                runBlocking {
                    for (i in 0 until perThread) {
                        device.recordVisit("kt-p1", visit("kt-v$t-$i"))
                        if (i % 5 == 0) {
                            device.people()
                            device.pendingChanges()
                            reads.incrementAndGet()
                        }
                    }
                }
            } catch (e: Throwable) {
                failures.add(e)
            }
        }
    }
    start.countDown()
    workers.forEach { it.join(120_000) }
    check(failures.isEmpty()) { "threads failed: $failures" }
    check(reads.get() == threads * perThread / 5) { "reads ${reads.get()}" }
    val record = device.person("kt-p1")
    check(record.visits.size == threads * perThread) { "visits ${record.visits.size}" }
    check(record.visits.map { it.id }.toSet().size == threads * perThread) { "duplicate visit ids" }
    check(device.people().single { it.id == "kt-p1" }.visits == (threads * perThread).toUInt()) { "caseload count" }
    eventually("a change notice per durable write (${subscriber.changed.size} so far)") {
        subscriber.changed.count { it == "kt-p1" } == 2 + threads * perThread
    }

    // Typed errors for invalid input; nothing written.
    val msg = fails<PeersyncException.Invalid> { runBlocking { device.recordVisit("kt-p1", visit("bad", mode = "carrier-pigeon")) } }
    check(msg.contains("mode") && msg.contains("in_person")) { msg }
    fails<PeersyncException.Invalid> { runBlocking { device.recordVisit("kt-p1", visit("bad2", followUp = "next week")) } }
    fails<PeersyncException.Invalid> {
        runBlocking { device.recordCheckin("kt-p1", NewCheckin(wellbeing = listOf(9, 1, 1, 1, 1, 1, 1), distress = 1, coping = 1,
            socialSupport = 1, selfEfficacy = 1, qualityOfLife = 1, housing = "stable", employment = "unemployed", hospitalNights28d = 0u)) }
    }
    fails<PeersyncException.NotFound> { runBlocking { device.person("nobody") } }
    fails<PeersyncException.Invalid> { runBlocking { device.recordVisit("kt-p1", visit("bad4").copy(startedAt = Instant.MAX)) } }
    eventually("the re-entrant listener was called for every visit (${reentrant.get()})") { reentrant.get() >= threads * perThread }
    reentrantSubscription.cancel()
    check(device.person("kt-p1").visits.size == threads * perThread) { "an invalid write changed the record" }

    val edited = device.editVisit("kt-p1", "kt-v0-0", VisitEdit(notes = "amended in kotlin", followUp = "2026-12-24"))
    check(edited.notes == "amended in kotlin" && edited.followUp == "2026-12-24") { "$edited" }
    check(device.setConsent("kt-p1", ConsentChange(research = true)).research) { "consent" }
    val pending = device.pendingChanges()
    check(pending.documents == 1uL) { "pending $pending" }

    val listener = Recorder()
    val report = device.sync(config, listener)
    check(report.docsSent == 1uL && report.refused.isEmpty()) { "$report" }
    check(listener.progress.any { it is SyncProgress.Connected }) { "progress ${listener.progress}" }
    check(listener.progress.any { it is SyncProgress.Sending }) { "progress ${listener.progress}" }
    check(listener.states.first() is SyncState.Connecting) { "states ${listener.states}" }
    val last = listener.states.last()
    check(last is SyncState.Finished && last.report == report) { "states ${listener.states}" }
    check(listener.changed.contains(env.getValue("PEERSYNC_OTHER"))) { "changed ${listener.changed}" }
    eventually("the subscriber hears the sync finish: ${subscriber.states}") {
        subscriber.states.lastOrNull() is SyncState.Finished
    }

    val other = device.person(env.getValue("PEERSYNC_OTHER"))
    check(other.visits.any { it.notes == env.getValue("PEERSYNC_OTHER_NOTES") }) { "other's visits ${other.visits}" }
    check(device.pendingChanges().documents == 0uL) { "still pending" }

    // Syncs from several threads at once are serialised, not refused or corrupted.
    val syncs = (0 until 3).map { thread { runBlocking { device.sync(config, null) } } }
    syncs.forEach { it.join(60_000) }

    subscription.cancel()
    delay(300) // anything queued before the cancel is delivered
    val heard = subscriber.changed.size
    device.recordVisit("kt-p1", visit("kt-after-cancel"))
    delay(300)
    check(subscriber.changed.size == heard) { "a cancelled subscription still heard changes" }
    device.sync(config, null)

    val live = device.startLiveSync(config)
    delay(300)
    check(!live.isFinished()) { "live sync ended early" }
    live.stop()
    check(live.isFinished()) { "live sync did not stop" }

    File(env.getValue("PEERSYNC_OUT")).writeText("{\"device_id\": \"${device.deviceId()}\"}")
    device.close()
}

suspend fun wipedPhase(env: Map<String, String>) {
    val config = SyncConfig(serverUrl = env.getValue("PEERSYNC_SERVER"))
    val device = Device.open(env.getValue("PEERSYNC_STORE"), KEY)
    val before = device.people()
    check(before.size == 2) { "people before the wipe: $before" }
    val listener = Recorder()
    val subscriber = Recorder()
    val subscription = device.subscribe(subscriber)
    fails<PeersyncException.Wiped> { runBlocking { device.sync(config, listener) } }
    check(listener.states.last() is SyncState.Wiped) { "states ${listener.states}" }
    // Screens showing these people hear that their records are gone.
    eventually("the wipe is heard: ${subscriber.changed}") {
        subscriber.changed.containsAll(listOf("kt-p1", env.getValue("PEERSYNC_OTHER")))
    }
    // Nor can it sync or enroll again: it says it was wiped.
    fails<PeersyncException.Wiped> { runBlocking { device.sync(config, null) } }
    fails<PeersyncException.Wiped> { runBlocking { device.enroll(config, "ANYCODE", "again") } }
    subscription.cancel()
    check(device.isWiped()) { "not wiped" }
    fails<PeersyncException.Wiped> { runBlocking { device.people() } }
    fails<PeersyncException.Wiped> { runBlocking { device.recordVisit("kt-p1", visit("kt-late")) } }
}

fun main(args: Array<String>) {
    val phase = args.firstOrNull() ?: "main"
    try {
        runBlocking {
            when (phase) {
                "main" -> mainPhase(System.getenv())
                "wiped" -> wipedPhase(System.getenv())
                else -> throw IllegalArgumentException("unknown phase $phase")
            }
        }
    } catch (e: Throwable) {
        System.err.println("kotlin bindings: $phase phase FAILED: $e")
        e.printStackTrace()
        exitProcess(1)
    }
    println("kotlin bindings: $phase phase passed")
    exitProcess(0)
}
