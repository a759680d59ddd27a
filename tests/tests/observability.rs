//! Prometheus endpoints of the agent and the controller over real HTTP, and the precedence of
//! flags over the configuration file over built-in defaults.
#![allow(clippy::unwrap_used)]

use mesh_e2e::daemons::udp_port_bound;
use mesh_e2e::{controller_bin, netns::ip, run, wait_all_pairs_ping, wait_for, Agent, Lab, Proc};
use std::time::Duration;

use mesh_e2e::{metric_value as value, scrape_metrics as scrape};

#[test]
fn agent_and_controller_export_metrics() {
    let mut lab = Lab::new("metrics").unwrap();
    let ctl_host = lab.add_controller_host("ctl").unwrap();
    let a_host = lab.add_host("a").unwrap();
    let b_host = lab.add_host("b").unwrap();
    let ctl_state = lab.state_dir("ctl").unwrap();
    let ctl_bin = controller_bin().unwrap();
    let _ctl = Proc::spawn(
        &ctl_host.ns,
        &lab.log_dir(),
        "ctl-serve",
        &ctl_bin,
        [
            "serve",
            "--listen",
            "192.0.2.1:7443",
            "--metrics-listen",
            "127.0.0.1:9102",
            "--state-dir",
            ctl_state.to_str().unwrap(),
        ],
    )
    .unwrap();
    assert!(mesh_e2e::wait_until(Duration::from_secs(10), || {
        udp_port_bound(&ctl_host.ns, 7443)
    }));
    let admin = |args: &[&str]| {
        let mut v: Vec<&str> = args.to_vec();
        v.extend(["--state-dir", ctl_state.to_str().unwrap()]);
        run(&ctl_host.ns, &ctl_bin, v)
    };
    assert!(admin(&["network", "create", "obs"]).success());
    let token = admin(&["token", "create", "obs", "--reusable"])
        .stdout
        .trim()
        .to_owned();
    let a = Agent::join_with(
        &lab,
        &a_host,
        "a",
        &token,
        &["--metrics-listen", "127.0.0.1:9101"],
    )
    .unwrap();
    let b = Agent::join(&lab, &b_host, "b", &token).unwrap();
    wait_all_pairs_ping(&[&a, &b], Duration::from_secs(20)).unwrap();

    let text = wait_for(Duration::from_secs(10), || {
        let t = scrape(&a_host.ns, 9101)?;
        // Traffic may start on the relay; on a flat LAN the direct path follows shortly.
        let ready = value(&t, "mesh_peer_rx_bytes_total{peer=\"b\"")? > 0.0
            && value(&t, "mesh_peer_path_direct{peer=\"b\"")? == 1.0;
        ready.then_some(t)
    })
    .unwrap_or_else(|| panic!("agent metrics: {:?}", scrape(&a_host.ns, 9101)));
    assert_eq!(value(&text, "mesh_node_up"), Some(1.0));
    assert_eq!(value(&text, "mesh_controller_connected"), Some(1.0));
    assert_eq!(value(&text, "mesh_peer_path_direct{peer=\"b\""), Some(1.0));
    assert!(value(&text, "mesh_peer_tx_bytes_total{peer=\"b\"").unwrap() > 0.0);
    assert!(value(&text, "mesh_peer_last_handshake_seconds{peer=\"b\"").is_some());
    assert!(text.contains("mesh_dropped_packets_total{reason=\"malformed\"}"));

    let text = wait_for(Duration::from_secs(10), || {
        let t = scrape(&ctl_host.ns, 9102)?;
        (value(&t, "mesh_controller_nodes_online{network=\"obs\"}")? == 2.0).then_some(t)
    })
    .unwrap_or_else(|| panic!("controller metrics: {:?}", scrape(&ctl_host.ns, 9102)));
    assert_eq!(
        value(&text, "mesh_controller_nodes{network=\"obs\"}"),
        Some(2.0)
    );
    // The embedded relay reports in the same exposition: both nodes are connected to it.
    assert_eq!(
        value(&text, "mesh_relay_nodes_connected"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(text.matches("# EOF").count(), 1, "{text}");
}

#[test]
fn flags_win_over_the_config_file_which_wins_over_defaults() {
    let mut lab = Lab::new("config").unwrap();
    let ctl_host = lab.add_controller_host("ctl").unwrap();
    let a_host = lab.add_host("a").unwrap();
    let b_host = lab.add_host("b").unwrap();
    let ctl = mesh_e2e::Controller::start(&lab, &ctl_host).unwrap();
    ctl.create_network("cfg").unwrap();
    let token = ctl.create_token("cfg", &["--reusable"]).unwrap();
    let conf = lab.dir().join("mesh.toml");
    std::fs::write(&conf, "mtu = 1380\nport = 41641\n").unwrap();
    let conf = conf.to_str().unwrap().to_owned();

    let a = Agent::join_with(&lab, &a_host, "a", &token, &["--config", conf.as_str()]).unwrap();
    let b = Agent::join_with(
        &lab,
        &b_host,
        "b",
        &token,
        &["--config", conf.as_str(), "--mtu", "1400"],
    )
    .unwrap();
    let mtu_of = |ns: &str| {
        ip(["-n", ns, "link", "show", "mesh0"])
            .unwrap()
            .split_whitespace()
            .skip_while(|w| *w != "mtu")
            .nth(1)
            .unwrap()
            .to_owned()
    };
    assert_eq!(mtu_of(&a_host.ns), "1380", "file over default");
    assert_eq!(mtu_of(&b_host.ns), "1400", "flag over file");
    assert_eq!(
        a.status().unwrap()["node"]["port"],
        41641,
        "file over default"
    );
    wait_all_pairs_ping(&[&a, &b], Duration::from_secs(20)).unwrap();

    // A file with a typo is refused with the key named, before anything starts.
    let bad = lab.dir().join("bad.toml");
    std::fs::write(&bad, "mut = 1380\n").unwrap();
    let out = a.cli(["status", "--config", bad.to_str().unwrap()]);
    assert!(!out.success());
    assert!(
        out.stderr.contains("mut") && out.stderr.lines().count() == 1,
        "{out}"
    );
}
