//! Where `mesh join` gets its join token: a file (`--token-file PATH`), standard input
//! (`mesh join -` or `--token-file -`), the `MESH_TOKEN` environment variable, or, kept for
//! compatibility and discouraged, the command line, where every local user can read it
//! (`ps`, `/proc/PID/cmdline`).
//!
//! Errors and warnings name where the token came from, never its text.

use anyhow::Context as _;
use mesh_proto::token::JoinToken;
use std::io::{BufRead, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

/// The environment variable that may hold the token.
pub const ENV: &str = "MESH_TOKEN";

/// Most bytes read from a token file or standard input (a token is at most 512 characters).
const MAX_INPUT: u64 = 4096;

/// Where the token comes from, as the user asked.
#[derive(Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// The positional argument (visible to every local user while the process runs).
    Arg(String),
    /// Standard input.
    Stdin,
    /// A file.
    File(PathBuf),
    /// The `MESH_TOKEN` environment variable.
    Env(String),
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// The warning printed once when the token is given on the command line.
pub const ARG_WARNING: &str = "a join token on the command line can be read by every local user (ps, /proc/PID/cmdline) and stays in shell history; pass it with --token-file PATH, on standard input (`mesh join -`) or in MESH_TOKEN instead";

impl TokenSource {
    /// Picks the source: the positional argument (`-` is standard input) or `--token-file`
    /// (clap lets only one of them through), else `MESH_TOKEN` (`env`).
    pub fn choose(
        arg: Option<String>,
        file: Option<PathBuf>,
        env: Option<String>,
    ) -> anyhow::Result<TokenSource> {
        match (arg, file) {
            (Some(a), _) if a == "-" => Ok(TokenSource::Stdin),
            (Some(a), _) => Ok(TokenSource::Arg(a)),
            (None, Some(p)) if p.as_os_str() == "-" => Ok(TokenSource::Stdin),
            (None, Some(p)) => Ok(TokenSource::File(p)),
            (None, None) => match env {
                Some(t) if !t.trim().is_empty() => Ok(TokenSource::Env(t)),
                _ => anyhow::bail!(
                    "no join token: pass --token-file PATH, pipe it to `mesh join -`, or set {ENV} (`mesh-controller token create` prints one)"
                ),
            },
        }
    }

    /// Where the token comes from, for messages.
    pub fn describe(&self) -> String {
        match self {
            TokenSource::Arg(_) => "the join token on the command line".to_owned(),
            TokenSource::Stdin => "the join token on standard input".to_owned(),
            TokenSource::File(p) => format!("the join token in {}", p.display()),
            TokenSource::Env(_) => format!("the join token in {ENV}"),
        }
    }

    /// Reads and parses the token (`stdin` is read only for [`TokenSource::Stdin`]); returns
    /// it with the warnings to show (never containing the token).
    pub fn read(&self, stdin: impl BufRead) -> anyhow::Result<(JoinToken, Vec<String>)> {
        let mut warnings = Vec::new();
        let text = match self {
            TokenSource::Arg(t) | TokenSource::Env(t) => t.clone(),
            TokenSource::Stdin => {
                first_line(stdin).context("cannot read the join token from standard input")?
            }
            TokenSource::File(p) => {
                let f = std::fs::File::open(p)
                    .with_context(|| format!("cannot read the join token file {}", p.display()))?;
                if let Ok(meta) = f.metadata() {
                    if meta.permissions().mode() & 0o004 != 0 {
                        warnings.push(format!(
                            "the join token file {} is readable by every local user; restrict it (chmod 600 {}) or delete it after the join",
                            p.display(),
                            p.display()
                        ));
                    }
                }
                read_bounded(std::io::BufReader::new(f))
                    .with_context(|| format!("cannot read the join token file {}", p.display()))?
            }
        };
        if text.trim().is_empty() {
            anyhow::bail!(
                "{} is empty; it should hold the line `mesh-controller token create` printed",
                self.describe()
            );
        }
        if text.trim().starts_with(mesh_proto::token::NETWORK_PREFIX) {
            anyhow::bail!(
                "{} is a network id, not a join token; it holds no secret: pass it as the argument (`mesh join meshnet1_...`)",
                self.describe()
            );
        }
        let token = match self {
            // As before: the parse error alone (it never repeats the text).
            TokenSource::Arg(_) => text.parse::<JoinToken>()?,
            _ => text.parse::<JoinToken>().with_context(|| self.describe())?,
        };
        if matches!(self, TokenSource::Arg(_)) {
            warnings.push(ARG_WARNING.to_owned());
        }
        Ok((token, warnings))
    }
}

/// The first non-blank line (at most [`MAX_INPUT`] bytes in all), so that a token typed or
/// pasted on a terminal needs only Enter, and a pipe may close later.
fn first_line(r: impl BufRead) -> anyhow::Result<String> {
    let mut r = r.take(MAX_INPUT + 1);
    let mut line = String::new();
    let mut total = 0usize;
    loop {
        line.clear();
        let n = r.read_line(&mut line).context("not UTF-8 text")?;
        total += n;
        if total as u64 > MAX_INPUT {
            anyhow::bail!("more than {MAX_INPUT} bytes; it should hold one join token");
        }
        if n == 0 || !line.trim().is_empty() {
            return Ok(line);
        }
    }
}

/// Reads at most [`MAX_INPUT`] bytes; more is an error (a token file holds one line).
fn read_bounded(r: impl Read) -> anyhow::Result<String> {
    let mut text = String::new();
    r.take(MAX_INPUT + 1)
        .read_to_string(&mut text)
        .context("not UTF-8 text")?;
    if text.len() as u64 > MAX_INPUT {
        anyhow::bail!("more than {MAX_INPUT} bytes; it should hold one join token");
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::PublicKey;
    use std::os::unix::fs::OpenOptionsExt;

    fn sample() -> JoinToken {
        JoinToken {
            controller: "192.0.2.1:7443".into(),
            controller_key: PublicKey([7; 32]),
            id: "0badc0de".into(),
            secret: [0x5a; 32],
            controller_tcp: None,
            controller_others: Vec::new(),
        }
    }

    fn temp_dir(label: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "mesh-token-test-{label}-{}-{:x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn chooses_the_source() {
        let t = "mesh1_x".to_owned();
        assert_eq!(
            TokenSource::choose(Some(t.clone()), None, None).unwrap(),
            TokenSource::Arg(t.clone())
        );
        assert_eq!(
            TokenSource::choose(Some("-".into()), None, Some(t.clone())).unwrap(),
            TokenSource::Stdin
        );
        assert_eq!(
            TokenSource::choose(None, Some("-".into()), None).unwrap(),
            TokenSource::Stdin
        );
        assert_eq!(
            TokenSource::choose(None, Some("/etc/mesh/token".into()), Some(t.clone())).unwrap(),
            TokenSource::File("/etc/mesh/token".into())
        );
        assert_eq!(
            TokenSource::choose(None, None, Some(t.clone())).unwrap(),
            TokenSource::Env(t)
        );
        let err = TokenSource::choose(None, None, Some(" ".into())).unwrap_err();
        assert!(err.to_string().contains("--token-file"), "{err}");
    }

    #[test]
    fn reads_every_source_and_warns_only_for_the_command_line() {
        let t = sample();
        let text = format!("{t}\n");
        let none = std::io::empty();
        let (got, w) = TokenSource::Stdin
            .read(std::io::Cursor::new(text.clone()))
            .unwrap();
        assert_eq!((got, w.len()), (t.clone(), 0));
        let (got, _) = TokenSource::Stdin
            .read(std::io::Cursor::new(format!("\n  \n{t}\nmore\n")))
            .unwrap();
        assert_eq!(got, t);
        let (got, w) = TokenSource::Env(t.to_string()).read(none).unwrap();
        assert_eq!((got, w.len()), (t.clone(), 0));
        let (got, w) = TokenSource::Arg(t.to_string())
            .read(std::io::empty())
            .unwrap();
        assert_eq!(got, t);
        assert_eq!(w, vec![ARG_WARNING.to_owned()]);

        let dir = temp_dir("read");
        let private = dir.join("token");
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&private)
            .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()))
            .unwrap();
        let (got, w) = TokenSource::File(private.clone())
            .read(std::io::empty())
            .unwrap();
        assert_eq!((got, w.len()), (t.clone(), 0));
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (_, w) = TokenSource::File(private.clone())
            .read(std::io::empty())
            .unwrap();
        assert!(w.len() == 1 && w[0].contains("chmod 600"), "{w:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn errors_name_the_source_never_the_secret() {
        let t = sample();
        let secret_hex = t.secret_hex();
        // A damaged token: the real one with its last characters cut.
        let s = t.to_string();
        let damaged = &s[..s.len() - 5];
        let dir = temp_dir("errors");
        let file = dir.join("token");
        std::fs::write(&file, damaged).unwrap();
        let missing = dir.join("missing");
        let cases = [
            TokenSource::Env(damaged.to_owned()).read(std::io::empty()),
            TokenSource::Arg(damaged.to_owned()).read(std::io::empty()),
            TokenSource::Stdin.read(std::io::Cursor::new(damaged.to_owned())),
            TokenSource::Stdin.read(std::io::Cursor::new(String::new())),
            TokenSource::Stdin.read(std::io::Cursor::new("x".repeat(5000))),
            TokenSource::File(file.clone()).read(std::io::empty()),
            TokenSource::File(missing).read(std::io::empty()),
        ];
        for r in cases {
            let msg = format!("{:#}", r.unwrap_err());
            assert!(msg.contains("token"), "{msg}");
            assert!(!msg.contains(damaged) && !msg.contains(&s[6..30]), "{msg}");
            assert!(!msg.contains(&secret_hex), "{msg}");
        }
        let msg = format!(
            "{:#}",
            TokenSource::File(file.clone())
                .read(std::io::empty())
                .unwrap_err()
        );
        assert!(msg.contains(&file.display().to_string()), "{msg}");
        assert!(!format!("{:?}", TokenSource::Arg(s.clone())).contains(&s));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
