//! Who a session's Jupyter runs as. An agent running as root gives each
//! project a system user of its own (`oc-p<project_id>`, no login shell), so
//! notebooks never run as root and projects cannot read each other's files.
//! An agent started by an ordinary user runs Jupyter as that user.
//!
//! Warm servers start before their project is known, so they run as pool
//! users (`oc-w<work dir hash>-<slot>`), one per slot of the host: no two
//! live servers share one, and the agent on another work dir of the same
//! machine has its own.

use std::path::Path;

use nix::unistd::{Gid, Uid, User};

use crate::error::Error;

/// The account a session runs under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Whether the agent switches to this user (it is root) or already is it.
    pub switch: bool,
}

/// The user name for a project's sessions.
pub fn project_user(project_id: u64) -> String {
    format!("oc-p{project_id}")
}

/// The user of warm-pool slot `slot` of the agent on `work_dir`.
pub fn pool_user(work_dir: &Path, slot: u32) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(work_dir.as_os_str().as_encoded_bytes());
    format!("oc-w{}-{slot}", hex::encode(&digest[..4]))
}

pub fn running_as_root() -> bool {
    Uid::effective().is_root()
}

/// The current user, for an agent that is not root.
pub fn current() -> RunAs {
    let uid = Uid::effective();
    let gid = Gid::effective();
    let name = User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| format!("uid{uid}"));
    RunAs {
        name,
        uid: uid.as_raw(),
        gid: gid.as_raw(),
        switch: false,
    }
}

/// The user `name` (a project's or a pool slot's), created with `useradd`
/// when missing. Callers serialise calls (useradd locks /etc/passwd and
/// fails when it is busy).
pub async fn ensure_user(name: &str, home: &Path) -> Result<RunAs, Error> {
    let name = name.to_owned();
    if let Some(user) = lookup(&name)? {
        return Ok(user);
    }
    let shell = ["/usr/sbin/nologin", "/sbin/nologin", "/bin/false"]
        .into_iter()
        .find(|s| Path::new(s).exists())
        .unwrap_or("/bin/false");
    let mut failure = String::new();
    // useradd fails while another process (another agent, a package
    // install) holds /etc/passwd's lock: a few tries.
    for attempt in 0..5u64 {
        if attempt > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(200 * attempt)).await;
        }
        let output = tokio::process::Command::new("useradd")
            .args([
                "--system",
                "--user-group",
                "--no-create-home",
                "--shell",
                shell,
            ])
            .arg("--home-dir")
            .arg(home)
            .arg(&name)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .output()
            .await
            .map_err(|e| Error::User {
                user: name.clone(),
                message: format!("cannot run useradd: {e}"),
            })?;
        // Made by us, or by another agent on this machine meanwhile.
        if let Some(user) = lookup(&name)? {
            tracing::info!(user = %name, "created the session user");
            return Ok(user);
        }
        failure = format!(
            "useradd failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Err(Error::User {
        user: name,
        message: failure,
    })
}

fn lookup(name: &str) -> Result<Option<RunAs>, Error> {
    let user = User::from_name(name).map_err(|e| Error::User {
        user: name.to_owned(),
        message: format!("cannot look it up: {e}"),
    })?;
    let Some(user) = user else {
        return Ok(None);
    };
    if user.uid.is_root() || user.gid.as_raw() == 0 {
        return Err(Error::User {
            user: name.to_owned(),
            message: "exists with uid or gid 0; refusing to run notebooks as it".into(),
        });
    }
    Ok(Some(RunAs {
        name: user.name,
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
        switch: true,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_users_are_short_valid_names() {
        let name = project_user(u64::MAX);
        assert_eq!(name, "oc-p18446744073709551615");
        assert!(name.len() <= 32);
    }

    #[test]
    fn pool_users_are_short_and_differ_between_work_dirs() {
        let a = pool_user(Path::new("/srv/host-a"), 5);
        let b = pool_user(Path::new("/srv/host-b"), 5);
        assert!(a.starts_with("oc-w") && a.ends_with("-5"), "{a}");
        assert_ne!(a, b);
        assert_eq!(a, pool_user(Path::new("/srv/host-a"), 5));
        assert!(pool_user(Path::new("/x"), u32::MAX).len() <= 32);
    }

    #[test]
    fn root_is_never_a_project_user() {
        let err = lookup("root").unwrap_err().to_string();
        assert!(err.contains("uid or gid 0"), "{err}");
    }

    #[test]
    fn the_current_user_is_not_switched_to() {
        let me = current();
        assert!(!me.switch);
        assert_eq!(me.uid, Uid::effective().as_raw());
    }
}
