//! The sync wire protocol, shared by device and server. No I/O here: message types, the frame
//! codec with its size limits, and nothing else, so both ends test it with byte literals.
//!
//! A frame is one binary websocket message: `[version][flags][payload]`, where the payload is a
//! postcard-encoded [`ClientMsg`] or [`ServerMsg`], zstd-compressed when `flags & COMPRESSED`.
//!
//! A sync is one exchange (see ARCHITECTURE.md): the device sends `Hello` carrying its cursor
//! and its first batch of pending changes, then further `Push` batches without waiting; the
//! server acknowledges each batch once it is durable, then streams what the device lacks since
//! its cursor in bounded `Docs` batches. Nothing pending and nothing new: one small frame each
//! way. Documents whose state the two sides disagree on fall back to automerge's own sync
//! protocol (`Sync` rounds), batched across documents.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// 2 since person documents hold a visit or check-in as one `original` JSON text (see
/// `document`): a phone of version 1 would sync such records but not show them, so it is told
/// to update instead.
pub const PROTOCOL_VERSION: u8 = 2;
/// Largest frame accepted on the wire (compressed).
pub const MAX_FRAME_BYTES: usize = 4 << 20;
/// Largest payload once decompressed: a compression bomb stops here.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;
/// Batches of pushes aim at this many raw bytes (the server's download batches at most this),
/// so that a link that drops every minute still completes (and persists) batches, and progress
/// can be shown.
pub const TARGET_BATCH_BYTES: usize = 128 << 10;
/// Most documents one `Sync` frame may name: the server checks and loads each under its
/// writers' lock, so a frame of idle documents' small messages must still be bounded.
pub const MAX_SYNC_DOCS: usize = 1024;
/// Largest single document in a push (raw automerge bytes).
pub const MAX_DOC_BYTES: usize = 2 << 20;
/// Payloads below this are sent uncompressed: zstd's header would outweigh the saving.
const COMPRESS_OVER: usize = 96;
const COMPRESSED: u8 = 1;
const ZSTD_LEVEL: i32 = 9;

pub type Hash = [u8; 32];

/// A position in the organisation's change log. `tag` is a random number the server drew when
/// it wrote entry `seq`: a cursor from another history (a server restored from backup) does
/// not match and is detected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub seq: u64,
    pub tag: u32,
}

impl Cursor {
    pub const START: Cursor = Cursor { seq: 0, tag: 0 };
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientMsg {
    /// First frame of a sync. `more`: further `Push` frames follow.
    Hello { cursor: Cursor, live: bool, docs: Vec<DocPush>, more: bool },
    Push { docs: Vec<DocPush>, more: bool },
    /// One round of automerge's sync protocol for the documents named.
    Sync { msgs: Vec<DocSync> },
    /// After `CursorUnknown` and reconciliation: send every readable document, except `skip`,
    /// as if the cursor were at the start.
    Fetch { skip: Vec<String> },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerMsg {
    /// One per `Hello`/`Push` frame with documents, sent once they are durable.
    Acks { acks: Vec<DocAck> },
    /// What the device lacks. `cursor` is where the device stands once it has stored this
    /// batch; `remaining` documents follow; `done` marks the last batch of this exchange.
    /// `purge`: people this device must delete (erased, or no longer assigned to its worker).
    Docs { docs: Vec<DocDown>, purge: Vec<String>, cursor: Cursor, remaining: u32, done: bool },
    /// Replies to a `Sync` round (documents with nothing to say are left out).
    Sync { msgs: Vec<DocSync> },
    /// The device's cursor is from another history: reconcile with `Sync` rounds, then `Fetch`.
    CursorUnknown,
    /// Fatal for the connection; the server closes after sending it.
    Error { code: ErrorCode, message: String },
    /// This device was revoked (lost or stolen): delete every local record now.
    Wipe { message: String },
}

/// A document's changes the server has not acknowledged: either the whole document (automerge
/// `save()`) or the changes since what the server acknowledged last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocPush {
    pub doc: String,
    /// The device's heads once `data` is applied: the server confirms it holds them.
    pub heads: Vec<Hash>,
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocAck {
    pub doc: String,
    pub status: AckStatus,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AckStatus {
    /// Durable on the server, which now holds the pushed heads.
    Stored,
    /// The server lacks changes these depend on: reconcile this document with `Sync` rounds.
    NeedSync,
    /// Not accepted; the device keeps its data.
    Refused { code: ErrorCode, message: String },
}

/// Automerge data for a document: a `save()`, changes, or both concatenated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocDown {
    pub doc: String,
    pub data: Vec<u8>,
}

/// An automerge sync message for one document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocSync {
    pub doc: String,
    pub msg: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ErrorCode {
    #[error("malformed frame")]
    BadFrame,
    #[error("frame or document too large")]
    TooLarge,
    #[error("unsupported protocol version")]
    UnsupportedVersion,
    #[error("message not expected at this point")]
    Unexpected,
    #[error("not authenticated")]
    Unauthenticated,
    #[error("not allowed")]
    Forbidden,
    #[error("invalid document data")]
    InvalidDocument,
    #[error("the person was erased")]
    Erased,
    #[error("server error")]
    Internal,
    #[error("server is shutting down")]
    ShuttingDown,
    #[error("idle for too long")]
    Timeout,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("empty frame")]
    Empty,
    #[error("frame of {size} bytes exceeds the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("protocol version {0} is not supported (this side speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion(u8),
    #[error("unknown frame flags {0:#04x}")]
    UnknownFlags(u8),
    #[error("garbled frame: {0}")]
    Garbled(String),
}

impl ProtocolError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtocolError::TooLarge { .. } => ErrorCode::TooLarge,
            ProtocolError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            _ => ErrorCode::BadFrame,
        }
    }
}

/// Encode a message as one frame, compressing where it pays.
pub fn encode<M: Serialize>(msg: &M) -> Result<Vec<u8>, ProtocolError> {
    let raw = postcard::to_allocvec(msg).map_err(|e| ProtocolError::Garbled(e.to_string()))?;
    if raw.len() > MAX_MESSAGE_BYTES {
        return Err(ProtocolError::TooLarge { size: raw.len(), limit: MAX_MESSAGE_BYTES });
    }
    let mut frame = Vec::with_capacity(raw.len() / 2 + 2);
    if raw.len() > COMPRESS_OVER {
        let packed = crate::packing::compress(&raw, ZSTD_LEVEL).map_err(|e| ProtocolError::Garbled(e.to_string()))?;
        if packed.len() < raw.len() {
            frame.extend_from_slice(&[PROTOCOL_VERSION, COMPRESSED]);
            frame.extend_from_slice(&packed);
            return check_size(frame);
        }
    }
    frame.extend_from_slice(&[PROTOCOL_VERSION, 0]);
    frame.extend_from_slice(&raw);
    check_size(frame)
}

fn check_size(frame: Vec<u8>) -> Result<Vec<u8>, ProtocolError> {
    if frame.len() > MAX_FRAME_BYTES {
        return Err(ProtocolError::TooLarge { size: frame.len(), limit: MAX_FRAME_BYTES });
    }
    Ok(frame)
}

/// Decode one frame. Never panics on any input.
pub fn decode<M: DeserializeOwned>(frame: &[u8]) -> Result<M, ProtocolError> {
    if frame.len() > MAX_FRAME_BYTES {
        return Err(ProtocolError::TooLarge { size: frame.len(), limit: MAX_FRAME_BYTES });
    }
    let [version, flags, payload @ ..] = frame else {
        return Err(ProtocolError::Empty);
    };
    if *version != PROTOCOL_VERSION {
        return Err(ProtocolError::UnsupportedVersion(*version));
    }
    let owned;
    let raw = match *flags {
        0 => payload,
        COMPRESSED => {
            owned = crate::packing::decompress(payload, MAX_MESSAGE_BYTES)
                .map_err(|e| ProtocolError::Garbled(format!("decompression failed: {e}")))?;
            &owned[..]
        }
        other => return Err(ProtocolError::UnknownFlags(other)),
    };
    let (msg, rest) = postcard::take_from_bytes(raw).map_err(|e| ProtocolError::Garbled(e.to_string()))?;
    if !rest.is_empty() {
        return Err(ProtocolError::Garbled(format!("{} trailing bytes", rest.len())));
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_hello_and_reply_are_tiny() {
        let hello = encode(&ClientMsg::Hello { cursor: Cursor { seq: 123_456, tag: 0xdead_beef }, live: false, docs: vec![], more: false }).unwrap();
        let reply = encode(&ServerMsg::Docs { docs: vec![], purge: vec![], cursor: Cursor { seq: 123_456, tag: 0xdead_beef }, remaining: 0, done: true }).unwrap();
        assert!(hello.len() < 16, "{}", hello.len());
        assert!(reply.len() < 16, "{}", reply.len());
        assert_eq!(decode::<ClientMsg>(&hello).unwrap(), ClientMsg::Hello { cursor: Cursor { seq: 123_456, tag: 0xdead_beef }, live: false, docs: vec![], more: false });
    }

    #[test]
    fn large_messages_are_compressed_and_round_trip() {
        let docs = (0..50).map(|i| DocPush { doc: format!("p-{i:05}"), heads: vec![[i as u8; 32]], data: b"visits visits visits".repeat(20) }).collect();
        let msg = ClientMsg::Push { docs, more: true };
        let frame = encode(&msg).unwrap();
        assert_eq!(frame[1], COMPRESSED);
        assert!(frame.len() < 50 * 400 / 4);
        assert_eq!(decode::<ClientMsg>(&frame).unwrap(), msg);
    }

    #[test]
    fn garbage_is_an_error_never_a_panic() {
        assert_eq!(decode::<ClientMsg>(&[]), Err(ProtocolError::Empty));
        assert_eq!(decode::<ClientMsg>(&[1]), Err(ProtocolError::Empty));
        assert_eq!(decode::<ClientMsg>(&[9, 0, 0]), Err(ProtocolError::UnsupportedVersion(9)));
        // A phone from before `original` (version 1) is told its version is not spoken.
        assert_eq!(decode::<ClientMsg>(&[1, 0, 0]), Err(ProtocolError::UnsupportedVersion(1)));
        assert!(matches!(decode::<ClientMsg>(&[PROTOCOL_VERSION, 7, 0]), Err(ProtocolError::UnknownFlags(7))));
        assert!(matches!(decode::<ClientMsg>(&[PROTOCOL_VERSION, 0, 200, 1, 2]), Err(ProtocolError::Garbled(_))));
        assert!(matches!(decode::<ClientMsg>(&[PROTOCOL_VERSION, 1, 1, 2, 3, 4]), Err(ProtocolError::Garbled(_))));
        // A length prefix claiming far more than is there.
        assert!(matches!(decode::<ClientMsg>(&[PROTOCOL_VERSION, 0, 1, 0xff, 0xff, 0xff, 0xff, 0x0f]), Err(ProtocolError::Garbled(_))));
        // Trailing bytes after a valid message.
        let mut f = encode(&ClientMsg::Fetch { skip: vec![] }).unwrap();
        f.push(0);
        assert!(matches!(decode::<ClientMsg>(&f), Err(ProtocolError::Garbled(_))));
        // Pseudo-random garbage of many lengths.
        let mut x: u32 = 12345;
        for len in 0..300 {
            let bytes: Vec<u8> = (0..len).map(|_| { x = x.wrapping_mul(1664525).wrapping_add(1013904223); (x >> 24) as u8 }).collect();
            let _ = decode::<ClientMsg>(&bytes);
            let _ = decode::<ServerMsg>(&bytes);
        }
    }

    #[test]
    fn a_compression_bomb_is_refused() {
        let bomb = zstd::bulk::compress(&vec![0u8; MAX_MESSAGE_BYTES + 1], 1).unwrap();
        let mut frame = vec![PROTOCOL_VERSION, COMPRESSED];
        frame.extend(bomb);
        assert!(matches!(decode::<ClientMsg>(&frame), Err(ProtocolError::Garbled(_))));
    }

    #[test]
    fn oversized_frames_are_refused() {
        let big = vec![0u8; MAX_FRAME_BYTES + 1];
        assert!(matches!(decode::<ClientMsg>(&big), Err(ProtocolError::TooLarge { .. })));
    }
}
