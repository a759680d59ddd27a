//! Control-plane load: many simulated nodes in one process against a running controller.
//!
//! Every simulated node does what an agent does on `mesh join`, with the agent's own client
//! code: its own QUIC connection ([`mesh_control::quic`]), the Noise IK channel
//! ([`mesh_control::channel::initiate`]), a `Join` with a random x25519 key, the `Welcome`;
//! then it reads the controller's pushes for as long as the tool runs, and sends a heartbeat
//! every 10 s like the agent (`--heartbeat 0` for none). Nothing is tunnelled: only the
//! control plane is exercised.
//!
//! Phases and what is printed:
//!
//! 1. `--nodes N` nodes join, `--concurrency C` at a time: the time from the first `Welcome` to
//!    the last, and joins per second. The tool then waits until no push arrived for a second
//!    (the controller finished telling everyone about everyone).
//! 2. One more node joins. For each of the N connected nodes: the time from that node's
//!    `Welcome` until the node received a push that names the new key (p50, p99, max, and how
//!    many got it within 10 s), and the bytes pushed to it from the start of that join until
//!    then (sizes of the encoded control messages, before Noise and QUIC framing).
//! 3. The extra node sends `Leave`: the same, from the `Leave` until a push removes the key.
//!
//! With `--controller-pid PID` (a controller on this host) it also reads the controller's
//! resident memory after the joins, the CPU time it spent during the joins, and its CPU use
//! while all N nodes sit connected for `--idle` seconds.
//!
//! The token is the line `mesh-controller token create --reusable` prints (`--token` or
//! `--token-file`); it names the controller and its key, which `--controller` (repeatable:
//! nodes are spread over the addresses in turn) and `--controller-key` override.
//!
//! Loopback only in the bench script; the client sockets bind to `--bind` (127.0.0.1).

#![allow(clippy::print_stdout)]

use anyhow::{bail, Context};
use clap::Parser;
use mesh_control::channel::{self, Sender};
use mesh_control::{quic, Link};
use mesh_proto::control::{decode_server, ClientMsg, ServerMsg};
use mesh_proto::token::JoinToken;
use mesh_proto::PublicKey;
use rand::RngCore;
use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use x25519_dalek::{PublicKey as XPublic, StaticSecret};

#[derive(Parser)]
#[command(about = "Simulated nodes joining a mesh controller over the real control protocol")]
struct Args {
    /// Controller QUIC address, host:port; repeatable (nodes are spread over them in turn)
    /// [default: the token's].
    #[arg(long)]
    controller: Vec<String>,
    /// The controller's public key (base64) [default: the token's].
    #[arg(long)]
    controller_key: Option<String>,
    /// A reusable join token (`mesh-controller token create --reusable`).
    #[arg(long, conflicts_with = "token_file")]
    token: Option<String>,
    /// A file holding the token.
    #[arg(long)]
    token_file: Option<std::path::PathBuf>,
    /// Simulated nodes that join first.
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    /// Joins in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Nodes sharing one client UDP socket (quinn endpoint).
    #[arg(long, default_value_t = 100)]
    per_socket: usize,
    /// Address the client sockets bind to (keep it on loopback).
    #[arg(long, default_value = "127.0.0.1")]
    bind: IpAddr,
    /// Seconds between a node's heartbeats (the agent's pace is 10); 0: none.
    #[arg(long, default_value_t = 10)]
    heartbeat: u64,
    /// PID of the controller, to read its memory and CPU time from /proc.
    #[arg(long)]
    controller_pid: Option<u32>,
    /// Seconds to sit idle with all nodes connected (CPU of the controller is read over it).
    #[arg(long, default_value_t = 10)]
    idle: u64,
    /// Longest wait, in seconds, for the pushes that follow the joins to stop.
    #[arg(long, default_value_t = 900)]
    settle_max: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// One message a node received after its Welcome.
#[derive(Clone, Copy)]
struct Received {
    at: Instant,
    /// Length of the decrypted, still encoded message.
    bytes: usize,
    /// It upserts the watched key.
    adds_watched: bool,
    /// It removes the watched key.
    removes_watched: bool,
}

type Log = Arc<Mutex<Vec<Received>>>;

fn lock(log: &Log) -> std::sync::MutexGuard<'_, Vec<Received>> {
    log.lock().unwrap_or_else(|p| p.into_inner())
}

/// A node that joined.
struct Joined {
    welcome_at: Instant,
    log: Log,
    /// Peers the node knows of now (the Welcome's, then the pushes' upserts and removals).
    known: Arc<AtomicUsize>,
    /// The channel's sending side while no heartbeat task holds it.
    tx: Option<Sender>,
    conn: quinn::Connection,
}

fn fresh_secret() -> [u8; 32] {
    let mut s = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut s);
    s
}

fn public(secret: &[u8; 32]) -> PublicKey {
    PublicKey(XPublic::from(&StaticSecret::from(*secret)).to_bytes())
}

/// Node `i`'s one reported endpoint, in TEST-NET-2 (198.51.100.0/24).
fn fake_endpoint(i: usize) -> SocketAddr {
    let host = (i % 250) as u8 + 1;
    let port = 40000 + (i / 250 % 20000) as u16;
    SocketAddr::new(Ipv4Addr::new(198, 51, 100, host).into(), port)
}

struct Plan {
    controllers: Vec<SocketAddr>,
    key: PublicKey,
    token: JoinToken,
    heartbeat: Option<Duration>,
}

/// Joins as node `i` with `secret` on `endpoint`, then records every push into the returned
/// log; the pushes that name `watched` are marked.
async fn join(
    plan: &Plan,
    endpoint: &quinn::Endpoint,
    i: usize,
    name: String,
    secret: [u8; 32],
    watched: PublicKey,
) -> anyhow::Result<Joined> {
    let addr = plan.controllers[i % plan.controllers.len()];
    let conn = endpoint
        .connect(addr, "mesh")
        .context("connect")?
        .await
        .with_context(|| format!("QUIC handshake with {addr}"))?;
    let link = Link::Quic(conn.clone());
    let (mut tx, mut rx) = channel::initiate(&link, &secret, &plan.key)
        .await
        .context("Noise handshake")?;
    let endpoints = vec![fake_endpoint(i)];
    let msg = ClientMsg::Join {
        token_id: plan.token.id.clone(),
        token_secret: plan.token.secret_hex(),
        name,
        endpoints: endpoints.clone(),
        exact_name: false,
    };
    tx.send(&msg.encode()).await.context("send join")?;
    let reply = rx.recv().await.context("read the answer to join")?;
    let welcome_at = Instant::now();
    let mut peers: HashSet<PublicKey> =
        match decode_server(&reply).context("decode the answer to join")? {
            ServerMsg::Welcome(w) => w.peers.iter().map(|p| p.key).collect(),
            ServerMsg::Error { code, message } => bail!("refused: {code:?}: {message}"),
            other => bail!("unexpected answer to join: {other:?}"),
        };
    let log: Log = Arc::new(Mutex::new(Vec::new()));
    let sink = log.clone();
    let known = Arc::new(AtomicUsize::new(peers.len()));
    let count = known.clone();
    tokio::spawn(async move {
        while let Ok(bytes) = rx.recv().await {
            let at = Instant::now();
            let (mut adds_watched, mut removes_watched) = (false, false);
            if let Ok(ServerMsg::PeersChanged { upsert, remove }) = decode_server(&bytes) {
                adds_watched = upsert.iter().any(|p| p.key == watched);
                removes_watched = remove.contains(&watched);
                peers.extend(upsert.iter().map(|p| p.key));
                for k in &remove {
                    peers.remove(k);
                }
                count.store(peers.len(), Ordering::Relaxed);
            }
            lock(&sink).push(Received {
                at,
                bytes: bytes.len(),
                adds_watched,
                removes_watched,
            });
        }
    });
    let tx = match plan.heartbeat {
        Some(every) => {
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let hb = ClientMsg::Heartbeat {
                        endpoints: endpoints.clone(),
                        home_relay: None,
                        nat: None,
                        routes: Vec::new(),
                        exits: Vec::new(),
                    };
                    if tx.send(&hb.encode()).await.is_err() {
                        return;
                    }
                }
            });
            None
        }
        None => Some(tx),
    };
    Ok(Joined {
        welcome_at,
        log,
        known,
        tx,
        conn,
    })
}

/// The controller's CPU time (user + system) and resident memory, from /proc.
#[derive(Clone, Copy)]
struct ProcSample {
    at: Instant,
    cpu: Duration,
    rss_kib: u64,
}

fn clock_ticks() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

fn sample(pid: u32, ticks: u64) -> anyhow::Result<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("controller process {pid}"))?;
    // Fields after the command name (which may hold spaces) start with the state, field 3;
    // utime and stime are fields 14 and 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> anyhow::Result<u64> {
        fields
            .get(n - 3)
            .and_then(|f| f.parse().ok())
            .context("malformed /proc/PID/stat")
    };
    let ticks_used = field(14)? + field(15)?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse().ok())
        .unwrap_or(0);
    Ok(ProcSample {
        at: Instant::now(),
        cpu: Duration::from_millis(ticks_used * 1000 / ticks),
        rss_kib,
    })
}

/// Waits until every node knows `peers` peers; returns when (within 50 ms), or `None` after
/// `limit`.
async fn converge(nodes: &[Joined], peers: usize, limit: Duration) -> Option<Instant> {
    let start = Instant::now();
    loop {
        if nodes
            .iter()
            .all(|n| n.known.load(Ordering::Relaxed) >= peers)
        {
            return Some(Instant::now());
        }
        if start.elapsed() >= limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until no node received anything for `quiet`, at most `limit`.
async fn settle(nodes: &[Joined], quiet: Duration, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let last = nodes
            .iter()
            .filter_map(|n| lock(&n.log).last().map(|r| r.at))
            .max();
        let now = Instant::now();
        let calm = last.is_none_or(|l| now.duration_since(l) >= quiet);
        if calm || now.duration_since(start) >= limit {
            return now.duration_since(start);
        }
    }
}

/// How the N connected nodes heard of one change.
struct Spread {
    /// Per node that heard in time: from `since` until the push.
    delays: Vec<Duration>,
    /// Per node that heard: bytes received from `from` up to and including that push.
    bytes: Vec<usize>,
    /// Pushes that arrived before `since` (counted as 0 in `delays`).
    early: usize,
}

/// Waits up to `window` after `since` until every node received a push matching `hit` at or
/// after `from`.
async fn spread(
    nodes: &[Joined],
    from: Instant,
    since: Instant,
    window: Duration,
    hit: fn(&Received) -> bool,
) -> Spread {
    let deadline = since + window;
    let arrival = |n: &Joined| -> Option<(Instant, usize)> {
        let log = lock(&n.log);
        let mut bytes = 0;
        for r in log.iter().filter(|r| r.at >= from) {
            bytes += r.bytes;
            if hit(r) {
                return Some((r.at, bytes));
            }
        }
        None
    };
    loop {
        let done = nodes.iter().all(|n| arrival(n).is_some());
        if done || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut s = Spread {
        delays: Vec::new(),
        bytes: Vec::new(),
        early: 0,
    };
    for (at, bytes) in nodes.iter().filter_map(arrival) {
        if at < since {
            s.early += 1;
        }
        if at <= deadline {
            s.delays.push(at.saturating_duration_since(since));
            s.bytes.push(bytes);
        }
    }
    s.delays.sort();
    s.bytes.sort();
    s
}

fn pct<T: Copy + Default>(sorted: &[T], p: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 100.0
}

fn spread_json(s: &Spread, of: usize) -> serde_json::Value {
    let total: usize = s.bytes.iter().sum();
    serde_json::json!({
        "nodes": of,
        "within_10s": s.delays.len(),
        "before_reference": s.early,
        "p50_ms": ms(pct(&s.delays, 0.50)),
        "p99_ms": ms(pct(&s.delays, 0.99)),
        "max_ms": ms(s.delays.last().copied().unwrap_or_default()),
        "bytes_per_node_mean": if s.bytes.is_empty() { 0 } else { total / s.bytes.len() },
        "bytes_per_node_max": s.bytes.last().copied().unwrap_or(0),
    })
}

fn spread_text(what: &str, s: &Spread, of: usize) {
    let total: usize = s.bytes.iter().sum();
    let mean = if s.bytes.is_empty() {
        0
    } else {
        total / s.bytes.len()
    };
    println!(
        "{what}: {}/{of} nodes told within 10 s; delay p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms{}",
        s.delays.len(),
        ms(pct(&s.delays, 0.50)),
        ms(pct(&s.delays, 0.99)),
        ms(s.delays.last().copied().unwrap_or_default()),
        if s.early > 0 {
            format!(
                " ({} told before the reference instant, counted as 0)",
                s.early
            )
        } else {
            String::new()
        }
    );
    println!(
        "  bytes pushed per node for it: mean {mean}, max {}",
        s.bytes.last().copied().unwrap_or(0)
    );
}

fn resolve(addr: &str) -> anyhow::Result<SocketAddr> {
    addr.to_socket_addrs()
        .with_context(|| format!("controller address {addr}"))?
        .next()
        .with_context(|| format!("controller address {addr} resolves to nothing"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let token_text = match (&args.token, &args.token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("cannot read the token file {}", f.display()))?,
        (None, None) => bail!("give a join token: --token TOKEN or --token-file FILE"),
    };
    let token: JoinToken = token_text.trim().parse()?;
    let key = match &args.controller_key {
        Some(k) => k
            .parse()
            .map_err(|e| anyhow::anyhow!("--controller-key: {e}"))?,
        None => token.controller_key,
    };
    let names = if args.controller.is_empty() {
        vec![token.controller.clone()]
    } else {
        args.controller.clone()
    };
    let controllers = names
        .iter()
        .map(|a| resolve(a))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let plan = Arc::new(Plan {
        controllers,
        key,
        token,
        heartbeat: (args.heartbeat > 0).then(|| Duration::from_secs(args.heartbeat)),
    });
    let n = args.nodes;
    let sockets = n.div_ceil(args.per_socket.max(1)).max(1);
    let endpoints = (0..sockets)
        .map(|_| quic::bind_client(SocketAddr::new(args.bind, 0)))
        .collect::<Result<Vec<_>, _>>()?;
    let ticks = clock_ticks();
    let extra_secret = fresh_secret();
    let watched = public(&extra_secret);
    let run = format!("{:08x}", rand::rngs::OsRng.next_u32());

    // Phase 1: N joins.
    let before_joins = args.controller_pid.map(|p| sample(p, ticks)).transpose()?;
    let gate = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let (plan, gate) = (plan.clone(), gate.clone());
        let endpoint = endpoints[i % endpoints.len()].clone();
        let name = format!("load-{run}-{i}");
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await?;
            join(&plan, &endpoint, i, name, fresh_secret(), watched).await
        }));
    }
    let mut nodes = Vec::with_capacity(n);
    let mut failures: Vec<String> = Vec::new();
    for t in tasks {
        match t.await {
            Ok(Ok(j)) => nodes.push(j),
            Ok(Err(e)) => failures.push(format!("{e:#}")),
            Err(e) => failures.push(e.to_string()),
        }
    }
    if nodes.is_empty() {
        bail!(
            "no node joined; first error: {}",
            failures.first().map_or("none", String::as_str)
        );
    }
    let first = nodes.iter().map(|j| j.welcome_at).min().unwrap_or(started);
    let last = nodes.iter().map(|j| j.welcome_at).max().unwrap_or(started);
    let join_span = last.duration_since(first);
    let since_start = last.duration_since(started);
    // Everyone knows everyone (N - 1 peers each), and then a second without pushes.
    let converged = converge(
        &nodes,
        nodes.len().saturating_sub(1),
        Duration::from_secs(args.settle_max),
    )
    .await
    .map(|at| at.duration_since(last));
    let settled_after = settle(
        &nodes,
        Duration::from_secs(1),
        Duration::from_secs(args.settle_max),
    )
    .await;
    let after_joins = args.controller_pid.map(|p| sample(p, ticks)).transpose()?;
    let pushed_during_joins: usize = nodes
        .iter()
        .map(|j| lock(&j.log).iter().map(|r| r.bytes).sum::<usize>())
        .sum();
    let msgs_during_joins: usize = nodes.iter().map(|j| lock(&j.log).len()).sum();

    // Idle with everyone connected.
    tokio::time::sleep(Duration::from_secs(args.idle)).await;
    let after_idle = args.controller_pid.map(|p| sample(p, ticks)).transpose()?;

    // Phase 2: one more node joins.
    let from = Instant::now();
    let extra_endpoint = endpoints[0].clone();
    let mut extra = join(
        &Plan {
            controllers: plan.controllers.clone(),
            key: plan.key,
            token: plan.token.clone(),
            heartbeat: None,
        },
        &extra_endpoint,
        n,
        format!("load-{run}-extra"),
        extra_secret,
        watched,
    )
    .await
    .context("the extra node's join")?;
    let join_spread = spread(
        &nodes,
        from,
        extra.welcome_at,
        Duration::from_secs(10),
        |r| r.adds_watched,
    )
    .await;

    // Phase 3: it leaves.
    settle(&nodes, Duration::from_millis(500), Duration::from_secs(10)).await;
    let from = Instant::now();
    let mut leave_spread = None;
    if let Some(tx) = extra.tx.as_mut() {
        tx.send(&ClientMsg::Leave.encode())
            .await
            .context("send leave")?;
        let sent = Instant::now();
        leave_spread = Some(
            spread(&nodes, from, sent, Duration::from_secs(10), |r| {
                r.removes_watched
            })
            .await,
        );
    }
    extra.conn.close(quinn::VarInt::from_u32(0), b"done");

    let idle_cpu_pct = match (after_joins, after_idle) {
        (Some(a), Some(b)) => {
            Some((b.cpu - a.cpu).as_secs_f64() / b.at.duration_since(a.at).as_secs_f64() * 100.0)
        }
        _ => None,
    };
    let join_cpu = match (before_joins, after_joins) {
        (Some(a), Some(b)) => Some((b.cpu - a.cpu).as_secs_f64()),
        _ => None,
    };
    let rss_mib = after_joins.map(|s| s.rss_kib as f64 / 1024.0);
    let rate = if join_span.is_zero() {
        0.0
    } else {
        (nodes.len().saturating_sub(1)) as f64 / join_span.as_secs_f64()
    };

    if args.json {
        let out = serde_json::json!({
            "nodes": n,
            "joined": nodes.len(),
            "failed": failures.len(),
            "first_failure": failures.first(),
            "concurrency": args.concurrency,
            "controllers": plan.controllers.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "join_span_s": join_span.as_secs_f64(),
            "join_from_start_s": since_start.as_secs_f64(),
            "joins_per_s": rate,
            "converged_s": converged.map(|d| d.as_secs_f64()),
            "settle_s": settled_after.as_secs_f64(),
            "pushed_during_joins_bytes": pushed_during_joins,
            "pushed_during_joins_messages": msgs_during_joins,
            "controller_cpu_joins_s": join_cpu,
            "controller_rss_mib": rss_mib,
            "controller_idle_cpu_pct": idle_cpu_pct,
            "idle_s": args.idle,
            "extra_join": spread_json(&join_spread, nodes.len()),
            "extra_leave": leave_spread.as_ref().map(|s| spread_json(s, nodes.len())),
        });
        println!("{out}");
    } else {
        println!(
            "{} of {n} nodes joined ({} failed) in {:.2} s from the first Welcome to the last ({:.2} s from the start): {rate:.0} joins/s",
            nodes.len(),
            failures.len(),
            join_span.as_secs_f64(),
            since_start.as_secs_f64(),
        );
        if let Some(f) = failures.first() {
            println!("  first failure: {f}");
        }
        match converged {
            Some(d) => println!(
                "  every node knew every other {:.2} s after the last Welcome",
                d.as_secs_f64()
            ),
            None => println!(
                "  not every node knew every other after {} s (--settle-max)",
                args.settle_max
            ),
        }
        println!(
            "  pushes until quiet ({:.1} s after the last join): {msgs_during_joins} messages, {pushed_during_joins} bytes to all nodes",
            settled_after.as_secs_f64()
        );
        if let (Some(cpu), Some(rss), Some(idle)) = (join_cpu, rss_mib, idle_cpu_pct) {
            println!(
                "  controller: {cpu:.2} s CPU for the joins, {rss:.1} MiB resident after them, {idle:.1}% of a core idle over {} s",
                args.idle
            );
        }
        spread_text("one more join", &join_spread, nodes.len());
        if let Some(s) = &leave_spread {
            spread_text("its leave", s, nodes.len());
        }
    }
    for j in &nodes {
        j.conn.close(quinn::VarInt::from_u32(0), b"done");
    }
    for e in &endpoints {
        let _ = tokio::time::timeout(Duration::from_secs(2), e.wait_idle()).await;
    }
    Ok(())
}
