//! The static part of the AWS credential chain: `--aws-profile`, the environment, the
//! shared credentials file (read with `configparser`). Keys are never shown (`Debug` prints
//! `***`); the file's text is zeroized once parsed.

use std::path::PathBuf;

use zeroize::Zeroizing;

use super::S3Error;

/// Static keys found by [`chain`].
pub(crate) struct Credential {
    pub key_id: String,
    pub secret_key: String,
    pub token: Option<String>,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credential(***)")
    }
}

/// The shared credentials file: `AWS_SHARED_CREDENTIALS_FILE`, else `~/.aws/credentials`.
pub(crate) fn credentials_path() -> Option<PathBuf> {
    env_path("AWS_SHARED_CREDENTIALS_FILE", "credentials")
}

fn config_path() -> Option<PathBuf> {
    env_path("AWS_CONFIG_FILE", "config")
}

fn env_path(var: &str, file: &str) -> Option<PathBuf> {
    match std::env::var_os(var) {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".aws").join(file)),
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Keys from the chain's static sources, or `None` when none has any (object_store's
/// providers are tried then). `profile` is `--aws-profile`.
pub(crate) fn chain(profile: Option<&str>) -> Result<Option<Credential>, S3Error> {
    if let Some(p) = profile {
        return from_file(p, true);
    }
    if let (Some(key_id), Some(secret_key)) =
        (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY"))
    {
        return Ok(Some(Credential {
            key_id,
            secret_key,
            token: env("AWS_SESSION_TOKEN"),
        }));
    }
    match env("AWS_PROFILE") {
        Some(p) => from_file(&p, true),
        None => from_file("default", false),
    }
}

/// The keys of `profile` in the credentials file. `required`: a missing file or profile
/// is an error (the operator named it), else `None`.
fn from_file(profile: &str, required: bool) -> Result<Option<Credential>, S3Error> {
    let Some(path) = credentials_path() else {
        return if required {
            Err(S3Error::Config(format!(
                "profile {profile:?}: no credentials file (HOME is not set)"
            )))
        } else {
            Ok(None)
        };
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => Zeroizing::new(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => return Ok(None),
        Err(e) => {
            return Err(S3Error::Config(format!(
                "profile {profile:?}: {}: {e}",
                path.display()
            )))
        }
    };
    let mut ini = configparser::ini::Ini::new_cs();
    // The parser's message may quote a line, which may hold a key: not shown.
    let sections = ini
        .read(text.to_string())
        .map_err(|_| S3Error::Config(format!("{}: not a valid INI file", path.display())))?;
    let Some(section) = sections.get(profile) else {
        return if required {
            Err(S3Error::Config(format!(
                "{}: no profile [{profile}]",
                path.display()
            )))
        } else {
            Ok(None)
        };
    };
    let get = |k: &str| {
        section
            .get(k)
            .and_then(|v| v.as_deref())
            .map(str::trim)
            .filter(|v| !v.is_empty())
    };
    match (get("aws_access_key_id"), get("aws_secret_access_key")) {
        (Some(id), Some(secret)) => Ok(Some(Credential {
            key_id: id.to_owned(),
            secret_key: secret.to_owned(),
            token: get("aws_session_token").map(str::to_owned),
        })),
        _ => Err(S3Error::Config(format!(
            "{}: profile [{profile}] lacks aws_access_key_id or aws_secret_access_key",
            path.display()
        ))),
    }
}

/// The `region` of the profile in the config file (`[profile NAME]`, or `[default]`).
pub(crate) fn profile_region(profile: Option<&str>) -> Option<String> {
    let name = profile.map(str::to_owned).or_else(|| env("AWS_PROFILE"));
    let text = std::fs::read_to_string(config_path()?).ok()?;
    let mut ini = configparser::ini::Ini::new_cs();
    ini.read(text).ok()?;
    let section = match name.as_deref() {
        None | Some("default") => "default".to_owned(),
        Some(n) => format!("profile {n}"),
    };
    ini.get(&section, "region").map(|r| r.trim().to_owned())
}
