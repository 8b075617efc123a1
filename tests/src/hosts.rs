//! Hosts and the sessions placed on them, set up the way their owners and
//! customers do it: through the platform's API behind the gateway. The
//! database is read only to see what control decided.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use opencloud_protocol::agent::{AgentHello, Capacity, HOST_KEY_SCHEME};
use opencloud_protocol::link::{certificate_request, new_private_key};
use serde_json::Value;

use crate::agents::{eventually, AgentProcess};
use crate::stack::TestStack;
use crate::user::TestUser;

/// What a stand-in agent at `address` says when it registers: a modest
/// machine with its link on port 9, no sessions yet, and a request for a
/// link certificate for a key of its own.
pub fn agent_hello(address: &str) -> AgentHello {
    let link_key = new_private_key().expect("a link key");
    AgentHello {
        version: "0.1.0-test".into(),
        address: address.into(),
        link_port: 9,
        capacity: Capacity {
            max_sessions: 4,
            cpu_cores: 8.0,
            memory_mib: 16384,
        },
        cgroup_limits: true,
        sessions: Vec::new(),
        link_csr: certificate_request(&link_key).expect("a certificate request"),
    }
}

impl TestStack {
    /// POSTs `body` to control's agent API as the host whose key is `key`
    /// (`Authorization: HostKey …`), the way an agent does.
    pub async fn post_as_agent(&self, key: &str, path: &str, body: &Value) -> (StatusCode, Value) {
        let r = self
            .http()
            .post(self.url(path))
            .header("authorization", format!("{HOST_KEY_SCHEME} {key}"))
            .json(body)
            .send()
            .await
            .expect("send to control's agent API");
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// GETs `path` from control's agent API as the host whose key is `key`:
    /// (status, headers, body bytes).
    pub async fn get_as_agent(
        &self,
        key: &str,
        path: &str,
    ) -> (StatusCode, reqwest::header::HeaderMap, Vec<u8>) {
        let r = self
            .http()
            .get(self.url(path))
            .header("authorization", format!("{HOST_KEY_SCHEME} {key}"))
            .send()
            .await
            .expect("send to control's agent API");
        let (status, headers) = (r.status(), r.headers().clone());
        let body = r.bytes().await.expect("read the body").to_vec();
        (status, headers, body)
    }

    /// PUTs `body` to control's agent API as the host whose key is `key`,
    /// with `headers`. `streamed`: in 64 KiB pieces without a
    /// Content-Length, as an agent streaming an archive it is still making.
    pub async fn put_as_agent(
        &self,
        key: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
        streamed: bool,
    ) -> (StatusCode, Value) {
        let mut request = self
            .http()
            .put(self.url(path))
            .header("authorization", format!("{HOST_KEY_SCHEME} {key}"));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = if streamed {
            let pieces: Vec<Result<Vec<u8>, std::io::Error>> =
                body.chunks(64 << 10).map(|c| Ok(c.to_vec())).collect();
            request.body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                pieces,
            )))
        } else {
            request.body(body)
        };
        let r = request.send().await.expect("send to control's agent API");
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// A host owner, registered and logged in.
    pub async fn host_owner(&self) -> TestUser {
        self.registered("owner", "Host Owner", Some("host_owner"))
            .await
    }

    /// Adds a host on My hosts and returns (host id, HostKey).
    pub async fn add_host(&self, owner: &TestUser, name: &str) -> (u64, String) {
        let (status, body) = owner.post("/api/v1/hosts", json!({"name": name})).await;
        assert_eq!(status, StatusCode::CREATED, "add host: {body}");
        (
            body["host"]["id"].as_u64().expect("host id"),
            body["host_key"].as_str().expect("host key").to_owned(),
        )
    }

    /// Adds `owner`'s hosts (name, max sessions), starts an agent for
    /// each, and waits until placement may use them all.
    pub async fn online_hosts<const N: usize>(
        &self,
        owner: &TestUser,
        hosts: [(&str, u32); N],
    ) -> [(u64, AgentProcess); N] {
        let mut added = Vec::new();
        for (name, _) in hosts {
            added.push(self.add_host(owner, name).await);
        }
        let agents: Vec<AgentProcess> = added
            .iter()
            .zip(hosts)
            .map(|((_, key), (_, max_sessions))| self.start_agent(key, max_sessions))
            .collect();
        for ((id, _), agent) in added.iter().zip(&agents) {
            self.wait_placeable(*id).await;
            // It registered, so its link key exists: no client may see it.
            agent.link_key();
        }
        let online: Vec<(u64, AgentProcess)> =
            added.into_iter().map(|(id, _)| id).zip(agents).collect();
        match online.try_into() {
            Ok(online) => online,
            Err(_) => unreachable!("one agent per host"),
        }
    }

    /// Waits until the host is online and a gateway has found it reachable,
    /// so placement may use it.
    pub async fn wait_placeable(&self, host_id: u64) {
        let db = &self.db;
        let (_, took) = eventually(
            "the host becoming placeable",
            Duration::from_secs(60),
            || async {
                let n = db
                    .count(&format!(
                        "hosts h JOIN host_reachability r ON r.host_id = h.id \
                         WHERE h.id = {host_id} AND h.state = 'online' AND r.reachable"
                    ))
                    .await;
                (n > 0).then_some(())
            },
        )
        .await;
        println!("host {host_id} placeable after {took:?}");
    }

    /// Session `sid` as control recorded it: (host id, state).
    pub async fn session_row(&self, sid: &str) -> (u64, String) {
        let mut conn = self.db.conn().await;
        mysql_async::prelude::Queryable::exec_first(
            &mut conn,
            "SELECT host_id, state FROM sessions WHERE sid = ?",
            (sid,),
        )
        .await
        .expect("read the session")
        .unwrap_or_else(|| panic!("no session {sid}"))
    }
}
