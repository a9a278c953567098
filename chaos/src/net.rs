//! Hosts on one machine: one network namespace per node on a bridge, and the
//! network faults (partitions, packet loss) as nftables rules inside the
//! namespaces. Every name starts with `kch-`; cleanup removes only those.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::Mutex;

use anyhow::{bail, Context};

pub const BRIDGE: &str = "kch-br0";
/// The host's address on the bridge: clients and the harness live here.
pub const HOST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);

pub fn namespace(node: u32) -> String {
    format!("kch-n{node}")
}

pub fn node_addr(node: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, 10 + node as u8)
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn nft(node: u32, rules: &str) -> anyhow::Result<()> {
    let ns = namespace(node);
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("cannot run nft")?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().context("nft stdin")?;
        stdin.write_all(rules.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft in {ns} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The namespaces and bridge of one run.
pub struct Net {
    hosts: Mutex<BTreeSet<u32>>,
}

fn add_namespace(n: u32) -> anyhow::Result<()> {
    let ns = namespace(n);
    let (host_end, ns_end) = (format!("kch-v{n}"), format!("kch-p{n}"));
    run("ip", &["netns", "add", &ns])?;
    run(
        "ip",
        &[
            "link", "add", &host_end, "type", "veth", "peer", "name", &ns_end,
        ],
    )?;
    run("ip", &["link", "set", &host_end, "master", BRIDGE, "up"])?;
    run("ip", &["link", "set", &ns_end, "netns", &ns])?;
    run(
        "ip",
        &[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/24", node_addr(n)),
            "dev",
            &ns_end,
        ],
    )?;
    run("ip", &["-n", &ns, "link", "set", &ns_end, "up"])?;
    run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
    nft(
        n,
        "table inet kch {\n chain input { type filter hook input priority 0; policy accept; }\n}\n",
    )
}

impl Net {
    /// Removes whatever an earlier (crashed) run left behind, then builds the
    /// bridge and one namespace per node.
    pub fn create(nodes: u32) -> anyhow::Result<Net> {
        cleanup();
        run("ip", &["link", "add", BRIDGE, "type", "bridge"])?;
        run(
            "ip",
            &["addr", "add", &format!("{HOST_ADDR}/24"), "dev", BRIDGE],
        )?;
        run("ip", &["link", "set", BRIDGE, "up"])?;
        for n in 1..=nodes {
            add_namespace(n)?;
        }
        Ok(Net {
            hosts: Mutex::new((1..=nodes).collect()),
        })
    }

    /// One more host (a node joining the cluster).
    pub fn add_host(&self, n: u32) -> anyhow::Result<()> {
        add_namespace(n)?;
        self.hosts.lock().expect("hosts lock").insert(n);
        Ok(())
    }

    /// Drops traffic between every pair of nodes in different `sides`
    /// (both directions: each side drops what arrives from the other).
    /// The host (clients) still reaches every node.
    pub fn partition(&self, sides: &[Vec<u32>]) -> anyhow::Result<()> {
        for (i, side) in sides.iter().enumerate() {
            let others: Vec<String> = sides
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .flat_map(|(_, s)| s.iter().map(|n| node_addr(*n).to_string()))
                .collect();
            if others.is_empty() {
                continue;
            }
            for n in side {
                nft(
                    *n,
                    &format!(
                        "add rule inet kch input ip saddr {{ {} }} drop\n",
                        others.join(", ")
                    ),
                )?;
            }
        }
        Ok(())
    }

    /// Drops `percent` % of the packets a node receives from other nodes.
    pub fn loss(&self, node: u32, percent: u32) -> anyhow::Result<()> {
        nft(
            node,
            &format!(
                "add rule inet kch input ip saddr != {HOST_ADDR} numgen random mod 100 < {percent} drop\n"
            ),
        )
    }

    /// Removes every network fault.
    pub fn heal(&self) -> anyhow::Result<()> {
        let hosts = self.hosts.lock().expect("hosts lock").clone();
        for n in hosts {
            nft(n, "flush chain inet kch input\n")?;
        }
        Ok(())
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        cleanup();
    }
}

/// Deletes every `kch-` namespace and link, and waits until the veths are
/// gone (the kernel removes them asynchronously).
pub fn cleanup() {
    let list = |args: &[&str]| -> Vec<String> {
        Command::new("ip")
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                l.split([' ', ':', '@'])
                    .find(|w| w.starts_with("kch-"))
                    .map(str::to_string)
            })
            .collect()
    };
    for ns in list(&["netns", "list"]) {
        // Processes left in a namespace (a harness killed hard) go first.
        let pids = Command::new("ip")
            .args(["netns", "pids", &ns])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for pid in pids.split_whitespace() {
            let _ = run("kill", &["-9", pid]);
        }
        let _ = run("ip", &["netns", "del", &ns]);
    }
    for link in list(&["-o", "link", "show"]) {
        let _ = run("ip", &["link", "del", &link]);
    }
    for _ in 0..50 {
        if list(&["-o", "link", "show"]).is_empty() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
