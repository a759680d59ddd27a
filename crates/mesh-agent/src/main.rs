//! `mesh`: the node agent and its CLI.

mod api;
mod control;
mod daemon;
mod dataplane;
mod state;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use mesh_proto::token::JoinToken;
use state::StateDir;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "mesh",
    version,
    about = "mesh node agent: a stable overlay IP on every machine"
)]
struct Cli {
    /// State directory (node key, membership, peer cache, control socket).
    #[arg(long, global = true, default_value = "/var/lib/mesh")]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Join a network with a token and run the daemon in the foreground.
    Join {
        /// Join token from `mesh-controller token create`.
        token: String,
        /// Node name (default: the hostname).
        #[arg(long)]
        name: Option<String>,
        /// UDP port for WireGuard and control traffic.
        #[arg(long, default_value_t = 51820)]
        port: u16,
        /// MTU of the overlay interface.
        #[arg(long, default_value_t = 1420, value_parser = clap::value_parser!(u32).range(1280..=9000))]
        mtu: u32,
        /// Name of the TUN device.
        #[arg(long, default_value = "mesh0")]
        interface: String,
        /// How long to wait for the controller.
        #[arg(long, default_value = "10s")]
        connect_timeout: String,
    },
    /// Run the daemon from saved state (after a join), in the foreground.
    Up,
    /// Print this node's overlay IPv4 address and nothing else.
    Ip,
    /// Show the node, the controller connection and every peer.
    Status {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Leave the network: the controller deletes the node, and the local state is deleted.
    Leave {
        /// Delete the local state even if the controller cannot be told.
        #[arg(long)]
        force: bool,
    },
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MESH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

fn hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let clean: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(mesh_proto::control::MAX_NAME_LEN)
        .collect();
    if clean.is_empty() {
        "node".into()
    } else {
        clean
    }
}

#[allow(clippy::print_stdout)]
fn out(s: &str) {
    println!("{s}");
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

fn print_status(v: &serde_json::Value) {
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_owned();
    let node = &v["node"];
    let ctl = &v["controller"];
    out(&format!(
        "node      {} (udp port {})\naddress   {}/{} on {} (mtu {})\nnetwork   {}\nkey       {}\ncontroller {} {}",
        s(&node["name"]),
        node["port"],
        s(&node["address"]),
        node["prefix_len"],
        s(&node["interface"]),
        node["mtu"],
        s(&node["network"]),
        s(&node["key"]),
        s(&ctl["address"]),
        if ctl["connected"].as_bool() == Some(true) {
            "connected".to_owned()
        } else {
            format!("disconnected ({})", ctl["last_error"].as_str().unwrap_or("connecting"))
        }
    ));
    out(&format!(
        "\n{:<20} {:<16} {:<22} {:>10} {:>12} {:>12}",
        "PEER", "ADDRESS", "ENDPOINT", "HANDSHAKE", "RX", "TX"
    ));
    for p in v["peers"].as_array().into_iter().flatten() {
        let hs = p["last_handshake_secs_ago"]
            .as_u64()
            .map_or("never".to_owned(), |s| format!("{s}s ago"));
        out(&format!(
            "{:<20} {:<16} {:<22} {:>10} {:>12} {:>12}",
            s(&p["name"]),
            s(&p["address"]),
            p["endpoint"].as_str().unwrap_or("-"),
            hs,
            p["rx_bytes"].as_u64().unwrap_or(0),
            p["tx_bytes"].as_u64().unwrap_or(0)
        ));
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let state = StateDir::new(&cli.state_dir);
    match cli.command {
        Command::Join {
            token,
            name,
            port,
            mtu,
            interface,
            connect_timeout,
        } => {
            let token: JoinToken = token.parse()?;
            let connect_timeout =
                humantime::parse_duration(&connect_timeout).with_context(|| {
                    format!("invalid --connect-timeout {connect_timeout:?}; use e.g. 10s")
                })?;
            let name = name.unwrap_or_else(hostname);
            if !mesh_proto::control::valid_name(&name) {
                anyhow::bail!(
                    "invalid node name {name:?}: use 1-63 letters, digits, '-', '_' or '.'"
                );
            }
            init_logging();
            let opts = daemon::Options {
                state,
                port,
                mtu,
                interface,
            };
            runtime()?.block_on(daemon::join(opts, token, name, connect_timeout))
        }
        Command::Up => {
            init_logging();
            let opts = daemon::Options {
                state,
                port: 51820,
                mtu: 1420,
                interface: "mesh0".into(),
            };
            runtime()?.block_on(daemon::up(opts))
        }
        Command::Ip => {
            let m = state.load_membership()?;
            out(&m.address.to_string());
            Ok(())
        }
        Command::Status { json } => {
            let v =
                runtime()?.block_on(api::request(&state.socket_path(), api::Request::Status))?;
            if json {
                out(&serde_json::to_string_pretty(&v)?);
            } else {
                print_status(&v);
            }
            Ok(())
        }
        Command::Leave { force } => runtime()?.block_on(async {
            match api::request(&state.socket_path(), api::Request::Leave).await {
                Ok(v) => {
                    // The daemon deletes the state as it stops; wait for that.
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                    while state.load_membership().is_ok() && tokio::time::Instant::now() < deadline
                    {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    out(&format!(
                        "left network {}; local state in {} deleted",
                        v["network"].as_str().unwrap_or("?"),
                        state.path().display()
                    ));
                    Ok(())
                }
                Err(e) if e.downcast_ref::<api::NotRunning>().is_some() => {
                    let network = daemon::leave_offline(&state, force).await?;
                    out(&format!(
                        "left network {network}; local state in {} deleted",
                        state.path().display()
                    ));
                    Ok(())
                }
                Err(e) => Err(e),
            }
        }),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
