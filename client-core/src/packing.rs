//! zstd with one context per thread, and outputs sized from the frame header.
//!
//! `zstd::bulk`'s one-shot functions build a context on every call (a level-9 compression
//! context is megabytes of tables, allocated and zeroed each time) and, without zstd's
//! experimental features, allocate the whole capacity they are given for every decompression:
//! 16 MiB for each protocol frame, 64 MiB for each stored value read. Both showed in profiles
//! of a first upload, on the server and on the phones.

use std::cell::RefCell;
use std::io;

use zstd::bulk::{Compressor, Decompressor};

thread_local! {
    /// One compression context per level used on this thread (the protocol's and the store's).
    static COMPRESSORS: RefCell<Vec<(i32, Compressor<'static>)>> = const { RefCell::new(Vec::new()) };
    static DECOMPRESSOR: RefCell<Option<Decompressor<'static>>> = const { RefCell::new(None) };
}

/// `data` as one zstd frame at `level`, its size recorded in the frame header.
pub fn compress(data: &[u8], level: i32) -> io::Result<Vec<u8>> {
    COMPRESSORS.with(|cell| {
        let mut contexts = cell.borrow_mut();
        if let Some((_, c)) = contexts.iter_mut().find(|(l, _)| *l == level) {
            return c.compress(data);
        }
        let mut c = Compressor::new(level)?;
        let packed = c.compress(data);
        contexts.push((level, c));
        packed
    })
}

/// The content of the zstd frame `data`, refused if it would exceed `limit` bytes. The output
/// is allocated at the size the frame header states (a frame whose content runs past its stated
/// size fails); a frame without one may use up to `limit`.
pub fn decompress(data: &[u8], limit: usize) -> io::Result<Vec<u8>> {
    let size = match zstd::zstd_safe::get_frame_content_size(data) {
        Ok(Some(n)) if n <= limit as u64 => n as usize,
        Ok(Some(n)) => return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{n} bytes once decompressed, over the limit of {limit}"))),
        Ok(None) => limit,
        Err(_) => return Err(io::Error::new(io::ErrorKind::InvalidData, "not a zstd frame")),
    };
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let d = match slot.as_mut() {
            Some(d) => d,
            None => slot.insert(Decompressor::new()?),
        };
        let mut out = Vec::with_capacity(size);
        d.decompress_to_buffer(data, &mut out)?;
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_at_each_level_on_one_thread() {
        let data: Vec<u8> = (0..200_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        for level in [3, 9, 3] {
            let packed = compress(&data, level).unwrap();
            assert!(packed.len() < data.len() / 4);
            assert_eq!(decompress(&packed, data.len()).unwrap(), data);
        }
    }

    #[test]
    fn refuses_content_over_the_limit_before_decompressing() {
        let packed = compress(&vec![7u8; 100_000], 3).unwrap();
        let err = decompress(&packed, 99_999).unwrap_err();
        assert!(err.to_string().contains("over the limit"), "{err}");
    }

    #[test]
    fn refuses_a_frame_whose_content_outgrows_its_header() {
        // Two frames back to back: the header states the first one's size only.
        let one = compress(&vec![1u8; 10_000], 3).unwrap();
        let two = [one.clone(), one].concat();
        assert!(decompress(&two, 1 << 20).is_err());
    }

    #[test]
    fn a_frame_without_its_size_is_bounded_by_the_limit() {
        // Streamed frames carry no content size.
        let data = vec![5u8; 50_000];
        let streamed = zstd::stream::encode_all(&data[..], 3).unwrap();
        assert_eq!(zstd::zstd_safe::get_frame_content_size(&streamed).unwrap(), None);
        assert_eq!(decompress(&streamed, 50_000).unwrap(), data);
        assert!(decompress(&streamed, 49_999).is_err());
    }

    #[test]
    fn refuses_garbage() {
        assert!(decompress(b"not zstd at all", 1 << 20).is_err());
        assert!(decompress(&[], 1 << 20).is_err());
    }
}
