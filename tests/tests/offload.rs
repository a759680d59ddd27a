//! TUN offloads (issue 18): mesh0 is opened with offloads, so the kernel hands over TCP
//! super-packets that the agent splits, and gets coalesced TCP segments back. What users check:
//! every byte of TCP streams of many sizes and write patterns arrives unchanged both ways
//! (checksummed by the application, as the kernel's own checksums are what offload could get
//! wrong), UDP datagrams of every size up to the MTU come back unchanged, a fast run of
//! full-size datagrams of one flow arrives whole (the receiving agent writes it coalesced, in
//! more than one IP packet's worth: flannel's VXLAN is such a flow), and the agent says
//! the device has offloads and its UDP socket the buffers it asked for. The same holds with
//! offloads off, the fallback for kernels that refuse them.
#![allow(clippy::unwrap_used)]

use mesh_e2e::process::Proc;
use mesh_e2e::{Agent, Controller, Host, Lab};
use std::time::Duration;

const NET: &str = "offload";

/// Serves on the overlay: TCP on 5301 (each connection sends an 8-byte length and that many
/// bytes, and gets their SHA-256 back), UDP on 5302 (each datagram echoed).
const SERVER: &str = r#"
import hashlib, socket, struct, sys, threading
def udp():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(('0.0.0.0', 5302))
    while True:
        d, a = u.recvfrom(65535)
        u.sendto(d, a)
threading.Thread(target=udp, daemon=True).start()
def burst():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE: nothing lost here
    u.bind(('0.0.0.0', 5303))
    expected = bytes((i * 7) % 256 for i in range(1392))
    seen, bad = set(), 0
    while True:
        d, a = u.recvfrom(65535)
        if d == b'?':
            u.sendto(f'{len(seen)} {bad}'.encode(), a)
            seen, bad = set(), 0
        elif len(d) == 1392 and d[4:] == expected[4:]:
            seen.add(d[:4])
        else:
            bad += 1
threading.Thread(target=burst, daemon=True).start()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('0.0.0.0', 5301)); s.listen(4)
print('listening', flush=True)
while True:
    c, _ = s.accept(); c.settimeout(60)
    def exact(n):
        b = bytearray()
        while len(b) < n:
            d = c.recv(min(1 << 20, n - len(b)))
            if not d: raise SystemExit('stream ended early')
            b += d
        return bytes(b)
    n = struct.unpack('!Q', exact(8))[0]
    h = hashlib.sha256()
    left = n
    while left:
        d = c.recv(min(1 << 20, left))
        if not d: raise SystemExit('stream ended early')
        h.update(d); left -= len(d)
    c.sendall(h.digest()); c.close()
"#;

/// Sends streams of many sizes in writes of varying sizes to `sys.argv[1]` and compares the
/// digests; then UDP datagrams of every size from 1 to the largest that fits mesh0's MTU.
/// Prints one line per failure, and `done` at the end.
const CLIENT: &str = r#"
import hashlib, os, random, socket, struct, sys
peer = sys.argv[1]
rng = random.Random(18)
for size in [1, 100, 1379, 1380, 1381, 65535, 65536, 262147, 4_000_000, 24_000_000]:
    data = os.urandom(size)
    c = socket.create_connection((peer, 5301), timeout=60)
    if size % 2:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c.sendall(struct.pack('!Q', size))
    at = 0
    while at < size:
        step = rng.choice([1, 7, 536, 1380, 1448, 9000, 65536, 1 << 20])
        c.sendall(data[at:at + step]); at += step
    got = b''
    while len(got) < 32:
        d = c.recv(32 - len(got))
        if not d: break
        got += d
    if got != hashlib.sha256(data).digest():
        print(f'tcp {size}: digest differs', flush=True)
    c.close()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(1)
lost = 0
for size in list(range(1, 1393)):
    data = os.urandom(size)
    for attempt in range(3):
        u.sendto(data, (peer, 5302))
        try:
            d, _ = u.recvfrom(65535)
        except socket.timeout:
            continue
        if d != data:
            print(f'udp {size}: echo differs ({len(d)} bytes)', flush=True)
        break
    else:
        lost += 1
if lost:
    print(f'udp: {lost} sizes never echoed', flush=True)
# One flow in runs of 64 datagrams of the largest size mesh0 carries: the receiving agent
# gets a run as one batch and writes it coalesced (more than fits one IP packet).
import time
b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); b.settimeout(2)
payload = bytearray((i * 7) % 256 for i in range(1392))
sent = 0
for run in range(100):
    for i in range(64):
        payload[:4] = struct.pack('!I', sent); sent += 1
        b.sendto(payload, (peer, 5303))
    time.sleep(0.005)
time.sleep(1)
b.sendto(b'?', (peer, 5303))
got, bad = map(int, b.recvfrom(100)[0].split())
if got < sent * 99 // 100 or bad:
    print(f'udp burst: {got} of {sent} datagrams arrived, {bad} malformed', flush=True)
print('done', flush=True)
"#;

fn serve(lab: &Lab, host: &Host) -> Proc {
    let p = Proc::spawn(
        &host.ns,
        &lab.log_dir(),
        &format!("{}-server", host.name),
        "timeout",
        ["300", "python3", "-c", SERVER],
    )
    .unwrap();
    let ns = host.ns.clone();
    assert!(
        mesh_e2e::wait_until(Duration::from_secs(10), || {
            mesh_e2e::netns::ip(["netns", "exec", &ns, "ss", "-H", "-l", "-t", "-n"])
                .map(|o| o.contains(":5301"))
                .unwrap_or(false)
        }),
        "the server on {} did not start",
        host.name
    );
    p
}

/// An agent joined on `host` with `env` set (`NAME=value`).
fn join_with(lab: &Lab, host: &Host, token: &str, env: &[&str]) -> Agent {
    let mesh = mesh_e2e::mesh_bin().unwrap();
    let state = lab.state_dir(&host.name).unwrap();
    let mut args: Vec<&str> = env.to_vec();
    args.extend([
        mesh.to_str().unwrap(),
        "join",
        token,
        "--name",
        &host.name,
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    Agent::spawn(lab, host, &host.name, "env", args).unwrap()
}

fn exchange(from: &Agent, to: &Agent) {
    let out = from.host.run(
        "timeout",
        ["240", "python3", "-c", CLIENT, &to.address.to_string()],
    );
    assert!(
        out.success() && out.stdout.trim_end() == "done",
        "{} -> {}: {out}",
        from.host.name,
        to.host.name
    );
}

#[test]
fn streams_and_datagrams_of_every_size_arrive_unchanged_through_an_offloading_mesh0() {
    let mut lab = Lab::new("offload").unwrap();
    let ctl_host = lab.add_controller_host("ctl").unwrap();
    let a_host = lab.add_host("a").unwrap();
    let b_host = lab.add_host("b").unwrap();
    let ctl = Controller::start(&lab, &ctl_host).unwrap();
    ctl.create_network(NET).unwrap();
    let token = ctl.create_token(NET, &["--reusable"]).unwrap();
    // With decryption on its thread too (off unless asked).
    let a = join_with(&lab, &a_host, &token, &["MESH_OPEN_THREAD=1"]);
    let b = join_with(&lab, &b_host, &token, &["MESH_OPEN_THREAD=1"]);
    for agent in [&a, &b] {
        let status = agent.status().unwrap();
        assert_eq!(
            status["counters"]["tun_offload"], 1,
            "mesh0 without offloads on {}: {:#}",
            agent.host.name, status["counters"]
        );
        let text = agent.cli(["status"]).stdout;
        assert!(
            text.contains("datapath  mesh0 with offloads")
                && text.contains("batches encrypted and decrypted on threads of their own")
                && text.contains("TUN writes on a thread of their own")
                && text.contains("UDP buffers 7.0 MiB in"),
            "{text}"
        );
        // Run as root, the agent gets the socket buffers it asks for past rmem_max.
        let c = &status["counters"];
        assert!(
            c["udp_recv_buffer"].as_u64().unwrap() >= 7 << 20
                && c["udp_send_buffer"].as_u64().unwrap() >= 7 << 20
                && c["udp_buffers_refused"] == 0,
            "{c:#}"
        );
    }
    assert!(a.host.wait_ping(b.address, Duration::from_secs(20)));
    // A ping's packets, one at a time, went out from the loop itself (no wake-up of a writer
    // thread in its round trip): b wrote the request to mesh0 and sent the reply that way.
    let c = b.status().unwrap()["counters"].clone();
    assert!(
        c["tun_inline"].as_u64().unwrap() > 0 && c["udp_inline"].as_u64().unwrap() > 0,
        "{c:#}"
    );
    let _servers = (serve(&lab, &a.host), serve(&lab, &b.host));
    exchange(&a, &b);
    exchange(&b, &a);
    // The kernel did hand over super-packets: fewer reads than packets.
    let counters = a.status().unwrap()["counters"].clone();
    let (reads, packets) = (
        counters["tun_reads"].as_u64().unwrap(),
        counters["tun_rx"].as_u64().unwrap(),
    );
    eprintln!("offload: a read {packets} packets from mesh0 in {reads} reads");
    assert!(reads < packets, "{counters:#}");
    assert_eq!(counters["tun_write_errors"], 0, "{counters:#}");
    // The streams' batches were encrypted on the sealing thread (and arrived whole, above).
    let sealed = counters["sealed_off_loop"].as_u64().unwrap();
    eprintln!("offload: a sealed {sealed} datagrams off the loop");
    assert!(sealed * 2 > packets, "{counters:#}");
    // And b decrypted them on its opening thread: most of what it received came back from
    // there (a lone message b opens itself).
    let bc = b.status().unwrap()["counters"].clone();
    let (opened, received) = (
        bc["opened_off_loop"].as_u64().unwrap(),
        bc["udp_rx"].as_u64().unwrap(),
    );
    eprintln!("offload: b opened {opened} of {received} datagrams off the loop");
    assert!(opened * 2 > received, "{bc:#}");
    // And took coalesced ones back: the kernel counts each write into b's mesh0 as one
    // received packet, and a's streams arrived in far fewer writes than the packets b's agent
    // handed its writer (each segment of a flow written alone would be one write per packet).
    let written = b.status().unwrap()["counters"]["tun_tx"].as_u64().unwrap();
    let out = b
        .host
        .run("cat", ["/sys/class/net/mesh0/statistics/rx_packets"]);
    let writes: u64 = out
        .stdout
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{out}"));
    eprintln!("offload: b wrote {written} packets to mesh0 in {writes} writes");
    assert!(
        writes * 4 < written,
        "b's packets were not coalesced: {written} packets in {writes} writes"
    );
    drop((a, b, ctl, lab));
}

/// The fallbacks: where a kernel refuses offloads (forced here with `MESH_TUN_OFFLOAD=0`, the
/// documented way out) mesh0 is opened without them, the log and `mesh status` say so, one
/// packet goes per read and write; and with `MESH_SEAL_THREAD=0` (as on one core) and the
/// opening thread left off (its default) the loop encrypts and decrypts everything itself. The same streams and datagrams still arrive unchanged.
#[test]
fn without_offloads_the_same_bytes_arrive_and_status_says_so() {
    let mut lab = Lab::new("nooffload").unwrap();
    let ctl_host = lab.add_controller_host("ctl").unwrap();
    let hosts = [lab.add_host("a").unwrap(), lab.add_host("b").unwrap()];
    let ctl = Controller::start(&lab, &ctl_host).unwrap();
    ctl.create_network(NET).unwrap();
    let token = ctl.create_token(NET, &["--reusable"]).unwrap();
    let agents: Vec<Agent> = hosts
        .iter()
        .map(|h| {
            join_with(
                &lab,
                h,
                &token,
                &[
                    "MESH_TUN_OFFLOAD=0",
                    "MESH_SEAL_THREAD=0",
                    "MESH_TUN_THREAD=0",
                ],
            )
        })
        .collect();
    let (a, b) = (&agents[0], &agents[1]);
    for agent in [a, b] {
        let status = agent.status().unwrap();
        assert_eq!(
            (
                &status["counters"]["tun_offload"],
                &status["counters"]["seal_thread"],
                &status["counters"]["open_thread"],
                &status["counters"]["tun_write_thread"]
            ),
            (&0.into(), &0.into(), &0.into(), &0.into()),
            "{:#}",
            status["counters"]
        );
        let text = agent.cli(["status"]).stdout;
        assert!(
            text.contains("datapath  mesh0 without offloads")
                && !text.contains("on a thread")
                && !text.contains("on threads"),
            "{text}"
        );
        assert!(
            agent.stderr().contains("opened without offloads")
                && agent.stderr().contains("MESH_TUN_OFFLOAD=0"),
            "{}",
            agent.stderr()
        );
    }
    assert!(a.host.wait_ping(b.address, Duration::from_secs(20)));
    let _servers = (serve(&lab, &a.host), serve(&lab, &b.host));
    exchange(a, b);
    exchange(b, a);
    let counters = a.status().unwrap()["counters"].clone();
    assert_eq!(
        counters["tun_reads"], counters["tun_rx"],
        "one packet per read: {counters:#}"
    );
    assert_eq!(counters["sealed_off_loop"], 0, "{counters:#}");
    assert_eq!(counters["opened_off_loop"], 0, "{counters:#}");
    assert_eq!(counters["tun_write_errors"], 0, "{counters:#}");
    drop((agents, ctl, lab));
}
