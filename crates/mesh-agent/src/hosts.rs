//! The managed block of the network's names in /etc/hosts.
//!
//! For programs that do not ask the DNS responder (a static resolver configuration, a
//! container's own /etc/hosts), the agent can keep the network's names in a block of the
//! hosts file, between two marker lines that name the network:
//!
//! ```text
//! # BEGIN mesh prod (managed by mesh; edits inside are overwritten)
//! 100.64.0.2 node-b node-b.prod.mesh
//! fd6d:6573:6800::2 node-b node-b.prod.mesh
//! # END mesh prod
//! ```
//!
//! A tab separates the address from the names. On a network with an IPv6 overlay every name
//! also has a line with its IPv6 address (after the IPv4 lines). [`render`] builds the block, [`update`] puts
//! it into the file (or takes it out) without touching a byte outside the markers. Several networks' blocks coexist. The file is
//! replaced atomically (a temporary file renamed over it) except where it is a bind mount
//! (Docker, `ip netns exec`), where renaming over it is impossible and it is rewritten in
//! place instead.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::net::IpAddr;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use tracing::{debug, info};

/// The largest hosts file [`update`] reads: a hosts file larger than this is not one we
/// should be rewriting.
pub const MAX_HOSTS_FILE: u64 = 4 * 1024 * 1024;
/// Mode of a hosts file that does not exist yet.
const NEW_FILE_MODE: u32 = 0o644;

/// What went wrong updating the hosts file.
#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    /// Reading the file failed.
    #[error("could not read {path}: {source}")]
    Read {
        /// The hosts file.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
    /// The file is too large to be a hosts file we manage.
    #[error("{path} is larger than {max} bytes; not rewriting it (check what fills it, or run mesh without the hosts block)", max = MAX_HOSTS_FILE)]
    TooLarge {
        /// The hosts file.
        path: PathBuf,
    },
    /// The file is not UTF-8 text.
    #[error("{path} is not UTF-8 text; not rewriting it")]
    NotText {
        /// The hosts file.
        path: PathBuf,
    },
    /// The block's BEGIN marker has no END marker after it.
    #[error("{path} line {line}: \"# BEGIN mesh {network}\" has no \"# END mesh {network}\" after it; fix or delete the block by hand, mesh will not guess where it ends")]
    MissingEnd {
        /// The hosts file.
        path: PathBuf,
        /// The network whose block it is.
        network: String,
        /// The line of the BEGIN marker (1-based).
        line: usize,
    },
    /// An END marker without a BEGIN marker before it, or a second block of one network.
    #[error("{path} line {line}: unexpected \"{marker}\" (a second block for network {network}, or an END without BEGIN); fix the file by hand so that it has at most one block per network")]
    StrayMarker {
        /// The hosts file.
        path: PathBuf,
        /// The network whose marker it is.
        network: String,
        /// The line of the stray marker (1-based).
        line: usize,
        /// The marker line.
        marker: String,
    },
    /// The caller passed a block that is not one [`render`] made for this network.
    #[error("the hosts block for network {network} must start with its BEGIN and end with its END marker line")]
    InvalidBlock {
        /// The network.
        network: String,
    },
    /// Writing the new contents failed.
    #[error("could not write {path}: {source}")]
    Write {
        /// The file being written (the hosts file or its temporary file).
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
}

fn begin_marker(network: &str) -> String {
    format!("# BEGIN mesh {network}")
}

fn end_marker(network: &str) -> String {
    format!("# END mesh {network}")
}

/// The block for `network`: a BEGIN marker line, one line per address (`address<TAB>names`
/// separated by spaces) in the given order, an END marker line; each line ends with `\n`.
/// Names that are not plain host names (letters, digits, '-' and '.') are left out, so that a
/// strange name from the peer list cannot break the file's syntax; so are entries left
/// without names.
pub fn render(entries: &[(IpAddr, Vec<String>)], network: &str) -> String {
    let mut block = format!(
        "{} (managed by mesh; edits inside are overwritten)\n",
        begin_marker(network)
    );
    for (addr, names) in entries {
        let names: Vec<&str> = names
            .iter()
            .map(String::as_str)
            .filter(|name| {
                let plain = is_plain_host_name(name);
                if !plain {
                    debug!(name, "not a plain host name; left out of the hosts block");
                }
                plain
            })
            .collect();
        if names.is_empty() {
            continue;
        }
        block.push_str(&format!("{addr}\t{}\n", names.join(" ")));
    }
    block.push_str(&end_marker(network));
    block.push('\n');
    block
}

/// Letters, digits, '-' and '.', at most 253 characters, not starting with '-' or '.'.
fn is_plain_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && !name.starts_with(['-', '.'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// Puts `block` (made by [`render`] for `network`) into the hosts file at `path` in place of
/// that network's block, or at the end when it has none; `None` removes the block. Nothing
/// outside the markers changes. Returns whether the file changed; an unchanged file is not
/// written at all.
///
/// A missing file counts as empty (it is created with mode 0644 when a block goes in).
pub fn update(path: &Path, network: &str, block: Option<&str>) -> Result<bool, HostsError> {
    if let Some(block) = block {
        check_block(block, network)?;
    }
    let current = read_bounded(path)?;
    let old = current.as_deref().unwrap_or("");
    let span = find_block(old, network).map_err(|err| err.into_error(path, network))?;
    let new = match (span, block) {
        (Some((start, end)), Some(block)) => format!("{}{block}{}", &old[..start], &old[end..]),
        (Some((start, end)), None) => format!("{}{}", &old[..start], &old[end..]),
        (None, Some(block)) => {
            let separator = if old.is_empty() || old.ends_with('\n') {
                ""
            } else {
                "\n"
            };
            format!("{old}{separator}{block}")
        }
        (None, None) => return Ok(false),
    };
    if new == old {
        debug!(path = %path.display(), network, "hosts block unchanged");
        return Ok(false);
    }
    write_atomically(path, new.as_bytes())?;
    info!(path = %path.display(), network, present = block.is_some(), "hosts block updated");
    Ok(true)
}

/// The block must be exactly a rendered block of this network: marker lines first and last.
fn check_block(block: &str, network: &str) -> Result<(), HostsError> {
    let mut lines = block.lines();
    let first = lines.next().unwrap_or("");
    let last = lines.next_back().unwrap_or("");
    let ok = is_begin(first, network) && last.trim_end() == end_marker(network);
    if ok && block.ends_with('\n') {
        Ok(())
    } else {
        Err(HostsError::InvalidBlock {
            network: network.to_owned(),
        })
    }
}

/// Whether `line` is the BEGIN marker of `network` (and not of a network whose name merely
/// starts the same way).
fn is_begin(line: &str, network: &str) -> bool {
    line.trim_end()
        .strip_prefix(&begin_marker(network))
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(' '))
}

/// A problem with the markers, before the path is known.
enum MarkerError {
    MissingEnd { line: usize },
    Stray { line: usize, marker: String },
}

impl MarkerError {
    fn into_error(self, path: &Path, network: &str) -> HostsError {
        match self {
            MarkerError::MissingEnd { line } => HostsError::MissingEnd {
                path: path.to_owned(),
                network: network.to_owned(),
                line,
            },
            MarkerError::Stray { line, marker } => HostsError::StrayMarker {
                path: path.to_owned(),
                network: network.to_owned(),
                line,
                marker,
            },
        }
    }
}

/// The byte range of `network`'s block in `text`, from the start of its BEGIN line to the end
/// of its END line (including that line's newline, if any).
fn find_block(text: &str, network: &str) -> Result<Option<(usize, usize)>, MarkerError> {
    let end = end_marker(network);
    let mut found: Option<(usize, usize)> = None;
    let mut open: Option<(usize, usize)> = None; // (byte offset, line number) of BEGIN
    let mut offset = 0;
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let number = index + 1;
        let content = line.trim_end_matches(['\n', '\r']);
        if is_begin(content, network) {
            if open.is_some() || found.is_some() {
                return Err(MarkerError::Stray {
                    line: number,
                    marker: content.to_owned(),
                });
            }
            open = Some((offset, number));
        } else if content.trim_end() == end {
            match open.take() {
                Some((start, _)) => found = Some((start, offset + line.len())),
                None => {
                    return Err(MarkerError::Stray {
                        line: number,
                        marker: content.to_owned(),
                    })
                }
            }
        }
        offset += line.len();
    }
    if let Some((_, line)) = open {
        return Err(MarkerError::MissingEnd { line });
    }
    Ok(found)
}

/// The file's text, or `None` when it does not exist; at most [`MAX_HOSTS_FILE`] bytes.
fn read_bounded(path: &Path) -> Result<Option<String>, HostsError> {
    let read_err = |source| HostsError::Read {
        path: path.to_owned(),
        source,
    };
    let file = match File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(read_err(err)),
    };
    let mut bytes = Vec::new();
    file.take(MAX_HOSTS_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_HOSTS_FILE {
        return Err(HostsError::TooLarge {
            path: path.to_owned(),
        });
    }
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| HostsError::NotText {
            path: path.to_owned(),
        })
}

/// Replaces the file with `contents`: a temporary file in the same directory, with the
/// original's mode and (where permitted) owner, synced, then renamed over the original. When
/// the rename is impossible because the file is a mount point (EBUSY) or on another file
/// system (EXDEV), the file is rewritten in place instead.
fn write_atomically(path: &Path, contents: &[u8]) -> Result<(), HostsError> {
    let write_err = |path: &Path, source| HostsError::Write {
        path: path.to_owned(),
        source,
    };
    let original = fs::metadata(path).ok();
    let tmp = temporary_path(path);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(NEW_FILE_MODE)
            .open(&tmp)?;
        if let Some(meta) = &original {
            file.set_permissions(fs::Permissions::from_mode(meta.mode() & 0o7777))?;
            if let Err(err) = std::os::unix::fs::fchown(&file, Some(meta.uid()), Some(meta.gid())) {
                debug!(%err, "could not give the new hosts file the original's owner");
            }
        }
        file.write_all(contents)?;
        file.sync_all()
    })();
    if let Err(err) = result {
        let _ = fs::remove_file(&tmp);
        return Err(write_err(&tmp, err));
    }
    match fs::rename(&tmp, path) {
        Ok(()) => {
            sync_parent(path);
            Ok(())
        }
        Err(err) if is_mount_point_error(&err) => {
            debug!(path = %path.display(), %err, "cannot rename over the hosts file (a bind mount?); rewriting it in place");
            let _ = fs::remove_file(&tmp);
            rewrite_in_place(path, contents).map_err(|err| write_err(path, err))
        }
        Err(err) => {
            let _ = fs::remove_file(&tmp);
            Err(write_err(path, err))
        }
    }
}

/// Whether a rename failed because the target cannot be replaced, only rewritten: a bind
/// mount (EBUSY) or a file on another file system (EXDEV).
fn is_mount_point_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ResourceBusy | io::ErrorKind::CrossesDevices
    )
}

/// Truncates the file and writes `contents` into it: not atomic (a reader may see it short
/// for a moment), but it keeps the inode, which a bind mount needs.
fn rewrite_in_place(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new().write(true).truncate(true).open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

/// A name for the temporary file next to `path`, unique within this process.
fn temporary_path(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| "hosts".to_owned());
    let tmp = format!(
        ".{name}.mesh-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    path.with_file_name(tmp)
}

/// Syncs the directory of `path` so that the rename survives a crash (best effort).
fn sync_parent(path: &Path) {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    if let Err(err) = File::open(dir).and_then(|dir| dir.sync_all()) {
        debug!(dir = %dir.display(), %err, "could not sync the hosts file's directory");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// A fresh directory under the system's temporary directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            static N: AtomicU64 = AtomicU64::new(0);
            let dir = std::env::temp_dir().join(format!(
                "mesh-hosts-test-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            fs::create_dir_all(&dir).expect("create temp dir");
            TempDir(dir)
        }

        fn file(&self, contents: &str) -> PathBuf {
            let path = self.0.join("hosts");
            fs::write(&path, contents).expect("write");
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const ORIGINAL: &str =
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n\n# the db\n10.0.0.5 db\n";

    fn entries(last: u8) -> Vec<(IpAddr, Vec<String>)> {
        vec![
            (
                Ipv4Addr::new(100, 64, 0, 1).into(),
                vec!["node-a".into(), "node-a.prod.mesh".into()],
            ),
            (
                Ipv4Addr::new(100, 64, 0, last).into(),
                vec!["node-b".into(), "node-b.prod.mesh".into()],
            ),
        ]
    }

    fn read(path: &Path) -> String {
        fs::read_to_string(path).expect("read")
    }

    #[test]
    fn render_format() {
        let block = render(&entries(2), "prod");
        assert_eq!(
            block,
            "# BEGIN mesh prod (managed by mesh; edits inside are overwritten)\n\
             100.64.0.1\tnode-a node-a.prod.mesh\n\
             100.64.0.2\tnode-b node-b.prod.mesh\n\
             # END mesh prod\n"
        );
        let empty = render(&[(Ipv4Addr::new(100, 64, 0, 9).into(), vec![])], "prod");
        assert_eq!(empty.lines().count(), 2);
        let odd = render(
            &[(
                Ipv4Addr::new(100, 64, 0, 9).into(),
                vec!["ok".into(), "bad\n# END mesh prod".into(), "x y".into()],
            )],
            "prod",
        );
        assert!(odd.contains("100.64.0.9\tok\n"), "{odd}");
        assert_eq!(odd.lines().count(), 3);
    }

    #[test]
    fn render_both_families() {
        let mut entries = entries(2);
        let v6 = |last| IpAddr::V6(Ipv6Addr::new(0xfd6d, 0x6573, 0x6800, 0, 0, 0, 0, last));
        entries.push((v6(1), vec!["node-a".into(), "node-a.prod.mesh".into()]));
        entries.push((v6(2), vec!["node-b".into(), "node-b.prod.mesh".into()]));
        let block = render(&entries, "prod");
        assert_eq!(
            block,
            "# BEGIN mesh prod (managed by mesh; edits inside are overwritten)\n\
             100.64.0.1\tnode-a node-a.prod.mesh\n\
             100.64.0.2\tnode-b node-b.prod.mesh\n\
             fd6d:6573:6800::1\tnode-a node-a.prod.mesh\n\
             fd6d:6573:6800::2\tnode-b node-b.prod.mesh\n\
             # END mesh prod\n"
        );
        // Into the file and out again, without touching the system's IPv6 lines.
        let dir = TempDir::new("dual");
        let path = dir.file(ORIGINAL);
        assert!(update(&path, "prod", Some(&block)).expect("insert"));
        let text = read(&path);
        assert!(text.starts_with(ORIGINAL), "{text}");
        assert!(text.ends_with(&block), "{text}");
        assert!(update(&path, "prod", None).expect("remove"));
        assert_eq!(read(&path), ORIGINAL);
    }

    #[test]
    fn insert_replace_remove() {
        let dir = TempDir::new("cycle");
        let path = dir.file(ORIGINAL);
        let block = render(&entries(2), "prod");
        assert!(update(&path, "prod", Some(&block)).expect("insert"));
        assert_eq!(read(&path), format!("{ORIGINAL}{block}"));

        // Someone appends a line after the block: a replacement keeps it byte for byte.
        let mut text = read(&path);
        text.push_str("192.0.2.7 added-later\n");
        fs::write(&path, &text).expect("write");
        let block2 = render(&entries(3), "prod");
        assert!(update(&path, "prod", Some(&block2)).expect("replace"));
        assert_eq!(
            read(&path),
            format!("{ORIGINAL}{block2}192.0.2.7 added-later\n")
        );

        assert!(update(&path, "prod", None).expect("remove"));
        assert_eq!(read(&path), format!("{ORIGINAL}192.0.2.7 added-later\n"));
        assert!(!update(&path, "prod", None).expect("remove again"));
    }

    #[test]
    fn remove_restores_the_file() {
        let dir = TempDir::new("restore");
        let path = dir.file(ORIGINAL);
        let block = render(&entries(2), "prod");
        update(&path, "prod", Some(&block)).expect("insert");
        update(&path, "prod", None).expect("remove");
        assert_eq!(read(&path), ORIGINAL);
    }

    #[test]
    fn insert_after_a_missing_final_newline() {
        let dir = TempDir::new("newline");
        let path = dir.file("127.0.0.1 localhost");
        let block = render(&entries(2), "prod");
        update(&path, "prod", Some(&block)).expect("insert");
        assert_eq!(read(&path), format!("127.0.0.1 localhost\n{block}"));
    }

    #[test]
    fn unchanged_is_not_written() {
        let dir = TempDir::new("unchanged");
        let path = dir.file(ORIGINAL);
        let block = render(&entries(2), "prod");
        assert!(update(&path, "prod", Some(&block)).expect("insert"));
        let inode = fs::metadata(&path).expect("meta").ino();
        assert!(!update(&path, "prod", Some(&block)).expect("same again"));
        // An atomic write would have given the path a new inode.
        assert_eq!(fs::metadata(&path).expect("meta").ino(), inode);
    }

    #[test]
    fn keeps_the_mode() {
        let dir = TempDir::new("mode");
        let path = dir.file(ORIGINAL);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).expect("chmod");
        update(&path, "prod", Some(&render(&entries(2), "prod"))).expect("insert");
        let mode = fs::metadata(&path).expect("meta").mode() & 0o7777;
        assert_eq!(mode, 0o640);
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(&dir.0)
            .expect("list")
            .map(|entry| entry.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("hosts")]);
    }

    #[test]
    fn missing_end_marker_is_refused() {
        let dir = TempDir::new("noend");
        let text = format!(
            "{ORIGINAL}# BEGIN mesh prod (managed by mesh; edits inside are overwritten)\n100.64.0.1\tnode-a\n"
        );
        let path = dir.file(&text);
        let err = update(&path, "prod", Some(&render(&entries(2), "prod"))).expect_err("refused");
        assert!(
            matches!(err, HostsError::MissingEnd { line: 6, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("will not guess"));
        assert!(update(&path, "prod", None).is_err());
        assert_eq!(read(&path), text, "untouched");
    }

    #[test]
    fn stray_markers_are_refused() {
        let dir = TempDir::new("stray");
        let path = dir.file(&format!("{ORIGINAL}# END mesh prod\n"));
        let err = update(&path, "prod", None).expect_err("refused");
        assert!(
            matches!(err, HostsError::StrayMarker { line: 6, .. }),
            "{err}"
        );
        let block = render(&entries(2), "prod");
        let path = dir.file(&format!("{block}{block}"));
        assert!(matches!(
            update(&path, "prod", None),
            Err(HostsError::StrayMarker { .. })
        ));
    }

    #[test]
    fn two_networks_coexist() {
        let dir = TempDir::new("two");
        let path = dir.file(ORIGINAL);
        let prod = render(&entries(2), "prod");
        let prod2 = render(&entries(5), "prod2");
        update(&path, "prod", Some(&prod)).expect("prod");
        update(&path, "prod2", Some(&prod2)).expect("prod2");
        assert_eq!(read(&path), format!("{ORIGINAL}{prod}{prod2}"));
        let prod_new = render(&entries(3), "prod");
        update(&path, "prod", Some(&prod_new)).expect("prod again");
        assert_eq!(read(&path), format!("{ORIGINAL}{prod_new}{prod2}"));
        update(&path, "prod", None).expect("remove prod");
        assert_eq!(read(&path), format!("{ORIGINAL}{prod2}"));
    }

    #[test]
    fn missing_file_is_created() {
        let dir = TempDir::new("missing");
        let path = dir.0.join("hosts");
        assert!(!update(&path, "prod", None).expect("nothing to remove"));
        let block = render(&entries(2), "prod");
        assert!(update(&path, "prod", Some(&block)).expect("create"));
        assert_eq!(read(&path), block);
    }

    #[test]
    fn a_block_of_another_network_is_refused() {
        let dir = TempDir::new("invalid");
        let path = dir.file(ORIGINAL);
        let err = update(&path, "prod", Some(&render(&entries(2), "dev"))).expect_err("refused");
        assert!(matches!(err, HostsError::InvalidBlock { .. }));
        assert!(update(&path, "prod", Some("100.64.0.1 x\n")).is_err());
        assert_eq!(read(&path), ORIGINAL);
    }

    #[test]
    fn oversized_file_is_refused() {
        let dir = TempDir::new("big");
        let path = dir.file("");
        let file = OpenOptions::new().write(true).open(&path).expect("open");
        file.set_len(MAX_HOSTS_FILE + 1).expect("grow");
        let err = update(&path, "prod", None).expect_err("refused");
        assert!(matches!(err, HostsError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn bind_mount_fallback() {
        assert!(is_mount_point_error(&io::Error::from(
            io::ErrorKind::ResourceBusy
        )));
        assert!(is_mount_point_error(&io::Error::from(
            io::ErrorKind::CrossesDevices
        )));
        assert!(!is_mount_point_error(&io::Error::from(
            io::ErrorKind::PermissionDenied
        )));
        // The fallback rewrites the same inode (what a bind mount needs).
        let dir = TempDir::new("inplace");
        let path = dir.file("a much longer original text than the new one\n");
        let inode = fs::metadata(&path).expect("meta").ino();
        rewrite_in_place(&path, b"short\n").expect("rewrite");
        assert_eq!(read(&path), "short\n");
        assert_eq!(fs::metadata(&path).expect("meta").ino(), inode);
    }
}
