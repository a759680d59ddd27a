//! `--advertise-routes auto`: the node's pod subnet, as the cluster hands it out, found on disk
//! and followed while it changes.
//!
//! kubeadm gives a node its podCIDR only after the node has joined the cluster, so the agent
//! cannot know it at `mesh join`. It looks where the CNI on this node writes it down:
//! 1. flannel's `/run/flannel/subnet.env` (`FLANNEL_SUBNET=10.244.1.1/24`: the bridge address
//!    inside the node's subnet, so the prefix is 10.244.1.0/24);
//! 2. else the first CNI config in `/etc/cni/net.d` by file name (`*.conf`, `*.conflist`,
//!    `*.json`: the one kubelet uses), and in it a `host-local` IPAM range
//!    (`ipam.ranges[][].subnet`, or the older `ipam.subnet`). The conflist `mesh kubeadm cni
//!    --write` writes is such a file.
//!
//! [`read`] does the file I/O once; [`Tracker`] is the pure part: it keeps the last good prefix
//! through unreadable or half-written files, says when the prefix changed, and rate-limits the
//! warnings. [`run`] polls every [`POLL`] and publishes a [`Status`] on a watch channel; the
//! daemon's loop puts the prefix into the advertised list (see [`replace_auto`]).

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::{info, warn};

/// Where kubelet (and `mesh kubeadm cni --write`) keeps CNI configs.
pub const DEFAULT_CNI_CONF_DIR: &str = "/etc/cni/net.d";
/// Where flannel writes the node's subnet.
pub const DEFAULT_FLANNEL_SUBNET_ENV: &str = "/run/flannel/subnet.env";
/// How often the sources are read again.
pub const POLL: Duration = Duration::from_secs(2);
/// At most one warning about the same unreadable file in this long.
const WARN_EVERY: Duration = Duration::from_secs(60);
/// CNI config files larger than this are not read (a real one is a few hundred bytes).
const MAX_FILE: u64 = 1 << 20;

/// Where the pod subnet is looked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sources {
    /// The CNI config directory [default: [`DEFAULT_CNI_CONF_DIR`]].
    pub cni_conf_dir: PathBuf,
    /// flannel's subnet file [default: [`DEFAULT_FLANNEL_SUBNET_ENV`]].
    pub flannel_subnet_env: PathBuf,
}

impl Default for Sources {
    fn default() -> Sources {
        Sources {
            cni_conf_dir: PathBuf::from(DEFAULT_CNI_CONF_DIR),
            flannel_subnet_env: PathBuf::from(DEFAULT_FLANNEL_SUBNET_ENV),
        }
    }
}

/// What `node.json` keeps about auto: present means on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutoRoutes {
    /// The prefix found last (it is in the advertised list), kept across restarts so that a
    /// node whose files are gone still advertises what it had.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub found: Option<Ipv4Net>,
    /// The CNI config directory, when not the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cni_conf_dir: Option<PathBuf>,
    /// flannel's subnet file, when not the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flannel_subnet_env: Option<PathBuf>,
}

impl AutoRoutes {
    /// Where to look, defaults filled in.
    pub fn sources(&self) -> Sources {
        let d = Sources::default();
        Sources {
            cni_conf_dir: self.cni_conf_dir.clone().unwrap_or(d.cni_conf_dir),
            flannel_subnet_env: self
                .flannel_subnet_env
                .clone()
                .unwrap_or(d.flannel_subnet_env),
        }
    }
}

/// One look at the sources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reading {
    /// A file names the pod subnet.
    Found {
        /// The subnet, host bits cleared.
        prefix: Ipv4Net,
        /// The file it came from.
        source: PathBuf,
    },
    /// No file names a subnet (no CNI config yet, or one without a host-local range).
    Nothing,
    /// The file that decides cannot be read or parsed.
    Unreadable {
        /// The file.
        source: PathBuf,
        /// What is wrong with it.
        error: String,
    },
}

/// What `mesh status --json` shows under `routes.auto`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Status {
    /// The prefix advertised for the pod subnet, if one was ever found.
    pub prefix: Option<Ipv4Net>,
    /// The file it was found in (`None`: kept from the last run).
    pub source: Option<PathBuf>,
    /// Why the latest look found nothing new, if it did not.
    pub note: Option<String>,
    /// flannel's subnet file looked at.
    pub flannel_subnet_env: PathBuf,
    /// The CNI config directory looked at.
    pub cni_conf_dir: PathBuf,
}

/// The prefix of flannel's `subnet.env` text: `FLANNEL_SUBNET=10.244.1.1/24` gives
/// 10.244.1.0/24.
pub fn parse_flannel_env(text: &str) -> Result<Ipv4Net, String> {
    let value = text
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("FLANNEL_SUBNET="))
        .ok_or("no FLANNEL_SUBNET= line")?;
    let value = value.trim().trim_matches('"');
    value
        .parse::<Ipv4Net>()
        .map(|n| n.trunc())
        .map_err(|_| format!("FLANNEL_SUBNET={value} is not an IPv4 prefix"))
}

/// The first IPv4 subnet of a `host-local` IPAM in a CNI config (`.conf`: one plugin;
/// `.conflist`: a `plugins` list), if it has one. Malformed JSON is an error; a config
/// without a host-local subnet (flannel's own, which delegates) is `Ok(None)`.
pub fn parse_cni_config(text: &str) -> Result<Option<Ipv4Net>, String> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    if !v.is_object() {
        return Err("not a JSON object".into());
    }
    let plugins: Vec<&serde_json::Value> = match v.get("plugins") {
        Some(serde_json::Value::Array(list)) => list.iter().collect(),
        Some(_) => return Err("\"plugins\" is not a list".into()),
        None => vec![&v],
    };
    for plugin in plugins {
        let ipam = &plugin["ipam"];
        if ipam["type"].as_str() != Some("host-local") {
            continue;
        }
        let ranged = ipam["ranges"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|set| set.as_array())
            .flatten()
            .filter_map(|range| range["subnet"].as_str());
        for subnet in ranged.chain(ipam["subnet"].as_str()) {
            // IPv6 ranges of a dual-stack config are skipped: subnet routes are IPv4.
            if subnet.contains(':') {
                continue;
            }
            return subnet
                .parse::<Ipv4Net>()
                .map(|n| Some(n.trunc()))
                .map_err(|_| format!("host-local subnet {subnet:?} is not an IPv4 prefix"));
        }
    }
    Ok(None)
}

/// The CNI config kubelet would use: the first `*.conf`, `*.conflist` or `*.json` in `dir` by
/// name.
pub fn first_cni_config(dir: &Path) -> Option<PathBuf> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conf" | "conflist" | "json")
                )
        })
        .collect();
    names.sort();
    names.into_iter().next()
}

fn read_small(path: &Path) -> std::io::Result<String> {
    let meta = std::fs::metadata(path)?;
    if meta.len() > MAX_FILE {
        return Err(std::io::Error::other(format!(
            "{} bytes, more than a CNI config has",
            meta.len()
        )));
    }
    std::fs::read_to_string(path)
}

/// Reads the sources once (blocking file I/O): flannel's file when it exists, else the first
/// CNI config.
pub fn read(sources: &Sources) -> Reading {
    let unreadable = |source: &Path, error: String| Reading::Unreadable {
        source: source.to_owned(),
        error,
    };
    match read_small(&sources.flannel_subnet_env) {
        Ok(text) => {
            return match parse_flannel_env(&text) {
                Ok(prefix) => Reading::Found {
                    prefix,
                    source: sources.flannel_subnet_env.clone(),
                },
                Err(e) => unreadable(&sources.flannel_subnet_env, e),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return unreadable(&sources.flannel_subnet_env, e.to_string()),
    }
    let Some(path) = first_cni_config(&sources.cni_conf_dir) else {
        return Reading::Nothing;
    };
    match read_small(&path).map_err(|e| e.to_string()) {
        Ok(text) => match parse_cni_config(&text) {
            Ok(Some(prefix)) => Reading::Found {
                prefix,
                source: path,
            },
            Ok(None) => Reading::Nothing,
            Err(e) => unreadable(&path, e),
        },
        Err(e) => unreadable(&path, e),
    }
}

/// The last good prefix and what the latest reading said.
#[derive(Debug)]
pub struct Tracker {
    status: Status,
    /// When each unreadable file was last warned about.
    warned: Option<(PathBuf, Instant)>,
}

impl Tracker {
    /// Starts from the prefix the last run found (`saved`).
    pub fn new(sources: &Sources, saved: Option<Ipv4Net>) -> Tracker {
        Tracker {
            status: Status {
                prefix: saved,
                source: None,
                note: None,
                flannel_subnet_env: sources.flannel_subnet_env.clone(),
                cni_conf_dir: sources.cni_conf_dir.clone(),
            },
            warned: None,
        }
    }

    /// What the status says now.
    pub fn status(&self) -> &Status {
        &self.status
    }

    /// Takes one reading at `now`. Returns a warning to log, at most one per file per
    /// [`WARN_EVERY`]. The prefix changes only on [`Reading::Found`]; otherwise the last good
    /// one stays.
    pub fn observe(&mut self, reading: Reading, now: Instant) -> Option<String> {
        match reading {
            Reading::Found { prefix, source } => {
                self.status.prefix = Some(prefix);
                self.status.source = Some(source);
                self.status.note = None;
                self.warned = None;
                None
            }
            Reading::Nothing => {
                self.status.note = Some(match self.status.prefix {
                    Some(p) => format!("no pod subnet in the sources now; keeping {p}"),
                    None => "no pod subnet yet (no flannel subnet file, no CNI config with a host-local range)".into(),
                });
                None
            }
            Reading::Unreadable { source, error } => {
                let keeping = match self.status.prefix {
                    Some(p) => format!("keeping {p}"),
                    None => "nothing advertised yet".into(),
                };
                let line = format!("{}: {error}; {keeping}", source.display());
                self.status.note = Some(line.clone());
                let recent = matches!(&self.warned, Some((p, at)) if *p == source && now.duration_since(*at) < WARN_EVERY);
                if recent {
                    return None;
                }
                self.warned = Some((source, now));
                Some(line)
            }
        }
    }
}

/// The advertised list with the auto-found prefix `old` replaced by `new`; the other
/// (explicit) prefixes stay in their order. `None` when the list has no room for it.
pub fn replace_auto<P: Copy + PartialEq>(
    list: &[P],
    old: Option<P>,
    new: P,
    max: usize,
) -> Option<Vec<P>> {
    let mut out: Vec<P> = list
        .iter()
        .copied()
        .filter(|p| Some(*p) != old || *p == new)
        .collect();
    if !out.contains(&new) {
        if out.len() >= max {
            return None;
        }
        out.push(new);
    }
    Some(out)
}

/// Puts `found` into `membership`'s advertised list in place of the prefix auto found before,
/// and remembers it. Returns the new list when it changed; an error when the list is full.
pub fn adopt(
    membership: &mut crate::state::Membership,
    found: Ipv4Net,
) -> Result<Option<Vec<ipnet::IpNet>>, String> {
    let Some(auto) = membership.auto_routes.as_mut() else {
        return Ok(None);
    };
    // Unchanged: nothing to do, also when `mesh routes withdraw` took it out by hand (it
    // comes back when the subnet changes, or at the next start).
    if auto.found == Some(found) {
        return Ok(None);
    }
    let max = mesh_proto::control::MAX_ROUTES;
    let (old, new) = (auto.found.map(ipnet::IpNet::V4), ipnet::IpNet::V4(found));
    let list = replace_auto(&membership.advertise_routes, old, new, max).ok_or_else(|| {
        format!("cannot advertise the pod subnet {found}: the node already advertises {max} prefixes (`mesh routes withdraw` one)")
    })?;
    auto.found = Some(found);
    membership.advertise_routes = list.clone();
    Ok(Some(list))
}

/// Starts [`run`] when `auto` is on: the status channel, and the task.
pub fn start(
    auto: Option<&AutoRoutes>,
    shutdown: watch::Receiver<bool>,
) -> Option<(watch::Receiver<Status>, tokio::task::JoinHandle<()>)> {
    let auto = auto?;
    let sources = auto.sources();
    let tracker = Tracker::new(&sources, auto.found);
    let (tx, rx) = watch::channel(tracker.status().clone());
    let task = tokio::spawn(run(sources, tracker, tx, shutdown));
    Some((rx, task))
}

/// Reads the sources every [`POLL`] and publishes the status whenever it changes, until
/// `shutdown` turns true.
pub async fn run(
    sources: Sources,
    mut tracker: Tracker,
    status: watch::Sender<Status>,
    mut shutdown: watch::Receiver<bool>,
) {
    info!(
        flannel = %sources.flannel_subnet_env.display(),
        cni = %sources.cni_conf_dir.display(),
        "advertising the pod subnet found on this node (--advertise-routes auto)"
    );
    loop {
        let s = sources.clone();
        let reading = match tokio::task::spawn_blocking(move || read(&s)).await {
            Ok(r) => r,
            Err(_) => return,
        };
        if let Some(line) = tracker.observe(reading, Instant::now()) {
            warn!("pod subnet: {line}");
        }
        let now = tracker.status().clone();
        status.send_if_modified(|s| {
            let changed = *s != now;
            *s = now;
            changed
        });
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn flannel_subnet_file_gives_the_nodes_prefix() {
        let text = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1370\nFLANNEL_IPMASQ=true\n";
        assert_eq!(parse_flannel_env(text), Ok(net("10.244.1.0/24")));
        assert_eq!(
            parse_flannel_env("FLANNEL_SUBNET=\"10.244.7.1/24\""),
            Ok(net("10.244.7.0/24"))
        );
        assert!(parse_flannel_env("FLANNEL_NETWORK=10.244.0.0/16\n")
            .unwrap_err()
            .contains("FLANNEL_SUBNET"));
        assert!(parse_flannel_env("FLANNEL_SUBNET=fe80::/64").is_err());
    }

    #[test]
    fn host_local_ranges_subnet_and_plain_conf_are_read() {
        let list = r#"{"cniVersion":"1.0.0","name":"k","plugins":[
            {"type":"bridge","ipam":{"type":"host-local","ranges":[[{"subnet":"fd00::/64"}],[{"subnet":"10.244.3.0/24","gateway":"10.244.3.1"}]]}},
            {"type":"portmap","capabilities":{"portMappings":true}}]}"#;
        assert_eq!(parse_cni_config(list), Ok(Some(net("10.244.3.0/24"))));
        let conf = r#"{"cniVersion":"0.4.0","name":"k","type":"bridge","ipam":{"type":"host-local","subnet":"10.244.4.7/24"}}"#;
        assert_eq!(parse_cni_config(conf), Ok(Some(net("10.244.4.0/24"))));
    }

    #[test]
    fn a_config_without_host_local_names_nothing_and_bad_json_is_an_error() {
        let flannel = r#"{"name":"cbr0","cniVersion":"0.3.1","plugins":[{"type":"flannel","delegate":{"hairpinMode":true,"isDefaultGateway":true}},{"type":"portmap","capabilities":{"portMappings":true}}]}"#;
        assert_eq!(parse_cni_config(flannel), Ok(None));
        let dhcp = r#"{"type":"bridge","ipam":{"type":"dhcp","subnet":"10.1.0.0/24"}}"#;
        assert_eq!(parse_cni_config(dhcp), Ok(None));
        assert!(parse_cni_config("{\"plugins\": [").is_err());
        assert!(parse_cni_config("[]").is_err());
        assert!(parse_cni_config(r#"{"plugins": 3}"#).is_err());
        let bad = r#"{"type":"bridge","ipam":{"type":"host-local","ranges":[[{"subnet":"10.244.300.0/24"}]]}}"#;
        assert!(parse_cni_config(bad)
            .unwrap_err()
            .contains("10.244.300.0/24"));
    }

    #[test]
    fn the_first_config_by_name_decides_and_flannel_comes_first() {
        let dir = std::env::temp_dir().join(format!("mesh-podcidr-{}", std::process::id()));
        let cni = dir.join("net.d");
        std::fs::create_dir_all(&cni).unwrap();
        let sources = Sources {
            cni_conf_dir: cni.clone(),
            flannel_subnet_env: dir.join("subnet.env"),
        };
        assert_eq!(read(&sources), Reading::Nothing);
        let conf = |n: u8| {
            format!(
                r#"{{"type":"bridge","ipam":{{"type":"host-local","subnet":"10.244.{n}.0/24"}}}}"#
            )
        };
        std::fs::write(cni.join("20-b.conflist"), conf(2)).unwrap();
        std::fs::write(cni.join("10-a.conf"), conf(1)).unwrap();
        std::fs::write(cni.join("00-ignored.txt"), conf(9)).unwrap();
        assert_eq!(
            read(&sources),
            Reading::Found {
                prefix: net("10.244.1.0/24"),
                source: cni.join("10-a.conf")
            }
        );
        std::fs::write(cni.join("05-broken.conf"), "{").unwrap();
        assert!(
            matches!(read(&sources), Reading::Unreadable { source, .. } if source == cni.join("05-broken.conf"))
        );
        std::fs::write(
            &sources.flannel_subnet_env,
            "FLANNEL_SUBNET=10.244.5.1/24\n",
        )
        .unwrap();
        assert_eq!(
            read(&sources),
            Reading::Found {
                prefix: net("10.244.5.0/24"),
                source: sources.flannel_subnet_env.clone()
            }
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_tracker_keeps_the_last_good_prefix_and_warns_once_a_minute() {
        let sources = Sources::default();
        let mut t = Tracker::new(&sources, Some(net("10.244.1.0/24")));
        let t0 = Instant::now();
        assert_eq!(t.status().prefix, Some(net("10.244.1.0/24")));
        assert_eq!(t.status().source, None);
        let bad = || Reading::Unreadable {
            source: PathBuf::from("/etc/cni/net.d/10-x.conf"),
            error: "not valid JSON".into(),
        };
        let w = t.observe(bad(), t0).unwrap();
        assert!(w.contains("keeping 10.244.1.0/24"), "{w}");
        assert_eq!(t.observe(bad(), t0 + Duration::from_secs(2)), None);
        assert!(t.observe(bad(), t0 + WARN_EVERY).is_some());
        assert_eq!(t.status().prefix, Some(net("10.244.1.0/24")));
        assert_eq!(t.observe(Reading::Nothing, t0), None);
        assert_eq!(t.status().prefix, Some(net("10.244.1.0/24")));
        let found = Reading::Found {
            prefix: net("10.244.2.0/24"),
            source: PathBuf::from("/run/flannel/subnet.env"),
        };
        assert_eq!(t.observe(found, t0), None);
        assert_eq!(t.status().prefix, Some(net("10.244.2.0/24")));
        assert_eq!(t.status().note, None);
        // After a good reading, a broken file is news again.
        assert!(t.observe(bad(), t0 + Duration::from_secs(3)).is_some());
    }

    #[test]
    fn adopting_a_found_prefix_changes_the_membership_once() {
        let (a, b, x) = (
            net("10.244.1.0/24"),
            net("10.244.2.0/24"),
            net("192.168.9.0/24"),
        );
        let both = |p: Ipv4Net| ipnet::IpNet::V4(p);
        let mut m = crate::state::Membership {
            advertise_routes: vec![both(x)],
            ..crate::state::sample_membership()
        };
        assert_eq!(adopt(&mut m, a), Ok(None), "auto off: nothing");
        m.auto_routes = Some(AutoRoutes::default());
        assert_eq!(adopt(&mut m, a), Ok(Some(vec![both(x), both(a)])));
        assert_eq!(adopt(&mut m, a), Ok(None));
        assert_eq!(adopt(&mut m, b), Ok(Some(vec![both(x), both(b)])));
        assert_eq!(m.auto_routes.as_ref().unwrap().found, Some(b));
        assert_eq!(m.advertise_routes, vec![both(x), both(b)]);
    }

    #[test]
    fn the_auto_prefix_is_replaced_and_explicit_ones_stay() {
        let (a, b, x) = (
            net("10.244.1.0/24"),
            net("10.244.2.0/24"),
            net("192.168.9.0/24"),
        );
        assert_eq!(replace_auto(&[x], None, a, 16), Some(vec![x, a]));
        assert_eq!(replace_auto(&[x, a], Some(a), b, 16), Some(vec![x, b]));
        assert_eq!(replace_auto(&[a, x], Some(a), a, 16), Some(vec![a, x]));
        // Withdrawn by hand meanwhile: it comes back only with the next change.
        assert_eq!(replace_auto(&[x], Some(a), b, 16), Some(vec![x, b]));
        assert_eq!(replace_auto(&[x], None, a, 1), None);
    }
}
