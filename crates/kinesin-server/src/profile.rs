//! CLI profiles: named endpoints and credentials, so that `kinesin` commands
//! need no flags (as rpk and nats contexts). Stored as TOML in
//! `$KINESIN_HOME/profiles.toml` (default `~/.config/kinesin`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Profile {
    /// gRPC address of any node (native API, cluster commands).
    pub endpoint: String,
    /// AWS API address of any node (commands that use the Kinesis API).
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
    match name {
        Some(n) => all
            .get(n)
            .cloned()
            .with_context(|| format!("no profile named {n} in {}", path().display())),
        None => Ok(all.get("default").cloned().unwrap_or_default()),
    }
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
    #[arg(long)]
    endpoint: Option<String>,
    #[arg(long)]
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
            println!("profile {name} saved in {}", path().display());
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
                println!("{}", serde_json::to_string_pretty(&redacted)?);
            } else {
                println!(
                    "{:<16} {:<24} {:<24} {:<20}",
                    "PROFILE", "ENDPOINT", "API ENDPOINT", "ACCESS KEY"
                );
                for (n, p) in &all {
                    println!(
                        "{n:<16} {:<24} {:<24} {:<20}",
                        p.endpoint, p.api_endpoint, p.access_key_id
                    );
                }
            }
        }
        ProfileCommand::Delete { name } => {
            if all.remove(&name).is_none() {
                anyhow::bail!("no profile named {name}");
            }
            save(&all)?;
            println!("profile {name} deleted");
        }
    }
    Ok(())
}
