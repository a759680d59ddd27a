//! Helpers for running kubeadm clusters on top of the mesh: every function here is pure text
//! logic behind the `mesh kubeadm ...` subcommands, so the CLI only reads and writes files.
//!
//! - [`KubeletDefaults`] says where the distribution keeps kubelet's extra arguments
//!   (`/etc/default/kubelet` or `/etc/sysconfig/kubelet`), decided from `/etc/os-release`.
//! - [`set_node_ip`] rewrites that file so `KUBELET_EXTRA_ARGS` carries
//!   `--node-ip=<overlay address>`, touching nothing else; [`preview`] renders the change as a
//!   zero-context unified diff for `--dry-run`.
//! - [`kubeadm_config`] prints a kubeadm `InitConfiguration` (control plane) or
//!   `JoinConfiguration` (worker) that pins the node IP and the API server address to the
//!   overlay address; with [`DualStack`] kubelet gets both overlay addresses and the cluster
//!   an IPv6 pod and service range beside the IPv4 ones.
//! - [`cni_advice`] computes the pod MTU for a CNI whose VXLAN tunnel runs over `mesh0`, and
//!   lists the settings that bind the CNI to `mesh0`.
//! - [`cni_conflist`] renders a CNI config for the standard `bridge`, `host-local` and
//!   `portmap` plugins over mesh's subnet routes (no second encapsulation).

use ipnet::Ipv6Net;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::ops::Range;
use std::path::Path;
use std::str::FromStr;

/// The environment variable kubelet's systemd drop-in (`10-kubeadm.conf`) expands on its
/// command line, read from the distribution's defaults file.
const EXTRA_ARGS_VAR: &str = "KUBELET_EXTRA_ARGS";
/// kubelet's flag for the address it registers and serves on.
const NODE_IP_FLAG: &str = "--node-ip";
/// The API server port kubeadm uses by default.
const API_PORT: u16 = 6443;
/// Outer headers a VXLAN tunnel adds to every pod packet: IPv4 (20) + UDP (8) + VXLAN (8)
/// + the inner Ethernet header (14).
const VXLAN_OVERHEAD: u32 = 50;
/// Outer header of IP-in-IP: one IPv4 header.
const IPIP_OVERHEAD: u32 = 20;
/// The smallest MTU IPv6 allows on a link; pods below it cannot carry IPv6.
const IPV6_MIN_MTU: u32 = 1280;
/// The IPv4 pod range of the rendered config (flannel's default).
const POD_CIDR: &str = "10.244.0.0/16";
/// The IPv4 service range of the rendered dual-stack config (kubeadm's default).
const SERVICE_CIDR: &str = "10.96.0.0/12";
/// The IPv6 pod range of a dual-stack config unless `--pod-cidr6` says otherwise: a ULA /56,
/// room for 256 nodes' /64 (kube-controller-manager's default IPv6 node mask).
pub const DEFAULT_POD_CIDR6: &str = "fd00:10:244::/56";
/// The IPv6 service range of a dual-stack config unless `--service-cidr6` says otherwise: a
/// ULA /112 (kube-apiserver takes IPv6 service ranges of /108 or smaller).
pub const DEFAULT_SERVICE_CIDR6: &str = "fd00:10:96::/112";
/// kube-controller-manager's default `--node-cidr-mask-size-ipv6`: each node's IPv6 pod range.
const NODE_MASK6: u8 = 64;
/// kube-controller-manager splits a pod range into node ranges at most 16 bits smaller.
const MAX_NODE_SPLIT_BITS: u8 = 16;
/// The largest IPv6 service range kube-apiserver accepts (20 bits of addresses).
const MAX_SERVICE_BITS6: u8 = 20;

/// The address(es) kubelet registers the node with (`--node-ip`): the IPv4 overlay address,
/// and for a dual-stack cluster the IPv6 one after it (`100.64.0.7,fd12:3456:789a::7`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeIp {
    /// The IPv4 overlay address (the cluster's primary family).
    pub v4: Ipv4Addr,
    /// The IPv6 overlay address, only for a dual-stack cluster.
    pub v6: Option<Ipv6Addr>,
}

impl From<Ipv4Addr> for NodeIp {
    fn from(v4: Ipv4Addr) -> Self {
        NodeIp { v4, v6: None }
    }
}

impl fmt::Display for NodeIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.v6 {
            Some(v6) => write!(f, "{},{v6}", self.v4),
            None => write!(f, "{}", self.v4),
        }
    }
}

/// The IPv6 half of a dual-stack cluster: the node's IPv6 overlay address and the cluster's
/// IPv6 pod and service ranges. Made by [`DualStack::new`], which checks them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DualStack {
    /// The node's IPv6 overlay address (kubelet's second node IP).
    pub address6: Ipv6Addr,
    /// The cluster's IPv6 pod range.
    pub pod_cidr6: Ipv6Net,
    /// The cluster's IPv6 service range.
    pub service_cidr6: Ipv6Net,
}

impl DualStack {
    /// Checks what `--dual-stack` needs: the node has an IPv6 overlay address (`address6`, in
    /// the network's `prefix6`), and the IPv6 pod and service ranges ([`DEFAULT_POD_CIDR6`] and
    /// [`DEFAULT_SERVICE_CIDR6`] when not given) fit what Kubernetes accepts and overlap
    /// neither each other nor the overlay prefix.
    pub fn new(
        address6: Option<Ipv6Addr>,
        prefix6: Option<Ipv6Net>,
        pod_cidr6: Option<Ipv6Net>,
        service_cidr6: Option<Ipv6Net>,
    ) -> Result<DualStack, String> {
        let Some(address6) = address6 else {
            return Err(
                "--dual-stack: this network has no IPv6 overlay (created with --cidr6 off), \
                 so this node has no IPv6 address for kubelet; leave out --dual-stack for an \
                 IPv4-only cluster, or put the nodes on a network with an IPv6 overlay \
                 (`mesh ip -6` prints the node's IPv6 address when it has one)"
                    .to_owned(),
            );
        };
        let default = |text: &str| text.parse::<Ipv6Net>().expect("a valid default range");
        let pod = pod_cidr6
            .unwrap_or_else(|| default(DEFAULT_POD_CIDR6))
            .trunc();
        let service = service_cidr6
            .unwrap_or_else(|| default(DEFAULT_SERVICE_CIDR6))
            .trunc();
        let min_pod_len = NODE_MASK6 - MAX_NODE_SPLIT_BITS;
        if !(min_pod_len..NODE_MASK6).contains(&pod.prefix_len()) {
            return Err(format!(
                "--pod-cidr6 {pod}: an IPv6 pod range must be a /{min_pod_len} to a /{} \
                 (kube-controller-manager gives every node a /{NODE_MASK6} of it); pass e.g. \
                 --pod-cidr6 {DEFAULT_POD_CIDR6}",
                NODE_MASK6 - 1
            ));
        }
        let min_service_len = 128 - MAX_SERVICE_BITS6;
        if service.prefix_len() < min_service_len {
            return Err(format!(
                "--service-cidr6 {service}: kube-apiserver refuses an IPv6 service range larger \
                 than a /{min_service_len}; pass e.g. --service-cidr6 {DEFAULT_SERVICE_CIDR6}"
            ));
        }
        if overlaps(&pod, &service) {
            return Err(format!(
                "--pod-cidr6 {pod} and --service-cidr6 {service} overlap; give them disjoint ranges"
            ));
        }
        if let Some(prefix6) = prefix6.map(|p| p.trunc()) {
            for (flag, range) in [("--pod-cidr6", pod), ("--service-cidr6", service)] {
                if overlaps(&range, &prefix6) {
                    return Err(format!(
                        "{flag} {range} overlaps the mesh's IPv6 overlay prefix {prefix6}; \
                         pick another range (the default {} does not, unless the network \
                         was given it)",
                        if flag == "--pod-cidr6" {
                            DEFAULT_POD_CIDR6
                        } else {
                            DEFAULT_SERVICE_CIDR6
                        }
                    ));
                }
            }
        }
        Ok(DualStack {
            address6,
            pod_cidr6: pod,
            service_cidr6: service,
        })
    }
}

/// Whether two IPv6 ranges share an address.
fn overlaps(a: &Ipv6Net, b: &Ipv6Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Where kubelet's extra args live on this distribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KubeletDefaults {
    /// Debian, Ubuntu and derivatives: `/etc/default/kubelet`.
    Debian,
    /// RHEL, Fedora, CentOS, Rocky, AlmaLinux, Amazon Linux: `/etc/sysconfig/kubelet`.
    RedHat,
}

impl KubeletDefaults {
    /// The defaults file that kubelet's systemd unit reads `KUBELET_EXTRA_ARGS` from.
    pub fn path(&self) -> &'static Path {
        match self {
            KubeletDefaults::Debian => Path::new("/etc/default/kubelet"),
            KubeletDefaults::RedHat => Path::new("/etc/sysconfig/kubelet"),
        }
    }

    /// Decide from the text of /etc/os-release (ID and ID_LIKE): debian/ubuntu -> Debian;
    /// rhel/fedora/centos/rocky/almalinux/amzn -> RedHat; unknown -> Debian.
    ///
    /// `ID` is tried first, then every word of `ID_LIKE` in order, so a derivative that names
    /// its parent (`ID=rocky`, `ID_LIKE="rhel centos fedora"`) is recognised either way.
    pub fn detect(os_release: &str) -> KubeletDefaults {
        let mut id: Option<String> = None;
        let mut like: Vec<String> = Vec::new();
        for line in os_release.lines() {
            let line = line.trim();
            if let Some(v) = line.strip_prefix("ID=") {
                id = Some(unquote_os_release(v).to_ascii_lowercase());
            } else if let Some(v) = line.strip_prefix("ID_LIKE=") {
                like = unquote_os_release(v)
                    .split_whitespace()
                    .map(str::to_ascii_lowercase)
                    .collect();
            }
        }
        id.into_iter()
            .chain(like)
            .find_map(|name| distribution_family(&name))
            .unwrap_or(KubeletDefaults::Debian)
    }
}

/// The family of one os-release ID, if it is one we know.
fn distribution_family(id: &str) -> Option<KubeletDefaults> {
    match id {
        "debian" | "ubuntu" => Some(KubeletDefaults::Debian),
        "rhel" | "fedora" | "centos" | "rocky" | "almalinux" | "amzn" | "ol" => {
            Some(KubeletDefaults::RedHat)
        }
        _ => None,
    }
}

/// Strips the optional single or double quotes around an os-release value.
fn unquote_os_release(v: &str) -> &str {
    let v = v.trim();
    for q in ['"', '\''] {
        if let Some(inner) = v.strip_prefix(q).and_then(|s| s.strip_suffix(q)) {
            return inner;
        }
    }
    v
}

/// Returns the new text of the kubelet defaults file with `--node-ip=<ip>` in KUBELET_EXTRA_ARGS:
/// keeps every other line and every other arg as they are, replaces an existing --node-ip (both `--node-ip=X` and `--node-ip X` forms), adds the variable if missing,
/// preserves the quoting style (double, single or none), and is idempotent (applying it twice gives the same text).
///
/// Only the text between the quotes (or after `=` when unquoted) of a `KUBELET_EXTRA_ARGS=`
/// assignment is edited, so quotes, trailing comments and whitespace stay byte for byte.
/// When the variable is assigned several times (the last assignment wins for systemd), every
/// assignment that names `--node-ip` gets the new address, and the last one gets the flag
/// added if it lacks it. A repeated `--node-ip` inside one assignment is reduced to one.
///
/// The file is read by systemd (`EnvironmentFile=` in kubelet's drop-in), for which an
/// unquoted value may contain spaces, so an unquoted value stays unquoted.
///
/// `ip` is the IPv4 overlay address, or a [`NodeIp`] with both addresses for a dual-stack
/// cluster (`--node-ip=<v4>,<v6>`).
pub fn set_node_ip(existing: &str, ip: impl Into<NodeIp>) -> String {
    let ip = ip.into();
    let assignments = find_assignments(existing);
    let Some(last) = assignments.len().checked_sub(1) else {
        let mut out = existing.to_owned();
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str(
            "# Added by `mesh kubeadm node-ip`: kubelet registers with this node's mesh overlay address.\n",
        );
        out.push_str(&format!("{EXTRA_ARGS_VAR}={NODE_IP_FLAG}={ip}\n"));
        return out;
    };
    let mut out = existing.to_owned();
    // Back to front, so the byte ranges of earlier assignments stay valid.
    for (i, value) in assignments.iter().enumerate().rev() {
        let edited = edit_args(&existing[value.clone()], ip, i == last);
        out.replace_range(value.clone(), &edited);
    }
    out
}

/// Byte ranges of the values (inside the quotes, if any) of every active
/// `KUBELET_EXTRA_ARGS=` assignment in `text`. Comment lines (`#` or `;`) are skipped; an
/// optional shell `export ` prefix is accepted. A double- or single-quoted value may span
/// several lines.
fn find_assignments(text: &str) -> Vec<Range<usize>> {
    let mut found = Vec::new();
    let mut pos = 0;
    while pos < text.len() {
        let line_end = text[pos..].find('\n').map_or(text.len(), |i| pos + i);
        let mut next = line_end + 1;
        if let Some(value) = assignment_value(text, pos, line_end) {
            // A quoted value may end on a later line: continue after it.
            let after_value = text[value.end..]
                .find('\n')
                .map_or(text.len(), |i| value.end + i);
            next = next.max(after_value + 1);
            found.push(value);
        }
        pos = next;
    }
    found
}

/// If the line `text[start..end]` assigns `KUBELET_EXTRA_ARGS`, the byte range of its value.
fn assignment_value(text: &str, start: usize, end: usize) -> Option<Range<usize>> {
    let line = &text[start..end];
    let body = line.trim_start();
    if body.starts_with('#') || body.starts_with(';') {
        return None;
    }
    let body = match body.strip_prefix("export") {
        Some(rest) if rest.starts_with([' ', '\t']) => rest.trim_start(),
        _ => body,
    };
    let rest = body.strip_prefix(EXTRA_ARGS_VAR)?;
    let rest = rest.trim_start_matches([' ', '\t']).strip_prefix('=')?;
    let rest = rest.trim_start_matches([' ', '\t']);
    let value_start = end - rest.len();
    let value = match rest.chars().next() {
        Some('"') => {
            let open = value_start + 1;
            match closing_double_quote(&text[open..]) {
                Some(len) => open..open + len,
                // Unterminated: edit up to the end of the line and leave the rest alone.
                None => open..end,
            }
        }
        Some('\'') => {
            let open = value_start + 1;
            match text[open..].find('\'') {
                Some(len) => open..open + len,
                None => open..end,
            }
        }
        _ => value_start..end,
    };
    Some(value)
}

/// Length of a double-quoted value up to (not including) its closing quote, honouring
/// backslash escapes.
fn closing_double_quote(s: &str) -> Option<usize> {
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => return Some(i),
            _ => {}
        }
    }
    None
}

/// Byte ranges of the whitespace-separated words of `s`.
fn words(s: &str) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in s.char_indices() {
        match (c.is_whitespace(), start) {
            (true, Some(st)) => {
                out.push(st..i);
                start = None;
            }
            (false, None) => start = Some(i),
            _ => {}
        }
    }
    if let Some(st) = start {
        out.push(st..s.len());
    }
    out
}

/// Sets `--node-ip` in one argument string: the first occurrence gets `ip` (keeping its
/// `--node-ip=X` or `--node-ip X` form), later occurrences are removed, and the flag is
/// appended after the last argument when it is missing and `add` is set.
fn edit_args(args: &str, ip: NodeIp, add: bool) -> String {
    let words = words(args);
    let with_value = format!("{NODE_IP_FLAG}={ip}");
    // (range in `args`, replacement), in ascending order and non-overlapping.
    let mut edits: Vec<(Range<usize>, String)> = Vec::new();
    let mut seen = false;
    let mut i = 0;
    while i < words.len() {
        let w = &args[words[i].clone()];
        let (span_end_word, replacement) = if w == NODE_IP_FLAG {
            match words.get(i + 1) {
                // `--node-ip X`: the next word is the value unless it is another flag.
                Some(v) if !args[v.clone()].starts_with('-') => (i + 1, ip.to_string()),
                _ => (i, with_value.clone()),
            }
        } else if w.starts_with(&format!("{NODE_IP_FLAG}=")) {
            (i, with_value.clone())
        } else {
            i += 1;
            continue;
        };
        if !seen {
            // Replace the value word (space form) or the whole `--node-ip=X` word.
            let target = if span_end_word > i {
                words[span_end_word].clone()
            } else {
                words[i].clone()
            };
            edits.push((target, replacement));
            seen = true;
        } else {
            // A duplicate: drop it with the whitespace in front of it. It is never the first
            // word, because the first occurrence comes before it.
            let from = words[i - 1].end;
            edits.push((from..words[span_end_word].end, String::new()));
        }
        i = span_end_word + 1;
    }
    let mut out = args.to_owned();
    if !seen && add {
        match words.last() {
            Some(last) => out.insert_str(last.end, &format!(" {with_value}")),
            None => out.insert_str(0, &with_value),
        }
        return out;
    }
    for (range, replacement) in edits.into_iter().rev() {
        out.replace_range(range, &replacement);
    }
    out
}

/// A unified-diff-like preview for --dry-run: lines removed with "-", added with "+" (only changed lines, with the file path in a header).
///
/// The output is a zero-context unified diff (like `diff -U0`): a `---`/`+++` header naming
/// `path`, then one `@@ -a,b +c,d @@` hunk per run of changed lines. When nothing changes,
/// the header is followed by a one-line note instead.
pub fn preview(path: &Path, old: &str, new: &str) -> String {
    let p = path.display();
    let mut out = format!("--- {p}\t(current)\n+++ {p}\t(new)\n");
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    if a == b {
        out.push_str("(no change: the file already says this)\n");
        return out;
    }
    let ops = diff_lines(&a, &b);
    let (mut ai, mut bi) = (0usize, 0usize);
    let mut k = 0;
    while k < ops.len() {
        if ops[k] == Op::Same {
            ai += 1;
            bi += 1;
            k += 1;
            continue;
        }
        let (a_start, b_start) = (ai, bi);
        let mut removed = Vec::new();
        let mut added = Vec::new();
        while k < ops.len() && ops[k] != Op::Same {
            match ops[k] {
                Op::Delete => {
                    removed.push(a[ai]);
                    ai += 1;
                }
                Op::Insert => {
                    added.push(b[bi]);
                    bi += 1;
                }
                Op::Same => {}
            }
            k += 1;
        }
        out.push_str(&format!(
            "@@ -{} +{} @@\n",
            hunk_range(a_start, removed.len()),
            hunk_range(b_start, added.len())
        ));
        for l in removed {
            out.push_str(&format!("-{l}\n"));
        }
        for l in added {
            out.push_str(&format!("+{l}\n"));
        }
    }
    out
}

/// A hunk range as unified diffs write it: `start,count`, with `start` the line before the
/// hunk when it is empty, and the count left out when it is 1.
fn hunk_range(lines_before: usize, count: usize) -> String {
    match count {
        0 => format!("{lines_before},0"),
        1 => format!("{}", lines_before + 1),
        n => format!("{},{}", lines_before + 1, n),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Same,
    Delete,
    Insert,
}

/// A shortest line edit script from `a` to `b` (longest common subsequence). Deletions come
/// before insertions within a change. Inputs too large for the quadratic table (far beyond
/// any kubelet defaults file) are shown as a full replacement.
fn diff_lines(a: &[&str], b: &[&str]) -> Vec<Op> {
    const MAX_CELLS: usize = 4_000_000;
    let (n, m) = (a.len(), b.len());
    if (n + 1).saturating_mul(m + 1) > MAX_CELLS {
        let mut ops = vec![Op::Delete; n];
        ops.extend(std::iter::repeat_n(Op::Insert, m));
        return ops;
    }
    // lcs[i * (m + 1) + j] = length of the LCS of a[i..] and b[j..].
    let w = m + 1;
    let mut lcs = vec![0u32; (n + 1) * w];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i * w + j] = if a[i] == b[j] {
                lcs[(i + 1) * w + j + 1] + 1
            } else {
                lcs[(i + 1) * w + j].max(lcs[i * w + j + 1])
            };
        }
    }
    let mut ops = Vec::with_capacity(n + m);
    let (mut i, mut j) = (0, 0);
    while i < n && j < m {
        if a[i] == b[j] {
            ops.push(Op::Same);
            i += 1;
            j += 1;
        } else if lcs[(i + 1) * w + j] >= lcs[i * w + j + 1] {
            ops.push(Op::Delete);
            i += 1;
        } else {
            ops.push(Op::Insert);
            j += 1;
        }
    }
    ops.extend(std::iter::repeat_n(Op::Delete, n - i));
    ops.extend(std::iter::repeat_n(Op::Insert, m - j));
    ops
}

/// The part a node plays in the kubeadm cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The first control-plane node (`kubeadm init`).
    ControlPlane,
    /// A node that joins an existing cluster (`kubeadm join`).
    Worker,
}

/// A kubeadm config snippet for this node, in the `kubeadm.k8s.io/v1beta4` config API
/// (kubeadm 1.31 and newer; the output says how to adapt it to v1beta3 for older kubeadm).
///
/// - `ControlPlane`: an `InitConfiguration` whose `nodeRegistration.kubeletExtraArgs` sets
///   `node-ip` (v1beta4 writes extra args as a list of `{name, value}`) and whose
///   `localAPIEndpoint.advertiseAddress` is `ip` (port 6443), followed by a commented-out
///   `ClusterConfiguration` with `controlPlaneEndpoint: "<ip>:6443"`, `apiServer.certSANs`
///   holding `ip`, and the pod subnet.
/// - `Worker`: a `JoinConfiguration` with the same `node-ip` and a `discovery` block whose
///   placeholders say what to fill in from the control plane.
///
/// `node_name` becomes `nodeRegistration.name` unless it is empty (kubeadm then uses the
/// hostname).
///
/// With `dual` (a dual-stack cluster), `node-ip` is `<ip>,<address6>` and the control plane's
/// `ClusterConfiguration` is active, not commented out: its `networking.podSubnet` and
/// `serviceSubnet` hold an IPv4 and an IPv6 range each (IPv4 first, the primary family).
/// The API server still advertises the IPv4 overlay address.
pub fn kubeadm_config(
    role: Role,
    ip: Ipv4Addr,
    node_name: &str,
    dual: Option<&DualStack>,
) -> String {
    let node_ip = NodeIp {
        v4: ip,
        v6: dual.map(|d| d.address6),
    };
    let mut y = String::new();
    let (what, command) = match role {
        Role::ControlPlane => ("first control-plane node", "kubeadm init --config"),
        Role::Worker => ("joining node", "kubeadm join --config"),
    };
    y.push_str(&format!(
        "# kubeadm configuration for the {what} at mesh overlay address {ip}\n\
         # (generated by `mesh kubeadm config`; use it with `{command} <this file>`).\n\
         #\n\
         # Config API kubeadm.k8s.io/v1beta4, the version kubeadm 1.31 and newer use\n\
         # (`kubeadm config print init-defaults | head -n 1` shows the one your kubeadm uses).\n\
         # For kubeadm 1.22-1.30 change every apiVersion to kubeadm.k8s.io/v1beta3 and write\n\
         # kubeletExtraArgs as a map instead of a list:\n\
         #   kubeletExtraArgs:\n\
         #     node-ip: \"{node_ip}\"\n"
    ));
    if dual.is_some() {
        y.push_str(
            "#\n\
             # Dual-stack: kubelet registers both overlay addresses (IPv4 first). Every node of the\n\
             # cluster needs them (`mesh kubeadm config --dual-stack`, `mesh kubeadm node-ip\n\
             # --dual-stack`), and the CNI needs an IPv6 pod range too.\n",
        );
    }
    let registration = node_registration(node_ip, node_name);
    match (role, dual) {
        (Role::ControlPlane, Some(dual)) => {
            y.push_str(&format!(
                "apiVersion: kubeadm.k8s.io/v1beta4\n\
                 kind: InitConfiguration\n\
                 {registration}\
                 # The API server advertises the IPv4 overlay address (kubeadm also puts etcd's client\n\
                 # and peer URLs on it), so every node reaches it over the mesh, even behind NAT.\n\
                 localAPIEndpoint:\n  \
                   advertiseAddress: {ip}\n  \
                   bindPort: {API_PORT}\n\
                 ---\n\
                 apiVersion: kubeadm.k8s.io/v1beta4\n\
                 kind: ClusterConfiguration\n\
                 # An IPv4 and an IPv6 range each, IPv4 first. Give the CNI the same pod ranges (flannel:\n\
                 # \"Network\" and \"IPv6Network\" with \"EnableIPv6\": true; Calico: CALICO_IPV4POOL_CIDR\n\
                 # and CALICO_IPV6POOL_CIDR). None may overlap the mesh ranges 100.64.0.0/10 and the\n\
                 # network's IPv6 overlay prefix.\n\
                 networking:\n  \
                   podSubnet: \"{POD_CIDR},{pod6}\"\n  \
                   serviceSubnet: \"{SERVICE_CIDR},{service6}\"\n\
                 # Optional: the address kubelets, kube-proxy and kubectl use for the API server, and\n\
                 # the names its certificate is valid for. An overlay address works for one\n\
                 # control-plane node; for several, use a DNS name that resolves to their overlay\n\
                 # addresses. To use them, remove the \"# \" in front of the next four lines.\n\
                 # controlPlaneEndpoint: \"{ip}:{API_PORT}\"\n\
                 # apiServer:\n\
                 #   certSANs:\n\
                 #     - \"{ip}\"\n",
                pod6 = dual.pod_cidr6,
                service6 = dual.service_cidr6,
            ));
        }
        (Role::ControlPlane, None) => {
            y.push_str(&format!(
                "apiVersion: kubeadm.k8s.io/v1beta4\n\
                 kind: InitConfiguration\n\
                 {registration}\
                 # The API server advertises the overlay address (kubeadm also puts etcd's client and\n\
                 # peer URLs on it), so every node reaches it over the mesh, even behind NAT.\n\
                 localAPIEndpoint:\n  \
                   advertiseAddress: {ip}\n  \
                   bindPort: {API_PORT}\n\
                 #\n\
                 # Optional ClusterConfiguration. kubeadm refuses flags such as --pod-network-cidr,\n\
                 # --control-plane-endpoint or --apiserver-cert-extra-sans next to --config, so their\n\
                 # settings go here. To use it, uncomment everything from the \"# ---\" line to the\n\
                 # end of the file:\n\
                 #   sed -i '/^# ---$/,$ s/^# //' kubeadm.yaml\n\
                 # ---\n\
                 # apiVersion: kubeadm.k8s.io/v1beta4\n\
                 # kind: ClusterConfiguration\n\
                 # # The address kubelets, kube-proxy and kubectl use for the API server. An overlay\n\
                 # # address works for one control-plane node; for several, use a DNS name that\n\
                 # # resolves to their overlay addresses.\n\
                 # controlPlaneEndpoint: \"{ip}:{API_PORT}\"\n\
                 # apiServer:\n\
                 #   # Names and addresses the API server certificate is valid for.\n\
                 #   certSANs:\n\
                 #     - \"{ip}\"\n\
                 # networking:\n\
                 #   # The CNI's pod range (10.244.0.0/16 is flannel's default; for Calico use its\n\
                 #   # CALICO_IPV4POOL_CIDR). It must not overlap the mesh range 100.64.0.0/10.\n\
                 #   podSubnet: \"{POD_CIDR}\"\n"
            ));
        }
        (Role::Worker, _) => {
            y.push_str(&format!(
                "apiVersion: kubeadm.k8s.io/v1beta4\n\
                 kind: JoinConfiguration\n\
                 {registration}\
                 # Fill in the three values below from the control plane: `kubeadm init` prints them\n\
                 # at the end, and `kubeadm token create --print-join-command` prints fresh ones\n\
                 # (kubeadm join <endpoint> --token <token> --discovery-token-ca-cert-hash <hash>).\n\
                 discovery:\n  \
                   bootstrapToken:\n    \
                     # The API server's overlay address and port, e.g. \"100.64.0.1:{API_PORT}\".\n    \
                     apiServerEndpoint: \"FILL-IN-CONTROL-PLANE-OVERLAY-IP:{API_PORT}\"\n    \
                     # A bootstrap token: 6 characters, a dot, 16 characters (\"abcdef.0123456789abcdef\").\n    \
                     token: \"FILL-IN-BOOTSTRAP-TOKEN\"\n    \
                     # The pin of the cluster CA: \"sha256:\" and 64 hex digits.\n    \
                     caCertHashes:\n      \
                       - \"sha256:FILL-IN-CA-CERT-HASH\"\n\
                 # To join as another control-plane node instead of a worker, also add (with the key\n\
                 # from `kubeadm init phase upload-certs --upload-certs` on the first one):\n\
                 # controlPlane:\n\
                 #   localAPIEndpoint:\n\
                 #     advertiseAddress: {ip}\n\
                 #     bindPort: {API_PORT}\n\
                 #   certificateKey: \"FILL-IN-CERTIFICATE-KEY\"\n"
            ));
        }
    }
    y
}

/// The `nodeRegistration` block shared by both roles, in v1beta4 form.
fn node_registration(ip: NodeIp, node_name: &str) -> String {
    let mut s = String::from("nodeRegistration:\n");
    if !node_name.is_empty() {
        s.push_str(&format!("  name: {}\n", yaml_quote(node_name)));
    }
    // Two addresses are quoted: a comma-separated list reads better as one string.
    let value = match ip.v6 {
        Some(_) => format!("\"{ip}\""),
        None => ip.to_string(),
    };
    s.push_str(&format!(
        "  # The node's InternalIP: the API server reaches kubelet (port 10250) at this address.\n  \
           kubeletExtraArgs:\n    \
             - name: node-ip\n      \
               value: {value}\n"
    ));
    s
}

/// A YAML double-quoted scalar.
fn yaml_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A CNI plugin running its pod network over `mesh0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cni {
    /// flannel (VXLAN backend).
    Flannel,
    /// Calico (VXLAN encapsulation by default here; IP-in-IP mentioned).
    Calico,
    /// Cilium (tunnel mode, VXLAN).
    Cilium,
}

/// What to configure in a CNI so its pod network fits inside the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniAdvice {
    /// The MTU pods get: the mesh MTU minus the CNI's tunnel overhead.
    pub mtu: u32,
    /// Bytes the CNI's encapsulation adds to every pod packet.
    pub overhead: u32,
    /// Human-readable settings to apply, each saying what it is for.
    pub lines: Vec<String>,
}

/// MTU for the CNI on top of mesh0 with `mesh_mtu` (default 1420), and the settings that put
/// the CNI's tunnel on `mesh0`.
///
/// Every CNI here uses VXLAN by default (50 bytes of headers per packet), so pods get
/// `mesh_mtu - 50`: 1370 over the default 1420, 1230 over 1280. The CNI's VXLAN packets are
/// addressed to node IPs, which are overlay addresses, so they travel inside WireGuard; the
/// pod MTU must leave room for the VXLAN headers inside `mesh0`'s MTU.
///
/// Note that flannel's and Cilium's own MTU settings mean the MTU of the interface *under*
/// the tunnel (they subtract the VXLAN overhead themselves), so those lines give `mesh_mtu`,
/// while Calico's MTU settings are the pod MTU.
pub fn cni_advice(cni: Cni, mesh_mtu: u32) -> CniAdvice {
    let overhead = VXLAN_OVERHEAD;
    let mtu = mesh_mtu.saturating_sub(overhead);
    let mut lines = match cni {
        Cni::Flannel => vec![
            format!(
                "kube-flannel DaemonSet, kube-flannel container args: add --iface=mesh0 \
                 (flannel sends its VXLAN traffic over the mesh and takes the MTU from mesh0: \
                 {mesh_mtu} - {overhead} = {mtu} for flannel.1 and pods)"
            ),
            format!(
                "kube-flannel-cfg ConfigMap, net-conf.json: \"Backend\": {{\"Type\": \"vxlan\", \"MTU\": {mesh_mtu}}} \
                 (optional: flannel derives it from --iface; flannel's MTU key is the MTU of the \
                 interface under the tunnel and flannel subtracts {overhead} itself, so never write {mtu} there)"
            ),
            "kube-flannel-cfg ConfigMap, net-conf.json: \"Network\" must equal the kubeadm \
             podSubnet (10.244.0.0/16 by default) and must not overlap 100.64.0.0/10"
                .to_owned(),
            format!(
                "check on each node: /run/flannel/subnet.env says FLANNEL_MTU={mtu}, and \
                 `ip link show flannel.1` shows mtu {mtu}"
            ),
        ],
        Cni::Calico => vec![
            "calico-node env IP_AUTODETECTION_METHOD=interface=mesh0 (the node address Calico \
             tunnels to is the overlay address; operator install: \
             spec.calicoNetwork.nodeAddressAutodetectionV4.interface: mesh0)"
                .to_owned(),
            "calico-node env CALICO_IPV4POOL_VXLAN=Always and CALICO_IPV4POOL_IPIP=Never \
             (VXLAN encapsulation, which needs no BGP between nodes; operator install: \
             ipPools[].encapsulation: VXLAN)"
                .to_owned(),
            format!(
                "calico-config ConfigMap: veth_mtu: \"{mtu}\" (the MTU of pod interfaces; the \
                 manifest passes it to the CNI config and to Felix's FELIX_VXLANMTU; operator \
                 install: spec.calicoNetwork.mtu: {mtu})"
            ),
            format!(
                "Felix: FELIX_VXLANMTU={mtu} if you set Felix directly (MTU of the vxlan.calico \
                 device); do not rely on auto-detection, whose default interface pattern does \
                 not match mesh0 (or set FELIX_MTUIFACEPATTERN=^mesh0$)"
            ),
            format!(
                "alternative: IP-in-IP instead of VXLAN costs {IPIP_OVERHEAD} bytes, so \
                 veth_mtu/FELIX_IPINIPMTU={}, but needs BGP (TCP 179) between nodes over the mesh",
                mesh_mtu.saturating_sub(IPIP_OVERHEAD)
            ),
        ],
        Cni::Cilium => vec![
            "Helm: routingMode=tunnel, tunnelProtocol=vxlan (encapsulate pod traffic between \
             node addresses, which are overlay addresses, so it rides the mesh)"
                .to_owned(),
            "Helm: devices=mesh0 (the interface Cilium attaches to and treats as the node's \
             network device)"
                .to_owned(),
            format!(
                "Helm: MTU={mesh_mtu} (Cilium's MTU value is the MTU of the network under the \
                 tunnel; Cilium subtracts {overhead} for VXLAN itself, so pods get {mtu}; \
                 setting it avoids detecting the MTU from another interface)"
            ),
            "Helm, with kubeProxyReplacement=true: k8sServiceHost=<control-plane overlay IP>, \
             k8sServicePort=6443 (Cilium reaches the API server over the mesh before it has \
             services)"
                .to_owned(),
            format!(
                "check: inside a pod, `ip route` or `ip link show eth0` shows mtu {mtu}"
            ),
        ],
    };
    if mtu < IPV6_MIN_MTU {
        lines.push(format!(
            "note: a pod MTU of {mtu} is below {IPV6_MIN_MTU}, the IPv6 minimum: pods can use IPv4 only"
        ));
    }
    CniAdvice {
        mtu,
        overhead,
        lines,
    }
}

/// The CNI spec version of [`cni_conflist`]: 1.0.0 is the newest that the reference plugins in
/// Debian 12 and Ubuntu 22.04 (`containernetworking-plugins` 1.1.1) and containerd 1.6 accept.
pub const CNI_VERSION: &str = "1.0.0";
/// The network name in [`cni_conflist`].
pub const CNI_NETWORK: &str = "mesh";
/// The bridge the pods hang on, the name kubelet's bridge setups use.
pub const DEFAULT_CNI_BRIDGE: &str = "cni0";
/// The file `mesh kubeadm cni --write` writes; `10-` sorts before most CNIs' own files, and
/// kubelet uses the first file by name.
pub const CNI_CONFLIST_FILE: &str = "10-mesh.conflist";

/// Whether `name` can name a Linux network interface: 1 to 15 bytes, none of them `/`, `:`,
/// whitespace or a control character, and not `.` or `..`.
pub fn valid_interface_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name != "."
        && name != ".."
        && !name.chars().any(|c| {
            c == '/' || c == ':' || c.is_whitespace() || c.is_control() || c == '"' || c == '\\'
        })
}

/// A CNI network config list (`.conflist`) for a node whose pod subnet is `pod_cidr`:
///
/// - `bridge` puts every pod's veth on `bridge` (created on first use) and gives the bridge the
///   subnet's first address as the pods' gateway (`isGateway`); `hairpinMode` lets a pod reach
///   itself through a Service. `ipMasq` is off: a pod's packets to another node's pods must keep
///   the pod's source address, since mesh routes the other node's prefix over `mesh0` and
///   accepts from each peer only its own approved prefixes. Pods reach the world through the
///   node's own masquerade, which must leave the cluster range alone (for example
///   `iptables -t nat -A POSTROUTING -s 10.244.1.0/24 ! -d 10.244.0.0/16 -j MASQUERADE`).
/// - `mtu` is `mesh0`'s MTU itself: pod packets cross `mesh0` as they are, with no second
///   header, so a 1420-byte pod packet fits a 1420-byte `mesh0`.
/// - `host-local` hands out addresses from `pod_cidr` (stored per node in
///   `/var/lib/cni/networks/<name>`), with a default route through the bridge.
/// - `portmap` implements `hostPort`; kubelet passes the port list because of its
///   `portMappings` capability.
pub fn cni_conflist(pod_cidr: ipnet::Ipv4Net, bridge: &str, mtu: u32) -> String {
    let subnet = pod_cidr.trunc();
    format!(
        r#"{{
  "cniVersion": "{CNI_VERSION}",
  "name": "{CNI_NETWORK}",
  "plugins": [
    {{
      "type": "bridge",
      "bridge": "{bridge}",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "mtu": {mtu},
      "ipam": {{
        "type": "host-local",
        "ranges": [[{{ "subnet": "{subnet}" }}]],
        "routes": [{{ "dst": "0.0.0.0/0" }}]
      }}
    }},
    {{
      "type": "portmap",
      "capabilities": {{ "portMappings": true }}
    }}
  ]
}}
"#
    )
}

/// A value given on the command line that is not one of the accepted choices.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {given:?}; use one of: {expected}")]
pub struct ParseChoiceError {
    kind: &'static str,
    given: String,
    expected: &'static str,
}

impl FromStr for Role {
    type Err = ParseChoiceError;

    /// `control-plane` or `worker` (case-insensitive).
    fn from_str(s: &str) -> Result<Role, ParseChoiceError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "control-plane" => Ok(Role::ControlPlane),
            "worker" => Ok(Role::Worker),
            _ => Err(ParseChoiceError {
                kind: "role",
                given: s.to_owned(),
                expected: "control-plane, worker",
            }),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::ControlPlane => "control-plane",
            Role::Worker => "worker",
        })
    }
}

impl FromStr for Cni {
    type Err = ParseChoiceError;

    /// `flannel`, `calico` or `cilium` (case-insensitive).
    fn from_str(s: &str) -> Result<Cni, ParseChoiceError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "flannel" => Ok(Cni::Flannel),
            "calico" => Ok(Cni::Calico),
            "cilium" => Ok(Cni::Cilium),
            _ => Err(ParseChoiceError {
                kind: "CNI",
                given: s.to_owned(),
                expected: "flannel, calico, cilium",
            }),
        }
    }
}

impl fmt::Display for Cni {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Cni::Flannel => "flannel",
            Cni::Calico => "calico",
            Cni::Cilium => "cilium",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cni_conflist_is_bridge_host_local_and_portmap_over_the_mesh_mtu() {
        let text = cni_conflist("10.244.3.0/24".parse().unwrap(), "cni0", 1420);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["name"], "mesh");
        let bridge = &v["plugins"][0];
        assert_eq!(bridge["type"], "bridge");
        assert_eq!(bridge["bridge"], "cni0");
        assert_eq!(bridge["isGateway"], true);
        assert_eq!(
            bridge["ipMasq"], false,
            "pod sources must survive across nodes"
        );
        assert_eq!(bridge["hairpinMode"], true);
        assert_eq!(bridge["mtu"], 1420);
        assert_eq!(bridge["ipam"]["type"], "host-local");
        assert_eq!(bridge["ipam"]["ranges"][0][0]["subnet"], "10.244.3.0/24");
        assert_eq!(bridge["ipam"]["routes"][0]["dst"], "0.0.0.0/0");
        assert_eq!(v["plugins"][1]["type"], "portmap");
        assert_eq!(v["plugins"][1]["capabilities"]["portMappings"], true);
        assert_eq!(v["plugins"].as_array().unwrap().len(), 2);
        // What `--advertise-routes auto` reads back from it.
        assert_eq!(
            crate::podcidr::parse_cni_config(&text),
            Ok(Some("10.244.3.0/24".parse().unwrap()))
        );
        // Host bits given are cleared.
        let text = cni_conflist("10.244.9.1/24".parse().unwrap(), "br-pods", 1380);
        assert!(text.contains("\"subnet\": \"10.244.9.0/24\""), "{text}");
        assert!(text.contains("\"mtu\": 1380"), "{text}");
    }

    #[test]
    fn bridge_names_are_interface_names() {
        assert!(valid_interface_name("cni0"));
        assert!(valid_interface_name("br-pods.1"));
        for bad in ["", "a-name-too-long-x", "a b", "a/b", "a:1", "..", "a\"b"] {
            assert!(!valid_interface_name(bad), "{bad:?}");
        }
    }

    const IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 7);
    const OTHER: Ipv4Addr = Ipv4Addr::new(100, 64, 3, 9);

    /// Applies `set_node_ip` and checks that a second application changes nothing.
    fn set(existing: &str) -> String {
        let once = set_node_ip(existing, IP);
        assert_eq!(
            set_node_ip(&once, IP),
            once,
            "not idempotent for {existing:?}"
        );
        once
    }

    fn count(hay: &str, needle: &str) -> usize {
        hay.matches(needle).count()
    }

    #[test]
    fn empty_file_gets_the_variable() {
        let out = set("");
        assert!(
            out.ends_with("KUBELET_EXTRA_ARGS=--node-ip=100.64.0.7\n"),
            "{out}"
        );
        assert_eq!(count(&out, "KUBELET_EXTRA_ARGS="), 1);
        // Every line but the assignment is a comment.
        for line in out
            .lines()
            .filter(|l| !l.starts_with("KUBELET_EXTRA_ARGS="))
        {
            assert!(line.starts_with('#'), "{line:?}");
        }
    }

    #[test]
    fn debian_package_default_with_empty_value() {
        // What the Debian/Ubuntu kubelet package installs as /etc/default/kubelet.
        assert_eq!(
            set("KUBELET_EXTRA_ARGS=\n"),
            "KUBELET_EXTRA_ARGS=--node-ip=100.64.0.7\n"
        );
        assert_eq!(
            set("KUBELET_EXTRA_ARGS=\"\"\n"),
            "KUBELET_EXTRA_ARGS=\"--node-ip=100.64.0.7\"\n"
        );
        // No trailing newline: still one line, nothing appended after it.
        assert_eq!(
            set("KUBELET_EXTRA_ARGS="),
            "KUBELET_EXTRA_ARGS=--node-ip=100.64.0.7"
        );
    }

    #[test]
    fn other_args_are_kept_and_node_ip_added() {
        assert_eq!(
            set("KUBELET_EXTRA_ARGS=\"--cgroup-driver=systemd --max-pods=200\"\n"),
            "KUBELET_EXTRA_ARGS=\"--cgroup-driver=systemd --max-pods=200 --node-ip=100.64.0.7\"\n"
        );
    }

    #[test]
    fn quoting_style_is_kept() {
        assert_eq!(
            set("KUBELET_EXTRA_ARGS='--max-pods=200'\n"),
            "KUBELET_EXTRA_ARGS='--max-pods=200 --node-ip=100.64.0.7'\n"
        );
        assert_eq!(
            set("KUBELET_EXTRA_ARGS=--max-pods=200\n"),
            "KUBELET_EXTRA_ARGS=--max-pods=200 --node-ip=100.64.0.7\n"
        );
        assert_eq!(
            set("KUBELET_EXTRA_ARGS=\"--max-pods=200\" # tuned for big nodes\n"),
            "KUBELET_EXTRA_ARGS=\"--max-pods=200 --node-ip=100.64.0.7\" # tuned for big nodes\n"
        );
    }

    #[test]
    fn old_node_ip_is_replaced_in_both_forms() {
        assert_eq!(
            set("KUBELET_EXTRA_ARGS=\"--node-ip=10.0.0.5 --max-pods=200\"\n"),
            "KUBELET_EXTRA_ARGS=\"--node-ip=100.64.0.7 --max-pods=200\"\n"
        );
        assert_eq!(
            set("KUBELET_EXTRA_ARGS=\"--max-pods=200 --node-ip 10.0.0.5 --v=2\"\n"),
            "KUBELET_EXTRA_ARGS=\"--max-pods=200 --node-ip 100.64.0.7 --v=2\"\n"
        );
        assert_eq!(
            set("KUBELET_EXTRA_ARGS=--node-ip 10.0.0.5\n"),
            "KUBELET_EXTRA_ARGS=--node-ip 100.64.0.7\n"
        );
        // A dangling flag with no value gets one.
        assert_eq!(
            set("KUBELET_EXTRA_ARGS=\"--node-ip --max-pods=200\"\n"),
            "KUBELET_EXTRA_ARGS=\"--node-ip=100.64.0.7 --max-pods=200\"\n"
        );
        // An empty value is filled in.
        assert_eq!(
            set("KUBELET_EXTRA_ARGS=--node-ip=\n"),
            "KUBELET_EXTRA_ARGS=--node-ip=100.64.0.7\n"
        );
    }

    #[test]
    fn duplicates_are_collapsed_not_multiplied() {
        let out = set("KUBELET_EXTRA_ARGS=\"--node-ip=10.0.0.5 --v=2 --node-ip 10.0.0.6\"\n");
        assert_eq!(out, "KUBELET_EXTRA_ARGS=\"--node-ip=100.64.0.7 --v=2\"\n");
        assert_eq!(count(&out, "--node-ip"), 1);
    }

    #[test]
    fn similar_flags_are_not_node_ip() {
        assert_eq!(
            set("KUBELET_EXTRA_ARGS=\"--node-ip-extra=1\"\n"),
            "KUBELET_EXTRA_ARGS=\"--node-ip-extra=1 --node-ip=100.64.0.7\"\n"
        );
    }

    #[test]
    fn comments_and_other_variables_are_kept() {
        let existing = "\
# Managed by hand.
#KUBELET_EXTRA_ARGS=--node-ip=192.0.2.1
; old style comment
HTTP_PROXY=http://proxy:3128

KUBELET_EXTRA_ARGS=\"--cgroup-driver=systemd\"
NO_PROXY=10.0.0.0/8,100.64.0.0/10
";
        let out = set(existing);
        let expected = "\
# Managed by hand.
#KUBELET_EXTRA_ARGS=--node-ip=192.0.2.1
; old style comment
HTTP_PROXY=http://proxy:3128

KUBELET_EXTRA_ARGS=\"--cgroup-driver=systemd --node-ip=100.64.0.7\"
NO_PROXY=10.0.0.0/8,100.64.0.0/10
";
        assert_eq!(out, expected);
    }

    #[test]
    fn missing_variable_is_appended_after_other_lines() {
        let out = set("HTTP_PROXY=http://proxy:3128");
        assert!(out.starts_with("HTTP_PROXY=http://proxy:3128\n"), "{out}");
        assert!(
            out.ends_with("\nKUBELET_EXTRA_ARGS=--node-ip=100.64.0.7\n"),
            "{out}"
        );
        // A commented-out assignment does not count as present.
        let out = set("# KUBELET_EXTRA_ARGS=--node-ip=1.2.3.4\n");
        assert!(
            out.starts_with("# KUBELET_EXTRA_ARGS=--node-ip=1.2.3.4\n"),
            "{out}"
        );
        assert!(
            out.ends_with("\nKUBELET_EXTRA_ARGS=--node-ip=100.64.0.7\n"),
            "{out}"
        );
    }

    #[test]
    fn export_prefix_and_multiline_values() {
        assert_eq!(
            set("export KUBELET_EXTRA_ARGS=\"--v=2\"\n"),
            "export KUBELET_EXTRA_ARGS=\"--v=2 --node-ip=100.64.0.7\"\n"
        );
        let multi = "KUBELET_EXTRA_ARGS=\"--v=2\n  --node-ip=10.0.0.5\"\nOTHER=1\n";
        assert_eq!(
            set(multi),
            "KUBELET_EXTRA_ARGS=\"--v=2\n  --node-ip=100.64.0.7\"\nOTHER=1\n"
        );
    }

    #[test]
    fn several_assignments_the_last_one_counts() {
        let out = set("KUBELET_EXTRA_ARGS=\"--node-ip=10.0.0.5\"\nKUBELET_EXTRA_ARGS=\"--v=2\"\n");
        assert_eq!(
            out,
            "KUBELET_EXTRA_ARGS=\"--node-ip=100.64.0.7\"\nKUBELET_EXTRA_ARGS=\"--v=2 --node-ip=100.64.0.7\"\n"
        );
    }

    #[test]
    fn changing_the_address_replaces_it() {
        let first = set_node_ip("KUBELET_EXTRA_ARGS=\"--max-pods=200\"\n", IP);
        let second = set_node_ip(&first, OTHER);
        assert_eq!(
            second,
            "KUBELET_EXTRA_ARGS=\"--max-pods=200 --node-ip=100.64.3.9\"\n"
        );
    }

    #[test]
    fn detects_distribution_families() {
        let rocky = "NAME=\"Rocky Linux\"\nVERSION=\"9.4 (Blue Onyx)\"\nID=\"rocky\"\nID_LIKE=\"rhel centos fedora\"\nVERSION_ID=\"9.4\"\n";
        assert_eq!(KubeletDefaults::detect(rocky), KubeletDefaults::RedHat);
        let rhel = "NAME=\"Red Hat Enterprise Linux\"\nID=\"rhel\"\nID_LIKE=\"fedora\"\nVERSION_ID=\"9.4\"\n";
        assert_eq!(KubeletDefaults::detect(rhel), KubeletDefaults::RedHat);
        let amazon = "NAME=\"Amazon Linux\"\nID=\"amzn\"\nID_LIKE=\"fedora\"\n";
        assert_eq!(KubeletDefaults::detect(amazon), KubeletDefaults::RedHat);
        let alma = "ID=almalinux\nID_LIKE='rhel centos fedora'\n";
        assert_eq!(KubeletDefaults::detect(alma), KubeletDefaults::RedHat);
        let ubuntu = "NAME=\"Ubuntu\"\nID=ubuntu\nID_LIKE=debian\nVERSION_ID=\"24.04\"\n";
        assert_eq!(KubeletDefaults::detect(ubuntu), KubeletDefaults::Debian);
        let debian = "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\n";
        assert_eq!(KubeletDefaults::detect(debian), KubeletDefaults::Debian);
        // A derivative only known through ID_LIKE.
        let derivative = "ID=someos\nID_LIKE=\"centos rhel\"\n";
        assert_eq!(KubeletDefaults::detect(derivative), KubeletDefaults::RedHat);
        // Unknown or empty: Debian.
        assert_eq!(
            KubeletDefaults::detect("ID=arch\n"),
            KubeletDefaults::Debian
        );
        assert_eq!(KubeletDefaults::detect(""), KubeletDefaults::Debian);
        assert_eq!(
            KubeletDefaults::RedHat.path(),
            Path::new("/etc/sysconfig/kubelet")
        );
        assert_eq!(
            KubeletDefaults::Debian.path(),
            Path::new("/etc/default/kubelet")
        );
    }

    #[test]
    fn preview_shows_only_changed_lines() {
        let path = Path::new("/etc/default/kubelet");
        let old = "# comment\nKUBELET_EXTRA_ARGS=\"--max-pods=200\"\nOTHER=1\n";
        let new = set_node_ip(old, IP);
        let p = preview(path, old, &new);
        assert_eq!(
            p,
            "--- /etc/default/kubelet\t(current)\n\
             +++ /etc/default/kubelet\t(new)\n\
             @@ -2 +2 @@\n\
             -KUBELET_EXTRA_ARGS=\"--max-pods=200\"\n\
             +KUBELET_EXTRA_ARGS=\"--max-pods=200 --node-ip=100.64.0.7\"\n"
        );
        assert!(!p.contains("# comment"));
        assert!(!p.contains("OTHER=1"));
    }

    #[test]
    fn preview_of_a_new_file_and_of_no_change() {
        let path = Path::new("/etc/sysconfig/kubelet");
        let new = set_node_ip("", IP);
        let p = preview(path, "", &new);
        assert!(p.starts_with("--- /etc/sysconfig/kubelet\t(current)\n+++ /etc/sysconfig/kubelet\t(new)\n@@ -0,0 +1,2 @@\n"), "{p}");
        assert!(
            p.ends_with("+KUBELET_EXTRA_ARGS=--node-ip=100.64.0.7\n"),
            "{p}"
        );
        assert!(!p
            .lines()
            .any(|l| l.starts_with('-') && !l.starts_with("---")));

        let same = preview(path, &new, &new);
        assert!(same.contains("no change"), "{same}");
        assert!(!same
            .lines()
            .any(|l| l.starts_with('+') && !l.starts_with("+++")));
    }

    #[test]
    fn preview_appended_line_hunk() {
        let p = preview(Path::new("f"), "A=1\n", "A=1\nB=2\n");
        assert_eq!(p, "--- f\t(current)\n+++ f\t(new)\n@@ -1,0 +2 @@\n+B=2\n");
    }

    #[test]
    fn control_plane_config_pins_the_overlay_address() {
        let y = kubeadm_config(Role::ControlPlane, IP, "cp-1", None);
        let lines: Vec<&str> = y.lines().collect();
        let has = |l: &str| lines.contains(&l);
        assert!(has("apiVersion: kubeadm.k8s.io/v1beta4"), "{y}");
        assert!(has("kind: InitConfiguration"));
        assert!(has("nodeRegistration:"));
        assert!(has("  name: \"cp-1\""));
        assert!(has("  kubeletExtraArgs:"));
        assert!(has("    - name: node-ip"));
        assert!(has("      value: 100.64.0.7"));
        assert!(has("localAPIEndpoint:"));
        assert!(has("  advertiseAddress: 100.64.0.7"));
        assert!(has("  bindPort: 6443"));
        // The ClusterConfiguration hint is commented out, but complete.
        assert!(has("# kind: ClusterConfiguration"));
        assert!(has("# controlPlaneEndpoint: \"100.64.0.7:6443\""));
        assert!(has("#   certSANs:"));
        assert!(has("#     - \"100.64.0.7\""));
        // The only active document is the InitConfiguration.
        assert_eq!(lines.iter().filter(|l| l.starts_with("kind:")).count(), 1);
        assert!(!lines.contains(&"---"));
        // The file says which config API it uses and how to go back to v1beta3.
        assert!(y.contains("kubeadm 1.31"));
        assert!(y.contains("v1beta3"));
        // Every active line is either a comment or indented under a top-level key.
        assert!(!y.contains('\t'));
    }

    #[test]
    fn uncommenting_the_cluster_configuration_hint_gives_a_second_document() {
        // Mimics `sed '/^# ---$/,$ s/^# //'` from the comment in the output.
        let y = kubeadm_config(Role::ControlPlane, IP, "", None);
        let start = y.lines().position(|l| l == "# ---").unwrap();
        let uncommented: Vec<String> = y
            .lines()
            .skip(start)
            .map(|l| l.strip_prefix("# ").unwrap_or(l).to_owned())
            .collect();
        assert_eq!(uncommented[0], "---");
        assert!(uncommented.contains(&"kind: ClusterConfiguration".to_owned()));
        assert!(uncommented.contains(&"controlPlaneEndpoint: \"100.64.0.7:6443\"".to_owned()));
        assert!(uncommented.contains(&"  certSANs:".to_owned()));
        assert!(uncommented.contains(&"    - \"100.64.0.7\"".to_owned()));
        // Without a name, kubeadm picks the hostname.
        assert!(!y.contains("  name: \""));
    }

    #[test]
    fn worker_config_joins_with_the_overlay_address() {
        let y = kubeadm_config(Role::Worker, OTHER, "worker-1", None);
        let lines: Vec<&str> = y.lines().collect();
        let has = |l: &str| lines.contains(&l);
        assert!(has("apiVersion: kubeadm.k8s.io/v1beta4"), "{y}");
        assert!(has("kind: JoinConfiguration"));
        assert!(has("  name: \"worker-1\""));
        assert!(has("    - name: node-ip"));
        assert!(has("      value: 100.64.3.9"));
        assert!(has("discovery:"));
        assert!(has("  bootstrapToken:"));
        assert!(lines
            .iter()
            .any(|l| l.starts_with("    apiServerEndpoint: ") && l.contains("FILL-IN")));
        assert!(lines
            .iter()
            .any(|l| l.starts_with("    token: ") && l.contains("FILL-IN")));
        assert!(has("    caCertHashes:"));
        // Not an init config, and no API endpoint of its own unless uncommented.
        assert!(!y.contains("InitConfiguration\n"));
        assert!(!lines.iter().any(|l| l.starts_with("localAPIEndpoint")));
        assert!(has("#     advertiseAddress: 100.64.3.9"));
    }

    #[test]
    fn node_names_are_quoted_for_yaml() {
        let y = kubeadm_config(Role::Worker, IP, "we\"ird\\name", None);
        assert!(y.contains("  name: \"we\\\"ird\\\\name\"\n"), "{y}");
    }

    const IP6: &str = "fd12:3456:789a::7";
    const PREFIX6: &str = "fd12:3456:789a::/64";

    fn dual(pod6: Option<&str>, service6: Option<&str>) -> Result<DualStack, String> {
        DualStack::new(
            Some(IP6.parse().unwrap()),
            Some(PREFIX6.parse().unwrap()),
            pod6.map(|p| p.parse().unwrap()),
            service6.map(|p| p.parse().unwrap()),
        )
    }

    #[test]
    fn node_ip_is_ipv4_alone_unless_dual_stack() {
        assert_eq!(NodeIp::from(IP).to_string(), "100.64.0.7");
        let both = NodeIp {
            v4: IP,
            v6: Some(IP6.parse().unwrap()),
        };
        assert_eq!(both.to_string(), "100.64.0.7,fd12:3456:789a::7");
        assert_eq!(
            set_node_ip("KUBELET_EXTRA_ARGS=\"--max-pods=200\"\n", both),
            "KUBELET_EXTRA_ARGS=\"--max-pods=200 --node-ip=100.64.0.7,fd12:3456:789a::7\"\n"
        );
        // From dual-stack back to IPv4 alone, and the space form.
        assert_eq!(
            set_node_ip(
                "KUBELET_EXTRA_ARGS=--node-ip 100.64.0.7,fd12:3456:789a::7 --v=2\n",
                IP
            ),
            "KUBELET_EXTRA_ARGS=--node-ip 100.64.0.7 --v=2\n"
        );
        let once = set_node_ip("", both);
        assert_eq!(set_node_ip(&once, both), once);
        assert!(once.contains("KUBELET_EXTRA_ARGS=--node-ip=100.64.0.7,fd12:3456:789a::7\n"));
    }

    #[test]
    fn dual_stack_defaults_and_checks() {
        let d = dual(None, None).unwrap();
        assert_eq!(d.address6, IP6.parse::<Ipv6Addr>().unwrap());
        assert_eq!(d.pod_cidr6.to_string(), DEFAULT_POD_CIDR6);
        assert_eq!(d.service_cidr6.to_string(), DEFAULT_SERVICE_CIDR6);
        // Host bits are dropped.
        let d = dual(Some("fd00:1:2::5/56"), Some("fd00:9::1/108")).unwrap();
        assert_eq!(d.pod_cidr6.to_string(), "fd00:1:2::/56");
        assert_eq!(d.service_cidr6.to_string(), "fd00:9::/108");
    }

    #[test]
    fn dual_stack_without_ipv6_overlay_says_what_to_do() {
        let err = DualStack::new(None, None, None, None).unwrap_err();
        assert!(
            err.contains("this network has no IPv6 overlay (created with --cidr6 off)"),
            "{err}"
        );
        assert!(err.contains("leave out --dual-stack"), "{err}");
    }

    #[test]
    fn dual_stack_refuses_ranges_kubernetes_refuses() {
        let err = dual(Some("fd00:10:244::/64"), None).unwrap_err();
        assert!(
            err.contains("--pod-cidr6") && err.contains("/48 to a /63"),
            "{err}"
        );
        let err = dual(Some("fd00::/40"), None).unwrap_err();
        assert!(err.contains("--pod-cidr6"), "{err}");
        let err = dual(None, Some("fd00:10:96::/100")).unwrap_err();
        assert!(
            err.contains("--service-cidr6") && err.contains("/108"),
            "{err}"
        );
        let err = dual(Some("fd00:10:96::/56"), Some("fd00:10:96::/112")).unwrap_err();
        assert!(err.contains("overlap"), "{err}");
        let err = dual(Some("fd12:3456:789a::/48"), None).unwrap_err();
        assert!(
            err.contains("overlaps the mesh's IPv6 overlay prefix fd12:3456:789a::/64"),
            "{err}"
        );
        let err = dual(None, Some("fd12:3456:789a::/112")).unwrap_err();
        assert!(err.contains("--service-cidr6"), "{err}");
    }

    #[test]
    fn dual_stack_control_plane_config() {
        let d = dual(None, None).unwrap();
        let y = kubeadm_config(Role::ControlPlane, IP, "cp-1", Some(&d));
        let lines: Vec<&str> = y.lines().collect();
        let has = |l: &str| lines.contains(&l);
        assert!(has("kind: InitConfiguration"), "{y}");
        assert!(has("    - name: node-ip"));
        assert!(has("      value: \"100.64.0.7,fd12:3456:789a::7\""));
        // The API server stays on the IPv4 overlay address.
        assert!(has("  advertiseAddress: 100.64.0.7"));
        assert!(!y.contains("advertiseAddress: fd"));
        // An active ClusterConfiguration with both families, IPv4 first.
        assert!(has("---"));
        assert_eq!(lines.iter().filter(|l| l.starts_with("kind:")).count(), 2);
        assert!(has("kind: ClusterConfiguration"));
        assert!(has("networking:"));
        assert!(has("  podSubnet: \"10.244.0.0/16,fd00:10:244::/56\""));
        assert!(has("  serviceSubnet: \"10.96.0.0/12,fd00:10:96::/112\""));
        // The optional endpoint lines stay commented, on the IPv4 address.
        assert!(has("# controlPlaneEndpoint: \"100.64.0.7:6443\""));
        assert!(has("#     - \"100.64.0.7\""));
        // The v1beta3 hint names both addresses; the CNI hint names the IPv6 pools.
        assert!(has("#     node-ip: \"100.64.0.7,fd12:3456:789a::7\""));
        assert!(y.contains("CALICO_IPV6POOL_CIDR") && y.contains("IPv6Network"));
        assert!(!y.contains('\t'));
    }

    #[test]
    fn dual_stack_ranges_are_the_ones_given() {
        let d = dual(Some("fd00:aa::/48"), Some("fd00:bb::/108")).unwrap();
        let y = kubeadm_config(Role::ControlPlane, IP, "", Some(&d));
        assert!(
            y.contains("  podSubnet: \"10.244.0.0/16,fd00:aa::/48\"\n"),
            "{y}"
        );
        assert!(
            y.contains("  serviceSubnet: \"10.96.0.0/12,fd00:bb::/108\"\n"),
            "{y}"
        );
    }

    #[test]
    fn dual_stack_worker_config() {
        let d = dual(None, None).unwrap();
        let y = kubeadm_config(Role::Worker, OTHER, "worker-1", Some(&d));
        let lines: Vec<&str> = y.lines().collect();
        assert!(lines.contains(&"kind: JoinConfiguration"), "{y}");
        assert!(lines.contains(&"      value: \"100.64.3.9,fd12:3456:789a::7\""));
        assert!(lines.contains(&"#     advertiseAddress: 100.64.3.9"));
        assert!(!y.contains("ClusterConfiguration"));
        assert!(!y.contains("podSubnet"));
    }

    #[test]
    fn single_stack_config_has_no_ipv6() {
        for role in [Role::ControlPlane, Role::Worker] {
            let y = kubeadm_config(role, IP, "n", None);
            assert!(!y.contains("fd"), "{y}");
            assert!(!y.contains("Dual-stack"), "{y}");
        }
    }

    #[test]
    fn flannel_over_default_mesh_mtu() {
        let a = cni_advice(Cni::Flannel, 1420);
        assert_eq!(a.overhead, 50);
        assert_eq!(a.mtu, 1370);
        assert!(a.lines.iter().any(|l| l.contains("--iface=mesh0")), "{a:?}");
        assert!(a.lines.iter().any(|l| l.contains("\"Type\": \"vxlan\"")));
        assert!(a.lines.iter().any(|l| l.contains("FLANNEL_MTU=1370")));
    }

    #[test]
    fn flannel_over_minimum_mesh_mtu() {
        let a = cni_advice(Cni::Flannel, 1280);
        assert_eq!(a.mtu, 1230);
        assert!(
            a.lines.iter().any(|l| l.contains("1280 - 50 = 1230")),
            "{a:?}"
        );
        // 1230 is below the IPv6 minimum: say so.
        assert!(a.lines.iter().any(|l| l.starts_with("note:")));
        assert!(!cni_advice(Cni::Flannel, 1420)
            .lines
            .iter()
            .any(|l| l.starts_with("note:")));
    }

    #[test]
    fn calico_uses_vxlan_and_mesh0() {
        let a = cni_advice(Cni::Calico, 1420);
        assert_eq!((a.mtu, a.overhead), (1370, 50));
        assert!(a
            .lines
            .iter()
            .any(|l| l.contains("IP_AUTODETECTION_METHOD=interface=mesh0")));
        assert!(a.lines.iter().any(|l| l.contains("veth_mtu: \"1370\"")));
        assert!(a.lines.iter().any(|l| l.contains("FELIX_VXLANMTU=1370")));
        // IP-in-IP alternative: 20 bytes.
        assert!(a.lines.iter().any(|l| l.contains("FELIX_IPINIPMTU=1400")));
    }

    #[test]
    fn cilium_tunnel_over_mesh0() {
        let a = cni_advice(Cni::Cilium, 1420);
        assert_eq!((a.mtu, a.overhead), (1370, 50));
        assert!(a.lines.iter().any(|l| l.contains("devices=mesh0")));
        assert!(a.lines.iter().any(|l| l.contains("MTU=1420")));
        assert!(a.lines.iter().any(|l| l.contains("tunnelProtocol=vxlan")));
    }

    #[test]
    fn parses_roles_and_cnis() {
        assert_eq!("control-plane".parse::<Role>(), Ok(Role::ControlPlane));
        assert_eq!("worker".parse::<Role>(), Ok(Role::Worker));
        assert_eq!("Worker".parse::<Role>(), Ok(Role::Worker));
        let e = "master".parse::<Role>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown role \"master\"; use one of: control-plane, worker"
        );
        assert_eq!("flannel".parse::<Cni>(), Ok(Cni::Flannel));
        assert_eq!("calico".parse::<Cni>(), Ok(Cni::Calico));
        assert_eq!("cilium".parse::<Cni>(), Ok(Cni::Cilium));
        assert!("weave".parse::<Cni>().is_err());
        for r in [Role::ControlPlane, Role::Worker] {
            assert_eq!(r.to_string().parse::<Role>(), Ok(r));
        }
        for c in [Cni::Flannel, Cni::Calico, Cni::Cilium] {
            assert_eq!(c.to_string().parse::<Cni>(), Ok(c));
        }
    }
}
