// One phone for `peersync bench --compare-automerge-repo`: a process per phone, each a Repo of
// its own with its own NodeFSStorageAdapter directory (its storage persists from phase to
// phase, as a phone's would) and its own websocket, which goes through that phone's
// link-emulation proxy (the Rust side opens one per phone and passes its URL in the manifest).
// The bench starts every phone's process of a phase at once. A process per phone, not one for
// all: in one Node thread, a phone's websocket waits whenever another phone's work holds the
// event loop; in a 20-phone run the server closed phones' sockets, most likely because the busy
// loop missed its 5 s keep-alive pings. The phones share this machine's cores with the server
// either way.
//
// Usage: node client.mjs MODE MANIFEST
//   prepare  import the phone's documents (automerge save() files exported by the Rust side)
//            into its storage; no network; prints nothing, exits 0 when done.
//   sync     load the documents from storage, connect, and sync them (P1, P2).
//   restore  a fresh, empty phone connects and asks the server for its caseload (P3).
//   change   load the documents, merge the P4 changes (save() files of the changed documents,
//            exported by the Rust side after it recorded the same visits on its phones),
//            connect and sync (P4).
//
// Manifest (one phone): {"worker", "store", "url", "docs": [{"person", "file"}],
//                        "changes": [{"person", "file"}]}
//
// Document ids: person id -> automerge-repo DocumentId is the first 16 bytes of
// SHA-256("peersync-bench:" + person id), so every phone (and every phase's process) names a
// person's document the same way and two phones' copies of a person are one repo document.
//
// When a phone counts as synced: every one of its documents is ready (loaded, or for a restore
// received) and the heads the server last told this phone it has (the Repo's sync info for the
// server's storage id, from the server's sync messages in this session) equal the phone's own
// heads. That is: the server holds everything the phone holds and the phone everything the
// server holds.
//
// Timing, so that the bench's phones start together: the process first sets up its Repo
// untimed (loading documents from storage, merging P4's changes), as the peersync phones' local
// work is not timed either, then prints "ready" and waits for a line "go" on stdin, which the
// bench sends every phone of the phase once all are ready. The phone's wall time runs from
// "go" (just before it opens its websocket) to synced.
//
// Warm-up, also untimed and before "ready": two throwaway Repos in this process (storage in a
// scratch directory) sync up to WARM_DOCS of the phone's documents over an in-memory link. A fresh Node process runs
// automerge's wasm and automerge-repo's code cold (compiled lazily, then optimised as it gets
// hot): without the warm-up a 45-document restore took about 1 s of CPU on its first run in a
// process and 0.25 s once warm, so every phone would pay in its timed sync what the earlier
// one-process-for-all-phones client paid once per phase, and what the peersync phones (native
// code) do not pay at all.
//
// Output on stdout: "ready", then one JSON object {"worker", "wall_ms", "docs", "docs_changed",
// "cpu_ms"} (docs_changed: documents whose heads moved during the sync, i.e. that received
// something; cpu_ms: this process's CPU time, user and system, from "go" to synced, so that
// Node's start-up and the untimed set-up are not counted). The process then shuts its Repo down
// (storage written for the next phase) and exits 0. It exits 1 if its stdin closes first: the
// bench died.

import crypto from "node:crypto"
import fs from "node:fs"
import * as A from "@automerge/automerge"
import { NetworkAdapter, Repo, cbor, interpretAsDocumentId } from "@automerge/automerge-repo"
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket"
import { NodeFSStorageAdapter } from "@automerge/automerge-repo-storage-nodefs"

const [mode, manifestPath] = process.argv.slice(2)
if (!["prepare", "sync", "restore", "change"].includes(mode) || !manifestPath) {
  console.error("usage: node client.mjs prepare|sync|restore|change MANIFEST")
  process.exit(2)
}
const phone = JSON.parse(fs.readFileSync(manifestPath, "utf8"))
// The bench keeps stdin open until this process has exited: if it dies, stop too.
process.stdin.setEncoding("utf8")
let input = ""
const go = new Promise(resolve => {
  process.stdin.on("data", chunk => {
    input += chunk
    if (input.split("\n").some(l => l.trim() === "go")) resolve()
  })
})
process.stdin.on("end", () => process.exit(1))
process.stdin.resume()

function docId(person) {
  const digest = crypto.createHash("sha256").update("peersync-bench:" + person).digest()
  return interpretAsDocumentId(new Uint8Array(digest.subarray(0, 16)))
}

function sameHeads(a, b) {
  if (!a || !b || a.length !== b.length) return false
  const x = [...a].sort()
  const y = [...b].sort()
  return x.every((h, i) => h === y[i])
}

// How many of the phone's documents the warm-up syncs: enough for its first real sync to run
// at its warm speed (measured: 10 of 45 documents left it at about twice that).
const WARM_DOCS = 50
// A phone not synced after this long says on stderr which documents it is waiting for, and
// again every time this passes.
const WAITING_REPORT_MS = 30_000

// One end of an in-memory link between two Repos of this process, for the warm-up; messages
// go through the same CBOR encoding as on the websocket.
class LocalAdapter extends NetworkAdapter {
  connected = false
  isReady() {
    return true
  }
  whenReady() {
    return Promise.resolve()
  }
  connect(peerId, peerMetadata) {
    this.peerId = peerId
    this.peerMetadata = peerMetadata
    this.connected = true
    if (this.other.connected) {
      this.emit("peer-candidate", { peerId: this.other.peerId, peerMetadata: this.other.peerMetadata })
      this.other.emit("peer-candidate", { peerId, peerMetadata })
    }
  }
  send(message) {
    const bytes = cbor.encode(message)
    setImmediate(() => this.other.connected && this.other.emit("message", cbor.decode(bytes)))
  }
  disconnect() {
    this.connected = false
  }
}

// A server-like Repo holding some of the phone's documents and a phone-like one asking for
// them, each with its own storage in a scratch directory next to the phone's (emptied first):
// the same code a sync runs, on the phone's own data, with nothing on the network.
async function warmUp() {
  const docs = phone.docs.slice(0, WARM_DOCS)
  if (docs.length === 0) return
  const scratch = `${phone.store}.warm`
  fs.rmSync(scratch, { recursive: true, force: true })
  const [a, b] = [new LocalAdapter(), new LocalAdapter()]
  a.other = b
  b.other = a
  const server = new Repo({
    network: [a],
    storage: new NodeFSStorageAdapter(`${scratch}/server`),
    peerId: `warm-server-${process.pid}`,
    sharePolicy: async () => false,
  })
  const connected = new Promise(resolve => server.networkSubsystem.once("peer", resolve))
  const client = new Repo({
    network: [b],
    storage: new NodeFSStorageAdapter(`${scratch}/phone`),
    peerId: `warm-phone-${process.pid}`,
  })
  await connected
  for (const d of docs) {
    server.import(new Uint8Array(fs.readFileSync(d.file)), { docId: docId(d.person) })
  }
  await Promise.all(docs.map(d => client.find(docId(d.person))))
  await Promise.all([server.shutdown(), client.shutdown()])
  // Sync states are saved on a 100 ms throttle that shutdown() does not wait for: let those
  // writes land now, not during the timed sync. The scratch directory stays (the bench's
  // temporary directory goes at its end): under load a throttled save came later than the
  // wait, found the directory gone, and its rejection ended the process.
  await new Promise(resolve => setTimeout(resolve, 250))
}

function phoneRepo() {
  return new Repo({ storage: new NodeFSStorageAdapter(phone.store), peerId: `phone-${phone.worker}-${process.pid}` })
}

async function prepare() {
  const repo = phoneRepo()
  for (const d of phone.docs) {
    repo.import(new Uint8Array(fs.readFileSync(d.file)), { docId: docId(d.person) })
  }
  await repo.flush()
  await repo.shutdown()
}

// Before the clock starts: the phone's Repo with its documents loaded (and P4's changes made).
async function setUp() {
  const repo = phoneRepo()
  const handles = []
  if (mode !== "restore") {
    for (const d of phone.docs) {
      handles.push(await repo.find(docId(d.person)))
    }
  }
  if (mode === "change") {
    for (const c of phone.changes) {
      const handle = await repo.find(docId(c.person))
      const before = handle.heads()
      const bytes = new Uint8Array(fs.readFileSync(c.file))
      handle.update(doc => A.loadIncremental(doc, bytes))
      if (sameHeads(before, handle.heads())) {
        throw new Error(`${phone.worker}: the P4 change to ${c.person} did not apply`)
      }
    }
  }
  return { repo, handles }
}

// The timed part: connect, (restore: ask for every document), wait until synced.
async function syncPhone({ repo, handles }) {
  const serverPeer = new Promise(resolve => repo.networkSubsystem.once("peer", ({ peerId }) => resolve(peerId)))
  repo.networkSubsystem.addNetworkAdapter(new WebSocketClientAdapter(phone.url))
  const peerId = await serverPeer
  const storageId = repo.getStorageIdOfPeer(peerId)
  if (!storageId) throw new Error(`${phone.worker}: the server announced no storage id`)
  if (mode === "restore") {
    handles = await Promise.all(phone.docs.map(d => repo.find(docId(d.person))))
  }
  const before = handles.map(h => h.heads())
  const waiting = new Set(handles)
  // A phone still waiting after a while says on stderr what for (the bench passes it on), so
  // that a phase that times out shows which documents never settled and how.
  const report = setInterval(() => {
    const shown = [...waiting].slice(0, 3).map(h => {
      const info = h.getSyncInfo(storageId)
      return `${h.documentId}: phone heads ${JSON.stringify(h.heads())}, server last said ${info ? JSON.stringify(info.lastHeads) : "nothing"}`
    })
    console.error(`still waiting for ${waiting.size} of ${handles.length} documents after ${Math.round(performance.now() - t0)} ms; ${shown.join("; ")}`)
  }, WAITING_REPORT_MS)
  const t0 = performance.now()
  await Promise.all(
    handles.map(
      h =>
        new Promise(resolve => {
          const check = () => {
            if (sameHeads(h.getSyncInfo(storageId)?.lastHeads, h.heads())) {
              h.off("remote-heads", check)
              h.off("heads-changed", check)
              waiting.delete(h)
              resolve()
            }
          }
          h.on("remote-heads", check)
          h.on("heads-changed", check)
          check()
        }),
    ),
  )
  clearInterval(report)
  const changed = mode === "restore" ? handles.length : handles.filter((h, i) => !sameHeads(before[i], h.heads())).length
  return { docs: handles.length, docs_changed: changed }
}

async function main() {
  if (mode === "prepare") {
    await prepare()
    return
  }
  await warmUp()
  const phoneState = await setUp()
  process.stdout.write("ready\n")
  await go
  const cpu = process.cpuUsage()
  const started = performance.now()
  const synced = await syncPhone(phoneState)
  const wall = performance.now() - started
  const used = process.cpuUsage(cpu)
  process.stdout.write(
    JSON.stringify({
      worker: phone.worker,
      wall_ms: Math.round(wall),
      ...synced,
      cpu_ms: Math.round((used.user + used.system) / 1000),
    }) + "\n",
  )
  // Untimed: the phone keeps what it received (and its sync state with the server) for the
  // next phase, as a phone would.
  await phoneState.repo.shutdown()
}

main().then(
  () => process.exit(0),
  e => {
    console.error(`${e?.stack ?? e}`)
    process.exit(1)
  },
)
