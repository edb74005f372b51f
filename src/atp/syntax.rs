//! Validated string types for atproto identifiers and string formats.
//!
//! Every type here can only be built through its validator, so holding one is
//! proof that the string is well formed. The rules follow atproto.com/specs and
//! are pinned down by the interop fixtures in `shared/interop/syntax`.
//! Pure code: no I/O and no clock reads (`TidClock` is handed the time).

use std::{fmt, str::FromStr, sync::LazyLock};

use regex::Regex;
use serde::{Deserialize, Serialize};
use time::{Date, Duration, Month, OffsetDateTime, PrimitiveDateTime, Time, UtcOffset};

/// Which string format failed validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SyntaxKind {
    Did,
    Handle,
    AtIdentifier,
    Nsid,
    RecordKey,
    Tid,
    AtUri,
    Datetime,
    Language,
    Cid,
    Uri,
}

impl fmt::Display for SyntaxKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Did => "DID",
            Self::Handle => "handle",
            Self::AtIdentifier => "at-identifier",
            Self::Nsid => "NSID",
            Self::RecordKey => "record key",
            Self::Tid => "TID",
            Self::AtUri => "AT URI",
            Self::Datetime => "datetime",
            Self::Language => "language tag",
            Self::Cid => "CID",
            Self::Uri => "URI",
        })
    }
}

/// A string that does not satisfy the syntax of `kind`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind}: {reason} (got {input:?})")]
pub struct SyntaxError {
    kind: SyntaxKind,
    reason: &'static str,
    input: String,
}

impl SyntaxError {
    fn new(kind: SyntaxKind, reason: &'static str, input: &str) -> Self {
        // Inputs can be kilobytes long (URIs); keep error messages log-sized.
        const MAX: usize = 64;
        let input = match input.char_indices().nth(MAX) {
            Some((cut, _)) => format!("{}…", &input[..cut]),
            None => input.to_owned(),
        };
        Self { kind, reason, input }
    }

    pub fn kind(&self) -> SyntaxKind {
        self.kind
    }

    pub fn reason(&self) -> &'static str {
        self.reason
    }
}

fn regex(pattern: &str) -> Regex {
    Regex::new(pattern).expect("static regex pattern must compile")
}

/// `Display`, `FromStr`, `AsRef<str>` and the `String` conversions serde uses,
/// all in terms of the type's `new` and `as_str`.
macro_rules! string_impls {
    ($($ty:ident),*) => {$(
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl FromStr for $ty {
            type Err = SyntaxError;
            fn from_str(s: &str) -> Result<Self, SyntaxError> {
                Self::new(s)
            }
        }
        impl TryFrom<String> for $ty {
            type Error = SyntaxError;
            fn try_from(s: String) -> Result<Self, SyntaxError> {
                Self::new(s)
            }
        }
        impl From<$ty> for String {
            fn from(v: $ty) -> String {
                v.as_str().to_owned()
            }
        }
        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                self.as_str()
            }
        }
    )*};
}

string_impls!(Did, Handle, AtIdentifier, Nsid, RecordKey, Tid, AtUri, Datetime, Language);

// ---------------------------------------------------------------------------
// DID

static DID_RE: LazyLock<Regex> = LazyLock::new(|| regex(r"^did:[a-z]+:[a-zA-Z0-9._:%-]*[a-zA-Z0-9._-]$"));

/// A decentralized identifier, `did:<method>:<method-specific-id>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Did(String);

impl Did {
    pub fn new(s: impl Into<String>) -> Result<Self, SyntaxError> {
        let s = s.into();
        let reason = if s.len() > 2048 {
            "longer than 2048 characters"
        } else if !DID_RE.is_match(&s) {
            "expected did:<lowercase method>:<identifier>"
        } else {
            return Ok(Self(s));
        };
        Err(SyntaxError::new(SyntaxKind::Did, reason, &s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The method name, e.g. `plc` for `did:plc:…`.
    pub fn method(&self) -> &str {
        self.0[4..].split_once(':').map_or("", |(method, _)| method)
    }
}

// ---------------------------------------------------------------------------
// Handle

// Matched after lowercasing. The TLD may not start with a digit so that IPv4
// addresses are never handles.
static HANDLE_RE: LazyLock<Regex> =
    LazyLock::new(|| regex(r"^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]([a-z0-9-]{0,61}[a-z0-9])?$"));

/// TLDs that are syntactically fine but can never be a real, resolvable handle.
const DISALLOWED_TLDS: &[&str] =
    &["local", "arpa", "invalid", "localhost", "internal", "example", "alt", "onion"];

/// A DNS-name handle, stored lowercased because handles are case-insensitive.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Handle(String);

impl Handle {
    /// Validates and normalizes to lowercase.
    pub fn new(s: impl Into<String>) -> Result<Self, SyntaxError> {
        let mut s = s.into();
        s.make_ascii_lowercase();
        let reason = if s.len() > 253 {
            "longer than 253 characters"
        } else if !HANDLE_RE.is_match(&s) {
            "expected two or more DNS labels of ASCII letters, digits and inner hyphens"
        } else {
            return Ok(Self(s));
        };
        Err(SyntaxError::new(SyntaxKind::Handle, reason, &s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The last label, e.g. `social` for `alice.bsky.social`.
    pub fn tld(&self) -> &str {
        self.0.rsplit('.').next().unwrap_or_default()
    }

    /// Reserved or non-public TLDs a PDS must refuse for accounts.
    pub fn is_disallowed_tld(&self) -> bool {
        DISALLOWED_TLDS.contains(&self.tld())
    }

    /// `.test` is reserved too, but dev setups legitimately use it, so callers
    /// decide separately.
    pub fn is_test_tld(&self) -> bool {
        self.tld() == "test"
    }
}

// ---------------------------------------------------------------------------
// AtIdentifier

/// Either a DID or a handle, as accepted by `repo`/`actor` parameters.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum AtIdentifier {
    Did(Did),
    Handle(Handle),
}

impl AtIdentifier {
    /// Anything starting with `did:` must be a DID; the error names which
    /// format was attempted.
    pub fn new(s: impl Into<String>) -> Result<Self, SyntaxError> {
        let s = s.into();
        if s.starts_with("did:") { Did::new(s).map(Self::Did) } else { Handle::new(s).map(Self::Handle) }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::Did(did) => did.as_str(),
            Self::Handle(handle) => handle.as_str(),
        }
    }

    pub fn as_did(&self) -> Option<&Did> {
        match self {
            Self::Did(did) => Some(did),
            Self::Handle(_) => None,
        }
    }

    pub fn as_handle(&self) -> Option<&Handle> {
        match self {
            Self::Did(_) => None,
            Self::Handle(handle) => Some(handle),
        }
    }
}

impl From<Did> for AtIdentifier {
    fn from(did: Did) -> Self {
        Self::Did(did)
    }
}

impl From<Handle> for AtIdentifier {
    fn from(handle: Handle) -> Self {
        Self::Handle(handle)
    }
}

// ---------------------------------------------------------------------------
// NSID

// Reversed domain authority (first segment is the TLD, so it starts with a
// letter) followed by a name segment of letters and digits only.
static NSID_RE: LazyLock<Regex> = LazyLock::new(|| {
    regex(
        r"^[a-zA-Z]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?(\.[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)+\.[a-zA-Z][a-zA-Z0-9]{0,62}$",
    )
});

/// A namespaced identifier such as `app.bsky.feed.post`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Nsid(String);

impl Nsid {
    pub fn new(s: impl Into<String>) -> Result<Self, SyntaxError> {
        let s = s.into();
        let reason = if s.len() > 317 {
            "longer than 317 characters"
        } else if !NSID_RE.is_match(&s) {
            "expected reversed domain segments then an alphanumeric name"
        } else {
            return Ok(Self(s));
        };
        Err(SyntaxError::new(SyntaxKind::Nsid, reason, &s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The authority as a domain name in DNS order, e.g. `feed.bsky.app` for
    /// `app.bsky.feed.post` (what lexicon resolution looks up).
    pub fn authority(&self) -> String {
        let prefix = self.0.rsplit_once('.').map_or("", |(prefix, _)| prefix);
        prefix.rsplit('.').collect::<Vec<_>>().join(".")
    }

    /// The final name segment, e.g. `post`.
    pub fn name(&self) -> &str {
        self.0.rsplit('.').next().unwrap_or_default()
    }
}

// ---------------------------------------------------------------------------
// Record key

static RECORD_KEY_RE: LazyLock<Regex> = LazyLock::new(|| regex(r"^[a-zA-Z0-9._:~-]{1,512}$"));

/// A record key: the last path segment of a record's AT URI.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RecordKey(String);

impl RecordKey {
    pub fn new(s: impl Into<String>) -> Result<Self, SyntaxError> {
        let s = s.into();
        let reason = if s == "." || s == ".." {
            "`.` and `..` would be path traversal"
        } else if !RECORD_KEY_RE.is_match(&s) {
            "expected 1-512 characters of A-Z a-z 0-9 . _ : ~ -"
        } else {
            return Ok(Self(s));
        };
        Err(SyntaxError::new(SyntaxKind::RecordKey, reason, &s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

// ---------------------------------------------------------------------------
// TID

const TID_ALPHABET: &[u8; 32] = b"234567abcdefghijklmnopqrstuvwxyz";
const TID_MICROS_MASK: u64 = (1 << 53) - 1;
const TID_CLOCK_MASK: u16 = (1 << 10) - 1;

// 13 chars * 5 bits = 65 bits; the first char carries only the top 4 of 64.
static TID_RE: LazyLock<Regex> =
    LazyLock::new(|| regex(r"^[234567abcdefghij][234567abcdefghijklmnopqrstuvwxyz]{12}$"));

/// A timestamp identifier: 53 bits of microseconds since the Unix epoch and a
/// 10-bit clock id, base32-sortable encoded so string order is time order.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Tid(String);

impl Tid {
    pub fn new(s: impl Into<String>) -> Result<Self, SyntaxError> {
        let s = s.into();
        if TID_RE.is_match(&s) {
            Ok(Self(s))
        } else {
            let reason = "expected 13 base32-sortable characters, the first in 2-7a-j";
            Err(SyntaxError::new(SyntaxKind::Tid, reason, &s))
        }
    }

    /// Encodes a TID; bits beyond 53 (micros) and 10 (clock id) are dropped.
    pub fn from_parts(micros: u64, clock_id: u16) -> Self {
        let value = (micros & TID_MICROS_MASK) << 10 | u64::from(clock_id & TID_CLOCK_MASK);
        let encoded =
            (0..13).rev().map(|i| char::from(TID_ALPHABET[((value >> (i * 5)) & 31) as usize])).collect();
        Self(encoded)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn value(&self) -> u64 {
        self.0.bytes().fold(0, |acc, b| {
            let digit = TID_ALPHABET.iter().position(|&c| c == b).unwrap_or_default();
            acc << 5 | digit as u64
        })
    }

    pub fn timestamp_micros(&self) -> u64 {
        self.value() >> 10 & TID_MICROS_MASK
    }

    pub fn clock_id(&self) -> u16 {
        (self.value() & u64::from(TID_CLOCK_MASK)) as u16
    }
}

/// Issues strictly increasing TIDs from caller-supplied wall-clock readings,
/// so a clock that stalls or steps backwards never yields a repeat.
#[derive(Clone, Debug)]
pub struct TidClock {
    clock_id: u16,
    last_micros: u64,
}

impl TidClock {
    pub fn new(clock_id: u16) -> Self {
        Self { clock_id: clock_id & TID_CLOCK_MASK, last_micros: 0 }
    }

    /// A TID for `now_micros`, or one microsecond after the previous TID if
    /// the clock has not advanced.
    pub fn next(&mut self, now_micros: u64) -> Tid {
        let micros = now_micros.max(self.last_micros.saturating_add(1)).min(TID_MICROS_MASK);
        self.last_micros = micros;
        Tid::from_parts(micros, self.clock_id)
    }

    /// Like `next`, but also strictly after `floor` (e.g. the stored repo rev),
    /// which survives restarts where this clock's memory does not.
    pub fn next_after(&mut self, now_micros: u64, floor: &Tid) -> Tid {
        self.last_micros = self.last_micros.max(floor.timestamp_micros());
        self.next(now_micros)
    }
}

// ---------------------------------------------------------------------------
// AT URI

/// The restricted AT URI form used for records: `at://authority[/collection[/rkey]]`,
/// without query or fragment. A handle authority is stored lowercased.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AtUri {
    uri: String,
    authority: AtIdentifier,
    collection: Option<Nsid>,
    rkey: Option<RecordKey>,
}

impl AtUri {
    pub fn new(s: impl Into<String>) -> Result<Self, SyntaxError> {
        let s = s.into();
        let err = |reason| SyntaxError::new(SyntaxKind::AtUri, reason, &s);
        if s.len() > 8 * 1024 {
            return Err(err("longer than 8 KiB"));
        }
        let rest = s.strip_prefix("at://").ok_or_else(|| err("must start with at://"))?;
        let mut segments = rest.split('/');
        let authority = AtIdentifier::new(segments.next().unwrap_or_default())
            .map_err(|_| err("authority is not a DID or handle"))?;
        let collection =
            segments.next().map(Nsid::new).transpose().map_err(|_| err("collection is not an NSID"))?;
        let rkey =
            segments.next().map(RecordKey::new).transpose().map_err(|_| err("record key is invalid"))?;
        if segments.next().is_some() {
            return Err(err("more than authority, collection and record key"));
        }
        Ok(Self::build(authority, collection, rkey))
    }

    /// `at://{did}/{collection}/{rkey}`; cannot fail since the parts are valid.
    pub fn for_record(did: &Did, collection: &Nsid, rkey: &RecordKey) -> Self {
        Self::build(did.clone().into(), Some(collection.clone()), Some(rkey.clone()))
    }

    fn build(authority: AtIdentifier, collection: Option<Nsid>, rkey: Option<RecordKey>) -> Self {
        let mut uri = format!("at://{authority}");
        for segment in [collection.as_ref().map(Nsid::as_str), rkey.as_ref().map(RecordKey::as_str)]
            .into_iter()
            .flatten()
        {
            uri.push('/');
            uri.push_str(segment);
        }
        Self { uri, authority, collection, rkey }
    }

    pub fn as_str(&self) -> &str {
        &self.uri
    }

    pub fn authority(&self) -> &AtIdentifier {
        &self.authority
    }

    pub fn collection(&self) -> Option<&Nsid> {
        self.collection.as_ref()
    }

    pub fn rkey(&self) -> Option<&RecordKey> {
        self.rkey.as_ref()
    }
}

// ---------------------------------------------------------------------------
// Datetime

// The intersection of RFC 3339 and ISO 8601 that atproto allows. Field ranges
// are checked semantically afterwards. `[0-9]`, not `\d`: the latter is Unicode.
static DATETIME_RE: LazyLock<Regex> = LazyLock::new(|| {
    regex(
        r"^([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?(Z|([+-])([0-9]{2}):([0-9]{2}))$",
    )
});

/// An atproto datetime string, guaranteed to name a real instant at or after
/// year 0000 UTC. Orders chronologically (ties broken by the string).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Datetime {
    at: OffsetDateTime,
    raw: String,
}

impl Datetime {
    /// Checks the syntax and that the fields form a real date and time.
    pub fn new(s: impl Into<String>) -> Result<Self, SyntaxError> {
        let raw = s.into();
        match parse_datetime(&raw) {
            Ok(at) => Ok(Self { at, raw }),
            Err(reason) => Err(SyntaxError::new(SyntaxKind::Datetime, reason, &raw)),
        }
    }

    /// Formats as `YYYY-MM-DDTHH:MM:SS.mmmZ` (the preferred form), truncating
    /// to milliseconds and clamping to the representable years 0000-9999.
    pub fn from_offset(dt: OffsetDateTime) -> Self {
        let min = time::macros::datetime!(0000-01-01 0:00 UTC);
        let max = time::macros::datetime!(9999-12-31 23:59:59.999 UTC);
        let utc = dt.clamp(min, max).to_offset(UtcOffset::UTC);
        let at = utc - Duration::nanoseconds(i64::from(utc.nanosecond() % 1_000_000));
        let raw = format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            at.year(),
            u8::from(at.month()),
            at.day(),
            at.hour(),
            at.minute(),
            at.second(),
            at.millisecond()
        );
        Self { at, raw }
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// The instant, in the offset the string was written with.
    pub fn offset_datetime(&self) -> OffsetDateTime {
        self.at
    }
}

/// Syntax only; field ranges are not checked.
fn check_datetime_syntax(s: &str) -> Result<regex::Captures<'_>, &'static str> {
    if s.len() > 64 {
        return Err("longer than 64 characters");
    }
    let caps = DATETIME_RE.captures(s).ok_or("expected YYYY-MM-DDTHH:MM:SS[.fff](Z|+hh:mm|-hh:mm)")?;
    // RFC 3339 uses -00:00 for "offset unknown", which ISO 8601 forbids.
    if s.ends_with("-00:00") {
        return Err("-00:00 is not an allowed offset");
    }
    Ok(caps)
}

fn parse_datetime(s: &str) -> Result<OffsetDateTime, &'static str> {
    let caps = check_datetime_syntax(s)?;
    // The regex guarantees every numeric group is a short run of ASCII digits.
    let num = |i: usize| caps.get(i).map_or(0, |m| m.as_str().parse::<i32>().unwrap_or(0));
    let field = |i: usize| num(i) as u8;

    let month = Month::try_from(field(2)).map_err(|_| "month out of range")?;
    let date = Date::from_calendar_date(num(1), month, field(3)).map_err(|_| "day out of range")?;
    // Only the first 9 fractional digits are representable (nanoseconds).
    let nanos = caps.get(7).map_or(0, |m| {
        let digits = &m.as_str()[..m.len().min(9)];
        digits.parse::<u32>().unwrap_or(0) * 10u32.pow(9 - digits.len() as u32)
    });
    let time =
        Time::from_hms_nano(field(4), field(5), field(6), nanos).map_err(|_| "time of day out of range")?;
    let sign: i8 = if caps.get(9).is_some_and(|m| m.as_str() == "-") { -1 } else { 1 };
    let offset = UtcOffset::from_hms(sign * field(10) as i8, sign * field(11) as i8, 0)
        .map_err(|_| "offset out of range")?;
    let at = PrimitiveDateTime::new(date, time).assume_offset(offset);
    match at.checked_to_offset(UtcOffset::UTC) {
        Some(utc) if utc.year() >= 0 => Ok(at),
        _ => Err("before year 0000 in UTC"),
    }
}

// ---------------------------------------------------------------------------
// Language

// Lenient BCP 47 as in the atproto spec: a 2-3 letter lowercase language (or
// the `i-` grandfathered / `x-` private-use prefixes) then 1-8 char subtags.
static LANGUAGE_RE: LazyLock<Regex> =
    LazyLock::new(|| regex(r"^(?:[a-z]{2,3}(?:-[A-Za-z0-9]{1,8})*|[ixX](?:-[A-Za-z0-9]{1,8})+)$"));

/// A BCP 47 language tag such as `en` or `pt-BR`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Language(String);

impl Language {
    /// Checks the lenient syntax and rejects repeated variant or extension
    /// singleton subtags (RFC 5646 §2.2.9), which no registry lookup needs.
    pub fn new(s: impl Into<String>) -> Result<Self, SyntaxError> {
        let s = s.into();
        let checked = if LANGUAGE_RE.is_match(&s) {
            check_language_repeats(&s)
        } else {
            Err("expected a BCP 47 tag like `en` or `pt-BR`")
        };
        match checked {
            Ok(()) => Ok(Self(s)),
            Err(reason) => Err(SyntaxError::new(SyntaxKind::Language, reason, &s)),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn check_language_repeats(s: &str) -> Result<(), &'static str> {
    let mut subtags = s.split('-');
    // `i-…` tags are opaque grandfathered names; `x-…` is all private use.
    if matches!(subtags.next(), Some("i" | "x" | "X")) {
        return Ok(());
    }
    let mut variants = Vec::new();
    let mut singletons = Vec::new();
    for subtag in subtags.map(str::to_ascii_lowercase) {
        if subtag.len() == 1 {
            if subtag == "x" {
                break; // everything after `x` is private use, so unconstrained
            }
            if singletons.contains(&subtag) {
                return Err("repeated extension singleton subtag");
            }
            singletons.push(subtag);
        } else if singletons.is_empty() {
            // Variants are 5-8 alphanumerics or a digit plus 3; extension
            // subtags after a singleton are not variants.
            let variant = (5..=8).contains(&subtag.len())
                || (subtag.len() == 4 && subtag.starts_with(|c: char| c.is_ascii_digit()));
            if variant && variants.contains(&subtag) {
                return Err("repeated variant subtag");
            }
            if variant {
                variants.push(subtag);
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// CID and URI strings (validated only; `cid::Cid` is the parsed type)

static CID_RE: LazyLock<Regex> = LazyLock::new(|| regex(r"^[a-zA-Z0-9+=]{8,256}$"));

/// Checks the string syntax of a CID as the spec and fixtures define it:
/// multibase characters only, and not a legacy CIDv0 (`Qm…`). Does not decode;
/// use [`parse_cid`] where the bytes matter.
pub fn validate_cid_string(s: &str) -> Result<(), SyntaxError> {
    let reason = if !CID_RE.is_match(s) {
        "expected 8-256 multibase characters"
    } else if s.starts_with("Qm") {
        "CIDv0 is not supported"
    } else {
        return Ok(());
    };
    Err(SyntaxError::new(SyntaxKind::Cid, reason, s))
}

/// [`validate_cid_string`], then decodes it as a real CIDv1.
pub fn parse_cid(s: &str) -> Result<cid::Cid, SyntaxError> {
    validate_cid_string(s)?;
    cid::Cid::try_from(s).map_err(|_| SyntaxError::new(SyntaxKind::Cid, "not a decodable CID", s))
}

static URI_RE: LazyLock<Regex> = LazyLock::new(|| regex(r"^[a-z][a-z0-9.+-]*:[!-~]+$"));

/// Checks the lexicon `uri` string format: `scheme:rest`, no whitespace, at
/// most 8 KiB.
pub fn validate_uri(s: &str) -> Result<(), SyntaxError> {
    let reason = if s.len() > 8 * 1024 {
        "longer than 8 KiB"
    } else if !URI_RE.is_match(s) {
        "expected scheme:rest without whitespace"
    } else {
        return Ok(());
    };
    Err(SyntaxError::new(SyntaxKind::Uri, reason, s))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use std::path::Path;

    /// Non-comment lines of a fixture, untrimmed: whitespace is significant.
    fn fixture(name: &str) -> Vec<String> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/interop/syntax").join(name);
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_owned).collect()
    }

    /// Runs `check` over every case and reports all mismatches at once.
    fn run_fixture<T>(name: &str, expect_ok: bool, check: impl Fn(&str) -> Result<T, SyntaxError>) {
        let cases = fixture(name);
        assert!(!cases.is_empty(), "{name}: read {} cases, expected some", cases.len());
        let failures: Vec<String> = cases
            .iter()
            .filter_map(|case| match (check(case), expect_ok) {
                (Ok(_), false) => Some(format!("  accepted {case:?}")),
                (Err(e), true) => Some(format!("  rejected {case:?}: {e}")),
                _ => None,
            })
            .collect();
        assert!(
            failures.is_empty(),
            "{name}: {} of {} cases failed:\n{}",
            failures.len(),
            cases.len(),
            failures.join("\n")
        );
        println!("{name}: {} cases", cases.len());
    }

    /// For valid fixtures: the value round-trips through `as_str` and serde.
    fn roundtrip<T>(value: T, input: &str) -> Result<T, SyntaxError>
    where
        T: Serialize + for<'de> Deserialize<'de> + PartialEq + fmt::Debug + AsRef<str>,
    {
        let json = serde_json::to_string(&value).expect("serialize");
        let back: T = serde_json::from_str(&json).expect("deserialize what we serialized");
        assert_eq!(back, value, "serde round trip of {input:?}");
        Ok(value)
    }

    fn exact<T>(value: T, input: &str) -> Result<T, SyntaxError>
    where
        T: Serialize + for<'de> Deserialize<'de> + PartialEq + fmt::Debug + AsRef<str>,
    {
        assert_eq!(value.as_ref(), input, "as_str must preserve the input");
        roundtrip(value, input)
    }

    macro_rules! fixture_tests {
        ($($test:ident: $file:literal => $ok:literal, $check:expr;)*) => {$(
            #[test]
            fn $test() {
                run_fixture($file, $ok, $check);
            }
        )*};
    }

    fn lower(s: &str) -> String {
        s.to_ascii_lowercase()
    }

    fixture_tests! {
        did_valid: "did_syntax_valid.txt" => true, |s| exact(Did::new(s)?, s);
        did_invalid: "did_syntax_invalid.txt" => false, |s| Did::new(s);
        handle_valid: "handle_syntax_valid.txt" => true, |s| exact(Handle::new(s)?, &lower(s));
        handle_invalid: "handle_syntax_invalid.txt" => false, |s| Handle::new(s);
        atidentifier_valid: "atidentifier_syntax_valid.txt" => true,
            |s| roundtrip(AtIdentifier::new(s)?, s);
        atidentifier_invalid: "atidentifier_syntax_invalid.txt" => false, |s| AtIdentifier::new(s);
        nsid_valid: "nsid_syntax_valid.txt" => true, |s| exact(Nsid::new(s)?, s);
        nsid_invalid: "nsid_syntax_invalid.txt" => false, |s| Nsid::new(s);
        recordkey_valid: "recordkey_syntax_valid.txt" => true, |s| exact(RecordKey::new(s)?, s);
        recordkey_invalid: "recordkey_syntax_invalid.txt" => false, |s| RecordKey::new(s);
        tid_valid: "tid_syntax_valid.txt" => true, |s| exact(Tid::new(s)?, s);
        tid_invalid: "tid_syntax_invalid.txt" => false, |s| Tid::new(s);
        aturi_valid: "aturi_syntax_valid.txt" => true, |s| exact(AtUri::new(s)?, s);
        aturi_invalid: "aturi_syntax_invalid.txt" => false, |s| AtUri::new(s);
        datetime_valid: "datetime_syntax_valid.txt" => true, |s| exact(Datetime::new(s)?, s);
        datetime_invalid: "datetime_syntax_invalid.txt" => false, |s| Datetime::new(s);
        language_valid: "language_syntax_valid.txt" => true, |s| exact(Language::new(s)?, s);
        language_invalid: "language_syntax_invalid.txt" => false, |s| Language::new(s);
        cid_valid: "cid_syntax_valid.txt" => true, validate_cid_string;
        cid_invalid: "cid_syntax_invalid.txt" => false, validate_cid_string;
        cid_invalid_parse: "cid_syntax_invalid.txt" => false, parse_cid;
        uri_valid: "uri_syntax_valid.txt" => true, validate_uri;
        uri_invalid: "uri_syntax_invalid.txt" => false, validate_uri;
    }

    #[test]
    fn datetime_parse_invalid() {
        // Each must pass the syntax check yet fail the full one.
        run_fixture("datetime_parse_invalid.txt", false, |s| {
            check_datetime_syntax(s).unwrap_or_else(|e| panic!("{s:?} fails syntax: {e}"));
            Datetime::new(s)
        });
    }

    #[test]
    fn language_parse_invalid() {
        run_fixture("language_parse_invalid.txt", false, |s| {
            assert!(LANGUAGE_RE.is_match(s), "{s:?} fails syntax");
            Language::new(s)
        });
    }

    #[test]
    fn parse_cid_decodes_real_cids() {
        // Some syntax fixtures are contrived strings that are not real CIDs,
        // so only the genuine ones are expected to decode.
        for s in [
            "bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi",
            "zdj7WWeQ43G6JJvLWQWZpyHuAMq6uYWRjkBXFad11vE2LHhQ7",
            "bafybeie5gq4jxvzmsym6hjlwxej4rwdoxt7wadqvmmwbqi7r27fclha2va",
            "zdj7WhuEjrB52m1BisYCtmjH1hSKa7yZ3jEZ9JcXaFRD51wVz",
            "f017012202c5f688262e0ece8569aa6f94d60aad55ca8d9d83734e4a7430d0cff6588ec2b",
        ] {
            let cid = parse_cid(s).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(cid.version(), cid::Version::V1);
        }
        assert!(parse_cid("mBcDxtdWx0aWhhc2g+").is_err());
    }

    #[test]
    fn did_method() {
        assert_eq!(Did::new("did:plc:abc").unwrap().method(), "plc");
        assert_eq!(Did::new("did:web:localhost%3A1234").unwrap().method(), "web");
    }

    #[test]
    fn handle_normalizes_and_flags_tlds() {
        let handle = Handle::new("Alice.Example.COM").unwrap();
        assert_eq!(handle.as_str(), "alice.example.com");
        assert!(!handle.is_disallowed_tld() && !handle.is_test_tld());
        assert!(Handle::new("laptop.local").unwrap().is_disallowed_tld());
        assert!(Handle::new("x.onion").unwrap().is_disallowed_tld());
        let test = Handle::new("alice.TEST").unwrap();
        assert!(test.is_test_tld() && !test.is_disallowed_tld());
        // Deserialization normalizes too.
        let parsed: Handle = serde_json::from_str("\"BOB.test\"").unwrap();
        assert_eq!(parsed.as_str(), "bob.test");
    }

    #[test]
    fn nsid_parts() {
        let nsid = Nsid::new("app.bsky.feed.post").unwrap();
        assert_eq!(nsid.authority(), "feed.bsky.app");
        assert_eq!(nsid.name(), "post");
    }

    #[test]
    fn aturi_parts_and_builder() {
        let uri = AtUri::new("at://Alice.Test/app.bsky.feed.post/3jzfcijpj2z2a").unwrap();
        assert_eq!(uri.as_str(), "at://alice.test/app.bsky.feed.post/3jzfcijpj2z2a");
        assert_eq!(uri.authority().as_handle().unwrap().as_str(), "alice.test");
        assert_eq!(uri.collection().unwrap().as_str(), "app.bsky.feed.post");
        assert_eq!(uri.rkey().unwrap().as_str(), "3jzfcijpj2z2a");

        let bare = AtUri::new("at://did:plc:abc").unwrap();
        assert!(bare.authority().as_did().is_some());
        assert!(bare.collection().is_none() && bare.rkey().is_none());

        let did = Did::new("did:plc:abc").unwrap();
        let nsid = Nsid::new("app.bsky.feed.like").unwrap();
        let rkey = RecordKey::new("self").unwrap();
        let built = AtUri::for_record(&did, &nsid, &rkey);
        assert_eq!(built.as_str(), "at://did:plc:abc/app.bsky.feed.like/self");
        assert_eq!(built, AtUri::new(built.as_str()).unwrap());
    }

    #[test]
    fn deserialize_validates() {
        assert!(serde_json::from_str::<Did>("\"did:plc:abc\"").is_ok());
        let err = serde_json::from_str::<Did>("\"did:PLC:abc\"").unwrap_err();
        assert!(err.to_string().contains("invalid DID"), "{err}");
        assert!(serde_json::from_str::<Tid>("\"zzzzzzzzzzzzz\"").is_err());
        assert!(serde_json::from_str::<AtUri>("\"at://did:plc:abc/\"").is_err());
        assert!(serde_json::from_str::<Datetime>("\"1985-13-12T23:20:50Z\"").is_err());
    }

    #[test]
    fn error_message_names_kind_and_truncates() {
        let err = Handle::new("nope").unwrap_err();
        assert_eq!(err.kind(), SyntaxKind::Handle);
        assert!(err.to_string().starts_with("invalid handle: "), "{err}");
        let long = AtUri::new(format!("at://{}", "o".repeat(9000))).unwrap_err();
        assert!(long.to_string().len() < 200, "{long}");
    }

    #[test]
    fn tid_round_trip() {
        for (micros, clock_id) in [(0, 0), (1, 1), (1_700_000_000_000_000, 1023), (TID_MICROS_MASK, 7)] {
            let tid = Tid::from_parts(micros, clock_id);
            assert_eq!(Tid::new(tid.as_str()).unwrap(), tid, "from_parts output validates");
            assert_eq!((tid.timestamp_micros(), tid.clock_id()), (micros, clock_id));
        }
        assert_eq!(Tid::from_parts(0, 0).as_str(), "2222222222222");
        let tid = Tid::new("3jzfcijpj2z2a").unwrap();
        assert_eq!(Tid::from_parts(tid.timestamp_micros(), tid.clock_id()), tid);
        // String order is numeric order.
        assert!(Tid::from_parts(1 << 40, 0) > Tid::from_parts((1 << 40) - 1, 1023));
    }

    #[test]
    fn tid_clock_is_strictly_monotonic() {
        let mut clock = TidClock::new(5);
        let readings = [1_000, 1_000, 999, 2_000, 500, 0, 2_001, 2_001, 3_000];
        let tids: Vec<Tid> = readings.iter().map(|&now| clock.next(now)).collect();
        assert!(tids.windows(2).all(|w| w[0] < w[1]), "{tids:?}");
        assert!(tids.iter().all(|t| t.clock_id() == 5));
        // Clock moving forwards is followed exactly; stalls advance by 1µs.
        let micros: Vec<u64> = tids.iter().map(Tid::timestamp_micros).collect();
        assert_eq!(micros, [1_000, 1_001, 1_002, 2_000, 2_001, 2_002, 2_003, 2_004, 3_000]);
    }

    #[test]
    fn tid_clock_next_after_floor() {
        // A fresh clock (as after a restart) whose wall clock is behind the
        // stored rev must still produce a greater rev.
        let floor = Tid::from_parts(5_000_000, 1023);
        let mut clock = TidClock::new(0);
        let rev = clock.next_after(1_000, &floor);
        assert!(rev > floor, "{rev} > {floor}");
        assert!(clock.next(1_000) > rev);
        // With the wall clock ahead, the wall clock wins.
        let ahead = clock.next_after(9_000_000, &floor);
        assert_eq!(ahead.timestamp_micros(), 9_000_000);
    }

    #[test]
    fn datetime_from_offset() {
        let dt = time::macros::datetime!(2024-02-29 13:04:05.123456789 +02:00);
        let formatted = Datetime::from_offset(dt);
        assert_eq!(formatted.as_str(), "2024-02-29T11:04:05.123Z");
        assert_eq!(Datetime::new(formatted.as_str()).unwrap(), formatted);
        let early = Datetime::from_offset(time::macros::datetime!(-0005-01-01 0:00 UTC));
        assert_eq!(early.as_str(), "0000-01-01T00:00:00.000Z");
    }

    #[test]
    fn datetime_orders_by_instant() {
        let a = Datetime::new("2024-01-01T10:00:00+05:00").unwrap();
        let b = Datetime::new("2024-01-01T06:00:00Z").unwrap();
        assert!(a < b);
        assert_eq!(a.offset_datetime(), time::macros::datetime!(2024-01-01 05:00 UTC));
    }
}
