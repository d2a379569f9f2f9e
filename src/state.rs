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
//! A state is checked whole (header, size, checksum, values) before anything is loaded; a
//! file is read once into memory for that ([`read_file`]) and written to a temporary file
//! renamed over the target ([`write_file_atomically`]).
//!
//! Format 1 (hyzo 0.1): magic, format 1, `body size ^ 0x5a5a5a5a` as u32, fingerprint,
//! step, updates, skipped, body; no checksum. Its body is format 2's for an optimizer without
//! a first-order rule, so such an optimizer loads it.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::Path;

use crate::config::{Config, StateSet};
use crate::dtype::DType;
use crate::error::{invalid, Error, Result};
use crate::rules::Rule;
use crate::shard::TensorSpec;

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

/// What a state's body holds, for [`check`] to refuse values no run produces: for each
/// tensor, the buffers of each rule (`m`, then `v`; see [`Rule::state_buffers`]), then `lo`
/// (bf16) where kept.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BodyLayout<'t> {
    pub tensors: &'t [TensorSpec],
    /// The rule of each [`StateSet`], `None` for a set the optimizer does not keep.
    pub rules: [Option<Rule>; 2],
    /// Whether f16/bf16 tensors keep a `lo` (compensated precision).
    pub residual: bool,
}

/// Refuses a body holding a value no run writes: a moment or a residual that is not finite
/// (it would make its parameter NaN at the next update), or a negative second moment
/// (AdamW's and AdaZO's `v` are averages of squares; `sqrt(v)` of a negative one is NaN).
fn check_body(body: &[u8], layout: &BodyLayout) -> Result<()> {
    let mut at = 0;
    let mut next = |bytes: usize| {
        let part = body.get(at..at + bytes);
        at += bytes;
        part.ok_or_else(|| Error::Internal("state: body shorter than its layout".into()))
    };
    for (i, t) in layout.tensors.iter().enumerate() {
        let n = t.numel as usize;
        for (set, rule) in layout.rules.iter().enumerate() {
            let Some(rule) = rule else { continue };
            for k in 0..rule.state_buffers() {
                let second = k == 1 && rule.keeps_second_moment();
                let values = next(4 * n)?.chunks_exact(4);
                for (e, b) in values.enumerate() {
                    let x = f32::from_le_bytes(b.try_into().unwrap());
                    if !x.is_finite() || (second && x < 0.0) {
                        let which = if set == StateSet::Main as usize {
                            "rule"
                        } else {
                            "first-order rule"
                        };
                        let (what, never) = if second {
                            ("second moment v", "non-finite or negative")
                        } else {
                            ("first moment m", "non-finite")
                        };
                        return invalid(format!(
                            "state: tensor {i}'s {what} (of the {which}, {rule:?}) holds {x} at \
                             element {e}: no run writes a {never} one"
                        ));
                    }
                }
            }
        }
        if layout.residual && t.dtype != DType::F32 {
            for (e, b) in next(2 * n)?.chunks_exact(2).enumerate() {
                let lo = half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]]));
                if !lo.is_finite() {
                    return invalid(format!(
                        "state: tensor {i}'s compensation residual lo holds {lo} at element \
                         {e}: no run writes a non-finite one"
                    ));
                }
            }
        }
    }
    if at != body.len() {
        return Err(Error::Internal(format!(
            "state: a body of {} bytes for a layout of {at}",
            body.len()
        )));
    }
    Ok(())
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

fn io_error(what: &str, path: &Path, e: std::io::Error) -> Error {
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

/// Checks a state in memory against the optimizer that would load it: header, size,
/// checksum, then the values of the body ([`BodyLayout`]).
pub(crate) fn check(
    bytes: &[u8],
    fingerprint: u64,
    body: u64,
    has_fo_rule: bool,
    layout: &BodyLayout,
) -> Result<Checked> {
    let h = parse_header(bytes, bytes.len() as u64)?;
    let checked = check_header(&h, bytes.len() as u64, fingerprint, body, has_fo_rule)?;
    if h.format == 2 {
        let (data, crc) = bytes.split_at(bytes.len() - TRAILER);
        if crc32c::crc32c(data) != u32_at(crc, 0) {
            return Err(checksum_error());
        }
    }
    check_body(
        &bytes[checked.body_start..checked.body_start + body as usize],
        layout,
    )?;
    Ok(checked)
}

/// Opens `path` for reading if it is a regular file. The open does not wait (a FIFO opened
/// for reading would block until a writer came); what it opened is then checked, not the
/// path, so nothing can be swapped in between.
fn open_regular(path: &Path) -> Result<File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NONBLOCK);
    let file = options
        .open(path)
        .map_err(|e| io_error("load_state", path, e))?;
    let kind = file
        .metadata()
        .map_err(|e| io_error("load_state", path, e))?
        .file_type();
    if !kind.is_file() {
        return Err(Error::Io(format!(
            "load_state: {}: not a regular file (a FIFO, device or directory is refused)",
            path.display()
        )));
    }
    Ok(file)
}

/// Reads the state file `path` once, whole, into memory, so that what is checked is what is
/// loaded (a file replaced, truncated or rewritten meanwhile cannot mix two states or half
/// apply one). `limit` is the size of the loading optimizer's state: a larger file cannot be
/// one, and is refused before anything is read or allocated.
pub(crate) fn read_file(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let mut file = open_regular(path)?;
    let len = file
        .metadata()
        .map_err(|e| io_error("load_state", path, e))?
        .len();
    if len > limit {
        return invalid(format!(
            "state: {}: {len} bytes; this optimizer's state has {limit} (saved by an \
             optimizer with other tensors or rules)",
            path.display()
        ));
    }
    let mut bytes = buffer(len)?;
    bytes.resize(len as usize, 0);
    let changed = || {
        Error::Io(format!(
            "load_state: {}: the file changed while it was read (nothing was loaded)",
            path.display()
        ))
    };
    file.read_exact(&mut bytes).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => changed(),
        _ => io_error("load_state", path, e),
    })?;
    let mut more = [0u8; 1];
    match file.read(&mut more) {
        Ok(0) => Ok(bytes),
        Ok(_) => Err(changed()),
        Err(e) => Err(io_error("load_state", path, e)),
    }
}

/// Runs `write` on a new temporary file beside `path`, then renames it over `path`, durably
/// (the file and then its directory are synced), as checkpoints are written. The temporary
/// file has a unique name and is created exclusively, so that it never is, or follows, a
/// link planted there, and concurrent savers to one path (of any process) each write their
/// own. On any failure it is removed and `path` is left as it was.
pub(crate) fn write_file_atomically(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> Result<()>,
) -> Result<()> {
    let Some(name) = path.file_name() else {
        return invalid(format!("path: {} names no file", path.display()));
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(name);
    prefix.push(".");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".tmp");
    // The mode `File::create` gives (the umask applies), not the temporary file's 0600.
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    let tmp = builder
        .tempfile_in(dir)
        .map_err(|e| io_error("save_state", path, e))?;
    let mut out = BufWriter::with_capacity(1 << 20, tmp.as_file());
    write(&mut out)?;
    out.flush()
        .map_err(|e| io_error("save_state", tmp.path(), e))?;
    drop(out);
    tmp.as_file()
        .sync_all()
        .map_err(|e| io_error("save_state", tmp.path(), e))?;
    tmp.persist(path)
        .map_err(|e| io_error("save_state", path, e.error))?;
    // The rename is durable once the directory is.
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error("save_state", dir, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout of a body of raw bytes: one f32 tensor with one momentum buffer.
    fn layout(tensors: &[TensorSpec]) -> BodyLayout<'_> {
        BodyLayout {
            tensors,
            rules: [Some(Rule::Momentum), None],
            residual: false,
        }
    }

    fn tensor(bytes: usize) -> [TensorSpec; 1] {
        [TensorSpec {
            data: 0,
            dtype: DType::F32,
            numel: bytes as u64 / 4,
            offset: 0,
            grad: 0,
            grad_dtype: DType::F32,
        }]
    }

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
        let t = tensor(body.len());
        let c = check(&s, 42, body.len() as u64, true, &layout(&t)).unwrap();
        assert_eq!(c.counters, counters);
        assert_eq!(&s[c.body_start..c.body_start + body.len()], &body[..]);
        for bit in 0..8 * s.len() {
            let mut bad = s.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(
                check(&bad, 42, body.len() as u64, true, &layout(&t)).is_err(),
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
        let e = check(&s, 42, 8, false, &layout(&tensor(8))).unwrap_err();
        assert!(e.message().contains("inconsistent counters"), "{e}");
    }
}
