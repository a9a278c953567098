//! CLI profiles: named endpoints and credentials, so that `kinesin` commands
//! need no flags (as rpk and nats contexts). Stored as TOML in
//! `$KINESIN_HOME/profiles.toml` (default `~/.config/kinesin`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};

use crate::output::outln;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Profile {
    /// gRPC address of any node (native API, cluster commands).
    pub endpoint: String,
    /// AWS API address of any node (commands that use the Kinesis or SQS
    /// API).
    pub api_endpoint: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub region: String,
}

impl Default for Profile {
    fn default() -> Self {
        Profile {
            endpoint: "127.0.0.1:7451".into(),
            api_endpoint: "127.0.0.1:7450".into(),
            access_key_id: "dev".into(),
            secret_access_key: "dev".into(),
            region: "us-east-1".into(),
        }
    }
}

/// A node address as the CLI's clients dial it (`host:port`), from
/// `host:port` or `http://host:port` (a trailing `/` is fine). The clients
/// speak plain HTTP, so `https://` is refused with a clear message rather
/// than dialled as something else.
pub fn parse_address(value: &str) -> Result<String, String> {
    let trimmed = value.trim().trim_end_matches('/');
    let expected = "expected host:port or http://host:port";
    if trimmed.starts_with("https://") {
        return Err(format!(
            "{value:?}: give the address without a scheme (the CLI uses TLS when KINESIN_INTERNAL_TLS_* name the cluster's certificates); {expected}"
        ));
    }
    let bare = trimmed.strip_prefix("http://").unwrap_or(trimmed);
    match bare.parse::<axum::http::uri::Authority>() {
        Ok(a) if a.port_u16().is_some() && !a.host().is_empty() && !bare.contains('@') => {
            Ok(bare.to_string())
        }
        _ => Err(format!("{value:?} is not a node address: {expected}")),
    }
}

fn path() -> PathBuf {
    let home = std::env::var_os("KINESIN_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config/kinesin")))
        .unwrap_or_else(|| PathBuf::from(".kinesin"));
    home.join("profiles.toml")
}

fn load_all() -> anyhow::Result<BTreeMap<String, Profile>> {
    let path = path();
    match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text)
            .with_context(|| format!("invalid profiles file {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// The named profile; `default` (or built-in defaults) when none is named.
pub fn load(name: Option<&str>) -> anyhow::Result<Profile> {
    let all = load_all()?;
    let mut p = match name {
        Some(n) => all
            .get(n)
            .cloned()
            .with_context(|| format!("no profile named {n} in {}", path().display()))?,
        None => all.get("default").cloned().unwrap_or_default(),
    };
    let profile = name.unwrap_or("default");
    p.endpoint = parse_address(&p.endpoint)
        .map_err(|e| anyhow::anyhow!("profile {profile}: endpoint {e}"))?;
    p.api_endpoint = parse_address(&p.api_endpoint)
        .map_err(|e| anyhow::anyhow!("profile {profile}: api_endpoint {e}"))?;
    Ok(p)
}

#[derive(Subcommand, Debug)]
pub enum ProfileCommand {
    /// Create or update a profile (unset fields keep their value).
    Set {
        name: String,
        #[command(flatten)]
        fields: ProfileFields,
    },
    /// List profiles.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Delete a profile.
    Delete { name: String },
}

#[derive(Args, Debug)]
pub struct ProfileFields {
    #[arg(long, value_parser = parse_address)]
    endpoint: Option<String>,
    #[arg(long, value_parser = parse_address)]
    api_endpoint: Option<String>,
    #[arg(long)]
    access_key_id: Option<String>,
    #[arg(long)]
    secret_access_key: Option<String>,
    #[arg(long)]
    region: Option<String>,
}

fn save(all: &BTreeMap<String, Profile>) -> anyhow::Result<()> {
    let path = path();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&path, toml::to_string(all)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

pub fn run(cmd: ProfileCommand) -> anyhow::Result<()> {
    let mut all = load_all()?;
    match cmd {
        ProfileCommand::Set { name, fields } => {
            let p = all.entry(name.clone()).or_default();
            macro_rules! set {
                ($($f:ident),*) => { $( if let Some(v) = fields.$f { p.$f = v; } )* };
            }
            set!(
                endpoint,
                api_endpoint,
                access_key_id,
                secret_access_key,
                region
            );
            save(&all)?;
            outln!("profile {name} saved in {}", path().display());
        }
        ProfileCommand::List { json } => {
            if json {
                let redacted: BTreeMap<_, _> = all
                    .iter()
                    .map(|(n, p)| {
                        (n, serde_json::json!({"endpoint": p.endpoint, "api_endpoint": p.api_endpoint,
                            "access_key_id": p.access_key_id, "region": p.region}))
                    })
                    .collect();
                outln!("{}", serde_json::to_string_pretty(&redacted)?);
            } else {
                outln!(
                    "{:<16} {:<24} {:<24} {:<20}",
                    "PROFILE",
                    "ENDPOINT",
                    "API ENDPOINT",
                    "ACCESS KEY"
                );
                for (n, p) in &all {
                    outln!(
                        "{n:<16} {:<24} {:<24} {:<20}",
                        p.endpoint,
                        p.api_endpoint,
                        p.access_key_id
                    );
                }
            }
        }
        ProfileCommand::Delete { name } => {
            if all.remove(&name).is_none() {
                anyhow::bail!("no profile named {name}");
            }
            save(&all)?;
            outln!("profile {name} deleted");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_address;

    #[test]
    fn addresses_are_accepted_with_or_without_http_and_refused_clearly() {
        for ok in [
            "127.0.0.1:7461",
            "http://127.0.0.1:7461",
            "http://127.0.0.1:7461/",
            "node-2.kinesin:7451",
            "[::1]:7451",
        ] {
            let parsed = parse_address(ok).unwrap();
            assert!(!parsed.starts_with("http"), "{ok} -> {parsed}");
            assert!(parsed.ends_with(":7461") || parsed.ends_with(":7451"));
        }
        for bad in [
            "127.0.0.1",
            "http://",
            "",
            "a b:1",
            "user@host:1",
            "127.0.0.1:x",
        ] {
            let e = parse_address(bad).unwrap_err();
            assert!(e.contains("host:port"), "{bad}: {e}");
        }
        assert!(parse_address("https://127.0.0.1:7451")
            .unwrap_err()
            .contains("without a scheme"));
    }
}
