//! `serve --config FILE`: a per-disk TOML file holding serve's options, so long option
//! lists and secrets stay off the command line (and out of `ps`).
//!
//! The file deserialises into [`ServeArgs`] itself: its keys are serve's long option
//! names (`socket`, `queues`, `target`, `connect-timeout`, ...) and the disk is `disk`.
//! Options given on the command line override the file's ([`merge`]). A key that is no
//! option is an error naming it. Secrets never sit in the file: a target or notification
//! URL carrying credentials (`user:password@`, a `?query` such as a presigned signature)
//! is refused there; such URLs are read from the files named by `target-file` and
//! `notify-file`.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Deserializer};

use super::serve::ServeArgs;
use super::NetArgs;
use crate::net::redact_url;

/// Size fields (`rate`, `min-rate`) take a number of bytes or a string such as "64K".
pub(super) fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Option::<Size>::deserialize(d)? {
        None => Ok(None),
        Some(Size::Bytes(n)) => Ok(Some(n)),
        Some(Size::Text(s)) => super::size::parse_size(&s)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

/// The keys a config file may hold: the serialised names of [`ServeArgs`]' fields.
pub(super) fn known_keys() -> BTreeSet<String> {
    match serde_json::to_value(ServeArgs::default()) {
        Ok(serde_json::Value::Object(m)) => m.into_iter().map(|(k, _)| k).collect(),
        _ => BTreeSet::new(),
    }
}

/// Reads and checks a config file.
pub(super) fn load(path: &Path) -> Result<ServeArgs> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the config file {}", path.display()))?;
    let at = |e: toml::de::Error| {
        let line = e
            .span()
            .map(|s| {
                let n = text[..s.start].lines().count().max(1);
                match text.lines().nth(n - 1).and_then(|l| l.split_once('=')) {
                    Some((key, _)) => format!(" (line {n}, key `{}`)", key.trim()),
                    None => format!(" (line {n})"),
                }
            })
            .unwrap_or_default();
        usage(format!(
            "config file {}: {}{line}",
            path.display(),
            e.message().trim().replace('\n', " ")
        ))
    };
    let table: toml::Table = text.parse().map_err(at)?;
    let known = known_keys();
    if let Some(key) = table.keys().find(|k| !known.contains(*k)) {
        return Err(usage(format!(
            "config file {}: unknown key `{key}` (keys are serve's long option names, \
             e.g. `socket`, `target`, `connect-timeout`; see `streamboot serve --help`)",
            path.display()
        )));
    }
    // Key by key first, so that an error names its key and line (serde's flatten, used
    // for the net options, loses the position).
    for (key, value) in &table {
        let one = toml::Value::Table(toml::Table::from_iter([(key.clone(), value.clone())]));
        if let Err(e) = one.try_into::<ServeArgs>() {
            let line = text
                .lines()
                .position(|l| {
                    l.trim_start()
                        .strip_prefix(key.as_str())
                        .is_some_and(|r| r.trim_start().starts_with('='))
                })
                .map(|n| format!(" (line {})", n + 1))
                .unwrap_or_default();
            return Err(usage(format!(
                "config file {}: `{key}`: {}{line}",
                path.display(),
                e.message().trim().replace('\n', " ")
            )));
        }
    }
    let args: ServeArgs = toml::from_str(&text).map_err(at)?;
    for (key, url) in args
        .targets
        .iter()
        .map(|u| ("target", u))
        .chain(args.notify.iter().map(|u| ("notify", u)))
    {
        if redact_url(url) != *url {
            return Err(usage(format!(
                "config file {}: `{key}` holds a secret (user:password@ or a ?query) in {}; \
                 put the URL in a file of its own (mode 0600) named by `{key}-file`",
                path.display(),
                redact_url(url)
            )));
        }
    }
    if !args.net.headers.is_empty() {
        return Err(usage(format!(
            "config file {}: `header` values are secrets; put the headers in a file of \
             their own (mode 0600) named by `header-file`",
            path.display()
        )));
    }
    Ok(args)
}

/// `cli` with every option it leaves unset taken from `file`. A target (`target`,
/// `target-file`) or notification URL (`notify`, `notify-file`) given on the command line
/// replaces the file's in either form.
pub(super) fn merge(cli: ServeArgs, file: ServeArgs) -> ServeArgs {
    // Destructured so that a new field cannot be forgotten here.
    let ServeArgs {
        disk,
        socket,
        fd,
        config: _,
        pidfile,
        queues,
        read_only,
        socket_group,
        allow_unsealed_memory,
        max_trial_starts,
        targets,
        target_files,
        no_hydrate,
        rate,
        control,
        notify,
        notify_file,
        notify_secret,
        metrics_listen,
        record_profile,
        boot_profile,
        net,
    } = file;
    let cli_targets = !cli.targets.is_empty() || !cli.target_files.is_empty();
    let cli_notify = cli.notify.is_some() || cli.notify_file.is_some();
    ServeArgs {
        disk: cli.disk.or(disk),
        socket: cli.socket.or(socket),
        fd: cli.fd.or(fd),
        config: cli.config,
        pidfile: cli.pidfile.or(pidfile),
        queues: cli.queues.or(queues),
        read_only: cli.read_only || read_only,
        socket_group: cli.socket_group.or(socket_group),
        allow_unsealed_memory: cli.allow_unsealed_memory || allow_unsealed_memory,
        max_trial_starts: cli.max_trial_starts.or(max_trial_starts),
        targets: if cli_targets { cli.targets } else { targets },
        target_files: if cli_targets {
            cli.target_files
        } else {
            target_files
        },
        no_hydrate: cli.no_hydrate || no_hydrate,
        rate: cli.rate.or(rate),
        control: cli.control.or(control),
        notify: if cli_notify { cli.notify } else { notify },
        notify_file: if cli_notify {
            cli.notify_file
        } else {
            notify_file
        },
        notify_secret: cli.notify_secret.or(notify_secret),
        metrics_listen: cli.metrics_listen.or(metrics_listen),
        record_profile: cli.record_profile.or(record_profile),
        boot_profile: cli.boot_profile.or(boot_profile),
        net: merge_net(cli.net, net),
    }
}

fn merge_net(cli: NetArgs, file: NetArgs) -> NetArgs {
    let NetArgs {
        connect_timeout,
        request_timeout,
        fetch_deadline,
        min_rate,
        allow_cross_origin_redirects,
        headers,
        header_files,
        bearer_token_file,
        cacerts,
        no_default_roots,
        system_roots,
        client_cert,
        client_key,
        cache,
        cache_size,
        s3_endpoint,
        s3_region,
        s3_path_style,
        aws_profile,
    } = file;
    NetArgs {
        connect_timeout: cli.connect_timeout.or(connect_timeout),
        request_timeout: cli.request_timeout.or(request_timeout),
        fetch_deadline: cli.fetch_deadline.or(fetch_deadline),
        min_rate: cli.min_rate.or(min_rate),
        allow_cross_origin_redirects: cli.allow_cross_origin_redirects
            || allow_cross_origin_redirects,
        // Lists given on the command line replace the file's (as targets do).
        headers: if cli.headers.is_empty() {
            headers
        } else {
            cli.headers
        },
        header_files: if cli.header_files.is_empty() {
            header_files
        } else {
            cli.header_files
        },
        bearer_token_file: cli.bearer_token_file.or(bearer_token_file),
        cacerts: if cli.cacerts.is_empty() {
            cacerts
        } else {
            cli.cacerts
        },
        no_default_roots: cli.no_default_roots || no_default_roots,
        system_roots: cli.system_roots || system_roots,
        client_cert: cli.client_cert.or(client_cert),
        client_key: cli.client_key.or(client_key),
        cache: cli.cache.or(cache),
        cache_size: cli.cache_size.or(cache_size),
        s3_endpoint: cli.s3_endpoint.or(s3_endpoint),
        s3_region: cli.s3_region.or(s3_region),
        s3_path_style: cli.s3_path_style || s3_path_style,
        aws_profile: cli.aws_profile.or(aws_profile),
    }
}

/// Reads the URLs of a secret file: one a line; blank lines and `#` comments are skipped.
/// A file others may read is used, with a warning.
pub(super) fn read_secret_urls(path: &Path) -> Result<Vec<String>> {
    use std::os::unix::fs::MetadataExt;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the URL file {}", path.display()))?;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.mode() & 0o004 != 0 {
            tracing::warn!(file = %path.display(), "URL file is readable by everyone (chmod 0600)");
        }
    }
    let urls: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    if urls.is_empty() {
        return Err(usage(format!(
            "the URL file {} holds no URL",
            path.display()
        )));
    }
    Ok(urls)
}

/// A wrong command line or config file: exit code 2, kind "usage".
fn usage(msg: String) -> anyhow::Error {
    super::exit::UsageError(msg).into()
}

/// A required option, or an error saying where to give it.
pub(super) fn required<T: Clone>(v: &Option<T>, what: &str) -> Result<T> {
    v.clone().ok_or_else(|| {
        usage(format!(
            "serve needs {what}: give it on the command line or in --config"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Args;

    /// Every long option of `serve` is a config key and every key an option (the CLI and
    /// the file cannot drift apart), except `--config` itself.
    #[test]
    fn keys_are_the_long_options() {
        let cmd = ServeArgs::augment_args(clap::Command::new("serve"));
        let options: BTreeSet<String> = cmd
            .get_arguments()
            .filter_map(|a| match a.get_long() {
                Some(l) => Some(l.to_string()),
                None => a.is_positional().then(|| a.get_id().to_string()),
            })
            .filter(|k| k != "config")
            .collect();
        assert_eq!(options, known_keys());
    }

    #[test]
    fn flags_override_the_file_and_targets_replace_as_a_whole() {
        let file: ServeArgs = toml::from_str(
            "disk = '/d'\nqueues = 4\nrate = '1M'\nmin-rate = 1024\n\
             target-file = ['/etc/t']\nconnect-timeout = 3\nread-only = true\n\
             cache = '/var/cache/sb'\ncache-size = '2G'",
        )
        .unwrap();
        let cli = ServeArgs {
            queues: Some(2),
            targets: vec!["http://a/x".into()],
            ..ServeArgs::default()
        };
        let m = merge(cli, file);
        assert_eq!(m.disk.as_deref(), Some(Path::new("/d")));
        assert_eq!(m.queues, Some(2));
        assert_eq!(m.rate, Some(1 << 20));
        assert_eq!(m.net.min_rate, Some(1024));
        assert_eq!(m.net.connect_timeout, Some(3));
        assert!(m.read_only);
        assert_eq!(m.targets, vec!["http://a/x".to_string()]);
        assert!(m.target_files.is_empty());
        assert_eq!(m.net.cache.as_deref(), Some(Path::new("/var/cache/sb")));
        assert_eq!(m.net.cache_size, Some(2 << 30));
    }

    #[test]
    fn s3_keys_merge_like_the_other_net_options() {
        let file: ServeArgs = toml::from_str(
            "s3-endpoint = 'http://127.0.0.1:9000'\ns3-region = 'eu-west-1'\n\
             s3-path-style = true\naws-profile = 'file'",
        )
        .unwrap();
        let mut cli = ServeArgs::default();
        cli.net.aws_profile = Some("cli".into());
        let s3 = merge(cli, file).net.http_options().s3;
        assert_eq!(s3.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(s3.region.as_deref(), Some("eu-west-1"));
        assert!(s3.path_style);
        assert_eq!(s3.profile.as_deref(), Some("cli"));
    }
}
