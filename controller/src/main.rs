//! `mesh-controller`: serve the control plane and administer networks, tokens and nodes.

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use mesh_controller::server::TcpListen;
use mesh_controller::state::{public_of, unix_now, Role, StateDir};
use mesh_controller::store::{
    parse_prefix_list, rfc3339, Approval, Cidr, NetworkRow, NewToken, RouteRow, Who,
};
use mesh_proto::control::IpNet;
use mesh_proto::token::{ControllerRef, JoinToken, NetworkId};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "mesh-controller",
    version,
    about = "mesh control plane: networks, join tokens, nodes, relays"
)]
struct Cli {
    /// State directory (key, database) [default: /var/lib/mesh-controller, or
    /// /var/lib/mesh-relay for `relay`].
    #[arg(long, global = true)]
    state_dir: Option<PathBuf>,
    /// Configuration file; flags win over it [default: /etc/mesh/mesh-controller.toml, or
    /// /etc/mesh/mesh-relay.toml for `relay`, if present].
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// PostgreSQL database, shared by several controllers (postgres://USER:PASSWORD@HOST/DB);
    /// every command, on any host that reaches it [default: SQLite in the state directory].
    /// Also MESH_CONTROLLER_DATABASE in the environment (keeps the password out of the
    /// process list), or `database` in the configuration file. TLS as libpq's sslmode says:
    /// `?sslmode=verify-full&sslrootcert=CA.pem` checks the server's certificate.
    #[arg(long, global = true, value_name = "URL")]
    database: Option<String>,
    /// The controller's key file, which every replica on one database must share [default:
    /// controller.key in the state directory; `serve` creates it, mode 0600, when missing].
    #[arg(long, global = true, value_name = "PATH")]
    key_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the control API over QUIC (foreground).
    Serve {
        /// UDP address to listen on [default: [::]:7443, both IPv6 and IPv4 (IPv4 alone where the
        /// kernel has no IPv6)].
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Serve Prometheus metrics on this address, e.g. 127.0.0.1:9102 [default: off].
        #[arg(long)]
        metrics_listen: Option<SocketAddr>,
        /// Most QUIC connections open at once; more are refused and logged [default: 10000].
        #[arg(long, value_name = "N")]
        max_connections: Option<usize>,
        /// UDP address of the STUN observer, which tells each node how its NAT maps (a second
        /// view of its socket beside the QUIC one); `off` to run none [default: the listen
        /// address's IP, port 3478].
        #[arg(long, value_name = "ADDR|off")]
        observer_listen: Option<String>,
        /// TCP address for nodes whose UDP is blocked (TLS after an HTTP upgrade: join, control
        /// and relayed traffic); `off` for none [default: the listen address's IP, port 443,
        /// left off with a warning if it cannot be bound].
        #[arg(long, value_name = "ADDR|off")]
        listen_tcp: Option<String>,
        /// Addresses (host:port of the QUIC listener, comma-separated) to announce to every
        /// node: nodes save them and try them when the address they use stops answering.
        /// Announce a new address before moving the controller there, so that nodes follow it
        /// without joining again.
        #[arg(long, value_name = "HOST:PORT,...", value_delimiter = ',')]
        announce: Vec<String>,
    },
    /// Run a standalone relay (one region) in the foreground. Register it on the controller
    /// with `mesh-controller region add`.
    Relay {
        /// UDP address to listen on [default: [::]:7444, both families as for `serve`].
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Public key of the controller whose tickets this relay honours
        /// (`mesh-controller key` on the controller).
        #[arg(long)]
        controller_key: Option<String>,
        /// Print this relay's public key (creating it if needed) and exit.
        #[arg(long)]
        print_key: bool,
        /// Serve Prometheus metrics on this address, e.g. 127.0.0.1:9103 [default: off].
        #[arg(long)]
        metrics_listen: Option<SocketAddr>,
        /// Most QUIC connections open at once; more are refused and logged [default: 10000].
        #[arg(long, value_name = "N")]
        max_connections: Option<usize>,
        /// TCP address for nodes whose UDP is blocked; `off` for none [default: the listen
        /// address's IP, port 443, left off with a warning if it cannot be bound].
        #[arg(long, value_name = "ADDR|off")]
        listen_tcp: Option<String>,
    },
    /// Print the controller's public key (what a standalone relay needs).
    Key,
    /// Copy the controller's database to FILE, also while `serve` runs (SQLite's online
    /// backup). Back up controller.key too: it is the identity every token and node pins.
    Backup {
        /// Where to write the copy (mode 0600).
        file: PathBuf,
        /// Replace FILE if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Manage the standalone relays (regions) nodes may use besides the controller's own.
    #[command(subcommand)]
    Region(RegionCmd),
    /// Manage networks.
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Manage join tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Manage nodes.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Manage the subnet routes nodes advertise (prefixes they route for their peers).
    #[command(subcommand)]
    Route(RouteCmd),
    /// Names for several nodes: `name set prod k8s-api cp1 cp2 cp3` makes `k8s-api` and
    /// `k8s-api.prod.mesh` resolve on every node to those of cp1..cp3 it can reach (kubeadm's
    /// controlPlaneEndpoint without a load balancer).
    #[command(subcommand)]
    Name(NameCmd),
}

#[derive(Subcommand)]
enum NameCmd {
    /// Make NAME stand for these nodes (replacing its members if it exists); every node of
    /// the network answers it within a second.
    Set {
        /// Network.
        network: String,
        /// The name, a DNS name (lowercase letters, digits, '-', '.').
        name: String,
        /// Member nodes, by node name.
        #[arg(required = true, value_name = "NODE")]
        nodes: Vec<String>,
    },
    /// Remove a name.
    Remove {
        /// Network.
        network: String,
        /// The name.
        name: String,
    },
    /// List the network's names for several nodes.
    List {
        /// Network.
        network: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum RegionCmd {
    /// Add (or update) a standalone relay; connected nodes learn of it within seconds.
    Add {
        /// Region name, e.g. eu-west.
        name: String,
        /// Address nodes dial, host:port.
        #[arg(long)]
        addr: String,
        /// Address nodes whose UDP is blocked dial over TCP, host:port (where the relay runs
        /// with --listen-tcp; by default port 443 of its host).
        #[arg(long)]
        tcp_addr: Option<String>,
        /// The relay's public key (`mesh-controller relay --print-key` on the relay host).
        #[arg(long)]
        key: String,
    },
    /// List the standalone relays.
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Remove a standalone relay.
    Remove {
        /// Region name.
        name: String,
    },
}

/// A birthday budget on the command line: a number, or `default`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Budget {
    /// The nodes' own default.
    Default,
    /// This many attempts per node per 10 minutes.
    Attempts(u16),
}

impl std::str::FromStr for Budget {
    type Err = String;

    fn from_str(s: &str) -> Result<Budget, String> {
        if s == "default" {
            return Ok(Budget::Default);
        }
        s.parse()
            .map(Budget::Attempts)
            .map_err(|_| format!("{s:?} is not a number of attempts (0-65535) or `default`"))
    }
}

/// A list of IPv4 and IPv6 prefixes on the command line: `a.b.c.d/n,x:y::/n,...`, or `none`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Prefixes(Vec<IpNet>);

impl std::str::FromStr for Prefixes {
    type Err = String;

    fn from_str(s: &str) -> Result<Prefixes, String> {
        parse_prefix_list(s).map(Prefixes)
    }
}

impl std::fmt::Display for Prefixes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&list.join(","))
    }
}

#[derive(Subcommand)]
enum NetworkCmd {
    /// Create a network and print its network id (nodes join with `mesh join ID`).
    Create {
        /// Network name.
        name: String,
        /// Overlay address range.
        #[arg(long, default_value = "100.64.0.0/16")]
        cidr: String,
        /// IPv6 overlay prefix, a unique local one (fc00::/7, /48 to /112), or `off` for an
        /// IPv4-only network. Default: a random ULA /64 (fd and a random 40-bit global id).
        #[arg(long, value_name = "PREFIX|off")]
        cidr6: Option<String>,
        /// Birthday hole-punching attempts each node may run per 10 minutes (started or
        /// joined; 0 turns it off in this network). Default: the nodes' own (8).
        #[arg(long, value_name = "N")]
        birthday_budget: Option<u16>,
        /// Who admits a node that joins by network id: `manual`, the administrator approves
        /// each (`node approve`); `auto`, anyone who has the id joins at once. Joins with a
        /// token need no approval either way.
        #[arg(long, value_name = "manual|auto", default_value = "manual")]
        approval: Approval,
        /// Approve the subnet routes nodes advertise inside these prefixes at once, e.g. the
        /// cluster's pod range 10.244.0.0/16; others wait for `route approve`.
        #[arg(long, value_name = "PREFIX,...")]
        auto_approve_routes: Option<Prefixes>,
    },
    /// Change a network's settings; connected nodes are told at once.
    Set {
        /// Network name.
        name: String,
        /// Birthday attempts per node per 10 minutes (0: none), or `default`.
        #[arg(long, value_name = "N|default")]
        birthday_budget: Option<Budget>,
        /// Who admits a node that joins by network id: `manual` (the administrator) or `auto`.
        #[arg(long, value_name = "manual|auto")]
        approval: Option<Approval>,
        /// Prefixes inside which advertised subnet routes are approved at once (pending ones
        /// too), or `none`: the administrator approves each (`route approve`).
        #[arg(long, value_name = "PREFIX,...|none")]
        auto_approve_routes: Option<Prefixes>,
    },
    /// List networks.
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Print a network's id, alone on one line: what `mesh join` takes to ask to join it. It
    /// holds the controller's addresses and key, and no secret.
    Id {
        /// Network name.
        name: String,
        /// Controller address written into the id; repeatable, as for `token create`
        /// [default: the address `serve` listens on, and every other controller that is up].
        #[arg(long, value_name = "HOST:PORT")]
        controller: Vec<String>,
        /// The controller's TCP address written into the id, host:port, or `none` (default:
        /// the controller address's host with the TCP port `serve` listens on, if it does).
        #[arg(long, value_name = "HOST:PORT|none")]
        controller_tcp: Option<String>,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a join token and print it.
    Create {
        /// Network the token admits to.
        network: String,
        /// Allow several nodes to join with it.
        #[arg(long)]
        reusable: bool,
        /// Lifetime, e.g. 30m, 24h, 7d, or `never` for a token that does not expire.
        #[arg(long, value_name = "DURATION", default_value = DEFAULT_TOKEN_LIFETIME)]
        expires: String,
        /// Controller address written into the token; repeat it for several controllers on
        /// one database (nodes try the others when one is down) [default: the address `serve`
        /// listens on, and every other controller of the database that is up].
        #[arg(long, value_name = "HOST:PORT")]
        controller: Vec<String>,
        /// The controller's TCP address written into the token, host:port, or `none` (default:
        /// the controller address's host with the TCP port `serve` listens on, if it does).
        #[arg(long, value_name = "HOST:PORT|none")]
        controller_tcp: Option<String>,
    },
    /// List tokens.
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token.
    Revoke {
        /// Token id (from `token list`).
        id: String,
    },
}

#[derive(Subcommand)]
enum NodeCmd {
    /// List the nodes of a network.
    List {
        /// Network.
        network: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Remove a node by name or key.
    Remove {
        /// Network.
        network: String,
        /// Node name or key.
        node: String,
    },
    /// List the requests to join a network (by its id) that wait for approval, oldest first.
    Pending {
        /// Network.
        network: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Approve join requests: each node becomes a member as if it held a token.
    #[command(
        group(clap::ArgGroup::new("which").required(true).args(["nodes", "all"])),
        override_usage = "mesh-controller node approve [OPTIONS] <NETWORK> <NAME-OR-KEY...|--all>"
    )]
    Approve {
        /// Network.
        network: String,
        /// Requests by name, key fingerprint or full key, as `node pending` lists them.
        #[arg(value_name = "NAME-OR-KEY")]
        nodes: Vec<String>,
        /// Every pending request of the network.
        #[arg(long)]
        all: bool,
    },
    /// Reject join requests: each node is told so, and refused for an hour if it asks again.
    #[command(
        group(clap::ArgGroup::new("which").required(true).args(["nodes", "all"])),
        override_usage = "mesh-controller node reject [OPTIONS] <NETWORK> <NAME-OR-KEY...|--all>"
    )]
    Reject {
        /// Network.
        network: String,
        /// Requests by name, key fingerprint or full key, as `node pending` lists them.
        #[arg(value_name = "NAME-OR-KEY")]
        nodes: Vec<String>,
        /// Every pending request of the network.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand)]
enum RouteCmd {
    /// List the prefixes the nodes of a network advertise, with where each stands.
    List {
        /// Network.
        network: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Approve advertised routes: peers route the prefixes to their nodes.
    #[command(
        group(clap::ArgGroup::new("which").required(true).args(["routes", "all"])),
        override_usage = "mesh-controller route approve [OPTIONS] <NETWORK> <PREFIX-OR-NODE...|--all>"
    )]
    Approve {
        /// Network.
        network: String,
        /// Routes by prefix (as `route list` shows them), or a node's name for all of its
        /// pending routes.
        #[arg(value_name = "PREFIX-OR-NODE")]
        routes: Vec<String>,
        /// Every pending route of the network.
        #[arg(long)]
        all: bool,
    },
    /// Reject advertised routes: no peer routes them (an approved route loses its approval).
    #[command(
        group(clap::ArgGroup::new("which").required(true).args(["routes", "all"])),
        override_usage = "mesh-controller route reject [OPTIONS] <NETWORK> <PREFIX-OR-NODE...|--all>"
    )]
    Reject {
        /// Network.
        network: String,
        /// Routes by prefix (as `route list` shows them), or a node's name for all of its
        /// pending routes.
        #[arg(value_name = "PREFIX-OR-NODE")]
        routes: Vec<String>,
        /// Every pending route of the network.
        #[arg(long)]
        all: bool,
    },
}

/// The controller's configuration file; every key is optional and flags win over it.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    state_dir: Option<PathBuf>,
    /// A PostgreSQL connection string (see `--database`).
    database: Option<String>,
    /// The controller's key file (see `--key-file`).
    key_file: Option<PathBuf>,
    listen: Option<SocketAddr>,
    metrics_listen: Option<String>,
    /// For `serve`: the STUN observer's address, or `off`.
    observer_listen: Option<String>,
    /// The TCP address, or `off`.
    listen_tcp: Option<String>,
    /// For `serve`: addresses to announce to nodes (see `serve --announce`).
    announce: Option<Vec<String>>,
    log: Option<String>,
    /// For `relay`: the controller's public key.
    controller_key: Option<String>,
}

const DEFAULT_CONFIG: &str = "/etc/mesh/mesh-controller.toml";
/// The environment variable that may hold the database's connection string (with its
/// password, which then stays out of the process list and of the 0644 configuration file).
const DATABASE_ENV: &str = "MESH_CONTROLLER_DATABASE";
const DEFAULT_RELAY_CONFIG: &str = "/etc/mesh/mesh-relay.toml";

/// The STUN observer's address: `off` (or empty) for none, absent for the listen address's IP
/// on port 3478 (STUN's own port).
fn parse_observer_listen(
    value: Option<&str>,
    listen: SocketAddr,
) -> anyhow::Result<Option<SocketAddr>> {
    match value.map(str::trim) {
        None => Ok(Some(SocketAddr::new(listen.ip(), 3478))),
        Some("" | "off") => Ok(None),
        Some(s) => Ok(Some(s.parse().with_context(|| {
            format!("invalid observer_listen {s:?}; use an address such as 0.0.0.0:3478, or off")
        })?)),
    }
}

/// `listen_tcp`: absent for the listen address's IP on port 443 (bound if it can be), `off` (or
/// empty) for none, or an address (which must be bound).
fn parse_listen_tcp(value: Option<&str>, listen: SocketAddr) -> anyhow::Result<TcpListen> {
    match value.map(str::trim) {
        None => Ok(TcpListen::Default(SocketAddr::new(
            listen.ip(),
            mesh_control::tcp::DEFAULT_PORT,
        ))),
        Some("" | "off") => Ok(TcpListen::Off),
        Some(s) => Ok(TcpListen::Explicit(s.parse().with_context(|| {
            format!("invalid listen_tcp {s:?}; use an address such as 0.0.0.0:443, or off")
        })?)),
    }
}

/// `metrics_listen` from the config file: empty or absent means off.
fn parse_metrics_listen(value: Option<&str>) -> anyhow::Result<Option<SocketAddr>> {
    match value.map(str::trim) {
        Some(s) if !s.is_empty() => {
            Ok(Some(s.parse().with_context(|| {
                format!("invalid metrics_listen {s:?}; use e.g. 127.0.0.1:9102")
            })?))
        }
        _ => Ok(None),
    }
}

#[allow(clippy::print_stdout)]
fn out(s: &str) {
    println!("{s}");
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let (default_config, default_dir) = match cli.command {
        Command::Relay { .. } => (DEFAULT_RELAY_CONFIG, "/var/lib/mesh-relay"),
        _ => (DEFAULT_CONFIG, "/var/lib/mesh-controller"),
    };
    let file: FileConfig = match cli.config.as_deref() {
        Some(path) => mesh_service::load_config(path, true)?,
        None => mesh_service::load_config(std::path::Path::new(default_config), false)?,
    };
    let state_dir = cli
        .state_dir
        .or(file.state_dir.clone())
        .unwrap_or_else(|| PathBuf::from(default_dir));
    // Flag, then the environment (systemd's EnvironmentFile=, a Kubernetes secret), then the
    // configuration file.
    let database = cli
        .database
        .or_else(|| {
            std::env::var(DATABASE_ENV)
                .ok()
                .filter(|u| !u.trim().is_empty())
        })
        .or(file.database.clone());
    if let Some(url) = &database {
        mesh_controller::state::check_database(url)?;
    }
    let key_file = cli.key_file.or(file.key_file.clone());
    // Only `serve` creates a controller, and `relay` its own key; admin commands need one, or
    // a shared database that names it.
    let state = match (&cli.command, database) {
        (Command::Serve { .. } | Command::Relay { .. }, database) => StateDir::open(&state_dir)?
            .with_database(database)
            .with_key_file(key_file),
        (_, Some(url)) => StateDir::remote(&state_dir, url, key_file),
        (_, None) => StateDir::existing(&state_dir)?.with_key_file(key_file),
    };
    match cli.command {
        Command::Relay {
            listen,
            controller_key,
            print_key,
            metrics_listen,
            max_connections,
            listen_tcp,
        } => {
            let secret = state.relay_key()?;
            if print_key {
                out(&public_of(&secret).to_string());
                return Ok(());
            }
            let Some(controller_key) = controller_key.or(file.controller_key.clone()) else {
                bail!("a relay needs the controller's public key: pass --controller-key KEY (or set controller_key in the config file); `mesh-controller key` prints it on the controller");
            };
            let controller: mesh_proto::PublicKey = controller_key
                .trim()
                .parse()
                .map_err(|e| anyhow::anyhow!("invalid controller key: {e}"))?;
            let listen = listen
                .or(file.listen)
                .unwrap_or_else(|| mesh_control::net::any(7444));
            let metrics_listen = match metrics_listen {
                Some(a) => Some(a),
                None => parse_metrics_listen(file.metrics_listen.as_deref())?,
            };
            mesh_service::init_logging(file.log.as_deref().unwrap_or("info"));
            let _lock = state.lock(Role::Relay)?;
            let rt = tokio::runtime::Runtime::new()?;
            let listen_tcp =
                parse_listen_tcp(listen_tcp.as_deref().or(file.listen_tcp.as_deref()), listen)?;
            rt.block_on(async {
                let mut relay = mesh_relay::server::Relay::bind_with(
                    listen,
                    secret,
                    &controller,
                    server_limits(max_connections)?,
                )?;
                if let Some(tcp) = listen_tcp.bind("relay", |a| relay.listen_tcp(a))? {
                    tracing::info!(%tcp, "listening on TCP too (TLS, for nodes whose UDP is blocked)");
                }
                if let Some(addr) = metrics_listen {
                    let listener = tokio::net::TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("cannot serve metrics on {addr}"))?;
                    drop(listener);
                    tracing::info!(%addr, "serving Prometheus metrics at /metrics");
                    let forwarder = relay.forwarder();
                    tokio::spawn(async move {
                        if let Err(e) = mesh_controller::metrics::serve(addr, None, forwarder).await
                        {
                            tracing::warn!(error = %format!("{e:#}"), "metrics endpoint stopped");
                        }
                    });
                }
                tracing::info!(%listen, key = %public_of(&secret), %controller, "relay listening");
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                relay
                    .run(async move {
                        tokio::select! {
                            _ = tokio::signal::ctrl_c() => {}
                            _ = term.recv() => {}
                        }
                    })
                    .await;
                tracing::info!("relay stopped");
                anyhow::Ok(())
            })
        }
        Command::Key => {
            out(&state.public_key()?.to_string());
            Ok(())
        }
        Command::Backup { file, force } => {
            if !force && std::fs::symlink_metadata(&file).is_ok() {
                bail!(
                    "{} exists; pass --force to replace it, or choose another file",
                    file.display()
                );
            }
            let summary = state.open_store()?.backup_to(&file)?;
            out(&format!(
                "wrote {} ({} bytes: {} networks, {} nodes)",
                file.display(),
                summary.bytes,
                summary.networks,
                summary.nodes
            ));
            out(&format!(
                "back up {} too: it is the controller's identity, pinned in every token; without it every node must join again",
                state.key_path().display()
            ));
            Ok(())
        }
        Command::Region(RegionCmd::Add {
            name,
            addr,
            tcp_addr,
            key,
        }) => {
            let key: mesh_proto::PublicKey = key
                .trim()
                .parse()
                .map_err(|e| anyhow::anyhow!("invalid --key: {e}"))?;
            state
                .open_store()?
                .add_relay(&name, &addr, tcp_addr.as_deref(), &key, unix_now())?;
            match tcp_addr {
                Some(tcp) => out(&format!("relay {name} at {addr} (TCP {tcp}) added")),
                None => out(&format!("relay {name} at {addr} added")),
            }
            Ok(())
        }
        Command::Region(RegionCmd::List { json }) => {
            let rows = state.open_store()?.relays()?;
            if json {
                out(&serde_json::to_string_pretty(&rows)?);
            } else {
                out(&format!(
                    "{:<20} {:<32} {:<32} KEY",
                    "NAME", "ADDRESS", "TCP"
                ));
                for r in rows {
                    let tcp = r.tcp_addr.as_deref().unwrap_or("-");
                    out(&format!(
                        "{:<20} {:<32} {:<32} {}",
                        r.name, r.addr, tcp, r.key
                    ));
                }
            }
            Ok(())
        }
        Command::Region(RegionCmd::Remove { name }) => {
            state.open_store()?.remove_relay(&name)?;
            out(&format!("relay {name} removed"));
            Ok(())
        }
        Command::Serve {
            listen,
            metrics_listen,
            max_connections,
            observer_listen,
            listen_tcp,
            announce,
        } => {
            let announce = if announce.is_empty() {
                file.announce.clone().unwrap_or_default()
            } else {
                announce
            };
            if let Some(bad) = announce.iter().find(|a| {
                a.rsplit_once(':')
                    .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
            }) {
                anyhow::bail!(
                    "invalid --announce address {bad:?}: use host:port, e.g. ctl.example.com:7443"
                );
            }
            if announce.len() > mesh_proto::control::MAX_CONTROLLERS {
                anyhow::bail!(
                    "at most {} addresses may be announced",
                    mesh_proto::control::MAX_CONTROLLERS
                );
            }
            let listen = listen
                .or(file.listen)
                .unwrap_or_else(|| mesh_control::net::any(7443));
            let metrics_listen = match metrics_listen {
                Some(a) => Some(a),
                None => parse_metrics_listen(file.metrics_listen.as_deref())?,
            };
            mesh_service::init_logging(file.log.as_deref().unwrap_or("info"));
            // Held until `serve` returns: a second `serve` here would overwrite listen.addr.
            let _lock = state.lock(Role::Controller)?;
            if state.init_controller()? {
                tracing::info!(
                    "created a new controller in {} (key {})",
                    state.path().display(),
                    state.controller_public()?
                );
            }
            // For the network ids admin commands print: the other addresses nodes may use.
            state.write_announced(&announce)?;
            tracing::info!(database = %state.database_name(), key = %state.key_path().display(), "controller state");
            let rt = tokio::runtime::Runtime::new()?;
            let observer = parse_observer_listen(
                observer_listen
                    .as_deref()
                    .or(file.observer_listen.as_deref()),
                listen,
            )?;
            let listen_tcp =
                parse_listen_tcp(listen_tcp.as_deref().or(file.listen_tcp.as_deref()), listen)?;
            rt.block_on(mesh_controller::server::serve_with(
                state,
                listen,
                listen_tcp,
                metrics_listen,
                observer,
                server_limits(max_connections)?,
                announce,
            ))
        }
        Command::Network(NetworkCmd::Create {
            name,
            cidr,
            cidr6,
            birthday_budget,
            approval,
            auto_approve_routes,
        }) => {
            let cidr: Cidr = cidr.parse().map_err(anyhow::Error::msg)?;
            let cidr6 = match cidr6 {
                Some(text) => mesh_controller::store::ipam6::parse_cidr6(&text)
                    .map_err(|e| anyhow::anyhow!("--cidr6: {e}"))?,
                None => Some(mesh_controller::store::ipam6::random_ula()),
            };
            let store = state.open_store()?;
            let now = unix_now();
            store.create_network_with(&name, cidr, cidr6, approval, now)?;
            if birthday_budget.is_some() {
                store.set_birthday_budget(&name, birthday_budget)?;
            }
            let auto_routes = auto_approve_routes.unwrap_or(Prefixes(Vec::new()));
            if !auto_routes.0.is_empty() {
                store.set_auto_approve_routes(&name, &auto_routes.0, now)?;
            }
            // The id alone goes to stdout, for scripts; what to do with it, to stderr.
            eprintln!("created network {name} ({cidr}), {approval} approval");
            match cidr6 {
                Some(p) => eprintln!("IPv6 overlay {p}: each node gets a stable address in it"),
                None => eprintln!("no IPv6 overlay (--cidr6 off): nodes get IPv4 addresses only"),
            }
            if !auto_routes.0.is_empty() {
                eprintln!("subnet routes inside {auto_routes} are approved automatically");
            }
            match controller_ref(&state, &[], None) {
                Ok(controller) => {
                    let id = NetworkId {
                        controller,
                        network: name.clone(),
                    };
                    out(&id.to_string());
                    eprintln!("nodes join with: mesh join {id}");
                    match approval {
                        Approval::Manual => eprintln!(
                            "each node that asks waits for approval: `mesh-controller node pending {name}` lists them, `mesh-controller node approve {name} NODE` admits one"
                        ),
                        Approval::Auto => eprintln!(
                            "anyone who has the id joins at once; to approve each node instead: `mesh-controller network set {name} --approval manual`"
                        ),
                    }
                }
                Err(e) => match e.downcast_ref::<NoAddress>() {
                    Some(NoAddress::NotServed) => eprintln!(
                        "no network id yet: the id names the controller's address, and none is known; once `mesh-controller serve` runs with this state directory, `mesh-controller network id {name}` prints it"
                    ),
                    Some(NoAddress::NoneUp) => eprintln!(
                        "no network id yet: no controller on this database is up; once one runs, `mesh-controller network id {name}` prints it"
                    ),
                    Some(NoAddress::Unspecified(a)) => eprintln!(
                        "no network id yet: the controller listens on {a}, which nodes cannot dial; print it with the address nodes should use: `mesh-controller network id {name} --controller HOST:PORT`"
                    ),
                    None => return Err(e),
                },
            }
            Ok(())
        }
        Command::Network(NetworkCmd::Set {
            name,
            birthday_budget,
            approval,
            auto_approve_routes,
        }) => {
            if birthday_budget.is_none() && approval.is_none() && auto_approve_routes.is_none() {
                anyhow::bail!(
                    "nothing to set: give --birthday-budget N (or `default`), --approval manual|auto, or --auto-approve-routes PREFIX,...|none"
                );
            }
            let store = state.open_store()?;
            if let Some(budget) = birthday_budget {
                let budget = match budget {
                    Budget::Default => None,
                    Budget::Attempts(n) => Some(n),
                };
                store.set_birthday_budget(&name, budget)?;
                match budget {
                    Some(n) => out(&format!(
                        "network {name}: {n} birthday attempts per node per 10 minutes"
                    )),
                    None => out(&format!(
                        "network {name}: birthday attempts per node back to the nodes' default"
                    )),
                }
            }
            if let Some(approval) = approval {
                store.set_approval(&name, approval)?;
                match approval {
                    Approval::Manual => out(&format!(
                        "network {name}: the administrator approves each join request (`mesh-controller node approve {name} NODE`)"
                    )),
                    Approval::Auto => out(&format!(
                        "network {name}: join requests are approved automatically; requests already waiting are admitted when their nodes ask again, or now with `mesh-controller node approve {name} --all`"
                    )),
                }
            }
            if let Some(routes) = auto_approve_routes {
                store.set_auto_approve_routes(&name, &routes.0, unix_now())?;
                if routes.0.is_empty() {
                    out(&format!(
                        "network {name}: the administrator approves each subnet route (`mesh-controller route approve {name} PREFIX`)"
                    ));
                } else {
                    out(&format!(
                        "network {name}: subnet routes inside {routes} are approved automatically, pending ones too (`mesh-controller route list {name}`)"
                    ));
                }
            }
            Ok(())
        }
        Command::Network(NetworkCmd::List { json }) => {
            let rows = state.open_store()?.networks()?;
            // Without a known controller address there are no ids: `-`.
            let controller = controller_ref(&state, &[], None).ok();
            let id = |name: &str| {
                controller.clone().map(|controller| {
                    NetworkId {
                        controller,
                        network: name.to_owned(),
                    }
                    .to_string()
                })
            };
            if json {
                let listed: Vec<NetworkListing<'_>> = rows
                    .iter()
                    .map(|row| NetworkListing {
                        row,
                        id: id(&row.name),
                    })
                    .collect();
                out(&serde_json::to_string_pretty(&listed)?);
            } else {
                out(&format!(
                    "{:<24} {:<18} {:<24} {:>6} {:>9} {:<8} {:<19} ID",
                    "NAME", "CIDR", "CIDR6", "NODES", "BIRTHDAY", "APPROVAL", "AUTO-APPROVE ROUTES"
                ));
                for r in rows {
                    let budget = r
                        .birthday_budget
                        .map_or_else(|| "default".to_string(), |b| b.to_string());
                    let auto_routes = if r.auto_approve_routes.is_empty() {
                        "-".to_owned()
                    } else {
                        r.auto_approve_routes.join(",")
                    };
                    out(&format!(
                        "{:<24} {:<18} {:<24} {:>6} {:>9} {:<8} {:<19} {}",
                        r.name,
                        r.cidr,
                        r.cidr6.as_deref().unwrap_or("-"),
                        r.nodes,
                        budget,
                        r.approval.as_str(),
                        auto_routes,
                        id(&r.name).unwrap_or_else(|| "-".to_owned())
                    ));
                }
            }
            Ok(())
        }
        Command::Network(NetworkCmd::Id {
            name,
            controller,
            controller_tcp,
        }) => {
            if !state
                .open_store()?
                .networks()?
                .iter()
                .any(|n| n.name == name)
            {
                bail!("no network named {name:?} (see `mesh-controller network list`)");
            }
            let controller = controller_ref(&state, &controller, controller_tcp.as_deref())?;
            out(&NetworkId {
                controller,
                network: name,
            }
            .to_string());
            Ok(())
        }
        Command::Token(TokenCmd::Create {
            network,
            reusable,
            expires,
            controller,
            controller_tcp,
        }) => {
            let ControllerRef {
                addr: controller,
                key: controller_key,
                tcp: controller_tcp,
                others: controller_others,
            } = controller_ref(&state, &controller, controller_tcp.as_deref())?;
            let now = unix_now();
            let expires_at = token_expiry(&expires, now)?;
            let mut rng = rand::rngs::OsRng;
            let mut id_bytes = [0u8; 4];
            rand::RngCore::fill_bytes(&mut rng, &mut id_bytes);
            let id = mesh_proto::hex::encode(&id_bytes);
            let mut secret = [0u8; 32];
            rand::RngCore::fill_bytes(&mut rng, &mut secret);
            let record = NewToken {
                id: &id,
                secret: &secret,
                reusable,
                expires_at,
                controller: Some(&controller),
                controller_tcp: controller_tcp.as_deref(),
            };
            state.open_store()?.create_token(&network, &record, now)?;
            let mut points_at = token_addresses(&controller, controller_tcp.as_deref());
            if !controller_others.is_empty() {
                points_at.push_str(&format!(", else {}", controller_others.join(", ")));
            }
            let token = JoinToken {
                controller,
                controller_key,
                id: id.clone(),
                secret,
                controller_tcp,
                controller_others,
            };
            out(&token.to_string());
            let what = if reusable { "reusable" } else { "one-time" };
            let until = expires_at.map_or("never expires".to_owned(), |e| {
                format!("expires {}", rfc3339(e))
            });
            // The token alone goes to stdout, for scripts; what it is, to stderr.
            eprintln!("{what} token {id} for network {network}, {until}");
            eprintln!("nodes that use it dial the controller at {points_at}");
            Ok(())
        }
        Command::Token(TokenCmd::List { json }) => {
            let rows = state.open_store()?.tokens()?;
            if json {
                out(&serde_json::to_string_pretty(&rows)?);
            } else {
                out(&format!(
                    "{:<10} {:<16} {:<9} {:<32} {:<8} {:>5} CONTROLLER",
                    "ID", "NETWORK", "REUSABLE", "EXPIRES", "REVOKED", "USES"
                ));
                // Same fixed-width RFC 3339 form as the rows, so the strings compare as times.
                let now = rfc3339(unix_now());
                for r in rows {
                    let expires = match r.expires_at.as_deref() {
                        None => "never".to_owned(),
                        Some(e) if e <= now.as_str() => format!("{e} (expired)"),
                        Some(e) => e.to_owned(),
                    };
                    // Tokens made before addresses were recorded: not known.
                    let points_at = r.controller.as_deref().map_or("-".to_owned(), |c| {
                        token_addresses(c, r.controller_tcp.as_deref())
                    });
                    out(&format!(
                        "{:<10} {:<16} {:<9} {:<32} {:<8} {:>5} {points_at}",
                        r.id, r.network, r.reusable, expires, r.revoked, r.uses
                    ));
                }
            }
            Ok(())
        }
        Command::Token(TokenCmd::Revoke { id }) => {
            state.open_store()?.revoke_token(&id)?;
            out(&format!("revoked token {id}"));
            Ok(())
        }
        Command::Node(NodeCmd::List { network, json }) => {
            let rows = state.open_store()?.nodes(&network, unix_now())?;
            if json {
                out(&serde_json::to_string_pretty(&rows)?);
            } else {
                out(&format!(
                    "{:<20} {:<10} {:<16} {:<40} {:<8} {:<22} {:<22} ENDPOINTS",
                    "NAME", "KEY", "ADDRESS", "ADDRESS6", "ONLINE", "LAST SEEN", "APPROVED"
                ));
                for r in rows {
                    let eps: Vec<String> = r.endpoints.iter().map(|e| e.to_string()).collect();
                    let address6 = r.address6.map_or_else(|| "-".to_owned(), |a| a.to_string());
                    out(&format!(
                        "{:<20} {:<10} {:<16} {:<40} {:<8} {:<22} {:<22} {}",
                        r.name,
                        r.key.short(),
                        r.address,
                        address6,
                        if r.online { "yes" } else { "no" },
                        r.last_seen.as_deref().unwrap_or("never"),
                        r.approved_by.as_deref().unwrap_or("-"),
                        eps.join(",")
                    ));
                }
            }
            Ok(())
        }
        Command::Node(NodeCmd::Remove { network, node }) => {
            let name = state
                .open_store()?
                .remove_node(&network, &node, unix_now())?;
            out(&format!("removed node {name} from network {network}"));
            Ok(())
        }
        Command::Node(NodeCmd::Pending { network, json }) => {
            let rows = state.open_store()?.pending(&network, unix_now())?;
            if json {
                out(&serde_json::to_string_pretty(&rows)?);
            } else if rows.is_empty() {
                eprintln!("no pending requests in {network}");
            } else {
                out(&format!(
                    "{:<20} {:<19} {:<24} {:<24} {:<20} LAST SEEN",
                    "NAME", "FINGERPRINT", "HOSTNAME", "SOURCE", "FIRST SEEN"
                ));
                for r in rows {
                    out(&format!(
                        "{:<20} {:<19} {:<24} {:<24} {:<20} {}",
                        r.name,
                        r.fingerprint,
                        if r.hostname.is_empty() {
                            "-"
                        } else {
                            &r.hostname
                        },
                        r.source.as_deref().unwrap_or("-"),
                        r.first_seen,
                        r.last_seen
                    ));
                }
            }
            Ok(())
        }
        Command::Node(NodeCmd::Approve {
            network,
            nodes,
            all,
        }) => {
            let who = if all { Who::All } else { Who::These(&nodes) };
            let approved = state
                .open_store()?
                .approve(&network, who, &admin_user(), unix_now())?;
            for a in approved {
                let v6 = a.address6.map(|a| format!(" and {a}")).unwrap_or_default();
                out(&format!(
                    "approved {} (fingerprint {}) with address {}{v6}",
                    a.name,
                    a.key.fingerprint(),
                    a.address
                ));
            }
            Ok(())
        }
        Command::Node(NodeCmd::Reject {
            network,
            nodes,
            all,
        }) => {
            let who = if all { Who::All } else { Who::These(&nodes) };
            let rejected =
                state
                    .open_store()?
                    .reject_requests(&network, who, &admin_user(), unix_now())?;
            for r in rejected {
                out(&format!(
                    "rejected {} (fingerprint {})",
                    r.name,
                    r.key.fingerprint()
                ));
            }
            Ok(())
        }
        Command::Name(NameCmd::Set {
            network,
            name,
            nodes,
        }) => {
            state
                .open_store()?
                .set_name(&network, &name, &nodes, unix_now())?;
            out(&format!(
                "{}.{network}.mesh -> {}",
                name.trim().to_ascii_lowercase(),
                nodes.join(" ")
            ));
            Ok(())
        }
        Command::Name(NameCmd::Remove { network, name }) => {
            if !state.open_store()?.remove_name(&network, &name)? {
                anyhow::bail!(
                    "network {network:?} has no name {name:?} (see `mesh-controller name list {network}`)"
                );
            }
            out(&format!("removed {name} from {network}"));
            Ok(())
        }
        Command::Name(NameCmd::List { network, json }) => {
            let names = state.open_store()?.names(&network)?;
            if json {
                out(&serde_json::to_string_pretty(&names)?);
            } else if names.is_empty() {
                eprintln!("no names for several nodes in {network} (`mesh-controller name set {network} NAME NODE...`)");
            } else {
                out(&format!("{:<30} NODES", "NAME"));
                for n in names {
                    out(&format!(
                        "{:<30} {}",
                        format!("{}.{network}.mesh", n.name),
                        n.nodes.join(" ")
                    ));
                }
            }
            Ok(())
        }
        Command::Route(RouteCmd::List { network, json }) => {
            let rows = state.open_store()?.routes(&network)?;
            if json {
                out(&serde_json::to_string_pretty(&rows)?);
            } else if rows.is_empty() {
                eprintln!("no routes advertised in {network}");
            } else {
                out(&format!(
                    "{:<20} {:<18} {:<5} {:<9} {:<22} REASON",
                    "NODE", "PREFIX", "KIND", "STATE", "DECIDED BY"
                ));
                for r in rows {
                    out(&format!(
                        "{:<20} {:<18} {:<5} {:<9} {:<22} {}",
                        r.node,
                        r.prefix,
                        if r.exit { "exit" } else { "route" },
                        r.state,
                        r.decided_by.as_deref().unwrap_or("-"),
                        r.reason.as_deref().unwrap_or("-")
                    ));
                }
            }
            Ok(())
        }
        Command::Route(RouteCmd::Approve {
            network,
            routes,
            all,
        }) => {
            let who = if all { Who::All } else { Who::These(&routes) };
            let approved =
                state
                    .open_store()?
                    .approve_routes(&network, who, &admin_user(), unix_now())?;
            print_decided("approved", &approved);
            Ok(())
        }
        Command::Route(RouteCmd::Reject {
            network,
            routes,
            all,
        }) => {
            let who = if all { Who::All } else { Who::These(&routes) };
            let rejected =
                state
                    .open_store()?
                    .reject_routes(&network, who, &admin_user(), unix_now())?;
            print_decided("rejected", &rejected);
            Ok(())
        }
    }
}

/// One line per route approved or rejected: `approved 10.244.1.0/24 of node-b`.
fn print_decided(verb: &str, rows: &[RouteRow]) {
    for r in rows {
        out(&format!("{verb} {} of {}", r.prefix, r.node));
    }
}

/// A network as `network list --json` shows it: the stored row and its id (`null` while no
/// controller address is known).
#[derive(serde::Serialize)]
struct NetworkListing<'a> {
    #[serde(flatten)]
    row: &'a NetworkRow,
    id: Option<String>,
}

/// No address nodes can dial is known for the controller, so no token or network id can be
/// made without `--controller`.
#[derive(Debug, thiserror::Error)]
enum NoAddress {
    /// `serve` never wrote the address it listens on.
    #[error("no controller address known: start `mesh-controller serve --listen <ip:port>` with this state dir first, or pass --controller <ip:port>")]
    NotServed,
    /// No controller on this database is up, and none runs here.
    #[error("no controller on this database is up (none wrote its row in the last 15 s): start `mesh-controller serve --database ...`, or pass --controller <ip:port> (repeatable)")]
    NoneUp,
    /// `serve` listens on a wildcard address.
    #[error("the controller listens on {0}, which nodes cannot dial; pass the address nodes should use with --controller <ip:port> (or start serve with --announce <ip:port>,...)")]
    Unspecified(SocketAddr),
}

/// Where nodes reach this controller, as join tokens and network ids carry it: the
/// `--controller` addresses (the first as the main one); else the address `serve` listens on
/// here, or (when that is a wildcard) the first one `serve --announce` names; else, on a shared
/// database, the first controller that is up. `controller_tcp` (`--controller-tcp`, `none` for
/// no TCP) or that address's host with the TCP port `serve` listens on, if it does. Besides,
/// the other addresses: the other `--controller` ones, those `serve` announces, and on a shared
/// database every other controller that is up. Fails with [`NoAddress`] when no address nodes can dial is known.
fn controller_ref(
    state: &StateDir,
    controllers: &[String],
    controller_tcp: Option<&str>,
) -> anyhow::Result<ControllerRef> {
    for c in controllers {
        check_host_port("--controller", c.trim(), "192.0.2.1:7443")?;
    }
    if controllers.len() > 1 + mesh_proto::token::MAX_OTHER_CONTROLLERS {
        bail!(
            "a token carries at most {} controller addresses",
            1 + mesh_proto::token::MAX_OTHER_CONTROLLERS
        );
    }
    // The replicas that are up (a shared database only: on SQLite, serve's files say it all).
    let replicas = if state.is_shared() {
        state.open_store()?.replicas(unix_now())?
    } else {
        Vec::new()
    };
    let replica_addrs: Vec<String> = replicas.iter().flat_map(|r| r.addrs.clone()).collect();
    // Where `serve` listens on this host, needed without --controller. On a shared database a
    // controller may run elsewhere: none here is no reason to wait for one to start.
    let local = match (controllers.is_empty(), state.is_shared()) {
        (false, _) => None,
        (true, true) => state.listen_addr(),
        (true, false) => state.wait_listen_addr(),
    };
    let mut tcp_default = state.listen_tcp_addr().map(|tcp| tcp.port());
    let addr = match controllers.first() {
        Some(c) => c.trim().to_owned(),
        None => match local {
            Some(a) if !a.ip().is_unspecified() => a.to_string(),
            // Listening on every address: the first one `serve --announce` names, if any.
            Some(a) => match state.announced().into_iter().find(|x| is_host_port(x)) {
                Some(first) => first,
                None => return Err(NoAddress::Unspecified(a).into()),
            },
            // No controller on this host: the first of the database's that are up.
            None => match replicas.iter().find(|r| !r.addrs.is_empty()) {
                Some(r) => {
                    tcp_default = r
                        .tcp
                        .as_deref()
                        .and_then(|t| t.rsplit_once(':'))
                        .and_then(|(_, p)| p.parse().ok());
                    r.addrs[0].clone()
                }
                None if state.is_shared() => return Err(NoAddress::NoneUp.into()),
                None => return Err(NoAddress::NotServed.into()),
            },
        },
    };
    let tcp = match controller_tcp.map(str::trim) {
        Some("none") => None,
        Some(a) => {
            check_host_port("--controller-tcp", a, "192.0.2.1:443, or none")?;
            Some(a.to_owned())
        }
        // The host nodes dial, with the port the controller listens on over TCP.
        None => tcp_default.and_then(|port| {
            let host = addr.rsplit_once(':').map(|(h, _)| h)?;
            Some(format!("{host}:{port}"))
        }),
    };
    let mut others: Vec<String> = Vec::new();
    // The other `--controller` addresses first, then (as always) the announced ones and the
    // other replicas that are up.
    let candidates = controllers
        .iter()
        .skip(1)
        .map(|c| c.trim().to_owned())
        .chain(state.announced())
        .chain(replica_addrs);
    for other in candidates {
        if others.len() < mesh_proto::token::MAX_OTHER_CONTROLLERS
            && other != addr
            && !others.contains(&other)
            && is_host_port(&other)
        {
            others.push(other);
        }
    }
    Ok(ControllerRef {
        addr,
        key: state.public_key()?,
        tcp,
        others,
    })
}

/// Whether `addr` is a `host:port` that fits in a token or network id (at most 255 bytes).
fn is_host_port(addr: &str) -> bool {
    addr.len() <= 255
        && addr
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
}

/// Refuses a `flag` value that is no [`is_host_port`], showing `example`.
fn check_host_port(flag: &str, addr: &str, example: &str) -> anyhow::Result<()> {
    if addr.len() > 255 {
        bail!(
            "{flag} {:?}... is {} bytes long; at most 255 fit in a token or network id",
            addr.chars().take(32).collect::<String>(),
            addr.len()
        );
    }
    if !is_host_port(addr) {
        bail!("invalid {flag} {addr:?}: use host:port, e.g. {example}");
    }
    Ok(())
}

/// Who runs this admin command, as recorded beside an approval or a rejection: the user
/// behind `sudo`, else the logged-in user, else the uid.
fn admin_user() -> String {
    admin_user_from(|var| std::env::var(var).ok())
}

/// [`admin_user`] with the environment given.
fn admin_user_from(env: impl Fn(&str) -> Option<String>) -> String {
    for var in ["SUDO_USER", "USER"] {
        if let Some(user) = env(var).filter(|u| !u.trim().is_empty()) {
            return user.trim().to_owned();
        }
    }
    use std::os::unix::fs::MetadataExt as _;
    // The process's own /proc directory belongs to its user: no unsafe getuid().
    std::fs::metadata("/proc/self").map_or_else(
        |_| "an unknown user".to_owned(),
        |m| user_name(m.uid()).unwrap_or_else(|| format!("uid {}", m.uid())),
    )
}

/// The name of user `uid` in `/etc/passwd`.
fn user_name(uid: u32) -> Option<String> {
    std::fs::read_to_string("/etc/passwd")
        .ok()?
        .lines()
        .find_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            (f.nth(1)?.parse::<u32>().ok()? == uid).then(|| name.to_owned())
        })
}

/// Where a token points nodes: "ADDR (QUIC/UDP)" and ", TCP_ADDR (TCP)" when it has one.
fn token_addresses(controller: &str, tcp: Option<&str>) -> String {
    match tcp {
        Some(tcp) => format!("{controller} (QUIC/UDP), {tcp} (TCP)"),
        None => format!("{controller} (QUIC/UDP)"),
    }
}

/// How long a join token lives unless `token create --expires` says otherwise.
const DEFAULT_TOKEN_LIFETIME: &str = "24h";

/// `--expires`: a lifetime from `now` (unix seconds), or `never`.
fn token_expiry(expires: &str, now: u64) -> anyhow::Result<Option<u64>> {
    if expires.trim().eq_ignore_ascii_case("never") {
        return Ok(None);
    }
    let lifetime = humantime::parse_duration(expires.trim()).with_context(|| {
        format!("invalid --expires {expires:?}; use e.g. 30m, 24h, 7d, or never")
    })?;
    Ok(Some(now + lifetime.as_secs().max(1)))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-controller: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `--max-connections`, over the library's defaults.
fn server_limits(
    max_connections: Option<usize>,
) -> anyhow::Result<mesh_control::quic::ServerLimits> {
    let mut limits = mesh_control::quic::ServerLimits::default();
    if let Some(n) = max_connections {
        if n == 0 {
            bail!("--max-connections 0 would refuse every node; use at least 1");
        }
        limits.max_connections = n;
    }
    Ok(limits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_expire_after_24_hours_unless_told_otherwise() {
        let now = 1_800_000_000;
        let cli = Cli::parse_from(["mesh-controller", "token", "create", "prod"]);
        let Command::Token(TokenCmd::Create { expires, .. }) = cli.command else {
            panic!("not token create");
        };
        assert_eq!(token_expiry(&expires, now).unwrap(), Some(now + 24 * 3600));
        assert_eq!(token_expiry("30m", now).unwrap(), Some(now + 1800));
        assert_eq!(token_expiry("never", now).unwrap(), None);
        assert_eq!(token_expiry("Never", now).unwrap(), None);
        let err = token_expiry("soon", now).unwrap_err();
        assert!(err.to_string().contains("never"), "{err}");
    }

    #[test]
    fn approve_and_reject_take_names_or_all_but_not_both() {
        for verb in ["approve", "reject"] {
            let parse = |more: &[&str]| {
                let args = ["mesh-controller", "node", verb, "prod"];
                Cli::try_parse_from(args.iter().chain(more))
            };
            assert!(parse(&["web", "3f2a-91c0-77de-0b14"]).is_ok());
            assert!(parse(&["--all"]).is_ok());
            let e = parse(&[]).err().unwrap().to_string();
            assert!(e.contains("--all"), "{e}");
            assert!(parse(&["web", "--all"]).is_err());
        }
    }

    #[test]
    fn route_approve_and_reject_take_prefixes_or_nodes_or_all_but_not_both() {
        for verb in ["approve", "reject"] {
            let parse = |more: &[&str]| {
                let args = ["mesh-controller", "route", verb, "prod"];
                Cli::try_parse_from(args.iter().chain(more))
            };
            assert!(parse(&["10.244.1.0/24", "node-b"]).is_ok());
            assert!(parse(&["--all"]).is_ok());
            let e = parse(&[]).err().unwrap().to_string();
            assert!(e.contains("--all"), "{e}");
            assert!(parse(&["node-b", "--all"]).is_err());
        }
    }

    #[test]
    fn auto_approve_routes_take_a_list_or_none() {
        let parse = |value: &str| {
            let cli = Cli::try_parse_from([
                "mesh-controller",
                "network",
                "set",
                "prod",
                "--auto-approve-routes",
                value,
            ])?;
            let Command::Network(NetworkCmd::Set {
                auto_approve_routes,
                ..
            }) = cli.command
            else {
                panic!("not network set");
            };
            Ok::<_, clap::Error>(auto_approve_routes.unwrap().to_string())
        };
        assert_eq!(
            parse("10.245.0.0/16,10.244.0.0/16").unwrap(),
            "10.244.0.0/16,10.245.0.0/16"
        );
        assert_eq!(parse("none").unwrap(), "");
        let e = parse("10.244.1.0/33").unwrap_err().to_string();
        assert!(
            e.contains("10.244.1.0/33 is not an IP prefix (expected e.g. 10.244.0.0/16 or fd00:10:244::/56)"),
            "{e}"
        );
        let e = parse("10.244.1.0/16").unwrap_err().to_string();
        assert!(e.contains("did you mean 10.244.0.0/16?"), "{e}");
    }

    #[test]
    fn the_admin_is_the_user_behind_sudo_else_the_user_else_the_uid() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |var: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == var)
                    .map(|(_, v)| v.to_string())
            }
        };
        let both = &[("SUDO_USER", "alice"), ("USER", "root")];
        assert_eq!(admin_user_from(env(both)), "alice");
        assert_eq!(admin_user_from(env(&[("USER", "bob")])), "bob");
        let blank = &[("SUDO_USER", " "), ("USER", "bob")];
        assert_eq!(admin_user_from(env(blank)), "bob");
        // Without either variable: the process's user, by name where /etc/passwd has it.
        let own = admin_user_from(env(&[]));
        assert!(!own.is_empty() && !own.contains(':'), "{own}");
        assert_eq!(user_name(0).as_deref(), Some("root"));
    }

    #[test]
    fn tokens_and_network_ids_carry_what_serve_listens_on_and_announces() {
        let dir = std::env::temp_dir().join(format!("mesh-ctl-main-test-{}", std::process::id()));
        let state = StateDir::open(&dir).unwrap();
        let e = controller_ref(&state, &[], None).unwrap_err();
        assert!(
            matches!(e.downcast_ref(), Some(NoAddress::NotServed)),
            "{e}"
        );
        state
            .write_listen_addr("0.0.0.0:7443".parse().unwrap())
            .unwrap();
        let e = controller_ref(&state, &[], None).unwrap_err();
        assert!(
            matches!(e.downcast_ref(), Some(NoAddress::Unspecified(_))),
            "{e}"
        );
        // On every address, with addresses announced: the first of them, the rest besides.
        let both = ["[2001:db8::1]:7443", "192.0.2.1:7443"].map(String::from);
        state.write_announced(&both).unwrap();
        let c = controller_ref(&state, &[], None).unwrap();
        assert_eq!(c.addr, "[2001:db8::1]:7443");
        assert_eq!(c.others, ["192.0.2.1:7443"]);
        state
            .write_listen_addr("192.0.2.1:7443".parse().unwrap())
            .unwrap();
        state
            .write_listen_tcp_addr(Some("0.0.0.0:443".parse().unwrap()))
            .unwrap();
        let announced: Vec<String> = ["192.0.2.1:7443", "a:1", "b:2", "a:1", "c:3", "d:4", "e:5"]
            .map(String::from)
            .to_vec();
        state.write_announced(&announced).unwrap();
        let c = controller_ref(&state, &[], None).unwrap();
        assert_eq!(c.addr, "192.0.2.1:7443");
        assert_eq!(c.tcp.as_deref(), Some("192.0.2.1:443"));
        assert_eq!(c.key, state.controller_public().unwrap());
        // Not the address itself, each once, as many as an id carries.
        assert_eq!(c.others, ["a:1", "b:2", "c:3", "d:4"]);
        let c = controller_ref(&state, &["ctl.example.com:7443".into()], Some("none")).unwrap();
        assert_eq!((c.addr.as_str(), c.tcp), ("ctl.example.com:7443", None));
        // The announced addresses still follow a --controller address.
        assert_eq!(c.others, ["192.0.2.1:7443", "a:1", "b:2", "c:3"]);
        // Several: the given ones first, then the announced ones, at most four others.
        let c = controller_ref(&state, &["x:1".into(), "b:2".into(), "y:2".into()], None).unwrap();
        assert_eq!(c.addr, "x:1");
        assert_eq!(c.others, ["b:2", "y:2", "192.0.2.1:7443", "a:1"]);
        let e = controller_ref(&state, &["ctl.example.com".into()], None).unwrap_err();
        assert!(e.to_string().contains("use host:port"), "{e}");
        let e = controller_ref(&state, &[], Some("443")).unwrap_err();
        assert!(e.to_string().contains("invalid --controller-tcp"), "{e}");
        let long = format!("{}:1", "h".repeat(300));
        let e = controller_ref(&state, &[long], None).unwrap_err();
        assert!(e.to_string().contains("at most 255"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
