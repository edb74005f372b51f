//! CAR v1 (<https://ipld.io/specs/transport/car/carv1/>), streaming.
//!
//! A CAR is `varint(len) ‖ header` followed by sections
//! `varint(len) ‖ CID bytes ‖ block bytes`, where the header is the DAG-CBOR
//! map `{"roots": [CID..], "version": 1}` and each varint is an unsigned
//! LEB128 length of what follows it.
//!
//! Nothing here holds a whole CAR. [`CarDecoder`] is sans-io: callers push
//! bytes as they arrive (from an async body, say) and pull the header and
//! blocks out. It never allocates from a length it has read: a declared
//! length is checked against the limits before anything waits for the bytes,
//! and only bytes actually pushed are buffered. [`CarReader`] drives it from
//! a blocking [`Read`]; [`CarWriter`] writes to a [`Write`].

use std::io::{self, Read, Write};
use std::ops::Range;

use cid::{Cid, Version};
use ipld_core::ipld::Ipld;

use super::data::{self, DAG_CBOR, RAW, SHA2_256};

/// Default limit on the encoded header (about 1,700 roots).
pub const DEFAULT_MAX_HEADER_SIZE: usize = 64 * 1024;
/// Default limit on one block's data (the CID is allowed on top).
pub const DEFAULT_MAX_BLOCK_SIZE: usize = 2 * 1024 * 1024;
/// Longest binary CID whose digest fits in 64 bytes: version, codec and hash
/// code varints (at most 9 bytes each), digest-length varint (at most 2),
/// digest.
const MAX_CID_LEN: usize = 9 + 9 + 9 + 2 + 64;
/// Multiformats varints carry at most 63 bits, so at most 9 bytes.
const MAX_VARINT_LEN: usize = 9;
/// How much [`CarReader`] asks its reader for at a time.
const READ_CHUNK: usize = 64 * 1024;

/// One decoded section: the block's CID and its bytes.
pub type Block = (Cid, Vec<u8>);

/// The decoded CAR header. `roots` may be empty: the atproto reference
/// implementation writes rootless CARs (e.g. for `getBlocks`), and the
/// CARv1 maintainers advise new readers to accept them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CarHeader {
    pub roots: Vec<Cid>,
    pub version: u64,
}

/// Limits and checks for decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CarOptions {
    /// Largest accepted header, in bytes.
    pub max_header_size: usize,
    /// Largest accepted block data, in bytes (excluding its CID).
    pub max_block_size: usize,
    /// Recompute each block's CID from its bytes and reject mismatches.
    /// Only atproto's CIDs can be checked (CIDv1, sha2-256, dag-cbor or
    /// raw); any other CID is an error while this is on. On by default:
    /// blocks from a CAR are untrusted until their hash is checked.
    pub verify: bool,
}

impl Default for CarOptions {
    fn default() -> Self {
        Self {
            max_header_size: DEFAULT_MAX_HEADER_SIZE,
            max_block_size: DEFAULT_MAX_BLOCK_SIZE,
            verify: true,
        }
    }
}

/// Why a CAR could not be read. `offset` is the byte position in the CAR
/// of the section (or varint) at fault.
#[derive(Debug, thiserror::Error)]
pub enum CarError {
    #[error("I/O error reading CAR: {0}")]
    Io(#[from] io::Error),
    #[error("at byte {offset}: invalid length varint: {reason}")]
    Varint { offset: u64, reason: &'static str },
    #[error("CAR header is {len} bytes, more than the limit of {max}")]
    HeaderTooLarge { len: u64, max: usize },
    #[error("at byte {offset}: block of {len} bytes exceeds the limit of {max} bytes")]
    BlockTooLarge { offset: u64, len: u64, max: usize },
    #[error("invalid CAR header: {0}")]
    InvalidHeader(String),
    #[error("unsupported CAR version {0}: only version 1 is supported")]
    UnsupportedVersion(i128),
    #[error("at byte {offset}: empty section (a section must start with a CID)")]
    EmptySection { offset: u64 },
    #[error("at byte {offset}: invalid block CID: {reason}")]
    InvalidCid { offset: u64, reason: String },
    #[error("block {cid} cannot be verified: {reason}")]
    UnverifiableCid { cid: Box<Cid>, reason: &'static str },
    #[error("block bytes hash to {actual}, not to their CID {expected}")]
    CidMismatch { expected: Box<Cid>, actual: Box<Cid> },
    #[error("CAR ends with {remaining} bytes of an incomplete section")]
    Truncated { remaining: usize },
    #[error("CAR ended before its header")]
    MissingHeader,
    #[error("CAR decoder misuse: {0}")]
    Misuse(&'static str),
    #[error("CAR decoder already failed; it cannot continue")]
    Failed,
}

// ---------------------------------------------------------------------------
// Encoding

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// A CBOR head (major type + argument) in its shortest form, as DAG-CBOR
/// requires.
fn put_cbor_head(out: &mut Vec<u8>, major: u8, n: u64) {
    let m = major << 5;
    if n < 24 {
        out.push(m | n as u8);
    } else if n <= u64::from(u8::MAX) {
        out.extend_from_slice(&[m | 24, n as u8]);
    } else if n <= u64::from(u16::MAX) {
        out.push(m | 25);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else if n <= u64::from(u32::MAX) {
        out.push(m | 26);
        out.extend_from_slice(&(n as u32).to_be_bytes());
    } else {
        out.push(m | 27);
        out.extend_from_slice(&n.to_be_bytes());
    }
}

/// The length-prefixed header `{"roots": [..], "version": 1}`.
///
/// Written by hand so it cannot fail: the shape is fixed, and canonical
/// DAG-CBOR puts `roots` (5 bytes) before `version` (7 bytes). A test checks
/// it against the general encoder.
pub fn encode_header(roots: &[Cid]) -> Vec<u8> {
    let mut cbor = Vec::with_capacity(24 + roots.len() * 42);
    put_cbor_head(&mut cbor, 5, 2);
    put_cbor_head(&mut cbor, 3, 5);
    cbor.extend_from_slice(b"roots");
    put_cbor_head(&mut cbor, 4, roots.len() as u64);
    for root in roots {
        let bytes = root.to_bytes();
        cbor.extend_from_slice(&[0xd8, 42]); // tag 42: CID
        // Binary CIDs in DAG-CBOR carry the 0x00 "identity" multibase prefix.
        put_cbor_head(&mut cbor, 2, bytes.len() as u64 + 1);
        cbor.push(0x00);
        cbor.extend_from_slice(&bytes);
    }
    put_cbor_head(&mut cbor, 3, 7);
    cbor.extend_from_slice(b"version");
    put_cbor_head(&mut cbor, 0, 1);

    let mut out = Vec::with_capacity(cbor.len() + MAX_VARINT_LEN);
    put_varint(&mut out, cbor.len() as u64);
    out.extend_from_slice(&cbor);
    out
}

fn section_head(cid: &Cid, data_len: usize) -> Vec<u8> {
    let cid_bytes = cid.to_bytes();
    let mut out = Vec::with_capacity(MAX_VARINT_LEN + cid_bytes.len());
    put_varint(&mut out, (cid_bytes.len() + data_len) as u64);
    out.extend_from_slice(&cid_bytes);
    out
}

/// One section: `varint(len(cid) + len(data)) ‖ cid ‖ data`.
pub fn encode_block(cid: &Cid, data: &[u8]) -> Vec<u8> {
    let mut out = section_head(cid, data.len());
    out.extend_from_slice(data);
    out
}

/// Writes a CAR to `W` one block at a time. It does not check that blocks
/// match their CIDs; callers write blocks they produced or already checked.
#[derive(Debug)]
pub struct CarWriter<W: Write> {
    inner: W,
}

impl<W: Write> CarWriter<W> {
    /// Writes the header.
    ///
    /// # Errors
    /// The writer's error.
    pub fn new(mut inner: W, roots: &[Cid]) -> io::Result<Self> {
        inner.write_all(&encode_header(roots))?;
        Ok(Self { inner })
    }

    /// Appends one section.
    ///
    /// # Errors
    /// The writer's error.
    pub fn write_block(&mut self, cid: &Cid, data: &[u8]) -> io::Result<()> {
        // Head and data written separately so large blocks are not copied.
        self.inner.write_all(&section_head(cid, data.len()))?;
        self.inner.write_all(data)
    }

    /// Flushes and returns the writer. (It returns a `Result` because a
    /// buffered writer's last bytes only fail to arrive at the flush.)
    ///
    /// # Errors
    /// The writer's flush error.
    pub fn finish(mut self) -> io::Result<W> {
        self.inner.flush()?;
        Ok(self.inner)
    }
}

// ---------------------------------------------------------------------------
// Verification

/// Checks that `data` hashes to `cid`.
///
/// # Errors
/// [`CarError::UnverifiableCid`] for a CID that is not CIDv1 / sha2-256 /
/// dag-cbor or raw, [`CarError::CidMismatch`] when the hash differs.
pub fn verify_block(cid: &Cid, data: &[u8]) -> Result<(), CarError> {
    let unverifiable = |reason| Err(CarError::UnverifiableCid { cid: Box::new(*cid), reason });
    if cid.version() != Version::V1 {
        return unverifiable("not a CIDv1");
    }
    if cid.hash().code() != SHA2_256 || cid.hash().size() != 32 {
        return unverifiable("hash is not sha2-256");
    }
    let actual = match cid.codec() {
        DAG_CBOR => data::cid_for_cbor(data),
        RAW => data::cid_for_raw(data),
        _ => return unverifiable("codec is neither dag-cbor nor raw"),
    };
    if actual != *cid {
        return Err(CarError::CidMismatch { expected: Box::new(*cid), actual: Box::new(actual) });
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Decoding

enum Varint {
    Value(u64, usize),
    Incomplete,
    Invalid(&'static str),
}

fn read_varint(bytes: &[u8]) -> Varint {
    let mut value = 0u64;
    for (i, &b) in bytes.iter().enumerate().take(MAX_VARINT_LEN) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            // The varint spec requires minimal encoding: no trailing 0x00.
            if b == 0 && i > 0 {
                return Varint::Invalid("not minimally encoded");
            }
            return Varint::Value(value, i + 1);
        }
    }
    if bytes.len() >= MAX_VARINT_LEN { Varint::Invalid("longer than 9 bytes") } else { Varint::Incomplete }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Header,
    Blocks,
    Failed,
}

#[derive(Clone, Copy)]
enum Frame {
    Header,
    Block,
}

/// Incremental, sans-io CAR decoder.
///
/// Push bytes with [`push`](Self::push); call [`next_header`](Self::next_header)
/// once, then [`next_block`](Self::next_block) until it returns `Ok(None)`
/// (more input needed) before pushing more, so the buffer holds at most one
/// section plus the last push. At end of input call [`finish`](Self::finish).
/// After any error the decoder is spent and returns [`CarError::Failed`].
#[derive(Debug)]
pub struct CarDecoder {
    opts: CarOptions,
    buf: Vec<u8>,
    /// Start of the unconsumed bytes in `buf`.
    pos: usize,
    /// Position in the CAR of `buf[pos]`, for error messages.
    offset: u64,
    state: State,
}

impl Default for CarDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl CarDecoder {
    /// A decoder with [`CarOptions::default`] (limits on, verification on).
    pub fn new() -> Self {
        Self::with_options(CarOptions::default())
    }

    pub fn with_options(opts: CarOptions) -> Self {
        Self { opts, buf: Vec::new(), pos: 0, offset: 0, state: State::Header }
    }

    /// Appends input.
    pub fn push(&mut self, bytes: &[u8]) {
        // Drop consumed bytes once they are at least half the buffer: each
        // byte is then moved O(1) times on average, even when input arrives
        // one byte at a time.
        if self.pos > 0 && self.pos >= self.buf.len() - self.pos {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes pushed but not yet consumed.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The header, once enough input has arrived.
    ///
    /// # Errors
    /// Malformed or oversized header, version other than 1, or calling it
    /// again after it returned the header.
    pub fn next_header(&mut self) -> Result<Option<CarHeader>, CarError> {
        match self.state {
            State::Header => {}
            State::Blocks => return Err(CarError::Misuse("the header was already read")),
            State::Failed => return Err(CarError::Failed),
        }
        let result = self.take_frame(Frame::Header).and_then(|frame| match frame {
            None => Ok(None),
            Some((_, range)) => parse_header(&self.buf[range]).map(Some),
        });
        match result {
            Ok(Some(header)) => {
                self.state = State::Blocks;
                Ok(Some(header))
            }
            other => self.fail_on_err(other),
        }
    }

    /// The next block, once all its bytes have arrived.
    ///
    /// # Errors
    /// Malformed or oversized section, invalid CID, failed verification, or
    /// calling it before the header was read.
    pub fn next_block(&mut self) -> Result<Option<Block>, CarError> {
        match self.state {
            State::Blocks => {}
            State::Header => {
                return Err(CarError::Misuse("next_header must return the header first"));
            }
            State::Failed => return Err(CarError::Failed),
        }
        let result = self.take_frame(Frame::Block).and_then(|frame| match frame {
            None => Ok(None),
            Some((offset, range)) => self.parse_section(offset, range).map(Some),
        });
        self.fail_on_err(result)
    }

    /// Checks that input ended cleanly: the header was read and no partial
    /// section is left.
    ///
    /// # Errors
    /// [`CarError::MissingHeader`] or [`CarError::Truncated`].
    pub fn finish(&self) -> Result<(), CarError> {
        let remaining = self.buffered();
        match self.state {
            State::Failed => Err(CarError::Failed),
            State::Header if remaining == 0 => Err(CarError::MissingHeader),
            _ if remaining > 0 => Err(CarError::Truncated { remaining }),
            _ => Ok(()),
        }
    }

    fn fail_on_err<T>(&mut self, result: Result<T, CarError>) -> Result<T, CarError> {
        if result.is_err() {
            self.state = State::Failed;
        }
        result
    }

    /// Consumes one complete length-prefixed frame, returning its offset in
    /// the CAR and its range in `buf`, or `None` if it has not all arrived.
    /// The declared length is checked as soon as the varint is complete.
    fn take_frame(&mut self, kind: Frame) -> Result<Option<(u64, Range<usize>)>, CarError> {
        let avail = &self.buf[self.pos..];
        let (len, varint_len) = match read_varint(avail) {
            Varint::Value(len, n) => (len, n),
            Varint::Incomplete => return Ok(None),
            Varint::Invalid(reason) => {
                return Err(CarError::Varint { offset: self.offset, reason });
            }
        };
        let max = match kind {
            Frame::Header => self.opts.max_header_size,
            Frame::Block => self.opts.max_block_size.saturating_add(MAX_CID_LEN),
        };
        if len > max as u64 {
            return Err(match kind {
                Frame::Header => CarError::HeaderTooLarge { len, max },
                Frame::Block => {
                    CarError::BlockTooLarge { offset: self.offset, len, max: self.opts.max_block_size }
                }
            });
        }
        let len = len as usize; // ≤ max, a usize
        if avail.len() - varint_len < len {
            return Ok(None);
        }
        let start = self.pos + varint_len;
        let offset = self.offset;
        self.pos = start + len;
        self.offset += (varint_len + len) as u64;
        Ok(Some((offset, start..start + len)))
    }

    fn parse_section(&self, offset: u64, range: Range<usize>) -> Result<Block, CarError> {
        let section = &self.buf[range];
        if section.is_empty() {
            return Err(CarError::EmptySection { offset });
        }
        let mut rest = section;
        let cid =
            Cid::read_bytes(&mut rest).map_err(|e| CarError::InvalidCid { offset, reason: e.to_string() })?;
        if rest.len() > self.opts.max_block_size {
            return Err(CarError::BlockTooLarge {
                offset,
                len: rest.len() as u64,
                max: self.opts.max_block_size,
            });
        }
        if self.opts.verify {
            verify_block(&cid, rest)?;
        }
        Ok((cid, rest.to_vec()))
    }
}

fn parse_header(bytes: &[u8]) -> Result<CarHeader, CarError> {
    let invalid = |msg: String| CarError::InvalidHeader(msg);
    let value: Ipld =
        serde_ipld_dagcbor::from_slice(bytes).map_err(|e| invalid(format!("not DAG-CBOR: {e}")))?;
    let Ipld::Map(map) = value else {
        return Err(invalid("not a map".into()));
    };
    // Version first, so a CARv2 pragma (`{"version": 2}`, no roots) is
    // reported as an unsupported version rather than a missing field.
    let version = match map.get("version") {
        Some(Ipld::Integer(1)) => 1,
        Some(Ipld::Integer(v)) => return Err(CarError::UnsupportedVersion(*v)),
        _ => return Err(invalid("version missing or not an integer".into())),
    };
    let Some(Ipld::List(items)) = map.get("roots") else {
        return Err(invalid("roots missing or not a list".into()));
    };
    let roots = items
        .iter()
        .map(|item| match item {
            Ipld::Link(cid) => Ok(*cid),
            _ => Err(invalid("roots must all be CID links".into())),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(CarHeader { roots, version })
}

/// Reads a CAR from a blocking reader, one block at a time.
///
/// Yields each block once its bytes are in; at end of input it checks that
/// nothing was left half-read. After an error it yields nothing more.
#[derive(Debug)]
pub struct CarReader<R: Read> {
    inner: R,
    decoder: CarDecoder,
    chunk: Vec<u8>,
    done: bool,
}

impl<R: Read> CarReader<R> {
    /// Reads the header with [`CarOptions::default`] (verification on).
    ///
    /// # Errors
    /// See [`CarDecoder::next_header`]; also I/O errors and input that ends
    /// before the header.
    pub fn new(inner: R) -> Result<(Self, CarHeader), CarError> {
        Self::with_options(inner, CarOptions::default())
    }

    /// Reads the header with the given options.
    ///
    /// # Errors
    /// As [`new`](Self::new).
    pub fn with_options(inner: R, opts: CarOptions) -> Result<(Self, CarHeader), CarError> {
        let mut this =
            Self { inner, decoder: CarDecoder::with_options(opts), chunk: vec![0; READ_CHUNK], done: false };
        loop {
            if let Some(header) = this.decoder.next_header()? {
                return Ok((this, header));
            }
            if !this.fill()? {
                return Err(match this.decoder.finish() {
                    Err(e) => e,
                    Ok(()) => CarError::MissingHeader,
                });
            }
        }
    }

    /// The underlying reader. Bytes it already handed over but that were
    /// not yet decoded are lost.
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// Pushes the next chunk into the decoder; `false` at end of input.
    fn fill(&mut self) -> Result<bool, CarError> {
        loop {
            match self.inner.read(&mut self.chunk) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.decoder.push(&self.chunk[..n]);
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn advance(&mut self) -> Result<Option<Block>, CarError> {
        loop {
            if let Some(block) = self.decoder.next_block()? {
                return Ok(Some(block));
            }
            if !self.fill()? {
                self.decoder.finish()?;
                return Ok(None);
            }
        }
    }
}

impl<R: Read> Iterator for CarReader<R> {
    type Item = Result<Block, CarError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let item = self.advance().transpose();
        if !matches!(item, Some(Ok(_))) {
            self.done = true;
        }
        item
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use std::path::{Path, PathBuf};

    const FIXTURE: &str = "atproto-fixtures/packages/repo/tests/car-file-fixtures.json";

    struct Fixture {
        root: Cid,
        blocks: Vec<Block>,
        car: Vec<u8>,
    }

    fn b64(s: &str) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD_NO_PAD.decode(s).expect("fixture base64")
    }

    fn cid(s: &str) -> Cid {
        Cid::try_from(s).expect("fixture CID")
    }

    fn fixtures() -> (PathBuf, Vec<Fixture>) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared").join(FIXTURE);
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let v: serde_json::Value = serde_json::from_str(&text).expect("fixture JSON");
        let cases = v
            .as_array()
            .expect("array")
            .iter()
            .map(|c| Fixture {
                root: cid(c["root"].as_str().expect("root")),
                blocks: c["blocks"]
                    .as_array()
                    .expect("blocks")
                    .iter()
                    .map(|b| (cid(b["cid"].as_str().expect("cid")), b64(b["bytes"].as_str().expect("bytes"))))
                    .collect(),
                car: b64(c["car"].as_str().expect("car")),
            })
            .collect();
        (path, cases)
    }

    fn report(path: &Path, total: usize, failures: &[String]) {
        assert!(total > 0, "{}: found {total} cases, expected some", path.display());
        eprintln!("{}: {total} cases", path.display());
        assert!(
            failures.is_empty(),
            "{}: {} of {total} cases failed:\n{}",
            path.display(),
            failures.len(),
            failures.join("\n")
        );
    }

    /// Feeds `chunks` in order and collects everything the decoder yields.
    fn decode_chunks<'a>(
        chunks: impl IntoIterator<Item = &'a [u8]>,
        opts: CarOptions,
    ) -> Result<(CarHeader, Vec<Block>), CarError> {
        let mut dec = CarDecoder::with_options(opts);
        let mut header = None;
        let mut blocks = Vec::new();
        for chunk in chunks {
            dec.push(chunk);
            if header.is_none() {
                header = dec.next_header()?;
            }
            if header.is_some() {
                while let Some(b) = dec.next_block()? {
                    blocks.push(b);
                }
            }
        }
        dec.finish()?;
        Ok((header.ok_or(CarError::MissingHeader)?, blocks))
    }

    #[test]
    fn fixture_writer_is_byte_identical() {
        let (path, cases) = fixtures();
        let mut failures = Vec::new();
        for (i, f) in cases.iter().enumerate() {
            let mut w = CarWriter::new(Vec::new(), &[f.root]).expect("header");
            for (c, data) in &f.blocks {
                w.write_block(c, data).expect("block");
            }
            let out = w.finish().expect("finish");
            if out != f.car {
                failures.push(format!(
                    "case {i}: writer output differs ({} vs {} bytes)",
                    out.len(),
                    f.car.len()
                ));
            }
            let mut joined = encode_header(&[f.root]);
            for (c, data) in &f.blocks {
                joined.extend(encode_block(c, data));
            }
            if joined != f.car {
                failures.push(format!("case {i}: encode_header/encode_block output differs"));
            }
        }
        report(&path, cases.len(), &failures);
    }

    #[test]
    fn fixture_reader_yields_root_and_blocks_in_order() {
        let (path, cases) = fixtures();
        let mut failures = Vec::new();
        for (i, f) in cases.iter().enumerate() {
            let result = CarReader::new(&f.car[..]).and_then(|(reader, header)| {
                let blocks = reader.collect::<Result<Vec<_>, _>>()?;
                Ok((header, blocks))
            });
            match result {
                Err(e) => failures.push(format!("case {i}: {e}")),
                Ok((header, blocks)) => {
                    if header != (CarHeader { roots: vec![f.root], version: 1 }) {
                        failures.push(format!("case {i}: header {header:?}"));
                    }
                    if blocks != f.blocks {
                        failures.push(format!(
                            "case {i}: blocks differ ({} read, {} expected)",
                            blocks.len(),
                            f.blocks.len()
                        ));
                    }
                    // Recompute every CID from its bytes (the reader did too).
                    for (c, data) in &blocks {
                        if data::cid_for_cbor(data) != *c {
                            failures.push(format!("case {i}: block {c} does not hash to its CID"));
                        }
                    }
                }
            }
        }
        report(&path, cases.len(), &failures);
    }

    #[test]
    fn byte_at_a_time_matches_all_at_once() {
        let (_, cases) = fixtures();
        let f = &cases[0];
        let whole = decode_chunks([&f.car[..]], CarOptions::default()).expect("whole");
        let bytewise = decode_chunks(f.car.chunks(1), CarOptions::default()).expect("bytewise");
        let odd = decode_chunks(f.car.chunks(7), CarOptions::default()).expect("chunks of 7");
        assert_eq!(whole, bytewise);
        assert_eq!(whole, odd);
        assert_eq!(whole.1, f.blocks);

        // The blocking reader over a reader that returns one byte per call.
        struct Trickle<'a>(&'a [u8]);
        impl Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let Some((&b, rest)) = self.0.split_first() else {
                    return Ok(0);
                };
                buf[0] = b;
                self.0 = rest;
                Ok(1)
            }
        }
        let (reader, header) = CarReader::new(Trickle(&f.car)).expect("header");
        assert_eq!(header.roots, vec![f.root]);
        assert_eq!(reader.collect::<Result<Vec<_>, _>>().expect("blocks"), f.blocks);
    }

    #[test]
    fn truncation_errors_unless_at_a_section_boundary() {
        let (_, cases) = fixtures();
        let f = &cases[0];
        let mut boundaries = vec![encode_header(&[f.root]).len()];
        for (c, data) in &f.blocks {
            boundaries.push(boundaries[boundaries.len() - 1] + encode_block(c, data).len());
        }
        assert_eq!(boundaries.last(), Some(&f.car.len()));
        let mut failures = Vec::new();
        for len in 0..f.car.len() {
            let result = decode_chunks([&f.car[..len]], CarOptions::default());
            let at_boundary = boundaries.contains(&len);
            match (&result, at_boundary) {
                (Ok(_), true) => {}
                (Err(CarError::Truncated { .. } | CarError::MissingHeader), false) => {}
                _ => failures.push(format!("prefix {len} (boundary: {at_boundary}): {result:?}")),
            }
            // Same through the blocking reader.
            let read = CarReader::new(&f.car[..len]).and_then(|(r, _)| r.collect::<Result<Vec<_>, _>>());
            if read.is_ok() != at_boundary {
                failures.push(format!("reader, prefix {len}: {read:?}"));
            }
        }
        assert!(
            failures.is_empty(),
            "{} of {} prefixes wrong:\n{}",
            failures.len(),
            f.car.len(),
            failures.join("\n")
        );
    }

    #[test]
    fn oversized_lengths_error_before_buffering() {
        let root = data::cid_for_cbor(b"r");
        // A block whose declared length exceeds the limit: rejected as soon
        // as the varint is in, with no data pushed at all.
        let mut car = encode_header(&[root]);
        put_varint(&mut car, (DEFAULT_MAX_BLOCK_SIZE + MAX_CID_LEN + 1) as u64);
        let mut dec = CarDecoder::new();
        dec.push(&car);
        assert!(dec.next_header().expect("header").is_some());
        assert!(matches!(dec.next_block(), Err(CarError::BlockTooLarge { .. })));
        assert!(dec.buf.capacity() < 4096, "buffered {} bytes", dec.buf.capacity());
        assert!(matches!(dec.next_block(), Err(CarError::Failed)));

        // A claimed 1 TiB section.
        let mut car = encode_header(&[root]);
        put_varint(&mut car, 1 << 40);
        assert!(matches!(
            decode_chunks([&car[..]], CarOptions::default()),
            Err(CarError::BlockTooLarge { .. })
        ));

        // Data over the limit while the whole section is within limit + CID.
        let opts = CarOptions { max_block_size: 10, ..CarOptions::default() };
        let mut car = encode_header(&[root]);
        car.extend(encode_block(&data::cid_for_raw(&[0; 11]), &[0; 11]));
        assert!(matches!(decode_chunks([&car[..]], opts), Err(CarError::BlockTooLarge { len: 11, .. })));
        let mut car = encode_header(&[root]);
        car.extend(encode_block(&data::cid_for_raw(&[0; 10]), &[0; 10]));
        assert!(decode_chunks([&car[..]], opts).is_ok());

        // Header limit.
        let mut car = Vec::new();
        put_varint(&mut car, (DEFAULT_MAX_HEADER_SIZE + 1) as u64);
        assert!(matches!(
            decode_chunks([&car[..]], CarOptions::default()),
            Err(CarError::HeaderTooLarge { .. })
        ));
    }

    #[test]
    fn malformed_cars_are_rejected() {
        let root = data::cid_for_cbor(b"r");
        let header = encode_header(&[root]);
        let with = |tail: &[u8]| [&header[..], tail].concat();
        let framed = |cbor: &[u8]| {
            let mut out = Vec::new();
            put_varint(&mut out, cbor.len() as u64);
            out.extend_from_slice(cbor);
            out
        };
        let carv2_pragma = [0x0a, 0xa1, 0x67, b'v', b'e', b'r', b's', b'i', b'o', b'n', 0x02];
        let dag_pb = Cid::new_v1(0x70, *data::cid_for_raw(b"x").hash());
        type Check = fn(&CarError) -> bool;
        let cases: Vec<(&str, Vec<u8>, Check)> = vec![
            ("empty input", vec![], |e| matches!(e, CarError::MissingHeader)),
            ("CARv2 pragma", carv2_pragma.to_vec(), |e| matches!(e, CarError::UnsupportedVersion(2))),
            ("header not a map", framed(&[0x01]), |e| matches!(e, CarError::InvalidHeader(_))),
            (
                "header without roots",
                framed(&[0xa1, 0x67, b'v', b'e', b'r', b's', b'i', b'o', b'n', 0x01]),
                |e| matches!(e, CarError::InvalidHeader(_)),
            ),
            ("empty header", framed(&[]), |e| matches!(e, CarError::InvalidHeader(_))),
            ("non-minimal varint", vec![0x80, 0x00], |e| matches!(e, CarError::Varint { .. })),
            ("overlong varint", vec![0xff; 10], |e| matches!(e, CarError::Varint { .. })),
            ("empty section", with(&[0x00]), |e| matches!(e, CarError::EmptySection { .. })),
            ("section shorter than its CID", with(&[0x03, 0x01, 0x71, 0x12]), |e| {
                matches!(e, CarError::InvalidCid { .. })
            }),
            (
                "tampered block",
                {
                    let mut car = with(&encode_block(&data::cid_for_cbor(&[0xa0]), &[0xa0]));
                    car.pop();
                    car.push(0xf6);
                    car
                },
                |e| matches!(e, CarError::CidMismatch { .. }),
            ),
            ("dag-pb block with verify on", with(&encode_block(&dag_pb, b"x")), |e| {
                matches!(e, CarError::UnverifiableCid { .. })
            }),
        ];
        let mut failures = Vec::new();
        for (name, bytes, want) in &cases {
            for (how, result) in [
                ("decoder", decode_chunks([&bytes[..]], CarOptions::default()).map(|_| ())),
                (
                    "reader",
                    CarReader::new(&bytes[..])
                        .and_then(|(r, _)| r.collect::<Result<Vec<_>, _>>())
                        .map(|_| ()),
                ),
            ] {
                match result {
                    Err(e) if want(&e) => {}
                    other => failures.push(format!("{name} ({how}): {other:?}")),
                }
            }
        }
        assert!(
            failures.is_empty(),
            "{} of {} cases wrong:\n{}",
            failures.len(),
            cases.len() * 2,
            failures.join("\n")
        );

        // Without verification the tampered and dag-pb blocks pass through.
        let no_verify = CarOptions { verify: false, ..CarOptions::default() };
        let block = with(&encode_block(&dag_pb, b"x"));
        assert_eq!(
            decode_chunks([&block[..]], no_verify).expect("unverified").1,
            vec![(dag_pb, b"x".to_vec())]
        );
    }

    #[test]
    fn header_encoding_matches_the_general_encoder() {
        let roots: Vec<Cid> = (0..30u8).map(|i| data::cid_for_cbor(&[i])).collect();
        for n in [0, 1, 2, 23, 24, 30] {
            let ipld = Ipld::Map(
                [
                    ("version".to_owned(), Ipld::Integer(1)),
                    ("roots".to_owned(), Ipld::List(roots[..n].iter().map(|c| Ipld::Link(*c)).collect())),
                ]
                .into(),
            );
            let cbor = data::encode_cbor(&ipld).expect("encode");
            let mut want = Vec::new();
            put_varint(&mut want, cbor.len() as u64);
            want.extend(cbor);
            assert_eq!(encode_header(&roots[..n]), want, "{n} roots");
            let (header, blocks) = decode_chunks([&want[..]], CarOptions::default()).expect("decode");
            assert_eq!(header, CarHeader { roots: roots[..n].to_vec(), version: 1 });
            assert!(blocks.is_empty());
        }
    }

    #[test]
    fn empty_block_and_varint_roundtrip() {
        // Zero-length data after the CID is a valid section.
        let empty = data::cid_for_raw(b"");
        let mut car = encode_header(&[]);
        car.extend(encode_block(&empty, b""));
        let (header, blocks) = decode_chunks([&car[..]], CarOptions::default()).expect("decode");
        assert!(header.roots.is_empty());
        assert_eq!(blocks, vec![(empty, Vec::new())]);

        for n in [0u64, 1, 127, 128, 300, 16_383, 16_384, u32::MAX.into(), (1 << 63) - 1] {
            let mut buf = Vec::new();
            put_varint(&mut buf, n);
            assert!(matches!(read_varint(&buf), Varint::Value(v, len) if v == n && len == buf.len()), "{n}");
            assert!(matches!(read_varint(&buf[..buf.len() - 1]), Varint::Incomplete), "{n}");
        }
    }

    #[test]
    fn decoder_misuse_is_reported() {
        let mut dec = CarDecoder::new();
        assert!(matches!(dec.next_block(), Err(CarError::Misuse(_))));
        dec.push(&encode_header(&[]));
        assert!(dec.next_header().expect("header").is_some());
        assert!(matches!(dec.next_header(), Err(CarError::Misuse(_))));
        assert!(dec.next_block().expect("no block yet").is_none());
        assert!(dec.finish().is_ok());
    }
}
