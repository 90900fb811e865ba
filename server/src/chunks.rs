//! A look at automerge bytes a device sends (pushes, and the changes in reconciliation's sync
//! messages) before automerge reads them.
//!
//! automerge inflates a compressed change chunk, or a document's deflated columns, without a
//! limit on the output: a push of a quarter of a megabyte inflated to 800 MB on the server. And
//! it ignores whatever follows the last whole chunk, so bytes stored as pushed could carry junk
//! that hides later changes when they are read back. So a push must be whole chunks with
//! nothing after them, and what is deflated in it is inflated here first, counting, and refused
//! past [`MAX_INFLATED_BYTES`]. Phones push uncompressed (`save_nocompress`, `save_after`),
//! except a record too large for that, sent as automerge's deflated `save()`: that costs
//! inflating twice, once here. Only the chunks' headers and a document's column descriptions
//! are parsed; automerge checks the rest.

use std::io::Read;

use peersync_core::protocol::{DocSync, MAX_DOC_BYTES, MAX_MESSAGE_BYTES};

/// The most one push, or one sync message, may inflate to: eight times the largest push. A
/// phone caps a record by its deflated size (under `MAX_DOC_BYTES`), and notes deflate well, so
/// the cap leaves room for text compressed eight to one.
pub const MAX_INFLATED_BYTES: u64 = 8 * MAX_DOC_BYTES as u64;

/// Every automerge chunk begins with these.
const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
const DOCUMENT: u8 = 0;
const CHANGE: u8 = 1;
const COMPRESSED_CHANGE: u8 = 2;
/// The bit of a column's specification that says its data is deflated.
const DEFLATED: u64 = 0b1000;

/// Whether `data` is a sequence of whole, uncompressed automerge document and change chunks;
/// the error says what is wrong with it.
pub fn check_pushed(data: &[u8]) -> Result<(), String> {
    if data.is_empty() {
        return Err("no automerge data".into());
    }
    check_chunks(data, &mut Budget(MAX_INFLATED_BYTES))
}

/// The most one `Sync` frame's messages may inflate to in all (a frame decodes to at most
/// 16 MiB).
pub const MAX_FRAME_INFLATED_BYTES: u64 = 4 * MAX_MESSAGE_BYTES as u64;
/// Bloom filters as automerge makes them use 10 bits per entry and 7 probes; a filter that
/// asks for more probes makes automerge allocate and loop that many times per hash.
const MAX_BLOOM_PROBES: u64 = 64;
const MAX_BLOOM_BITS_PER_ENTRY: u64 = 64;

/// Every message of a reconciliation `Sync` frame looked at as [`check_sync_message`] does,
/// each within its own limit and all within [`MAX_FRAME_INFLATED_BYTES`]. Returns the
/// documents whose message is refused, with why. Run before the writers' lock is taken.
pub fn check_sync_frame(msgs: &[DocSync]) -> Vec<(String, String)> {
    let mut frame = MAX_FRAME_INFLATED_BYTES;
    let mut refused = Vec::new();
    for m in msgs {
        let mut budget = Budget(frame.min(MAX_INFLATED_BYTES));
        let start = budget.0;
        match check_sync_message_within(&m.msg, &mut budget) {
            Ok(()) => frame -= start - budget.0,
            Err(why) => refused.push((m.doc.clone(), why)),
        }
    }
    refused
}

/// The same for the changes an automerge sync message carries (reconciliation's `Sync`
/// frames), within one budget for the message, and its bloom filters' sizes. The rest of the
/// message (heads, needs) is only stepped over.
pub fn check_sync_message(msg: &[u8]) -> Result<(), String> {
    check_sync_message_within(msg, &mut Budget(MAX_INFLATED_BYTES))
}

fn check_sync_message_within(msg: &[u8], inflated: &mut Budget) -> Result<(), String> {
    if msg.is_empty() {
        return Ok(()); // nothing to say: automerge is not asked to read it
    }
    let mut r = Reader { data: msg, at: 0 };
    r.take(1)?; // the message's version
    for _ in 0..2 {
        // Heads, then needs.
        let n = r.count(32)?;
        r.take(n * 32)?;
    }
    for _ in 0..r.count(2)? {
        // What the sender has: its last-sync heads and a bloom filter.
        let n = r.count(32)?;
        r.take(n * 32)?;
        let len = r.len()?;
        check_bloom(r.take(len)?)?;
    }
    for _ in 0..r.count(1)? {
        let len = r.len()?;
        check_chunks(r.take(len)?, inflated)?;
    }
    Ok(())
}

/// A bloom filter's header: entries, bits per entry, probes (an empty filter is none).
fn check_bloom(bloom: &[u8]) -> Result<(), String> {
    if bloom.is_empty() {
        return Ok(());
    }
    let mut r = Reader { data: bloom, at: 0 };
    let (entries, bits, probes) = (r.uleb()?, r.uleb()?, r.uleb()?);
    if probes > MAX_BLOOM_PROBES || bits > MAX_BLOOM_BITS_PER_ENTRY || (entries > 0 && (bits == 0 || probes == 0)) {
        return Err(format!("a bloom filter of {entries} entries, {bits} bits each and {probes} probes"));
    }
    Ok(())
}

/// Whole chunks, nothing after them, inflating within `inflated`.
fn check_chunks(data: &[u8], inflated: &mut Budget) -> Result<(), String> {
    let mut r = Reader { data, at: 0 };
    while r.at < data.len() {
        let start = r.at;
        if r.take(4)? != MAGIC {
            return Err(format!("bytes at offset {start} are not the start of an automerge chunk"));
        }
        r.take(4)?; // checksum: automerge verifies it
        let kind = r.take(1)?[0];
        let len = r.len()?;
        let body = r.take(len)?;
        match kind {
            DOCUMENT => check_document(body, inflated)?,
            CHANGE => {}
            COMPRESSED_CHANGE => inflated.inflate(body)?,
            other => return Err(format!("automerge chunk of type {other} at offset {start}: push documents and changes")),
        }
    }
    Ok(())
}

/// A document chunk's actors, heads and column descriptions, and its deflated columns
/// inflated within `inflated`.
fn check_document(body: &[u8], inflated: &mut Budget) -> Result<(), String> {
    let mut r = Reader { data: body, at: 0 };
    for _ in 0..r.count(1)? {
        let len = r.len()?;
        r.take(len)?; // an actor id
    }
    let heads = r.count(32)?;
    r.take(heads * 32)?;
    // Change columns, then op columns: (specification, length) pairs; their data follows in
    // the same order.
    let mut columns = Vec::new();
    for _ in 0..2 {
        for _ in 0..r.count(2)? {
            let spec = r.uleb()?;
            let len = r.len()?;
            columns.push((spec & DEFLATED != 0, len));
        }
    }
    for (deflated, len) in columns {
        let data = r.take(len)?;
        if deflated {
            inflated.inflate(data)?;
        }
    }
    Ok(())
}

/// What may still be inflated.
struct Budget(u64);

impl Budget {
    /// Inflate `deflated` to count its size, taking it from the budget.
    fn inflate(&mut self, deflated: &[u8]) -> Result<(), String> {
        let over = || format!("automerge data that inflates to more than {MAX_INFLATED_BYTES} bytes");
        let mut decoder = flate2::read::DeflateDecoder::new(deflated).take(self.0 + 1);
        let n = std::io::copy(&mut decoder, &mut std::io::sink()).map_err(|e| format!("a deflated part that does not inflate: {e}"))?;
        self.0 = self.0.checked_sub(n).ok_or_else(over)?;
        Ok(())
    }
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.data.len()).ok_or_else(|| format!("automerge data cut short at offset {}", self.at))?;
        let out = &self.data[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn uleb(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.take(1)?[0];
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(format!("a malformed number at offset {}", self.at))
    }

    /// A length of bytes to follow, bounded by what is left.
    fn len(&mut self) -> Result<usize, String> {
        let n = self.uleb()?;
        let left = self.data.len() - self.at;
        usize::try_from(n).ok().filter(|n| *n <= left).ok_or_else(|| format!("automerge data cut short at offset {}: {n} bytes said to follow, {left} do", self.at))
    }

    /// A count of items of at least `min` bytes each, bounded by what is left.
    fn count(&mut self, min: usize) -> Result<usize, String> {
        let n = self.uleb()?;
        let left = (self.data.len() - self.at) / min;
        usize::try_from(n).ok().filter(|n| *n <= left).ok_or_else(|| format!("a count of {n} at offset {} is more than the data holds", self.at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::{AutoCommit, ROOT};

    fn doc() -> AutoCommit {
        let mut d = AutoCommit::new();
        // Long enough text that automerge deflates its columns and compresses its changes.
        d.put(ROOT, "notes", "a long note about the week; ".repeat(200)).unwrap();
        d.put(ROOT, "alias", "KM-1").unwrap();
        d
    }

    #[test]
    fn what_phones_push_passes() {
        let mut d = doc();
        let heads = d.get_heads();
        assert_eq!(check_pushed(&d.save_nocompress()), Ok(()));
        d.put(ROOT, "alias", "KM-2").unwrap();
        let after = d.save_after(&heads);
        assert_eq!(check_pushed(&after), Ok(()));
        let mut both = d.save_nocompress();
        both.extend_from_slice(&after);
        assert_eq!(check_pushed(&both), Ok(()));
    }

    /// A large record is pushed deflated (`save()`), and changes may come compressed: they pass,
    /// within the limit.
    #[test]
    fn deflated_records_and_compressed_changes_pass_within_the_limit() {
        let mut d = doc();
        let deflated = d.save();
        assert!(deflated.len() < d.save_nocompress().len(), "automerge's save() deflates these columns");
        assert_eq!(check_pushed(&deflated), Ok(()));
        let mut change = automerge::Automerge::load(&d.save_nocompress()).unwrap().get_changes(&[]).into_iter().next().unwrap().clone();
        let compressed = change.bytes().into_owned();
        assert_eq!(compressed[8], COMPRESSED_CHANGE, "a change this large is compressed");
        assert_eq!(check_pushed(&compressed), Ok(()));
    }

    /// The bomb: a compressed change, or a document column, that inflates past the limit.
    #[test]
    fn data_inflating_past_the_limit_is_refused() {
        let bomb = deflated_zeros(MAX_INFLATED_BYTES + 1);
        assert!(bomb.len() < 64 << 10);
        let err = check_pushed(&chunk(COMPRESSED_CHANGE, &bomb)).unwrap_err();
        assert!(err.contains("inflates to more than"), "{err}");
        // A document whose one op column is the bomb: no actors, no heads, no change columns.
        let mut body = vec![0, 0, 0, 1];
        uleb(&mut body, (1 << 4) | DEFLATED | 6);
        uleb(&mut body, bomb.len() as u64);
        body.extend_from_slice(&bomb);
        let err = check_pushed(&chunk(DOCUMENT, &body)).unwrap_err();
        assert!(err.contains("inflates to more than"), "{err}");
    }

    /// Real sync messages pass, a first one carrying a whole document included; one carrying
    /// a bomb, or cut short, does not.
    #[test]
    fn sync_messages_are_looked_at_too() {
        use automerge::sync::{State, SyncDoc};
        let mut ours = doc();
        let mut theirs = automerge::AutoCommit::new();
        let (mut a, mut b) = (State::new(), State::new());
        let mut seen = 0;
        for _ in 0..6 {
            if let Some(m) = ours.sync().generate_sync_message(&mut a) {
                let bytes = m.encode();
                assert_eq!(check_sync_message(&bytes), Ok(()));
                theirs.sync().receive_sync_message(&mut b, automerge::sync::Message::decode(&bytes).unwrap()).unwrap();
                seen += 1;
            }
            if let Some(m) = theirs.sync().generate_sync_message(&mut b) {
                let bytes = m.encode();
                assert_eq!(check_sync_message(&bytes), Ok(()));
                ours.sync().receive_sync_message(&mut a, automerge::sync::Message::decode(&bytes).unwrap()).unwrap();
            }
        }
        assert!(seen > 0 && theirs.get_heads() == ours.get_heads(), "the two converged through the checked messages");

        let msg = message_carrying(&chunk(COMPRESSED_CHANGE, &deflated_zeros(MAX_INFLATED_BYTES + 1)));
        let err = check_sync_message(&msg).unwrap_err();
        assert!(err.contains("inflates to more than"), "{err}");
        assert!(check_sync_message(&msg[..40]).is_err());

        // A bloom filter asking for four billion probes per hash, or dividing by zero.
        for (bits, probes) in [(8u64, 0xffff_ffffu64), (0, 7)] {
            let mut bloom = vec![1];
            uleb(&mut bloom, bits);
            uleb(&mut bloom, probes);
            bloom.push(0xff);
            let mut msg = vec![0x43, 1];
            msg.extend_from_slice(&[9; 32]);
            msg.extend_from_slice(&[0, 1, 0]);
            uleb(&mut msg, bloom.len() as u64);
            msg.extend_from_slice(&bloom);
            msg.push(0);
            let err = check_sync_message(&msg).unwrap_err();
            assert!(err.contains("bloom filter"), "{err}");
        }

        // A frame of messages each just under the limit is bounded as a whole.
        let msg = message_carrying(&chunk(COMPRESSED_CHANGE, &deflated_zeros(MAX_INFLATED_BYTES - 4096)));
        assert_eq!(check_sync_message(&msg), Ok(()), "one alone is within the limit");
        let frame: Vec<DocSync> = (0..12).map(|i| DocSync { doc: format!("p-{i}"), msg: msg.clone() }).collect();
        let refused = check_sync_frame(&frame);
        let per_frame = (MAX_FRAME_INFLATED_BYTES / (MAX_INFLATED_BYTES - 4096)) as usize;
        assert_eq!(refused.len(), 12 - per_frame, "{refused:?}");
        assert_eq!(refused[0].0, format!("p-{per_frame}"));
    }

    /// `n` zero bytes, deflated: a few kilobytes that inflate to `n`.
    fn deflated_zeros(n: u64) -> Vec<u8> {
        use std::io::Write;
        let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        z.write_all(&vec![0u8; n as usize]).unwrap();
        z.finish().unwrap()
    }

    /// A chunk of `kind` around `body` (its checksum zero: not checked here).
    fn chunk(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut c = MAGIC.to_vec();
        c.extend_from_slice(&[0; 4]);
        c.push(kind);
        uleb(&mut c, body.len() as u64);
        c.extend_from_slice(body);
        c
    }

    /// A sync message with no heads, needs or haves, carrying `change`.
    fn message_carrying(change: &[u8]) -> Vec<u8> {
        let mut msg = vec![0x42, 0, 0, 0, 1];
        uleb(&mut msg, change.len() as u64);
        msg.extend_from_slice(change);
        msg
    }

    fn uleb(v: &mut Vec<u8>, mut n: u64) {
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            v.push(if n == 0 { b } else { b | 0x80 });
            if n == 0 {
                return;
            }
        }
    }

    #[test]
    fn trailing_or_broken_data_is_refused() {
        let mut d = doc();
        let mut junk = d.save_nocompress();
        junk.extend_from_slice(b"seventeen bytes!!");
        assert!(check_pushed(&junk).is_err());
        let whole = d.save_nocompress();
        assert!(check_pushed(&whole[..whole.len() - 1]).unwrap_err().contains("cut short"));
        assert!(check_pushed(b"").is_err());
        assert!(check_pushed(&[0x85, 0x6f, 0x4a, 0x83, 0, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]).is_err());
    }
}
