//! Joining by network id: the node asks (`RequestJoin`, no secret), the controller records the
//! request, and the administrator approves it (`mesh-controller node approve`), as ZeroTier
//! members are authorized. Until then the node learns nothing about the network.
//!
//! [`ask_until`] keeps the request alive: it reconnects when the controller restarts or the
//! connection breaks, asks again when the request lapsed, and ends with the welcome (approved),
//! or an error: rejected and an unknown network are [`crate::daemon::Fatal`] (no restart fixes
//! them); running out of `--wait` is a plain error.

use crate::control::{self, ControlError, Reply, Session};
use crate::dial::{Dialer, Target};
use mesh_proto::control::{ClientMsg, ErrorCode, ServerMsg, Welcome};
use mesh_proto::token::NetworkId;
use mesh_proto::PublicKey;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// Longest pause between attempts while the controller does not answer.
const MAX_BACKOFF: Duration = Duration::from_secs(15);
/// Pause before asking again after the controller dropped the request (it lapsed, or too many
/// came from this address).
const ASK_AGAIN_AFTER: Duration = Duration::from_secs(30);

/// Who asks, for what, and how.
pub struct Asking<'a> {
    /// Opens links to the controller (QUIC on the node's socket, or TCP).
    pub dialer: &'a Dialer,
    /// The network id (controller addresses, pinned key, network).
    pub id: &'a NetworkId,
    /// This node's private key.
    pub node_key: &'a [u8; 32],
    /// The `RequestJoin` message.
    pub request: ClientMsg,
    /// How long one connection attempt may take.
    pub connect_timeout: Duration,
}

/// How long to keep trying (`mesh join --wait`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Before the controller first answered: how long it may stay unreachable.
    pub unreachable: Option<Duration>,
    /// In all, including the wait for the administrator; `None`: for ever.
    pub total: Option<Duration>,
}

/// What `mesh status` shows while the node waits.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WaitStatus {
    /// The network asked for.
    pub network: String,
    /// The name the request is recorded under.
    pub name: String,
    /// This node's key.
    pub key: PublicKey,
    /// Its fingerprint, as `mesh-controller node pending` shows it.
    pub fingerprint: String,
    /// The controller address tried last.
    pub controller: String,
    /// Whether the controller holds the request on an open connection right now.
    pub controller_answers: bool,
    /// The last failure to reach it, if the last attempt failed.
    pub last_error: Option<String>,
    /// When the node first asked (seconds since the Unix epoch).
    pub since: u64,
}

impl WaitStatus {
    /// The command that approves this node.
    pub fn approve_command(&self) -> String {
        format!(
            "mesh-controller node approve {} {}",
            self.network, self.name
        )
    }

    /// One line for logs and systemd's status.
    pub fn line(&self) -> String {
        format!(
            "waiting for approval of node {} (key fingerprint {}) in network {}; on the controller run: {}",
            self.name,
            self.fingerprint,
            self.network,
            self.approve_command()
        )
    }
}

/// How the asking ended.
pub enum Answer {
    /// Admitted: the session goes on as a member's.
    Approved(Session, Box<Welcome>),
    /// Recorded, waiting for the administrator (only from [`ask_until`] with `first_only`).
    Pending(Session),
}

/// Every address of the controller the id names, the first one first.
fn targets(id: &NetworkId) -> Vec<Target> {
    std::iter::once(&id.controller.addr)
        .chain(id.controller.others.iter())
        .map(|a| Target::new(a, id.controller.tcp.as_deref(), "mesh-controller"))
        .collect()
}

fn set(status: &Mutex<WaitStatus>, f: impl FnOnce(&mut WaitStatus)) {
    if let Ok(mut s) = status.lock() {
        f(&mut s);
    }
}

/// What a refusal means for the asking node: `Err` ends it, `Ok(pause)` asks again after it.
fn refusal(network: &str, code: ErrorCode, message: String) -> anyhow::Result<Duration> {
    match code {
        ErrorCode::Rejected => Err(crate::daemon::fatal(anyhow::anyhow!(
            "the administrator rejected this node's request to join network {network}: {message}"
        ))),
        ErrorCode::NetworkUnknown => Err(crate::daemon::fatal(anyhow::anyhow!("{message}"))),
        ErrorCode::RequestDropped => {
            warn!(reason = %message, "the controller dropped this node's join request; asking again in {}", humantime::format_duration(ASK_AGAIN_AFTER));
            Ok(ASK_AGAIN_AFTER)
        }
        ErrorCode::Internal => {
            warn!(reason = %message, "the controller failed to handle the join request; asking again");
            Ok(MAX_BACKOFF)
        }
        _ => Err(anyhow::anyhow!("join refused: {message}")),
    }
}

/// Asks until the controller admits the node (or, with `first_only`, until it answers at all),
/// within `limits`; keeps `status` up to date.
pub async fn ask_until(
    asking: &Asking<'_>,
    status: &Mutex<WaitStatus>,
    limits: Limits,
    first_only: bool,
) -> anyhow::Result<Answer> {
    let started = Instant::now();
    let network = asking.id.network.clone();
    let controller_key = asking.id.controller.key;
    let targets = targets(asking.id);
    let mut next = 0usize;
    let mut backoff = Duration::from_secs(1);
    let mut reached = false;
    let mut told_unreachable = false;
    let mut told_waiting = false;
    let gave_up = |what: &str| {
        anyhow::anyhow!(
            "gave up after {} (--wait) {what}; the request stays on the controller until it lapses: run `mesh join` with the network id again to keep waiting",
            humantime::format_duration(limits.total.unwrap_or_default())
        )
    };
    loop {
        let left = limits.total.map(|t| t.saturating_sub(started.elapsed()));
        if left == Some(Duration::ZERO) {
            return Err(gave_up("waiting for approval"));
        }
        let target = &targets[next % targets.len()];
        set(status, |s| s.controller = target.quic.clone());
        let attempt = control::ask(
            asking.dialer,
            target,
            &controller_key,
            asking.node_key,
            &asking.request,
            asking.connect_timeout,
        )
        .await;
        let pause = match attempt {
            Ok((session, Reply::Welcome(w))) => return Ok(Answer::Approved(session, w)),
            Ok((mut session, Reply::Pending { name, .. })) => {
                reached = true;
                backoff = Duration::from_secs(1);
                set(status, |s| {
                    s.name = name;
                    s.controller_answers = true;
                    s.last_error = None;
                });
                let line = status.lock().map(|s| s.line()).unwrap_or_default();
                if !told_waiting {
                    told_waiting = true;
                    info!("{line}");
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&line)]);
                } else {
                    debug!("the controller holds the join request again");
                }
                if first_only {
                    return Ok(Answer::Pending(session));
                }
                let verdict = async {
                    loop {
                        match session.recv().await {
                            Ok(ServerMsg::Welcome(mut w)) => {
                                return match session.rest_of_welcome(&mut w).await {
                                    Ok(()) => Ok(w),
                                    Err(e) => Err(Ok(e)),
                                }
                            }
                            Ok(ServerMsg::Error { code, message }) => {
                                return Err(Err(refusal(&network, code, message)))
                            }
                            Ok(other) => debug!(?other, "ignored while waiting for approval"),
                            Err(e) => return Err(Ok(e)),
                        }
                    }
                };
                let verdict = match left {
                    Some(left) => match tokio::time::timeout(left, verdict).await {
                        Ok(v) => v,
                        Err(_) => return Err(gave_up("waiting for approval")),
                    },
                    None => verdict.await,
                };
                match verdict {
                    Ok(w) => return Ok(Answer::Approved(session, Box::new(w))),
                    Err(Err(refused)) => refused?,
                    Err(Ok(lost)) => {
                        warn!(error = %lost, "lost the connection to the controller while waiting for approval; asking again");
                        set(status, |s| {
                            s.controller_answers = false;
                            s.last_error = Some(lost.to_string());
                        });
                        backoff
                    }
                }
            }
            Err(ControlError::Refused { code, message }) => {
                reached = true;
                set(status, |s| {
                    s.controller_answers = false;
                    s.last_error = Some(message.clone());
                });
                refusal(&network, code, message)?
            }
            Err(e @ ControlError::KeyMismatch { .. }) => {
                return Err(crate::daemon::fatal(anyhow::anyhow!(
                    "{e} (for a network id: ask the administrator for the current one, `mesh-controller network id NETWORK`)"
                )))
            }
            Err(e) => {
                set(status, |s| {
                    s.controller_answers = false;
                    s.last_error = Some(e.to_string());
                });
                if !reached {
                    if let Some(limit) = limits.unreachable {
                        if started.elapsed() + backoff >= limit {
                            return Err(anyhow::Error::from(e).context(format!(
                                "gave up after waiting {} for the controller (--wait)",
                                humantime::format_duration(limit)
                            )));
                        }
                    }
                }
                if !told_unreachable {
                    told_unreachable = true;
                    warn!(controller = %target.quic, error = %e, "the controller does not answer; trying again");
                } else {
                    debug!(error = %e, "still no answer from the controller");
                }
                next += 1;
                backoff
            }
        };
        let pause = match limits.total {
            Some(t) => pause.min(t.saturating_sub(started.elapsed())),
            None => pause,
        };
        tokio::time::sleep(pause).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}
