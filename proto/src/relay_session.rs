//! Messages between a node and a standalone relay, inside the Noise channel the node opens to
//! the relay (the same channel as toward the controller, pinned to the relay's key).
//!
//! The node's first message is [`RelayClientMsg::Hello`] with the ticket the controller issued
//! for this relay; the relay answers [`RelayServerMsg::Welcome`] (with the address it observes for
//! the node, a discovery result on the node's one UDP socket) or [`RelayServerMsg::Error`] and
//! closes. A node renews its ticket on the same channel before it expires. Relayed traffic then
//! flows as QUIC datagrams in the [`crate::relay`] frame format. Envelopes and bounds are those
//! of [`crate::control`].

use crate::control::{
    check_revocations, check_ticket, decode, encode, valid_name, DecodeError, ErrorCode,
    Revocation, Ticket, MAX_ERROR_TEXT,
};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// Messages a node sends to a relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RelayClientMsg {
    /// First message: admission.
    Hello {
        /// Ticket from the controller for this relay.
        ticket: Ticket,
    },
    /// A fresh ticket for the same network, extending the admission.
    Renew {
        /// Ticket from the controller for this relay.
        ticket: Ticket,
    },
    /// Revocations the controller made for this relay, forwarded by a node (only to relays
    /// whose welcome said `revocations`). The relay verifies each; the sender needs no rights.
    Revoke {
        /// The network the revocations are for.
        network: String,
        /// At most [`crate::control::MAX_REVOCATIONS`].
        revoked: Vec<Revocation>,
    },
}

/// Messages a relay sends to a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RelayServerMsg {
    /// Admitted (or renewed) until `expires`.
    Welcome {
        /// The node's address as the relay sees it: its public mapping toward the relay.
        observed: SocketAddr,
        /// Unix seconds; the relay closes the connection then unless a renewal came.
        expires: u64,
        /// The relay accepts `revoke` messages (older relays do not and would close).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        revocations: bool,
    },
    /// Refused; the relay closes the connection after this.
    Error {
        /// Machine-readable reason.
        code: ErrorCode,
        /// What was wrong, for a person.
        message: String,
    },
}

impl RelayClientMsg {
    /// Encodes this message as an envelope.
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    /// Decodes and bounds-checks a message from a node.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let msg: Self = decode(bytes)?;
        match &msg {
            RelayClientMsg::Hello { ticket } | RelayClientMsg::Renew { ticket } => {
                check_ticket(ticket)?
            }
            RelayClientMsg::Revoke { network, revoked } => {
                if !valid_name(network) {
                    return Err(DecodeError::Bounds("network"));
                }
                check_revocations(revoked)?
            }
        }
        Ok(msg)
    }
}

impl RelayServerMsg {
    /// Encodes this message as an envelope.
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    /// Decodes and bounds-checks a message from a relay.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let msg: Self = decode(bytes)?;
        if let RelayServerMsg::Error { message, .. } = &msg {
            if message.len() > MAX_ERROR_TEXT {
                return Err(DecodeError::Bounds("error message"));
            }
        }
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ticket() -> Ticket {
        Ticket {
            network: "prod".into(),
            expires: 1_900_000_000,
            mac: "0f".repeat(32),
        }
    }

    #[test]
    fn round_trip() {
        for m in [
            RelayClientMsg::Hello { ticket: ticket() },
            RelayClientMsg::Renew { ticket: ticket() },
            RelayClientMsg::Revoke {
                network: "prod".into(),
                revoked: vec![Revocation {
                    key: crate::PublicKey([1; 32]),
                    expires: 1_900_000_000,
                    mac: "0e".repeat(32),
                }],
            },
        ] {
            assert_eq!(RelayClientMsg::decode(&m.encode()), Ok(m));
        }
        for m in [
            RelayServerMsg::Welcome {
                observed: SocketAddr::from(([203, 0, 113, 7], 40123)),
                expires: 1_900_000_000,
                revocations: true,
            },
            RelayServerMsg::Error {
                code: ErrorCode::TicketExpired,
                message: "expired".into(),
            },
        ] {
            assert_eq!(RelayServerMsg::decode(&m.encode()), Ok(m));
        }
    }

    #[test]
    fn bounds() {
        let mut t = ticket();
        t.network = "bad network".into();
        let m = RelayClientMsg::Hello { ticket: t };
        assert_eq!(
            RelayClientMsg::decode(&m.encode()),
            Err(DecodeError::Bounds("ticket"))
        );
    }

    proptest::proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = RelayClientMsg::decode(&bytes);
            let _ = RelayServerMsg::decode(&bytes);
        }
    }
}
