//! Event-stream frames for `com.atproto.sync.subscribeRepos` (event stream
//! spec): each frame is a DAG-CBOR header (`op`, `t`) followed by a DAG-CBOR
//! body. Bodies follow the sync v1.1 lexicon (`#commit` with `prevData` and
//! per-op `prev`, `#sync`, `#identity`, `#account`, `#info`).

use std::collections::BTreeMap;

use cid::Cid;
use ipld_core::ipld::Ipld;

use super::data::{DataError, encode_cbor};

/// Largest `blocks` CAR a `#commit` may carry, and most ops (the spec's limits);
/// a commit beyond either is announced with `#sync` instead.
pub const MAX_COMMIT_BLOCKS_BYTES: usize = 2_000_000;
pub const MAX_COMMIT_OPS: usize = 200;

fn map<const N: usize>(entries: [(&str, Ipld); N]) -> Ipld {
    Ipld::Map(entries.into_iter().map(|(k, v)| (k.to_owned(), v)).collect::<BTreeMap<_, _>>())
}

fn frame(t: &str, body: Ipld) -> Result<Vec<u8>, DataError> {
    let mut out = encode_cbor(&map([("op", Ipld::Integer(1)), ("t", Ipld::String(t.to_owned()))]))?;
    out.extend(encode_cbor(&body)?);
    Ok(out)
}

/// An error frame; the server closes the stream after sending it.
pub fn error_frame(error: &str, message: &str) -> Result<Vec<u8>, DataError> {
    let mut out = encode_cbor(&map([("op", Ipld::Integer(-1))]))?;
    out.extend(encode_cbor(&map([
        ("error", Ipld::String(error.to_owned())),
        ("message", Ipld::String(message.to_owned())),
    ]))?);
    Ok(out)
}

pub fn info_frame(name: &str, message: &str) -> Result<Vec<u8>, DataError> {
    frame(
        "#info",
        map([("name", Ipld::String(name.to_owned())), ("message", Ipld::String(message.to_owned()))]),
    )
}

/// One record operation of a commit.
#[derive(Debug, Clone)]
pub struct RepoOp {
    /// `create`, `update` or `delete`.
    pub action: &'static str,
    pub path: String,
    /// The new record CID (None for deletes).
    pub cid: Option<Cid>,
    /// The previous record CID (None for creates).
    pub prev: Option<Cid>,
}

pub struct CommitEvent<'a> {
    pub did: &'a str,
    pub commit: Cid,
    pub rev: &'a str,
    /// The previous commit's rev (None for the first commit).
    pub since: Option<&'a str>,
    /// The previous commit's MST root.
    pub prev_data: Option<Cid>,
    pub blocks: Vec<u8>,
    pub ops: &'a [RepoOp],
    pub time: &'a str,
}

pub fn commit_frame(seq: i64, e: &CommitEvent<'_>) -> Result<Vec<u8>, DataError> {
    let ops = e
        .ops
        .iter()
        .map(|op| {
            let mut m = BTreeMap::new();
            m.insert("action".to_owned(), Ipld::String(op.action.to_owned()));
            m.insert("path".to_owned(), Ipld::String(op.path.clone()));
            m.insert("cid".to_owned(), op.cid.map_or(Ipld::Null, Ipld::Link));
            if let Some(prev) = op.prev {
                m.insert("prev".to_owned(), Ipld::Link(prev));
            }
            Ipld::Map(m)
        })
        .collect();
    let mut body = BTreeMap::new();
    body.insert("seq".to_owned(), Ipld::Integer(seq.into()));
    body.insert("rebase".to_owned(), Ipld::Bool(false));
    body.insert("tooBig".to_owned(), Ipld::Bool(false));
    body.insert("repo".to_owned(), Ipld::String(e.did.to_owned()));
    body.insert("commit".to_owned(), Ipld::Link(e.commit));
    body.insert("rev".to_owned(), Ipld::String(e.rev.to_owned()));
    body.insert("since".to_owned(), e.since.map_or(Ipld::Null, |s| Ipld::String(s.to_owned())));
    body.insert("blocks".to_owned(), Ipld::Bytes(e.blocks.clone()));
    body.insert("ops".to_owned(), Ipld::List(ops));
    body.insert("blobs".to_owned(), Ipld::List(Vec::new()));
    if let Some(prev_data) = e.prev_data {
        body.insert("prevData".to_owned(), Ipld::Link(prev_data));
    }
    body.insert("time".to_owned(), Ipld::String(e.time.to_owned()));
    frame("#commit", Ipld::Map(body))
}

/// `#sync`: the repo's current commit, for consumers to re-sync from.
pub fn sync_frame(seq: i64, did: &str, blocks: Vec<u8>, rev: &str, time: &str) -> Result<Vec<u8>, DataError> {
    frame(
        "#sync",
        map([
            ("seq", Ipld::Integer(seq.into())),
            ("did", Ipld::String(did.to_owned())),
            ("blocks", Ipld::Bytes(blocks)),
            ("rev", Ipld::String(rev.to_owned())),
            ("time", Ipld::String(time.to_owned())),
        ]),
    )
}

pub fn identity_frame(seq: i64, did: &str, handle: Option<&str>, time: &str) -> Result<Vec<u8>, DataError> {
    let mut body = BTreeMap::new();
    body.insert("seq".to_owned(), Ipld::Integer(seq.into()));
    body.insert("did".to_owned(), Ipld::String(did.to_owned()));
    body.insert("time".to_owned(), Ipld::String(time.to_owned()));
    if let Some(h) = handle {
        body.insert("handle".to_owned(), Ipld::String(h.to_owned()));
    }
    frame("#identity", Ipld::Map(body))
}

pub fn account_frame(
    seq: i64,
    did: &str,
    active: bool,
    status: Option<&str>,
    time: &str,
) -> Result<Vec<u8>, DataError> {
    let mut body = BTreeMap::new();
    body.insert("seq".to_owned(), Ipld::Integer(seq.into()));
    body.insert("did".to_owned(), Ipld::String(did.to_owned()));
    body.insert("time".to_owned(), Ipld::String(time.to_owned()));
    body.insert("active".to_owned(), Ipld::Bool(active));
    if let Some(s) = status {
        body.insert("status".to_owned(), Ipld::String(s.to_owned()));
    }
    frame("#account", Ipld::Map(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::atp::data::decode_cbor_strict;

    /// Splits a frame into its two DAG-CBOR objects.
    fn split(frame: &[u8]) -> (Ipld, Ipld) {
        for cut in 1..frame.len() {
            if let (Ok(h), Ok(b)) = (decode_cbor_strict(&frame[..cut]), decode_cbor_strict(&frame[cut..])) {
                return (h, b);
            }
        }
        panic!("not a header+body frame");
    }

    #[test]
    fn frames_have_header_and_body() {
        let (h, b) =
            split(&identity_frame(7, "did:plc:x", Some("a.test"), "2024-01-01T00:00:00.000Z").expect("f"));
        assert_eq!(h, map([("op", Ipld::Integer(1)), ("t", Ipld::String("#identity".into()))]));
        let Ipld::Map(b) = b else { panic!("body") };
        assert_eq!(b["seq"], Ipld::Integer(7));
        let (h, _) = split(&error_frame("FutureCursor", "no").expect("f"));
        assert_eq!(h, map([("op", Ipld::Integer(-1))]));
    }
}
