// The phones for `peersync bench --compare-automerge-repo`: one process simulating every phone
// of a phase, each phone a Repo of its own with its own NodeFSStorageAdapter directory (its
// storage persists from phase to phase, as a phone's would) and its own websocket, which goes
// through that phone's link-emulation proxy (the Rust side opens one per phone and passes its
// URL in the manifest). One process for all phones, as the peersync bench runs all its phones
// in one process: the phones share this machine's cores with the server either way.
//
// Usage: node client.mjs MODE MANIFEST
//   prepare  import each phone's documents (automerge save() files exported by the Rust side)
//            into its storage; no network.
//   sync     every phone loads its documents from storage, connects, and syncs them (P1, P2).
//   restore  every (fresh, empty) phone connects and asks the server for its caseload (P3).
//   change   every phone loads its documents, merges the P4 changes (save() files of the
//            changed documents, exported by the Rust side after it recorded the same visits on
//            its phones), connects and syncs (P4).
//
// Manifest: {"phones": [{"worker", "store", "url", "docs": [{"person", "file"}],
//                        "changes": [{"person", "file"}]}]}
//
// Document ids: person id -> automerge-repo DocumentId is the first 16 bytes of
// SHA-256("peersync-bench:" + person id), so every phone (and every phase's process) names a
// person's document the same way and two phones' copies of a person are one repo document.
//
// When a phone counts as synced: every one of its documents is ready (loaded, or for a restore
// received) and the heads the server last told this phone it has (the Repo's sync info for the
// server's storage id, from the server's sync messages in this session) equal the phone's own
// heads. That is: the server holds everything the phone holds and the phone everything the
// server holds. The phone's wall time runs from opening its websocket to that moment. Setting
// up the Repos (loading documents from storage, merging P4's changes) happens before and is not
// timed, as the peersync phones' local work is not.
//
// Output on stdout, one JSON object a line: one per phone {"worker", "wall_ms", "docs",
// "docs_changed"} (docs_changed: documents whose heads moved during the sync, i.e. that
// received something), then {"phase_wall_ms", "client_cpu_ms"}.

import crypto from "node:crypto"
import fs from "node:fs"
import * as A from "@automerge/automerge"
import { Repo, interpretAsDocumentId } from "@automerge/automerge-repo"
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket"
import { NodeFSStorageAdapter } from "@automerge/automerge-repo-storage-nodefs"

const [mode, manifestPath] = process.argv.slice(2)
if (!["prepare", "sync", "restore", "change"].includes(mode) || !manifestPath) {
  console.error("usage: node client.mjs prepare|sync|restore|change MANIFEST")
  process.exit(2)
}
const manifest = JSON.parse(fs.readFileSync(manifestPath, "utf8"))
// The bench keeps stdin open while the phase runs: if it dies, stop too.
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

function phoneRepo(phone) {
  return new Repo({ storage: new NodeFSStorageAdapter(phone.store), peerId: `phone-${phone.worker}-${process.pid}` })
}

async function prepare(phone) {
  const repo = phoneRepo(phone)
  for (const d of phone.docs) {
    repo.import(new Uint8Array(fs.readFileSync(d.file)), { docId: docId(d.person) })
  }
  await repo.flush()
  await repo.shutdown()
}

// Before the clock starts: the phone's Repo with its documents loaded (and P4's changes made).
async function setUp(phone) {
  const repo = phoneRepo(phone)
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
  return { phone, repo, handles }
}

// The timed part: connect, (restore: ask for every document), wait until synced.
async function syncPhone({ phone, repo, handles }) {
  const started = performance.now()
  const serverPeer = new Promise(resolve => repo.networkSubsystem.once("peer", ({ peerId }) => resolve(peerId)))
  repo.networkSubsystem.addNetworkAdapter(new WebSocketClientAdapter(phone.url))
  const peerId = await serverPeer
  const storageId = repo.getStorageIdOfPeer(peerId)
  if (!storageId) throw new Error(`${phone.worker}: the server announced no storage id`)
  if (mode === "restore") {
    handles = await Promise.all(phone.docs.map(d => repo.find(docId(d.person))))
  }
  const before = handles.map(h => h.heads())
  await Promise.all(
    handles.map(
      h =>
        new Promise(resolve => {
          const check = () => {
            if (sameHeads(h.getSyncInfo(storageId)?.lastHeads, h.heads())) {
              h.off("remote-heads", check)
              h.off("heads-changed", check)
              resolve()
            }
          }
          h.on("remote-heads", check)
          h.on("heads-changed", check)
          check()
        }),
    ),
  )
  const wall = performance.now() - started
  const changed = mode === "restore" ? handles.length : handles.filter((h, i) => !sameHeads(before[i], h.heads())).length
  process.stdout.write(JSON.stringify({ worker: phone.worker, wall_ms: Math.round(wall), docs: handles.length, docs_changed: changed }) + "\n")
}

async function main() {
  if (mode === "prepare") {
    for (const phone of manifest.phones) await prepare(phone)
    return
  }
  const phones = []
  for (const phone of manifest.phones) phones.push(await setUp(phone))
  const cpu = process.cpuUsage()
  const started = performance.now()
  await Promise.all(phones.map(syncPhone))
  const wall = performance.now() - started
  const used = process.cpuUsage(cpu)
  process.stdout.write(
    JSON.stringify({ phase_wall_ms: Math.round(wall), client_cpu_ms: Math.round((used.user + used.system) / 1000) }) + "\n",
  )
  // Untimed: each phone keeps what it received (and its sync state with the server) for the
  // next phase, as a phone would.
  for (const p of phones) await p.repo.shutdown()
}

main().then(
  () => process.exit(0),
  e => {
    console.error(`automerge-repo client: ${e?.stack ?? e}`)
    process.exit(1)
  },
)
