//! Recovery when a direct path dies (issue 10, part 2), measured as a user would see it:
//!
//! - two nodes on a direct path carry a checksummed TCP stream; their UDP to each other is cut
//!   by nftables (the relay in the controller stays reachable): traffic flows over the relay
//!   less than 3 s after the cut, and the stream survives whole;
//! - when the cut is lifted, both sides are back on the direct path within 15 s;
//! - after `kill -9` of the controller, `mesh status --json` says it is disconnected within 10 s.
//!
//! Every figure is printed (seconds with ms precision) before the limits are checked, so a run
//! that fails still reports all of them.
#![allow(clippy::unwrap_used)]

use mesh_e2e::netns::Host;
use mesh_e2e::{wait_for, wait_until, Agent, Controller, Lab, Proc};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const NET: &str = "recovery";
/// TCP port of the checksummed stream.
const STREAM_PORT: u16 = 5210;
/// Rate of the stream: 1 MB/s, well within what the relay carries.
const STREAM_RATE: u64 = 1_000_000;
/// Interval of the ping that watches the path (50 per second).
const PING_INTERVAL: &str = "0.02";
/// Traffic must flow over the relay this soon after the direct path dies (issue 10).
const TO_RELAY_LIMIT: Duration = Duration::from_secs(3);
/// Both sides must be on the direct path again this soon after it returns (issue 10).
const BACK_TO_DIRECT_LIMIT: Duration = Duration::from_secs(15);
/// `mesh status` must say the controller is gone this soon after it died (issue 10).
const CONTROLLER_LOSS_LIMIT: Duration = Duration::from_secs(10);
/// How long a figure is measured beyond its limit, so that a failure says how long it took.
const MEASURE_TIMEOUT: Duration = Duration::from_secs(40);
/// How long the direct path stays dead: 20 s, as in the measurement. A real outage (a
/// link flap, a firewall reload) lasts long enough for the probes of the dead path to back off,
/// so the test must see how soon after such an outage the path is used again, not only after a
/// blip. (The code before issue 10 backs off its probe rounds on the relay, so the wait depends
/// on where the outage ends: measured 0.4 s after a 7 s outage, 15.4 to 15.7 s after 20 s,
/// 1.4 to 1.6 s after 40 s.)
const OUTAGE: Duration = Duration::from_secs(20);
/// Bytes the stream must move past a point to count as flowing again: more than could have been
/// in flight at that point (1 MB/s over a sub-millisecond path).
const FLOWING_AGAIN: u64 = 256 * 1024;

fn stream_bin() -> &'static str {
    env!("CARGO_BIN_EXE_mesh-e2e-stream")
}

fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Cuts all UDP between `host` and `peer` in both directions (one nftables table in `host`),
/// as a firewall that starts dropping the flow would. The controller, and so the relay it
/// embeds, stays reachable.
fn cut_udp(host: &Host, peer: Ipv4Addr) {
    host.nft(&format!(
        "table inet cutdirect {{ \
         chain out {{ type filter hook output priority 0; ip daddr {peer} meta l4proto udp drop; }}; \
         chain in {{ type filter hook input priority 0; ip saddr {peer} meta l4proto udp drop; }}; }}"
    ))
    .unwrap();
}

fn restore_udp(host: &Host) {
    host.nft("delete table inet cutdirect").unwrap();
}

fn path_of(a: &Agent, peer: &str) -> String {
    a.peer(peer)
        .ok()
        .and_then(|p| p["path"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// The stream receiver's progress lines `at UNIX_MS TOTAL`, as (unix seconds, total bytes).
fn arrivals(receiver: &Proc) -> Vec<(f64, u64)> {
    receiver
        .stdout()
        .lines()
        .filter_map(|l| l.strip_prefix("at "))
        .filter_map(|l| {
            let (ms, total) = l.split_once(' ')?;
            Some((ms.parse::<f64>().ok()? / 1000.0, total.parse().ok()?))
        })
        .collect()
}

/// Bytes the receiver had got by unix time `t`.
fn received_by(receiver: &Proc, t: f64) -> u64 {
    arrivals(receiver)
        .iter()
        .take_while(|(at, _)| *at <= t)
        .last()
        .map_or(0, |(_, n)| *n)
}

/// Waits until the receiver has more than `bytes`; the unix time it got there.
fn wait_received(receiver: &Proc, bytes: u64, timeout: Duration) -> Option<f64> {
    wait_for(timeout, || {
        arrivals(receiver)
            .into_iter()
            .find(|(_, n)| *n > bytes)
            .map(|(t, _)| t)
    })
}

/// The answers a `ping -D` printed: (unix time the answer came, round-trip seconds).
fn ping_answers(out: &str) -> Vec<(f64, f64)> {
    out.lines()
        .filter_map(|l| {
            let (stamp, rest) = l.strip_prefix('[')?.split_once(']')?;
            let rtt = rest.split("time=").nth(1)?.split_whitespace().next()?;
            Some((stamp.parse().ok()?, rtt.parse::<f64>().ok()? / 1000.0))
        })
        .collect()
}

/// The longest pause between two arrivals of the stream after unix time `from`: (start, length).
fn longest_stall(arrivals: &[(f64, u64)], from: f64) -> Option<(f64, f64)> {
    arrivals
        .windows(2)
        .filter(|w| w[1].0 > from)
        .map(|w| (w[0].0, w[1].0 - w[0].0))
        .max_by(|a, b| a.1.total_cmp(&b.1))
}

#[test]
fn traffic_moves_to_the_relay_within_3s_and_back_to_direct_within_15s_and_the_stream_survives() {
    let mut lab = Lab::new("path-recovery").unwrap();
    let ctl_host = lab.add_controller_host("ctl").unwrap();
    let a_host = lab.add_host("a").unwrap();
    let b_host = lab.add_host("b").unwrap();
    let ctl = Controller::start(&lab, &ctl_host).unwrap();
    ctl.create_network(NET).unwrap();
    let token = ctl.create_token(NET, &["--reusable"]).unwrap();
    let a = Agent::join(&lab, &a_host, "a", &token).unwrap();
    let b = Agent::join(&lab, &b_host, "b", &token).unwrap();

    // Ready: a direct path both ways.
    assert!(
        a_host.wait_ping(b.address, Duration::from_secs(20)),
        "a cannot ping b over the overlay: {:#}",
        a.status().unwrap()
    );
    assert!(
        wait_until(Duration::from_secs(30), || {
            let _ = a_host.ping(b.address);
            path_of(&a, "b") == "direct" && path_of(&b, "a") == "direct"
        }),
        "precondition: a and b never went direct on a flat network: a: {:#}\nb: {:#}",
        a.status().unwrap(),
        b.status().unwrap()
    );

    // The checksummed stream a -> b over the overlay.
    let mut receiver = lab
        .spawn(
            &b_host,
            "stream-recv",
            stream_bin(),
            ["recv".to_string(), STREAM_PORT.to_string()],
        )
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || receiver
            .stdout()
            .starts_with("listening")),
        "the stream receiver did not start: {}",
        receiver.log()
    );
    let stop = lab.dir().join("stop-stream");
    let mut sender = lab
        .spawn(
            &a_host,
            "stream-send",
            stream_bin(),
            [
                "send".to_string(),
                SocketAddrV4::new(b.address, STREAM_PORT).to_string(),
                STREAM_RATE.to_string(),
                stop.display().to_string(),
            ],
        )
        .unwrap();
    assert!(
        wait_received(&receiver, FLOWING_AGAIN, Duration::from_secs(20)).is_some(),
        "the stream does not flow over the direct path: {}\n{}",
        sender.log(),
        receiver.log()
    );

    // What a user sees: the ping of a monitoring job, 50 a second with `-D` timestamps. The
    // first answer to a request sent after the cut has crossed the relay both ways, so the time
    // from the cut to it is when traffic flows over the relay. (The TCP stream's own stall is
    // printed too, but it is longer by TCP's retransmission backoff: after a 5 s outage TCP
    // retries only at about 6.2 s, after a 2.5 s one at about 3 s.)
    let mut pinger = lab
        .spawn(
            &a_host,
            "ping-watch",
            "ping",
            ["-D", "-n", "-i", PING_INTERVAL, &b.address.to_string()],
        )
        .unwrap();
    assert!(
        // (ping's output is block-buffered in a file: the first lines show after a second or so.)
        wait_until(Duration::from_secs(10), || !ping_answers(&pinger.stdout())
            .is_empty()),
        "the watching ping got no answer before the cut: {}",
        pinger.log()
    );

    // The direct path dies.
    let load_at_cut = load();
    cut_udp(&a_host, b_host.ip);
    let cut = Instant::now();
    let cut_unix = unix_now();
    let before_cut = received_by(&receiver, cut_unix);

    // Both sides' status, polled until they say relay.
    let mut a_relay: Option<Duration> = None;
    let mut b_relay: Option<Duration> = None;
    wait_until(MEASURE_TIMEOUT, || {
        if a_relay.is_none() && path_of(&a, "b") == "relay" {
            a_relay = Some(cut.elapsed());
        }
        if b_relay.is_none() && path_of(&b, "a") == "relay" {
            b_relay = Some(cut.elapsed());
        }
        a_relay.is_some() && b_relay.is_some()
    });
    // The stream moves again (TCP retransmits on its own schedule).
    let stream_back = wait_received(&receiver, before_cut + FLOWING_AGAIN, MEASURE_TIMEOUT);
    // ping prints through stdio, which it flushes when SIGINT ends it.
    pinger.signal(libc::SIGINT);
    pinger.wait_exit(Duration::from_secs(5));
    let answers = ping_answers(&pinger.stdout());
    let ping_back = answers
        .iter()
        .find(|(at, rtt)| at - rtt > cut_unix)
        .map(|(at, _)| Duration::from_secs_f64((at - cut_unix).max(0.0)));
    let stall = longest_stall(&arrivals(&receiver), cut_unix - 1.0);
    // The rest of the outage: not a wait for readiness but the length of the scenario.
    std::thread::sleep(OUTAGE.saturating_sub(cut.elapsed()));
    let outage = cut.elapsed();

    // The direct path returns.
    restore_udp(&a_host);
    let restored = Instant::now();
    let back_direct = wait_for(MEASURE_TIMEOUT, || {
        (path_of(&a, "b") == "direct" && path_of(&b, "a") == "direct").then(|| restored.elapsed())
    });
    let load_after = load();

    // The stream on the direct path, then its end: every byte arrived, in order, no reset.
    let now_received = received_by(&receiver, unix_now());
    let flowing_direct = wait_received(
        &receiver,
        now_received + FLOWING_AGAIN,
        Duration::from_secs(30),
    );
    std::fs::write(&stop, b"").unwrap();
    let sender_status = sender.wait_exit(Duration::from_secs(90));
    let receiver_status = receiver.wait_exit(Duration::from_secs(30));
    let sent = sender
        .stdout()
        .lines()
        .find_map(|l| l.strip_prefix("sent ").map(str::to_owned));
    let done = receiver
        .stdout()
        .lines()
        .find_map(|l| l.strip_prefix("done ").map(str::to_owned));

    let show = |d: Option<Duration>| d.map_or(format!("none within {MEASURE_TIMEOUT:?}"), secs);
    eprintln!("path recovery figures (load average {load_at_cut} at the cut, {load_after} after):");
    eprintln!(
        "  cut -> first ping answered through the relay: {} (limit {})",
        show(ping_back),
        secs(TO_RELAY_LIMIT)
    );
    eprintln!(
        "  cut -> `mesh status` says relay: on a {}, on b {}",
        show(a_relay),
        show(b_relay)
    );
    eprintln!(
        "  cut -> TCP stream moving again: {}; its longest stall {}",
        show(stream_back.map(|t| Duration::from_secs_f64((t - cut_unix).max(0.0)))),
        stall.map_or("none".into(), |(start, len)| format!(
            "{} from {:+.3} s",
            secs(Duration::from_secs_f64(len)),
            start - cut_unix
        ))
    );
    eprintln!(
        "  path back after {} -> direct on both sides: {} (limit {})",
        secs(outage),
        show(back_direct),
        secs(BACK_TO_DIRECT_LIMIT)
    );
    eprintln!(
        "  stream: sender `{}`, receiver `{}`",
        sent.as_deref().unwrap_or("?"),
        done.as_deref().unwrap_or("?")
    );

    let mut failures = Vec::new();
    match ping_back {
        Some(t) if t < TO_RELAY_LIMIT => {}
        Some(t) => failures.push(format!(
            "traffic flowed over the relay only {} after the direct path died (limit {})",
            secs(t),
            secs(TO_RELAY_LIMIT)
        )),
        None => failures.push(format!(
            "no ping got through the relay within {MEASURE_TIMEOUT:?} of the cut"
        )),
    }
    match back_direct {
        Some(t) if t <= BACK_TO_DIRECT_LIMIT => {}
        Some(t) => failures.push(format!(
            "back on the direct path only {} after it returned (limit {})",
            secs(t),
            secs(BACK_TO_DIRECT_LIMIT)
        )),
        None => failures.push(format!(
            "not back on the direct path {MEASURE_TIMEOUT:?} after it returned: a: {:#}\nb: {:#}",
            a.status().unwrap(),
            b.status().unwrap()
        )),
    }
    if stream_back.is_none() || flowing_direct.is_none() {
        failures.push(format!(
            "the TCP stream stopped moving (after the cut: {}, after the path returned: {})",
            stream_back.is_some(),
            flowing_direct.is_some()
        ));
    }
    let intact = matches!((&sent, &done), (Some(s), Some(d)) if s == d)
        && sender_status.is_some_and(|s| s.success())
        && receiver_status.is_some_and(|s| s.success());
    if !intact {
        failures.push(format!(
            "the TCP stream did not survive whole (sent: {sent:?}, received: {done:?}):\n{}\n{}",
            sender.log(),
            receiver.log()
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn status_says_the_controller_is_gone_within_10s_of_kill_9() {
    let mut lab = Lab::new("controller-loss").unwrap();
    let ctl_host = lab.add_controller_host("ctl").unwrap();
    let a_host = lab.add_host("a").unwrap();
    let b_host = lab.add_host("b").unwrap();
    let mut ctl = Controller::start(&lab, &ctl_host).unwrap();
    ctl.create_network(NET).unwrap();
    let token = ctl.create_token(NET, &["--reusable"]).unwrap();
    let a = Agent::join(&lab, &a_host, "a", &token).unwrap();
    let b = Agent::join(&lab, &b_host, "b", &token).unwrap();
    let connected = |agent: &Agent| {
        agent
            .status()
            .ok()
            .and_then(|s| s["controller"]["connected"].as_bool())
    };
    assert!(
        wait_until(Duration::from_secs(20), || connected(&a) == Some(true)
            && connected(&b) == Some(true)),
        "precondition: the agents never said they were connected: {:#}",
        a.status().unwrap()
    );
    assert!(a_host.wait_ping(b.address, Duration::from_secs(20)));

    let load_at_kill = load();
    ctl.kill9();
    let killed = Instant::now();
    let mut a_gone: Option<Duration> = None;
    let mut b_gone: Option<Duration> = None;
    wait_until(MEASURE_TIMEOUT, || {
        if a_gone.is_none() && connected(&a) == Some(false) {
            a_gone = Some(killed.elapsed());
        }
        if b_gone.is_none() && connected(&b) == Some(false) {
            b_gone = Some(killed.elapsed());
        }
        a_gone.is_some() && b_gone.is_some()
    });
    let show = |d: Option<Duration>| d.map_or(format!("not within {MEASURE_TIMEOUT:?}"), secs);
    eprintln!(
        "controller kill -9 -> `mesh status` says disconnected: on a {}, on b {} (limit {}; load \
         average {load_at_kill})",
        show(a_gone),
        show(b_gone),
        secs(CONTROLLER_LOSS_LIMIT)
    );
    let status = a.status().unwrap();
    eprintln!("  a's controller status then: {}", status["controller"]);
    // The mesh itself keeps working without the controller.
    assert!(
        a_host.wait_ping(b.address, Duration::from_secs(5)),
        "the overlay stopped working with the controller: {status:#}"
    );
    for (name, gone) in [("a", a_gone), ("b", b_gone)] {
        match gone {
            Some(t) => assert!(
                t <= CONTROLLER_LOSS_LIMIT,
                "{name}'s `mesh status` said the controller was disconnected only {} after kill -9 \
                 (limit {})",
                secs(t),
                secs(CONTROLLER_LOSS_LIMIT)
            ),
            None => panic!(
                "{name}'s `mesh status` still said the controller was connected \
                 {MEASURE_TIMEOUT:?} after kill -9: {status:#}"
            ),
        }
    }
}
