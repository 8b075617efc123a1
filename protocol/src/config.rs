//! Reading a TOML config file with environment overrides, so that every
//! OpenCloud binary reports a wrong key the same way: which file, which key.
//!
//! An override `PREFIX__SECTION__KEY=value` sets `section.key`. The value is
//! read as a TOML value when it parses as one (`20`, `true`, `["a"]`) and as
//! a plain string otherwise.

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::keys::Keyring;

/// Why a config could not be loaded; every variant names the file, and
/// the key where there is one.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
    /// A file the process makes for itself could not be made.
    #[error("cannot write {path}: {message}")]
    Write { path: String, message: String },
    /// The file is not valid TOML.
    #[error("{file}: {message}")]
    Syntax { file: String, message: String },
    /// A value that parsed but is not acceptable.
    #[error("{file}: key `{key}`: {message}")]
    Invalid {
        file: String,
        key: &'static str,
        message: String,
    },
    /// The keys file the config points to is wrong.
    #[error(transparent)]
    Keys(#[from] crate::keys::KeyringError),
    /// A secret file other users may read or change (see [`check_private`]).
    #[error("{what} {path} is {access} by others (mode {mode:04o}); chmod 600 it")]
    Exposed {
        what: &'static str,
        path: String,
        access: &'static str,
        mode: u32,
    },
    /// A value of the wrong type or an unknown key, in the file or the
    /// environment.
    #[error("{file}: key `{key}`{origin}: {message}")]
    Key {
        file: String,
        key: String,
        /// Names the environment variable when the bad value came from one.
        origin: String,
        message: String,
    },
}

/// Reads a config (or keys) file, naming it when that fails.
pub fn read_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

/// Refuses a secret file whose permission bits `mode` let users other than
/// its owner read it (they would hold the secret) or write it (they would
/// choose it); `what` and `path` name it. Execute bits give nothing away.
pub fn check_private(what: &'static str, path: &str, mode: u32) -> Result<(), ConfigError> {
    let access = if mode & 0o044 != 0 {
        "readable"
    } else if mode & 0o022 != 0 {
        "writable"
    } else {
        return Ok(());
    };
    Err(ConfigError::Exposed {
        what,
        path: path.to_owned(),
        access,
        mode: mode & 0o7777,
    })
}

/// Reads a secret file, refusing it when others may read or change it
/// (the mode is taken from the opened file, so it is the one read).
pub fn read_private_file(what: &'static str, path: &Path) -> Result<String, ConfigError> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let failed = |e: std::io::Error| ConfigError::Read {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let mut file = std::fs::File::open(path).map_err(failed)?;
    let mode = file.metadata().map_err(failed)?.mode();
    check_private(what, &path.display().to_string(), mode)?;
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(failed)?;
    Ok(text)
}

/// Reads the secret file at `path` as [`read_private_file`] does or, when
/// there is none, makes one with what `make` returns (mode 0600 from the
/// start) and returns that: for keys a process makes itself at its first
/// start and keeps. The file appears whole (written aside, then linked into
/// place), and two processes starting at once end up with the same one.
pub fn read_or_create_private_file<E: std::fmt::Display>(
    what: &'static str,
    path: &Path,
    make: impl FnOnce() -> Result<String, E>,
) -> Result<String, ConfigError> {
    if std::fs::symlink_metadata(path).is_ok() {
        return read_private_file(what, path);
    }
    let failed = |message: String| ConfigError::Write {
        path: path.display().to_string(),
        message,
    };
    let text = make().map_err(|e| failed(e.to_string()))?;
    let aside = path.with_extension(format!("new-{}", std::process::id()));
    write_private_file(&aside, &text).map_err(|e| failed(e.to_string()))?;
    let linked = std::fs::hard_link(&aside, path);
    let _ = std::fs::remove_file(&aside);
    match linked {
        Ok(()) => Ok(text),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read_private_file(what, path),
        Err(e) => Err(failed(e.to_string())),
    }
}

/// Writes a secret file (keys, a gateway key) private to its owner from the
/// start: created with mode 0600, never written first and closed after.
pub fn write_private_file(path: &Path, contents: impl AsRef<[u8]>) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?
        .write_all(contents.as_ref())
}

/// Takes every permission of group and others away from `path`, leaving it
/// `private` (0600 for a file, 0700 for a directory). Returns the mode it had
/// when that changed anything, for the caller to say so: what was in it may
/// already have been read.
pub fn close_to_others(path: &Path, private: u32) -> std::io::Result<Option<u32>> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)?.permissions().mode() & 0o7777;
    if mode & 0o077 == 0 {
        return Ok(None);
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(private))?;
    Ok(Some(mode))
}

/// Reads the config file at `path` and hands its text, with the process
/// environment, to `from_toml`: the binary's own parse-and-validate step.
pub fn load<C>(
    path: &Path,
    from_toml: impl FnOnce(&Path, &str, std::env::Vars) -> Result<C, ConfigError>,
) -> Result<C, ConfigError> {
    from_toml(path, &read_file(path)?, std::env::vars())
}

/// Parses the config `text` read from `path` with the overrides among `env`
/// (see [`parse`]), and returns it with the maker of the error for a value in
/// it that parsed but is not acceptable: `invalid(key, message)`.
pub fn parse_file<T: DeserializeOwned>(
    path: &Path,
    text: &str,
    prefix: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(T, impl Fn(&'static str, String) -> ConfigError), ConfigError> {
    let file = path.display().to_string();
    let parsed = parse(&file, text, prefix, env)?;
    let invalid = move |key, message| ConfigError::Invalid {
        file: file.clone(),
        key,
        message,
    };
    Ok((parsed, invalid))
}

/// Reads the keys file that the config file at `config_path` names as
/// `keys_file` (relative to the config file's folder); it must be private
/// to its owner (see [`check_private`]).
pub fn load_keys(config_path: &Path, keys_file: &Path) -> Result<Keyring, ConfigError> {
    let keys_path = config_path
        .parent()
        .unwrap_or(Path::new("."))
        .join(keys_file);
    Ok(Keyring::from_toml(
        &keys_path.display().to_string(),
        &read_private_file("keys file", &keys_path)?,
    )?)
}

/// Parses `text` (from the file called `file`), applies the overrides among
/// `env` whose names start with `prefix__`, and deserialises the result.
pub fn parse<T: DeserializeOwned>(
    file: &str,
    text: &str,
    prefix: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<T, ConfigError> {
    let mut root: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Syntax {
            file: file.to_owned(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
    let marker = format!("{prefix}__");
    let mut overridden: Vec<(String, String)> = Vec::new();
    for (name, value) in env {
        let Some(path) = name.strip_prefix(&marker) else {
            continue;
        };
        let path: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
        set_path(&mut root, &path, parse_value(&value)).map_err(|message| ConfigError::Key {
            file: file.to_owned(),
            key: path.join("."),
            origin: format!(" (from {name})"),
            message,
        })?;
        overridden.push((path.join("."), name));
    }
    serde_path_to_error::deserialize(toml::Value::Table(root)).map_err(|e| {
        let key = e.path().to_string();
        let origin = overridden
            .iter()
            .find(|(path, _)| *path == key)
            .map(|(_, name)| format!(" (from {name})"))
            .unwrap_or_default();
        ConfigError::Key {
            file: file.to_owned(),
            key,
            origin,
            message: e.into_inner().to_string(),
        }
    })
}

fn parse_value(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

fn set_path(root: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("empty key")?;
    let mut table = root;
    for part in parents {
        let entry = table
            .entry(part.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry
            .as_table_mut()
            .ok_or_else(|| format!("`{part}` is not a section"))?;
    }
    table.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        name: String,
        database: Database,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Database {
        url: String,
        pool_max: u32,
    }

    const TEXT: &str = "name = \"x\"\n[database]\nurl = \"mysql://a\"\npool_max = 4\n";

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn overrides_replace_file_values() {
        let got: Sample = parse(
            "c.toml",
            TEXT,
            "OC",
            env(&[
                ("OC__DATABASE__POOL_MAX", "9"),
                ("OC__DATABASE__URL", "mysql://b"),
                ("OTHER", "1"),
            ]),
        )
        .unwrap();
        assert_eq!(got.database.pool_max, 9);
        assert_eq!(got.database.url, "mysql://b");
    }

    #[test]
    fn an_unknown_key_is_named_with_its_file() {
        let err = parse::<Sample>("c.toml", &format!("{TEXT}pool_min = 1\n"), "OC", env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("c.toml: key `database.pool_min`"), "{err}");
        assert!(err.contains("unknown field `pool_min`"), "{err}");
    }

    #[test]
    fn a_bad_override_names_the_variable() {
        let err = parse::<Sample>(
            "c.toml",
            TEXT,
            "OC",
            env(&[("OC__DATABASE__POOL_MAX", "many")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("key `database.pool_max` (from OC__DATABASE__POOL_MAX)"),
            "{err}"
        );
    }

    #[test]
    fn a_secret_file_others_can_read_or_write_is_refused_naming_it_and_its_mode() {
        for mode in [0o600, 0o400, 0o700, 0o100600, 0o611] {
            assert_eq!(
                check_private("keys file", "/x/keys.toml", mode),
                Ok(()),
                "{mode:o}"
            );
        }
        for (mode, message) in [
            (
                0o644,
                "keys file /x/keys.toml is readable by others (mode 0644); chmod 600 it",
            ),
            (
                0o100640,
                "keys file /x/keys.toml is readable by others (mode 0640); chmod 600 it",
            ),
            (
                0o604,
                "keys file /x/keys.toml is readable by others (mode 0604); chmod 600 it",
            ),
            (
                0o620,
                "keys file /x/keys.toml is writable by others (mode 0620); chmod 600 it",
            ),
            (
                0o602,
                "keys file /x/keys.toml is writable by others (mode 0602); chmod 600 it",
            ),
        ] {
            let err = check_private("keys file", "/x/keys.toml", mode).unwrap_err();
            assert_eq!(err.to_string(), message);
        }
    }

    #[test]
    fn a_keys_file_others_can_read_is_refused_before_it_is_parsed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("oc-protocol-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let keys = dir.join("keys.toml");
        write_private_file(&keys, Keyring::generate_toml("k1")).unwrap();
        load_keys(&dir.join("c.toml"), Path::new("keys.toml")).unwrap();
        std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_keys(&dir.join("c.toml"), Path::new("keys.toml")).unwrap_err();
        assert!(
            err.to_string()
                .contains("is readable by others (mode 0644)"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_key_a_process_makes_for_itself_is_made_once_private_and_then_kept() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("oc-protocol-own-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("link.key");
        let made = read_or_create_private_file("link key", &key, || Ok::<_, String>("one".into()));
        assert_eq!(made.unwrap(), "one");
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let kept = read_or_create_private_file("link key", &key, || Ok::<_, String>("two".into()));
        assert_eq!(kept.unwrap(), "one", "made once, then kept");
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "nothing left aside"
        );

        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_or_create_private_file("link key", &key, || Ok::<_, String>("x".into()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("link key") && err.contains("mode 0644"),
            "{err}"
        );

        let nowhere = dir.join("missing").join("link.key");
        let err = read_or_create_private_file("link key", &nowhere, || Ok::<_, String>("x".into()))
            .unwrap_err();
        assert!(matches!(err, ConfigError::Write { .. }), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_syntax_error_names_the_file() {
        let err = parse::<Sample>("c.toml", "name = ", "OC", env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("c.toml: "), "{err}");
    }
}
