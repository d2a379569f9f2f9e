//! The saved-state format: a header (counters, the fingerprint of the configuration), the
//! backend's buffers, and a CRC32C of everything before it.
//!
//! Format 2 (this hyzo writes it):
//!
//! | bytes | field |
//! |---|---|
//! | 8 | magic `HYZOSTAT` |
//! | 4 | format, 2 (u32 LE, like every integer here) |
//! | 4 | header size, 64 |
//! | 8 | fingerprint of what fixes the layout ([`fingerprint`]) |
//! | 8 | step |
//! | 8 | updates of the main rule's state (its `t`) |
//! | 8 | updates of the first-order rule's state |
//! | 8 | steps skipped |
//! | 8 | body size |
//! | body | the buffers, as `Backend::save_state` streams them |
//! | 4 | CRC32C of all the bytes above |
//!
//! Format 1 (hyzo 0.1): magic, format 1, `body size ^ 0x5a5a5a5a` as u32, fingerprint,
//! step, updates, skipped, body; no checksum. Its body is format 2's for an optimizer without
//! a first-order rule, so such an optimizer loads it.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;

use crate::config::{Config, StateSet};
use crate::error::{invalid, Error, Result};

const MAGIC: &[u8; 8] = b"HYZOSTAT";
const FORMAT: u32 = 2;
const HEADER: usize = 64;
const TRAILER: usize = 4;
const V1_HEADER: usize = 48;

/// The counters an optimizer carries between steps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Counters {
    /// Steps taken, of either kind, skipped ones included.
    pub step: u64,
    /// Updates of each [`StateSet`] (the rules' `t`).
    pub updates: [u64; 2],
    /// Steps skipped (host-side ones, in a live optimizer).
    pub skipped: u64,
}

impl Counters {
    /// Refuses counters that no run produces (a hand-edited or corrupted state that passed
    /// the checksum): they would overflow `t` or the step counter.
    fn validate(self) -> Result<Self> {
        let [main, fo] = self.updates;
        let applied = main
            .checked_add(fo)
            .and_then(|u| u.checked_add(self.skipped));
        if self.step >= 1 << 62 || applied.map_or(true, |a| a > self.step) {
            return invalid(format!(
                "state: inconsistent counters (step {}, updates {main} + {fo}, skipped {})",
                self.step, self.skipped
            ));
        }
        Ok(self)
    }
}

/// What [`check`] found in a saved state.
#[derive(Debug)]
pub(crate) struct Checked {
    pub counters: Counters,
    /// Where the body starts.
    pub body_start: usize,
}

/// FNV-1a over what fixes the state's layout and meaning (not the learning rates or
/// decays, which schedulers change). Unchanged from format 1 for optimizers without a
/// first-order rule, so their format-1 states keep loading.
pub(crate) fn fingerprint(config: &Config, shard: &crate::shard::ParamShard) -> u64 {
    let tensors = shard.tensors();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |v: u64| {
        for b in v.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    };
    eat(config.rule as u64);
    eat(config.precision as u64);
    eat(config.direction as u64);
    eat(config.estimator as u64);
    eat(config.num_directions as u64);
    eat(config.seed);
    eat(config.fo_steps as u64);
    eat(config.zo_steps as u64);
    for t in tensors {
        eat(t.dtype as u64);
        eat(t.numel);
        eat(t.offset);
    }
    if let Some(rule) = config.fo_rule {
        eat(u64::from_le_bytes(*b"fo_rule\0"));
        eat(rule as u64);
    }
    // Low-rank directions depend on the rank and the shapes (spec §7).
    if config.direction == crate::direction::DirectionKind::LowRank {
        eat(config.rank as u64);
        for (i, s) in shard.lowrank_tensors() {
            eat(i as u64);
            eat(s.rows);
            eat(s.cols);
        }
    }
    h
}

/// Size of a saved state whose body has `body` bytes.
pub(crate) fn saved_size(body: u64) -> u64 {
    HEADER as u64 + body + TRAILER as u64
}

/// An empty buffer with room for `size` bytes, or an out-of-memory error.
pub(crate) fn buffer(size: u64) -> Result<Vec<u8>> {
    let mut v = Vec::new();
    usize::try_from(size)
        .ok()
        .and_then(|n| v.try_reserve_exact(n).ok())
        .ok_or_else(|| Error::OutOfMemory(format!("state buffer of {size} bytes")))?;
    Ok(v)
}

pub(crate) fn io_error(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::Io(format!("{what}: {}: {e}", path.display()))
}

/// A writer that feeds the CRC of everything written through it.
struct Crc<W> {
    inner: W,
    crc: u32,
}

impl<W: Write> Crc<W> {
    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.crc = crc32c::crc32c_append(self.crc, bytes);
        self.inner
            .write_all(bytes)
            .map_err(|e| Error::Io(format!("save_state: {e}")))
    }
}

/// Writes a state: header, the body that `body` streams (exactly `body_bytes` bytes), CRC.
pub(crate) fn write(
    out: &mut dyn Write,
    fingerprint: u64,
    counters: Counters,
    body_bytes: u64,
    body: &mut dyn FnMut(&mut crate::backend::StateSink) -> Result<()>,
) -> Result<()> {
    let mut w = Crc { inner: out, crc: 0 };
    let mut header = Vec::with_capacity(HEADER);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&FORMAT.to_le_bytes());
    header.extend_from_slice(&(HEADER as u32).to_le_bytes());
    for v in [
        fingerprint,
        counters.step,
        counters.updates[StateSet::Main as usize],
        counters.updates[StateSet::FirstOrder as usize],
        counters.skipped,
        body_bytes,
    ] {
        header.extend_from_slice(&v.to_le_bytes());
    }
    w.put(&header)?;
    let mut written = 0u64;
    body(&mut |bytes: &[u8]| {
        written += bytes.len() as u64;
        w.put(bytes)
    })?;
    if written != body_bytes {
        return Err(Error::Internal(format!(
            "save_state: the backend wrote {written} bytes of {body_bytes}"
        )));
    }
    let crc = w.crc.to_le_bytes();
    w.put(&crc)?;
    w.inner
        .flush()
        .map_err(|e| Error::Io(format!("save_state: {e}")))
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(b[i..i + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i..i + 8].try_into().unwrap())
}

/// The parsed header of a state whose total length is `len`.
struct Header {
    format: u32,
    counters: Counters,
    fingerprint: u64,
    body_start: usize,
    body: u64,
}

/// Parses the header (at least [`V1_HEADER`] bytes; [`HEADER`] for format 2).
fn parse_header(head: &[u8], len: u64) -> Result<Header> {
    if head.len() < 16 || &head[..8] != MAGIC {
        return invalid("state: not a hyzo optimizer state (no HYZOSTAT magic)");
    }
    match u32_at(head, 8) {
        1 => {
            if head.len() < V1_HEADER {
                return invalid(format!("state: truncated ({len} bytes)"));
            }
            Ok(Header {
                format: 1,
                fingerprint: u64_at(head, 16),
                counters: Counters {
                    step: u64_at(head, 24),
                    updates: [u64_at(head, 32), 0],
                    skipped: u64_at(head, 40),
                },
                body_start: V1_HEADER,
                body: (u32_at(head, 12) ^ 0x5a5a_5a5a) as u64,
            })
        }
        2 => {
            if head.len() < HEADER || u32_at(head, 12) as usize != HEADER {
                return invalid(format!("state: truncated or damaged header ({len} bytes)"));
            }
            Ok(Header {
                format: 2,
                fingerprint: u64_at(head, 16),
                counters: Counters {
                    step: u64_at(head, 24),
                    updates: [u64_at(head, 32), u64_at(head, 40)],
                    skipped: u64_at(head, 48),
                },
                body_start: HEADER,
                body: u64_at(head, 56),
            })
        }
        v => invalid(format!(
            "state: format version {v}; this hyzo ({}) reads formats 1 and {FORMAT}",
            crate::VERSION
        )),
    }
}

/// Everything but the checksum: size, format, fingerprint, counters.
fn check_header(
    h: &Header,
    len: u64,
    fingerprint: u64,
    body: u64,
    has_fo_rule: bool,
) -> Result<Checked> {
    if h.format == 1 && has_fo_rule {
        return invalid(
            "state: format 1 (hyzo 0.1) kept one state shared by first- and zeroth-order \
             steps; this optimizer has a first-order rule with its own state (spec v2 §5). \
             Load it into an optimizer without fo_rule",
        );
    }
    let trailer = if h.format == 1 { 0 } else { TRAILER as u64 };
    let expected = h.body_start as u64 + body + trailer;
    if h.body != body || len != expected {
        return invalid(format!(
            "state: {len} bytes with a body of {}; this optimizer's state has {expected} bytes \
             (truncated, or saved by an optimizer with other tensors or rules)",
            h.body
        ));
    }
    if h.fingerprint != fingerprint {
        return invalid(
            "state: saved by an optimizer of another configuration (rule, fo_rule, \
             precision, directions, seed, schedule) or other tensors",
        );
    }
    Ok(Checked {
        counters: h.counters.validate()?,
        body_start: h.body_start,
    })
}

fn checksum_error() -> Error {
    Error::InvalidArgument("state: checksum mismatch (the state is corrupted)".into())
}

/// Checks a state in memory against the optimizer that would load it.
pub(crate) fn check(
    bytes: &[u8],
    fingerprint: u64,
    body: u64,
    has_fo_rule: bool,
) -> Result<Checked> {
    let h = parse_header(bytes, bytes.len() as u64)?;
    let checked = check_header(&h, bytes.len() as u64, fingerprint, body, has_fo_rule)?;
    if h.format == 2 {
        let (data, crc) = bytes.split_at(bytes.len() - TRAILER);
        if crc32c::crc32c(data) != u32_at(crc, 0) {
            return Err(checksum_error());
        }
    }
    Ok(checked)
}

/// [`check`] for a file, read once through (the body is not kept).
pub(crate) fn check_file(
    path: &Path,
    fingerprint: u64,
    body: u64,
    has_fo_rule: bool,
) -> Result<Checked> {
    let file = File::open(path).map_err(|e| io_error("load_state", path, e))?;
    let len = file
        .metadata()
        .map_err(|e| io_error("load_state", path, e))?
        .len();
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut head = vec![0u8; HEADER.min(len as usize)];
    r.read_exact(&mut head)
        .map_err(|e| io_error("load_state", path, e))?;
    let h = parse_header(&head, len)?;
    let checked = check_header(&h, len, fingerprint, body, has_fo_rule)?;
    if h.format == 2 {
        let mut crc = crc32c::crc32c(&head);
        let mut left = len - (HEADER + TRAILER) as u64;
        let mut buf = vec![0u8; 1 << 20];
        while left > 0 {
            let n = (buf.len() as u64).min(left) as usize;
            r.read_exact(&mut buf[..n])
                .map_err(|e| io_error("load_state", path, e))?;
            crc = crc32c::crc32c_append(crc, &buf[..n]);
            left -= n as u64;
        }
        let mut stored = [0u8; 4];
        r.read_exact(&mut stored)
            .map_err(|e| io_error("load_state", path, e))?;
        if crc != u32::from_le_bytes(stored) {
            return Err(checksum_error());
        }
    }
    Ok(checked)
}

/// A buffered reader of `path` positioned at the body.
pub(crate) fn open_body(path: &Path, body_start: usize) -> Result<impl Read> {
    let mut file = File::open(path).map_err(|e| io_error("load_state", path, e))?;
    file.seek(SeekFrom::Start(body_start as u64))
        .map_err(|e| io_error("load_state", path, e))?;
    Ok(BufReader::with_capacity(1 << 20, file))
}

/// Runs `write` on a temporary file beside `path`, then renames it over `path`; on any
/// failure the temporary file is removed and `path` is left as it was.
pub(crate) fn write_file_atomically(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> Result<()>,
) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    let result = (|| {
        let file = File::create(&tmp).map_err(|e| io_error("save_state", &tmp, e))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        write(&mut out)?;
        let file = out
            .into_inner()
            .map_err(|e| io_error("save_state", &tmp, e.into_error()))?;
        file.sync_all()
            .map_err(|e| io_error("save_state", &tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| io_error("save_state", path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saved(body: &[u8], counters: Counters) -> Vec<u8> {
        let mut out = Vec::new();
        write(&mut out, 42, counters, body.len() as u64, &mut |sink| {
            for part in body.chunks(3) {
                sink(part)?;
            }
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn round_trip_and_every_single_bit_flip_is_refused() {
        let body: Vec<u8> = (0..40u8).collect();
        let counters = Counters {
            step: 9,
            updates: [4, 3],
            skipped: 2,
        };
        let s = saved(&body, counters);
        assert_eq!(s.len() as u64, saved_size(body.len() as u64));
        let c = check(&s, 42, body.len() as u64, true).unwrap();
        assert_eq!(c.counters, counters);
        assert_eq!(&s[c.body_start..c.body_start + body.len()], &body[..]);
        for bit in 0..8 * s.len() {
            let mut bad = s.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(
                check(&bad, 42, body.len() as u64, true).is_err(),
                "bit {bit}"
            );
        }
    }

    #[test]
    fn impossible_counters_are_refused() {
        let body = [0u8; 8];
        let s = saved(
            &body,
            Counters {
                step: 3,
                updates: [u64::MAX, 0],
                skipped: 0,
            },
        );
        let e = check(&s, 42, 8, false).unwrap_err();
        assert!(e.message().contains("inconsistent counters"), "{e}");
    }
}
