// The automerge-repo sync server for `peersync bench --compare-automerge-repo`, set up as
// automerge-repo's own sync-server does (a Repo with a NodeWSServerAdapter on a ws server
// without its own HTTP listener, NodeFSStorageAdapter on a directory, sharePolicy false so it
// only syncs documents a peer asks for by id), minus express and its static files.
//
// It is a process of its own so that the bench can read its peak memory (VmHWM) and CPU time
// from /proc, as it does for the peersync server.
//
// Usage: node server.mjs DATA_DIR
// Prints "listening on PORT" once it accepts connections (a free loopback port); stops when
// its stdin closes, so it never outlives the bench.

import fs from "node:fs"
import http from "node:http"
import os from "node:os"
import { WebSocketServer } from "ws"
import { Repo } from "@automerge/automerge-repo"
import { NodeWSServerAdapter } from "@automerge/automerge-repo-network-websocket"
import { NodeFSStorageAdapter } from "@automerge/automerge-repo-storage-nodefs"

const dir = process.argv[2]
if (!dir) {
  console.error("usage: node server.mjs DATA_DIR")
  process.exit(2)
}
fs.mkdirSync(dir, { recursive: true })

// Under the bench's full load a document can wait longer than automerge-repo's 60 s
// whenReady timeout, whose rejection nothing catches; Node would then end the process (as it
// would end the stock sync-server). Log it and keep serving instead, so that the phase can
// finish or reach the bench's own timeout, and say how often it happened.
let unhandled = 0
process.on("unhandledRejection", e => {
  unhandled += 1
  if (unhandled <= 3) console.error(`automerge-repo server: unhandled rejection: ${e?.message ?? e}`)
})
process.on("exit", () => {
  if (unhandled > 0) console.error(`automerge-repo server: ${unhandled} unhandled rejections in all`)
})

const socket = new WebSocketServer({ noServer: true })
const repo = new Repo({
  network: [new NodeWSServerAdapter(socket)],
  storage: new NodeFSStorageAdapter(dir),
  peerId: `storage-server-${os.hostname()}`,
  // A server does not share generously: it syncs the documents peers ask for by id.
  sharePolicy: async () => false,
})

const server = http.createServer((_req, res) => {
  res.writeHead(200, { "content-type": "text/plain" })
  res.end("automerge-repo sync server (peersync bench)\n")
})
server.on("upgrade", (request, sock, head) => {
  socket.handleUpgrade(request, sock, head, ws => socket.emit("connection", ws, request))
})
server.listen(0, "127.0.0.1", () => {
  process.stdout.write(`listening on ${server.address().port}\n`)
})

async function stop() {
  server.close()
  socket.close()
  try {
    await repo.shutdown()
  } finally {
    process.exit(0)
  }
}
process.stdin.on("end", stop)
process.stdin.on("close", stop)
process.stdin.resume()
process.on("SIGTERM", stop)
