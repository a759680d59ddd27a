//! A real PostgreSQL server for tests: Debian's `postgresql` package, a cluster made with
//! `initdb` in a temporary directory and run as an unprivileged user (`postgres` when the tests
//! run as root), listening on loopback only, with trust authentication for its one role
//! `mesh`. Nothing outside the temporary directory is touched; no system service is started.
//!
//! [`Postgres::start`] gives a server the caller owns and stops (on drop, or with
//! [`Postgres::stop`] and [`Postgres::restart`] to test what happens when it goes away).
//! [`Postgres::shared`] gives one server per test process: a watchdog stops it and removes its
//! directory when the process ends, however it ends.
//!
//! Speed over durability: `fsync=off`. These clusters hold test data only.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The role the tests connect as (a superuser of the cluster).
pub const USER: &str = "mesh";

/// A running PostgreSQL server.
pub struct Postgres {
    dir: PathBuf,
    bin: PathBuf,
    user: Option<String>,
    /// The network namespace it runs in, and the address it listens on there (`None`:
    /// 127.0.0.1 in the tests' own namespace).
    netns: Option<(String, std::net::Ipv4Addr)>,
    port: u16,
    server: Option<Child>,
    log: PathBuf,
}

impl Postgres {
    /// One server for the whole test process, started at the first call.
    pub fn shared() -> &'static Postgres {
        static SHARED: OnceLock<Postgres> = OnceLock::new();
        SHARED.get_or_init(|| {
            let pg = Postgres::start().unwrap_or_else(|e| panic!("{e}"));
            pg.watch_parent();
            pg
        })
    }

    /// Makes a cluster in a new temporary directory and starts its server on loopback.
    pub fn start() -> Result<Postgres, String> {
        Postgres::start_at(None, false)
    }

    /// [`Postgres::start`] with TLS: a certificate for `localhost` signed by a CA of its own
    /// ([`Postgres::ca_file`]), and TCP connections without TLS refused (the Unix socket still
    /// takes plain ones, for the tests' own set-up). [`Postgres::unrelated_ca_file`] holds a CA
    /// that signed nothing here.
    pub fn start_tls() -> Result<Postgres, String> {
        Postgres::start_at(None, true)
    }

    /// The CA certificate (PEM) that signed the server's certificate (see
    /// [`Postgres::start_tls`]).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A CA certificate (PEM) that did not sign the server's (see [`Postgres::start_tls`]).
    pub fn unrelated_ca_file(&self) -> PathBuf {
        self.dir.join("other-ca.pem")
    }

    /// Makes a cluster and starts its server inside network namespace `netns`, listening on
    /// `addr` port 5432 there (the database host of a lab). The tests reach it through its
    /// Unix socket in the cluster's directory, which does not depend on the namespace.
    pub fn start_in(netns: &str, addr: std::net::Ipv4Addr) -> Result<Postgres, String> {
        Postgres::start_at(Some((netns.to_owned(), addr)), false)
    }

    fn start_at(
        netns: Option<(String, std::net::Ipv4Addr)>,
        tls: bool,
    ) -> Result<Postgres, String> {
        let bin = bindir()?;
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "mesh-testpg-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        // PostgreSQL refuses to run as root.
        let user = is_root().then(unprivileged_user).transpose()?;
        if let Some(user) = &user {
            let status = Command::new("chown")
                .arg(format!("{user}:"))
                .arg(&dir)
                .status()
                .map_err(|e| format!("chown: {e}"))?;
            if !status.success() {
                return Err(format!("cannot give {} to {user}", dir.display()));
            }
        }
        let mut pg = Postgres {
            log: dir.join("server.log"),
            dir,
            bin,
            user,
            port: 0,
            netns,
            server: None,
        };
        let out = pg
            .command("initdb")
            .args([
                "--auth=trust",
                "--no-locale",
                "--encoding=UTF8",
                "--no-sync",
            ])
            .arg(format!("--username={USER}"))
            .arg("-D")
            .arg(pg.data())
            .output()
            .map_err(|e| format!("cannot run initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        pg.port = if pg.netns.is_some() {
            5432
        } else {
            free_port()?
        };
        if pg.netns.is_some() {
            // The lab's hosts (controllers) connect over its network, not through the socket.
            pg.edit("pg_hba.conf", |rules| {
                rules + "host all all samenet trust\n"
            })?;
        }
        if tls {
            pg.set_up_tls()?;
        }
        pg.run()?;
        Ok(pg)
    }

    /// Certificates and settings for [`Postgres::start_tls`].
    fn set_up_tls(&self) -> Result<(), String> {
        let fail = |e: rcgen::Error| format!("cannot make test certificates: {e}");
        let ca = |name: &str| -> Result<(rcgen::Certificate, rcgen::KeyPair), String> {
            let key = rcgen::KeyPair::generate().map_err(fail)?;
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(fail)?;
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            Ok((params.self_signed(&key).map_err(fail)?, key))
        };
        let (ca_cert, ca_key) = ca("mesh test CA")?;
        let (other, _) = ca("mesh test CA (unrelated)")?;
        let key = rcgen::KeyPair::generate().map_err(fail)?;
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .map_err(fail)?
            .signed_by(&key, &ca_cert, &ca_key)
            .map_err(fail)?;
        let write = |path: PathBuf, text: String| {
            std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
        };
        write(self.ca_file(), ca_cert.pem())?;
        write(self.unrelated_ca_file(), other.pem())?;
        let data = self.data();
        write(data.join("server.crt"), cert.pem())?;
        write(data.join("server.key"), key.serialize_pem())?;
        // The server refuses a key others can read, and runs as its own user.
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(
            data.join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .map_err(|e| format!("chmod server.key: {e}"))?;
        if let Some(user) = &self.user {
            let status = Command::new("chown")
                .arg(format!("{user}:"))
                .arg(data.join("server.crt"))
                .arg(data.join("server.key"))
                .status()
                .map_err(|e| format!("chown: {e}"))?;
            if !status.success() {
                return Err(format!("cannot give the server's key to {user}"));
            }
        }
        self.edit("postgresql.conf", |conf| {
            conf + "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n"
        })?;
        // First match wins: TCP without TLS is refused before the trust rules.
        self.edit("pg_hba.conf", |rules| {
            format!("hostnossl all all all reject\n{rules}")
        })
    }

    /// Rewrites `file` of the cluster's data directory through `change`.
    fn edit(&self, file: &str, change: impl FnOnce(String) -> String) -> Result<(), String> {
        let path = self.data().join(file);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        std::fs::write(&path, change(text))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection string for database `db`, over TCP (what a controller uses).
    pub fn url(&self, db: &str) -> String {
        let host = self
            .netns
            .as_ref()
            .map_or(std::net::Ipv4Addr::LOCALHOST, |(_, a)| *a);
        format!("postgres://{USER}@{host}:{}/{db}", self.port)
    }

    /// A connection string for database `db` through the Unix socket (from the tests'
    /// process, whatever namespace the server runs in).
    fn local_url(&self, db: &str) -> String {
        format!(
            "host={} port={} user={USER} dbname={db}",
            self.dir.display(),
            self.port
        )
    }

    /// Creates a new, empty database with a unique name; its connection string.
    pub fn new_database(&self) -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!("t{}", N.fetch_add(1, Ordering::SeqCst));
        let mut admin = postgres::Client::connect(&self.local_url("postgres"), postgres::NoTls)
            .unwrap_or_else(|e| {
                panic!(
                    "cannot connect to the test PostgreSQL: {e}; its log: {}",
                    self.log_tail()
                )
            });
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        self.url(&name)
    }

    /// Stops the server (fast shutdown: sessions are cut, as in a crash of the clients' view).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.server.take() {
            // SIGINT: PostgreSQL's fast shutdown.
            let _ = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again after [`Postgres::stop`], on the same port and data.
    pub fn restart(&mut self) -> Result<(), String> {
        self.stop();
        self.run()
    }

    /// The last lines of the server's log (for failure messages).
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        let mut c = match &self.user {
            Some(user) => {
                let mut c = match &self.netns {
                    Some((ns, _)) => {
                        let mut c = Command::new("ip");
                        c.args(["netns", "exec", ns, "setpriv"]);
                        c
                    }
                    None => Command::new("setpriv"),
                };
                c.arg(format!("--reuid={user}"))
                    .arg(format!("--regid={user}"))
                    .arg("--clear-groups")
                    .arg("--")
                    .arg(path);
                c
            }
            None => match &self.netns {
                Some((ns, _)) => {
                    let mut c = Command::new("ip");
                    c.args(["netns", "exec", ns]).arg(path);
                    c
                }
                None => Command::new(path),
            },
        };
        c.current_dir(&self.dir).stdin(Stdio::null());
        c
    }

    fn run(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("cannot open {}: {e}", self.log.display()))?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.data())
            .args(["-p", &self.port.to_string()])
            .arg("-c")
            .arg(format!(
                "listen_addresses={}",
                self.netns
                    .as_ref()
                    .map_or(std::net::Ipv4Addr::LOCALHOST, |(_, a)| *a)
            ))
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.dir.display()))
            .args(["-c", "fsync=off", "-c", "max_connections=300"])
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start postgres: {e}"))?;
        self.server = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if postgres::Client::connect(&self.local_url("postgres"), postgres::NoTls).is_ok() {
                return Ok(());
            }
            if let Some(child) = self.server.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!(
                        "postgres exited ({status}); its log:\n{}",
                        self.log_tail()
                    ));
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "postgres did not accept connections within 30 s; its log:\n{}",
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server and removes its directory once this process is gone.
    fn watch_parent(&self) {
        let Some(server) = self.server.as_ref() else {
            return;
        };
        let script = format!(
            "while kill -0 {parent} 2>/dev/null; do sleep 0.5; done; kill -INT {pg} 2>/dev/null; \
             for i in $(seq 100); do kill -0 {pg} 2>/dev/null || break; sleep 0.1; done; \
             kill -KILL {pg} 2>/dev/null; rm -rf '{dir}'",
            parent = std::process::id(),
            pg = server.id(),
            dir = self.dir.display()
        );
        let _ = Command::new("setsid")
            .args(["sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Where Debian's PostgreSQL binaries are (the newest version installed).
fn bindir() -> Result<PathBuf, String> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.path().join("bin"))
                .filter(|b| b.join("postgres").exists() && b.join("initdb").exists())
                .collect()
        })
        .unwrap_or_default();
    found.sort_by_key(|p| {
        p.parent()
            .and_then(Path::file_name)
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    found.pop().ok_or_else(|| {
        "PostgreSQL is not installed: these tests run Debian's server (`apt install postgresql`; ./test.sh installs it)".to_owned()
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// `postgres` (Debian's package makes it), else `nobody`.
fn unprivileged_user() -> Result<String, String> {
    for user in ["postgres", "nobody"] {
        if Command::new("id")
            .arg(user)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            return Ok(user.to_owned());
        }
    }
    Err("no unprivileged user to run PostgreSQL as (neither postgres nor nobody exists)".into())
}

fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("no free port: {e}"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_starts_answers_restarts_and_stops() {
        let mut pg = Postgres::start().unwrap();
        let url = pg.new_database();
        let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        c.batch_execute("CREATE TABLE t (x BIGINT); INSERT INTO t VALUES (7)")
            .unwrap();
        pg.restart().unwrap();
        assert!(
            c.query_one("SELECT x FROM t", &[]).is_err(),
            "the old session was cut"
        );
        let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        let x: i64 = c.query_one("SELECT x FROM t", &[]).unwrap().get(0);
        assert_eq!(x, 7, "the data outlived the restart");
        let dir = pg.dir.clone();
        drop(pg);
        assert!(!dir.exists(), "the cluster's directory is gone");
        assert!(postgres::Client::connect(&url, postgres::NoTls).is_err());
    }
}
