//! Crash safety of the real binary: concurrent writers, `kill -9` while
//! writes are in flight, restart on the same data directory, and proof that
//! every acknowledged write survived and the repository still verifies.
//! Three kill/restart cycles in one test.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

use common::*;

const COLLECTION: &str = "com.example.crash.item";
const JWT_SECRET: &str = "0123456789abcdef0123456789abcdef";
const WRITERS: usize = 4;
const ROUNDS: usize = 3;

/// Kills the child (SIGKILL) when dropped, so a failing test never leaves a
/// server behind.
struct ServerGuard {
    child: Option<Child>,
    log: PathBuf,
}

impl ServerGuard {
    fn log_tail(&self) -> String {
        log_tail(&self.log)
    }

    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // tokio's Child::kill sends SIGKILL and reaps the process.
            child.kill().await.expect("kill -9 the server");
        }
    }
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

async fn start_server(work: &Path, port: u16, plc_url: &str) -> ServerGuard {
    let data = work.join("data");
    let log = work.join("server.log");
    let out = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("log file");
    let child = Command::new(env!("CARGO_BIN_EXE_roost"))
        .arg("serve")
        .current_dir(work)
        .env("ROOST_CONFIG", work.join("no-such-roost.toml"))
        .env("RUST_LOG", "warn")
        .env("PDS_DEV_MODE", "true")
        .env("PDS_HOSTNAME", "localhost")
        .env("PDS_PORT", port.to_string())
        .env("PDS_DATA_DIRECTORY", &data)
        .env("PDS_DID_PLC_URL", plc_url)
        .env("PDS_HANDLE", HANDLE)
        .env("PDS_PASSWORD", PASSWORD)
        .env("PDS_SERVICE_HANDLE_DOMAINS", ".test")
        .env("PDS_JWT_SECRET", JWT_SECRET)
        .env("PDS_CRAWLERS", "")
        // Each start is a fresh data directory: no lexicon download per start.
        .env("PDS_LEXICON_AUTO_INSTALL", "false")
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("log fd"))
        .stderr(out)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the roost binary");
    let mut guard = ServerGuard { child: Some(child), log };
    let x = Xrpc::new(format!("http://127.0.0.1:{port}"));
    // On a panic the guard's child is killed on drop (kill_on_drop).
    wait_until_healthy(&x, guard.child.as_mut().expect("just spawned"), &guard.log).await;
    guard
}

/// The CID Roost must assign to `record`.
fn cid_of(record: &Value) -> String {
    let ipld = roost::atp::data::record_from_json(record).expect("record");
    let bytes = roost::atp::data::encode_cbor(&ipld).expect("cbor");
    roost::atp::data::cid_for_cbor(&bytes).to_string()
}

/// One writer's view: what the server acknowledged, and the write whose
/// answer was lost to the kill (all of it applied, or none).
struct Writer {
    id: usize,
    /// rkey -> acknowledged CID (absent: never created, or acknowledged deleted).
    model: BTreeMap<String, String>,
    pending: Option<Vec<(String, Option<String>)>>,
    next_n: usize,
    acked: usize,
    errors: Vec<String>,
}

impl Writer {
    fn apply(&mut self, effects: &[(String, Option<String>)]) {
        for (rkey, cid) in effects {
            match cid {
                Some(c) => self.model.insert(rkey.clone(), c.clone()),
                None => self.model.remove(rkey),
            };
        }
    }
}

fn item(writer: usize, round: usize, n: usize) -> Value {
    json!({ "$type": COLLECTION, "writer": writer, "round": round, "n": n, "text": format!("w{writer} r{round} n{n}") })
}

async fn run_writer(
    mut w: Writer,
    x: Xrpc,
    did: String,
    access: String,
    round: usize,
    killed: Arc<AtomicBool>,
) -> Writer {
    let auth = format!("Bearer {access}");
    let headers = [("authorization", auth.as_str()), ("content-type", "application/json")];
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(20) {
        let n = w.next_n;
        w.next_n += 1;
        let live: Vec<String> = w.model.keys().cloned().collect();
        let fresh = format!("w{}-r{round}-n{n}", w.id);
        let record = item(w.id, round, n);
        let cid = cid_of(&record);
        let pick = |k: usize| live[(n / 7 + k) % live.len()].clone();
        let kind = if live.len() < 2 { 0 } else { n % 6 };
        let (nsid, body, effects) = match kind {
            0 | 1 => (
                "com.atproto.repo.createRecord",
                json!({ "repo": did, "collection": COLLECTION, "rkey": fresh, "record": record }),
                vec![(fresh.clone(), Some(cid.clone()))],
            ),
            2 => {
                let k = pick(0);
                (
                    "com.atproto.repo.putRecord",
                    json!({ "repo": did, "collection": COLLECTION, "rkey": k, "record": record }),
                    vec![(k, Some(cid.clone()))],
                )
            }
            3 => {
                let k = pick(0);
                (
                    "com.atproto.repo.deleteRecord",
                    json!({ "repo": did, "collection": COLLECTION, "rkey": k }),
                    vec![(k, None)],
                )
            }
            4 => {
                let (upd, del) = (pick(0), pick(1));
                let upd_record = item(w.id, round, n + 1_000_000);
                let upd_cid = cid_of(&upd_record);
                (
                    "com.atproto.repo.applyWrites",
                    json!({ "repo": did, "writes": [
                        { "$type": "com.atproto.repo.applyWrites#create", "collection": COLLECTION, "rkey": fresh, "value": record },
                        { "$type": "com.atproto.repo.applyWrites#update", "collection": COLLECTION, "rkey": upd, "value": upd_record },
                        { "$type": "com.atproto.repo.applyWrites#delete", "collection": COLLECTION, "rkey": del },
                    ] }),
                    vec![(fresh.clone(), Some(cid.clone())), (upd, Some(upd_cid)), (del, None)],
                )
            }
            _ => (
                "com.atproto.repo.putRecord",
                json!({ "repo": did, "collection": COLLECTION, "rkey": fresh, "record": record }),
                vec![(fresh.clone(), Some(cid.clone()))],
            ),
        };
        // applyWrites with update and delete of the same key would be
        // ambiguous; skip that draw.
        if kind == 4 && effects[1].0 == effects[2].0 {
            continue;
        }
        let body = serde_json::to_vec(&body).expect("json");
        let was_killed = killed.load(Ordering::SeqCst);
        match x.try_request(Method::POST, &format!("/xrpc/{nsid}"), &headers, Some(body)).await {
            Ok(resp) if resp.status == StatusCode::OK => {
                let out = resp.json();
                if matches!(kind, 0 | 1 | 2 | 5) && out["cid"] != cid.as_str() {
                    w.errors.push(format!("{nsid}: acknowledged cid {} != expected {cid}", out["cid"]));
                }
                if !out["commit"]["cid"].is_string() {
                    w.errors.push(format!("{nsid}: acknowledged without a commit: {out}"));
                }
                w.apply(&effects);
                w.acked += 1;
            }
            Ok(resp) => {
                w.errors.push(format!(
                    "{nsid} answered {}: {}",
                    resp.status,
                    resp.text().chars().take(300).collect::<String>()
                ));
                return w;
            }
            Err(e) => {
                if !was_killed && !killed.load(Ordering::SeqCst) {
                    w.errors.push(format!("{nsid} failed before the kill: {e}"));
                }
                w.pending = Some(effects);
                return w;
            }
        }
    }
    w.errors.push("writer never saw the kill".into());
    w
}

/// Checks the restarted server against every writer's acknowledged state,
/// resolves each lost answer (applied entirely or not at all), and verifies
/// the exported repository.
async fn check_state(x: &Xrpc, did: &str, plc_url: &str, writers: &mut [Writer]) {
    let actual = x.list_all(did, COLLECTION).await;
    let mut claimed = HashSet::new();
    for w in writers.iter_mut() {
        if let Some(effects) = w.pending.take() {
            let now = |k: &String| actual.get(k).map(|(c, _)| c.clone());
            let all_new = effects.iter().all(|(k, c)| now(k) == *c);
            let all_old = effects.iter().all(|(k, _)| now(k) == w.model.get(k).cloned());
            assert!(
                all_new || all_old,
                "writer {}: the write cut by the kill was partially applied: {effects:?}",
                w.id
            );
            if all_new {
                w.apply(&effects);
                eprintln!("  writer {}: the write cut by the kill had committed", w.id);
            } else {
                eprintln!("  writer {}: the write cut by the kill had not committed", w.id);
            }
        }
        for (rkey, cid) in &w.model {
            let got = actual.get(rkey).map(|(c, _)| c.as_str());
            assert_eq!(
                got,
                Some(cid.as_str()),
                "writer {}: acknowledged write of {rkey} lost or changed",
                w.id
            );
            claimed.insert(rkey.clone());
        }
    }
    for rkey in actual.keys() {
        assert!(
            claimed.contains(rkey),
            "{rkey} exists but its acknowledged deletion (or no acknowledged creation) says otherwise"
        );
    }
    let snap = verify_repo(x, did, plc_url).await;
    assert_eq!(snap.leaves.len(), actual.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9() {
    let work = tempfile::tempdir().expect("tempdir");
    let plc = MockPlc::start().await;
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut writers: Vec<Writer> = (0..WRITERS)
        .map(|id| Writer {
            id,
            model: BTreeMap::new(),
            pending: None,
            next_n: 0,
            acked: 0,
            errors: Vec::new(),
        })
        .collect();
    let mut did: Option<String> = None;

    for round in 0..=ROUNDS {
        let mut server = start_server(work.path(), port, &plc.url).await;
        let x = Xrpc::new(base.clone());
        let (status, resolved) = x.get("com.atproto.identity.resolveHandle", &[("handle", HANDLE)]).await;
        assert_eq!(status, StatusCode::OK, "{resolved}");
        let this_did = resolved["did"].as_str().expect("did").to_owned();
        match &did {
            None => did = Some(this_did.clone()),
            Some(d) => assert_eq!(d, &this_did, "the DID changed across a restart"),
        }
        check_state(&x, &this_did, &plc.url, &mut writers).await;
        if round == ROUNDS {
            break;
        }

        let (access, _) = x.login_as(HANDLE, PASSWORD).await;
        let killed = Arc::new(AtomicBool::new(false));
        let acked_before: usize = writers.iter().map(|w| w.acked).sum();
        let tasks: Vec<_> = writers
            .drain(..)
            .map(|w| {
                tokio::spawn(run_writer(
                    w,
                    Xrpc::new(base.clone()),
                    this_did.clone(),
                    access.clone(),
                    round,
                    killed.clone(),
                ))
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(1000)).await;
        killed.store(true, Ordering::SeqCst);
        server.kill().await;
        for t in tasks {
            writers.push(t.await.expect("writer task"));
        }
        let errors: Vec<&String> = writers.iter().flat_map(|w| &w.errors).collect();
        assert!(errors.is_empty(), "round {round}: {errors:#?}\n{}", server.log_tail());
        let acked: usize = writers.iter().map(|w| w.acked).sum::<usize>() - acked_before;
        assert!(acked >= 8, "round {round}: only {acked} writes acknowledged in 1 s");
        let cut = writers.iter().filter(|w| w.pending.is_some()).count();
        eprintln!("round {round}: {acked} writes acknowledged, {cut} cut by kill -9");
    }
    let did = did.expect("did");
    assert_eq!(plc.posts(&did), 1, "one PLC genesis, however many restarts");
    assert_eq!(plc.total_posts(), 1);
}
