//! Roost's MST against an independent implementation (jacquard-repo, which
//! matches the official MST roots): after every batch of random inserts,
//! updates and deletes applied incrementally by Roost, the root must equal the
//! root jacquard-repo builds from scratch for the same key/value set.
//!
//! jacquard's own incremental path is not used as the oracle: an add after
//! deleting a tree down to empty keeps the old layer there (seen with
//! jacquard-repo 0.12.2: put A, delete A, put B gives a root that differs from
//! a fresh tree holding only B, which both Roost and a fresh jacquard tree agree on).

use std::collections::HashMap;
use std::sync::Arc;

use cid::Cid;
use jacquard_repo::{MemoryBlockStore, Mst};
use proptest::prelude::*;
use roost::atp::data::cid_for_cbor;
use roost::atp::mst::{MstDiff, MstEditor};

type Store = HashMap<Cid, Arc<[u8]>>;

fn persist(store: &mut Store, diff: &MstDiff) {
    for c in &diff.removed {
        store.remove(c);
    }
    for (c, bytes) in &diff.new_blocks {
        store.insert(*c, Arc::from(bytes.as_slice()));
    }
}

/// A record CID per key, so leaves differ (a constant value would hide
/// value-handling bugs).
fn value_for(key: &str, generation: u32) -> Cid {
    cid_for_cbor(format!("{key}#{generation}").as_bytes())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

#[derive(Debug, Clone)]
enum Op {
    Put(String, u32),
    Delete(usize),
}

fn key_strategy() -> impl Strategy<Value = String> {
    // Collections and TID-like keys, as real repositories have.
    (
        prop::sample::select(vec![
            "app.bsky.feed.post",
            "app.bsky.feed.like",
            "app.bsky.graph.follow",
            "com.example.x",
        ]),
        "[2-7a-z]{13}",
    )
        .prop_map(|(c, r)| format!("{c}/{r}"))
}

fn ops_strategy() -> impl Strategy<Value = Vec<Vec<Op>>> {
    let op = prop_oneof![
        3 => (key_strategy(), 0u32..3).prop_map(|(k, g)| Op::Put(k, g)),
        1 => any::<usize>().prop_map(Op::Delete),
    ];
    prop::collection::vec(prop::collection::vec(op, 1..40), 1..6)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn roots_match_jacquard_repo(batches in ops_strategy()) {
        let rt = runtime();
        rt.block_on(async {
            let mut store = Store::new();
            let empty = {
                let editor = MstEditor::empty(&store).expect("empty");
                let diff = editor.finish();
                persist(&mut store, &diff);
                diff.root
            };
            let mut ours = empty;
            let mut present: Vec<String> = Vec::new();
            let mut values: HashMap<String, Cid> = HashMap::new();
            let mut checked = 0;
            for batch in &batches {
                let mut editor = MstEditor::new(&store, ours);
                for op in batch {
                    match op {
                        Op::Put(key, generation) => {
                            let value = value_for(key, *generation);
                            editor.insert(key, value).await.expect("insert");
                            values.insert(key.clone(), value);
                            if !present.contains(key) {
                                present.push(key.clone());
                            }
                        }
                        Op::Delete(i) if !present.is_empty() => {
                            let key = present.swap_remove(i % present.len());
                            editor.delete(&key).await.expect("delete");
                            values.remove(&key);
                        }
                        Op::Delete(_) => {}
                    }
                }
                let diff = editor.finish();
                persist(&mut store, &diff);
                ours = diff.root;
                let mut theirs = Mst::new(Arc::new(MemoryBlockStore::new()));
                for (key, value) in &values {
                    theirs = theirs.add(key, *value).await.expect("jacquard add");
                }
                let their_root = theirs.get_pointer().await.expect("jacquard root");
                prop_assert_eq!(ours, their_root, "roots differ after batch with {} keys", present.len());
                checked += 1;
            }
            prop_assert_eq!(checked, batches.len());
            Ok(())
        })?;
    }
}
