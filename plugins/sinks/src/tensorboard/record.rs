//! TFRecord framing, as TensorBoard reads event files: each record is
//!
//! ```text
//! u64 little-endian   length of the data
//! u32 little-endian   masked CRC-32C of those 8 bytes
//! [u8; length]        the data (here an encoded `Event`)
//! u32 little-endian   masked CRC-32C of the data
//! ```
//!
//! "Masked" is TensorFlow's `crc.rotate_right(15) + 0xa282ead8` (wrapping), which keeps a CRC
//! of data that itself holds CRCs from looking like one. The reader checks both CRCs. A last
//! record cut short is a write torn by a crash and is left out; a record whose CRC does not
//! match is damage, and an error.

use std::fs;
use std::path::Path;

use codex_plugin_api::{Error, Result};
use prost::Message;

use super::proto::Event;

/// Bytes before a record's data: the length and its CRC.
const HEAD: usize = 12;

/// TensorFlow's masked CRC-32C of `bytes`.
pub fn masked_crc32c(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
        .rotate_right(15)
        .wrapping_add(0xa282_ead8)
}

/// Append `data` to `out` as one framed record.
pub fn frame(data: &[u8], out: &mut Vec<u8>) {
    let len = (data.len() as u64).to_le_bytes();
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
}

/// A record that could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damaged {
    /// Where the record starts, in bytes from the start of the file.
    pub offset: usize,
    /// What is wrong with it.
    pub problem: &'static str,
}

/// One record of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framed<'a> {
    /// Where the record starts, in bytes from the start of the file.
    pub offset: usize,
    /// Its length with the framing.
    pub len: usize,
    /// Its data.
    pub data: &'a [u8],
}

/// The records of `bytes`, in order. A last record cut short is left out.
pub fn records(bytes: &[u8]) -> std::result::Result<Vec<Framed<'_>>, Damaged> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let rest = &bytes[at..];
        if rest.len() < HEAD {
            break;
        }
        let (len_bytes, tail) = rest.split_at(8);
        let damaged = |problem| Damaged {
            offset: at,
            problem,
        };
        if tail[..4] != masked_crc32c(len_bytes).to_le_bytes() {
            return Err(damaged("the CRC of its length does not match"));
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(len_bytes);
        let Some(total) = usize::try_from(u64::from_le_bytes(len))
            .ok()
            .and_then(|l| l.checked_add(HEAD + 4))
        else {
            return Err(damaged("its length is larger than any file"));
        };
        if rest.len() < total {
            break;
        }
        let data = &rest[HEAD..total - 4];
        if rest[total - 4..total] != masked_crc32c(data).to_le_bytes() {
            return Err(damaged("the CRC of its data does not match"));
        }
        out.push(Framed {
            offset: at,
            len: total,
            data,
        });
        at += total;
    }
    Ok(out)
}

/// Rewrite the event file at `path` without the events after `resume_step` (and without a
/// torn last record); a file with nothing to drop is left as it is.
pub(crate) fn truncate_after(path: &Path, resume_step: u64) -> Result<()> {
    let bytes =
        fs::read(path).map_err(|e| Error::msg(format!("cannot read {}: {e}", path.display())))?;
    let damaged = |offset: usize, problem: &str| {
        Error::msg(format!(
            "{}: the event record at byte {offset} is damaged ({problem}); move the file out of the folder, then resume again",
            path.display()
        ))
    };
    let records = records(&bytes).map_err(|d| damaged(d.offset, d.problem))?;
    let mut kept = Vec::with_capacity(bytes.len());
    for r in records {
        let event = Event::decode(r.data).map_err(|_| damaged(r.offset, "not an event"))?;
        if u64::try_from(event.step).map_or(true, |s| s <= resume_step) {
            kept.extend_from_slice(&bytes[r.offset..r.offset + r.len]);
        }
    }
    if kept.len() == bytes.len() {
        return Ok(());
    }
    // The temporary file's name starts with `.`, so TensorBoard does not read it.
    crate::resume::replace(path, &kept)
        .map_err(|e| Error::msg(format!("cannot rewrite {} for resume: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_values() {
        // The CRC-32C check value and the iSCSI vectors of RFC 3720, appendix B.4.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c::crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c::crc32c(&[0xffu8; 32]), 0x62a8_ab43);
        let ascending: Vec<u8> = (0..32).collect();
        assert_eq!(crc32c::crc32c(&ascending), 0x46dd_794e);
    }

    #[test]
    fn masked_crc_matches_tensorboard() {
        // From tensorboard 2.21.0's own writer:
        // `tensorboard.summary.writer.record_writer.masked_crc32c(b)`.
        for (bytes, expect) in [
            (&b""[..], 0xa282_ead8u32),
            (&b"123456789"[..], 0xc78a_b0e5),
            (&13u64.to_le_bytes()[..], 0x34b8_373c),
        ] {
            assert_eq!(masked_crc32c(bytes), expect, "{bytes:?}");
        }
    }

    #[test]
    fn frames_read_back() {
        let mut file = Vec::new();
        for data in [&b"first"[..], b"", b"third record"] {
            frame(data, &mut file);
        }
        let got: Vec<&[u8]> = records(&file)
            .unwrap()
            .into_iter()
            .map(|r| r.data)
            .collect();
        assert_eq!(got, [&b"first"[..], b"", b"third record"]);
    }

    #[test]
    fn a_torn_last_record_is_left_out_and_damage_is_found() {
        let mut file = Vec::new();
        frame(b"kept", &mut file);
        let whole = file.len();
        frame(b"torn", &mut file);
        for cut in whole..file.len() {
            assert_eq!(records(&file[..cut]).unwrap().len(), 1, "cut at {cut}");
        }
        let mut bad = file.clone();
        bad[whole + HEAD] ^= 1;
        assert_eq!(
            records(&bad),
            Err(Damaged {
                offset: whole,
                problem: "the CRC of its data does not match"
            })
        );
        let mut bad = file;
        bad[0] ^= 1;
        assert_eq!(records(&bad).unwrap_err().offset, 0);
    }
}
