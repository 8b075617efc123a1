#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! Project snapshots through control's agent API (issue 15): a host pulls
//! and pushes only the snapshots of sessions it runs now; a push that is
//! over the owner's quota, broken or not matching its hash stores nothing
//! and the previous version stays the latest; what was pushed comes back
//! byte for byte, older versions on request, damaged ones never again.
//! The agents are played by the test with their real HostKeys.

use mysql_async::prelude::*;
use opencloud_e2e::control::ControlOptions;
use opencloud_e2e::external::register_external;
use opencloud_e2e::hosts::agent_hello;
use opencloud_e2e::upstream::loopback;
use opencloud_e2e::user::TestUser;
use opencloud_e2e::TestStack;
use opencloud_protocol::snapshots::{
    damaged_path, snapshot_path, Stored, CREATED_HEADER, SHA256_HEADER, VERSION_HEADER,
};
use reqwest::StatusCode;
use serde_json::json;
use sha2::{Digest, Sha256};

/// The trial's storage quota in these tests, in MiB.
const QUOTA_MIB: usize = 3;
const MIB: usize = 1 << 20;

/// Two registered hosts of one owner, each running a session of its own.
struct Fixture {
    stack: TestStack,
    owner: TestUser,
    key_a: String,
    key_b: String,
    host_a: u64,
    /// Host A's session (project `project`).
    sid_a: String,
    /// Host B's session, of another project.
    sid_b: String,
    project: u64,
}

impl Fixture {
    async fn start() -> Self {
        let stack = TestStack::control_only_with(ControlOptions {
            env: vec![(
                "OPENCLOUD_CONTROL__BILLING__TRIAL__STORAGE_MIB".into(),
                QUOTA_MIB.to_string(),
            )],
            ..Default::default()
        })
        .await
        .unwrap();
        let owner = stack.host_owner().await;
        let mut hosts = Vec::new();
        for name in ["lab-a", "lab-b"] {
            let (id, key) = stack.add_host(&owner, name).await;
            let hello = serde_json::to_value(agent_hello("10.1.2.3")).unwrap();
            let (status, body) = stack
                .post_as_agent(&key, "/agent/v1/register", &hello)
                .await;
            assert_eq!(status, StatusCode::OK, "register: {body}");
            hosts.push((id, key));
        }
        let [(host_a, key_a), (host_b, key_b)] = <[_; 2]>::try_from(hosts).unwrap();
        let project = owner.create_project("Thesis").await;
        let other = owner.create_project("Other").await;
        let mut fixture = Self {
            stack,
            owner,
            key_a,
            key_b,
            host_a,
            sid_a: String::new(),
            sid_b: String::new(),
            project,
        };
        fixture.sid_a = fixture.session(host_a, project, "running").await;
        fixture.sid_b = fixture.session(host_b, other, "running").await;
        fixture
    }

    /// A session of `project` in `state` on host `host`.
    async fn session(&self, host: u64, project: u64, state: &str) -> String {
        let pool = mysql_async::Pool::new(self.stack.db.url.as_str());
        let external = register_external(
            &pool,
            &self.stack.host_ca(),
            self.owner.id,
            project,
            loopback(9),
        )
        .await
        .unwrap();
        let _ = pool.disconnect().await;
        let sid = external.sid().to_owned();
        self.stack
            .db
            .conn()
            .await
            .exec_drop(
                "UPDATE sessions SET host_id = ?, state = ? WHERE sid = ?",
                (host, state, &sid),
            )
            .await
            .unwrap();
        sid
    }

    async fn push(
        &self,
        key: &str,
        sid: &str,
        body: &[u8],
        sha256: &str,
        streamed: bool,
    ) -> (StatusCode, serde_json::Value) {
        self.stack
            .put_as_agent(
                key,
                &format!("{}?reason=autosave", snapshot_path(sid)),
                &[(SHA256_HEADER, sha256)],
                body.to_vec(),
                streamed,
            )
            .await
    }

    /// Pushes `body` as host A for its session; the version stored.
    async fn push_good(&self, body: &[u8]) -> Stored {
        let (status, stored) = self
            .push(&self.key_a, &self.sid_a, body, &sha(body), true)
            .await;
        assert_eq!(status, StatusCode::OK, "push: {stored}");
        serde_json::from_value(stored).unwrap()
    }

    /// What host A gets for its session: (version, body), `None` on 204.
    async fn pull(&self, query: &str) -> Option<(u64, Vec<u8>)> {
        let path = format!("{}{query}", snapshot_path(&self.sid_a));
        let (status, headers, body) = self.stack.get_as_agent(&self.key_a, &path).await;
        if status == StatusCode::NO_CONTENT {
            return None;
        }
        assert_eq!(status, StatusCode::OK, "pull {query}");
        let header = |name: &str| headers[name].to_str().unwrap().to_owned();
        assert_eq!(
            header(SHA256_HEADER),
            sha(&body),
            "the hash names the bytes"
        );
        let created: u64 = header(CREATED_HEADER).parse().unwrap();
        assert!(created.abs_diff(now()) < 600, "created {created}");
        Some((header(VERSION_HEADER).parse().unwrap(), body))
    }

    async fn versions(&self) -> u64 {
        self.stack
            .db
            .count(&format!(
                "project_versions WHERE project_id = {}",
                self.project
            ))
            .await
    }

    /// Objects in the store (a directory beside control's keys file).
    fn objects(&self) -> usize {
        let mut n = 0;
        let mut todo = vec![self.stack.control().dir.join("store")];
        while let Some(dir) = todo.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    todo.push(path);
                } else {
                    n += 1;
                }
            }
        }
        n
    }
}

fn sha(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Bytes that do not compress or repeat, like a real archive's.
fn archive(len: usize, seed: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut block = Sha256::digest([seed]);
    while out.len() < len {
        out.extend_from_slice(&block);
        block = Sha256::digest(block);
    }
    out.truncate(len);
    out
}

#[tokio::test]
async fn a_host_gets_nothing_of_sessions_it_does_not_run() {
    let f = Fixture::start().await;
    let secret = archive(1000, 1);
    f.push_good(&secret).await;
    let ended = f.session(f.host_a, f.project, "stopped").await;
    let asks = [
        ("another host's session", &f.key_b, f.sid_a.clone()),
        (
            "its own session, asked by another host",
            &f.key_a,
            f.sid_b.clone(),
        ),
        ("an ended session", &f.key_a, ended.clone()),
        ("a made-up sid", &f.key_a, "a".repeat(26)),
        ("not a sid", &f.key_a, "..%2F..%2Fetc".into()),
    ];
    for (what, key, sid) in &asks {
        let (status, headers, body) = f.stack.get_as_agent(key, &snapshot_path(sid)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{what}");
        assert!(headers.get(VERSION_HEADER).is_none(), "{what}");
        assert!(
            !body.windows(secret.len()).any(|w| w == secret.as_slice()),
            "{what}: got the snapshot"
        );
    }
    let (status, _, _) = f
        .stack
        .get_as_agent("not-a-host-key", &snapshot_path(&f.sid_a))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // The session's own host still gets it.
    assert_eq!(f.pull("").await, Some((1, secret)));
}

#[tokio::test]
async fn a_host_pushing_to_or_reporting_on_sessions_it_does_not_run_stores_nothing() {
    let f = Fixture::start().await;
    f.push_good(b"first").await;
    let ended = f.session(f.host_a, f.project, "stopped").await;
    let body = archive(5000, 2);
    for (what, key, sid) in [
        ("another host's session", &f.key_b, &f.sid_a),
        ("an ended session", &f.key_a, &ended),
        ("a made-up sid", &f.key_a, &"b".repeat(26)),
    ] {
        let (status, answer) = f.push(key, sid, &body, &sha(&body), false).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{what}: {answer}");
        let (status, answer) = f
            .stack
            .post_as_agent(key, &damaged_path(sid), &json!({"version": 1}))
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{what}: {answer}");
    }
    assert_eq!(f.versions().await, 1);
    assert_eq!(f.objects(), 1);
    assert_eq!(f.pull("").await, Some((1, b"first".to_vec())));
}

#[tokio::test]
async fn a_push_over_quota_or_not_matching_its_hash_stores_nothing() {
    let f = Fixture::start().await;
    f.push_good(b"kept").await;
    let big = archive((QUOTA_MIB + 1) * MIB, 3);
    for streamed in [false, true] {
        let (status, answer) = f.push(&f.key_a, &f.sid_a, &big, &sha(&big), streamed).await;
        assert_eq!(
            status,
            StatusCode::PAYLOAD_TOO_LARGE,
            "streamed {streamed}: {answer}"
        );
        assert_eq!(answer["error"]["code"], "quota_exceeded", "{answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("{QUOTA_MIB} MiB in all"))
                && message.contains("nothing was stored"),
            "{message}"
        );
    }
    // The owner is told next to the session, not only the host.
    let notice: Option<String> = f
        .stack
        .db
        .conn()
        .await
        .exec_first("SELECT notice FROM sessions WHERE sid = ?", (&f.sid_a,))
        .await
        .unwrap()
        .unwrap();
    let notice = notice.unwrap_or_default();
    assert!(
        notice.contains("could not be saved") && notice.contains("more storage"),
        "{notice}"
    );
    let body = archive(2 * MIB, 4);
    let (status, answer) = f
        .push(&f.key_a, &f.sid_a, &body, &sha(b"something else"), true)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert_eq!(answer["error"]["field"], "sha256", "{answer}");
    let (status, answer) = f.push(&f.key_a, &f.sid_a, &body, "not-hex", true).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert_eq!(f.versions().await, 1);
    assert_eq!(f.objects(), 1, "nothing half-written is left in the store");
    assert_eq!(f.pull("").await, Some((1, b"kept".to_vec())));

    // A lot with a larger quota (a bought package's) makes room.
    f.stack
        .db
        .conn()
        .await
        .exec_drop(
            "UPDATE lots SET storage_mib = ? WHERE user_id = ?",
            (QUOTA_MIB * 2, f.owner.id),
        )
        .await
        .unwrap();
    assert_eq!(f.push_good(&big).await.version, 2);
}

#[tokio::test]
async fn pushed_snapshots_come_back_whole_older_ones_on_request_damaged_ones_never() {
    let f = Fixture::start().await;
    assert_eq!(f.pull("").await, None, "a new project has no snapshot");
    // Larger than the 1 MiB every other request is held to.
    let first = archive(2 * MIB + 123, 5);
    let stored = f.push_good(&first).await;
    assert_eq!(
        stored,
        Stored {
            version: 1,
            size_bytes: first.len() as u64
        }
    );
    let second = archive(MIB, 6);
    assert_eq!(f.push_good(&second).await.version, 2);
    assert_eq!(f.pull("").await, Some((2, second.clone())));
    assert_eq!(f.pull("?before=2").await, Some((1, first.clone())));
    assert_eq!(f.pull("?before=1").await, None);

    // The session says where its files came from, on My projects too.
    let restored: Option<u64> = f
        .stack
        .db
        .conn()
        .await
        .exec_first(
            "SELECT restored_version FROM sessions WHERE sid = ?",
            (&f.sid_a,),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(restored, Some(1));
    let page = f.owner.page("/projects").await;
    assert!(
        page.contains("Your files were restored from the autosave of less than a minute ago."),
        "{page}"
    );

    // Version 2 fails the agent's check: never restored again.
    let (status, answer) = f
        .stack
        .post_as_agent(&f.key_a, &damaged_path(&f.sid_a), &json!({"version": 2}))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{answer}");
    assert_eq!(f.pull("").await, Some((1, first)));
    let (status, _) = f
        .stack
        .post_as_agent(&f.key_a, &damaged_path(&f.sid_a), &json!({"version": 9}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let page = f.owner.page(&format!("/projects/{}", f.project)).await;
    assert!(
        page.contains("was damaged, so an older one was used"),
        "{page}"
    );
    // Numbering goes on past the damaged version.
    assert_eq!(f.push_good(b"third").await.version, 3);
}
