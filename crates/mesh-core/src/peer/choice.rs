//! Which of two working paths a peer's traffic takes: the direct one, unless what it measured
//! ([`super::quality`]) made the relay the better one. The rules, with the thresholds of
//! [`QualityConfig`]:
//!
//! - **To the relay**: the direct path lost at least `switch_loss` over a whole window, surely
//!   (beyond the noise of its sample count, [`Estimate::surely_above`]), and the relay,
//!   measured meanwhile, lost at most `recover_loss` and less than half of what the direct path
//!   did.
//! - **Back to the direct path**: it lost less than `recover_loss` over a whole window, or the
//!   relay lost at least `switch_loss` over a whole window and the direct path less than half of
//!   that.
//! - **Hysteresis**: the thresholds are apart (10 % to leave, under 3 % to return), judgements
//!   rest on a whole window, and a peer changes path for quality at most once per `hold`. A
//!   return that had to be undone within twice `hold` doubles the next stay on the relay, up to
//!   `max_hold` (a rate limit that passes sparse probes and drops bulk makes the direct path look
//!   clean from the relay, every time); a return that lasted starts it over at `hold`.
//!
//! The choice only says where data goes while both paths exist: liveness (a direct path that
//! dies, a relay that goes down) overrides it at once, see [`super::path::PathState`].

use super::quality::Estimate;
use crate::io::QualityConfig;
use std::time::{Duration, Instant};

/// A quality switch [`Choice::decide`] made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Switch {
    /// Traffic moves to the relay.
    ToRelay,
    /// Traffic moves back to the direct path.
    ToDirect,
}

/// Where quality wants a peer's traffic. See the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Choice {
    /// The direct path, whenever there is one.
    Direct {
        /// When the peer came back to it from the relay for quality, and how long that stay on
        /// the relay was at least (`None`: it never left).
        returned: Option<(Instant, Duration)>,
    },
    /// The relay, although a direct path may work: keep probing the direct path.
    Relay {
        /// Since when.
        since: Instant,
        /// How long at least before the direct path is taken back.
        stay: Duration,
    },
}

impl Default for Choice {
    fn default() -> Self {
        Choice::Direct { returned: None }
    }
}

impl Choice {
    /// Whether traffic should avoid the direct path.
    pub(crate) fn prefers_relay(&self) -> bool {
        matches!(self, Choice::Relay { .. })
    }

    /// Weighs the two paths' estimates at `now` (the caller checked that both paths exist and
    /// traffic flows); switches if the rules say so.
    pub(crate) fn decide(
        &mut self,
        direct: &Estimate,
        relay: &Estimate,
        config: &QualityConfig,
        now: Instant,
    ) -> Option<Switch> {
        // Only what a whole window says counts.
        let direct_loss = direct.loss.filter(|_| direct.full)?;
        match *self {
            Choice::Direct { returned } => {
                if returned.is_some_and(|(t, _)| now < t + config.hold) {
                    return None;
                }
                let relay_loss = relay.loss?;
                let relay_clean =
                    relay_loss <= config.recover_loss && relay_loss < direct_loss / 2.0;
                if !direct.surely_above(config.switch_loss) || !relay_clean {
                    return None;
                }
                let stay = match returned {
                    // The return did not last: the next stay is twice as long.
                    Some((t, before)) if now < t + config.hold * 2 => {
                        (before * 2).clamp(config.hold, config.max_hold)
                    }
                    _ => config.hold,
                };
                *self = Choice::Relay { since: now, stay };
                Some(Switch::ToRelay)
            }
            Choice::Relay { since, stay } => {
                if now < since + stay {
                    return None;
                }
                let recovered = direct_loss < config.recover_loss;
                let relay_bad = relay.full
                    && relay
                        .loss
                        .is_some_and(|l| l >= config.switch_loss && direct_loss < l / 2.0);
                if !recovered && !relay_bad {
                    return None;
                }
                *self = Choice::Direct {
                    returned: Some((now, stay)),
                };
                Some(Switch::ToDirect)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    fn est(loss: f64) -> Estimate {
        Estimate {
            loss: Some(loss),
            samples: 10_000,
            rtt: None,
            full: true,
        }
    }

    fn config() -> QualityConfig {
        QualityConfig::default()
    }

    #[test]
    fn a_lossy_direct_path_gives_way_to_a_clean_relay_only() {
        let t0 = Instant::now();
        let c = config();
        let mut choice = Choice::default();
        assert_eq!(
            choice.decide(&est(0.09), &est(0.0), &c, t0),
            None,
            "under 10 %"
        );
        let few = Estimate {
            samples: 30,
            ..est(0.2)
        };
        assert_eq!(
            choice.decide(&few, &est(0.0), &c, t0),
            None,
            "6 of 30 may be luck"
        );
        assert_eq!(
            choice.decide(&est(0.2), &est(0.05), &c, t0),
            None,
            "relay not clean"
        );
        assert_eq!(
            choice.decide(&est(0.05), &est(0.03), &c, t0),
            None,
            "relay not much better"
        );
        let unknown = Estimate {
            loss: None,
            ..est(0.0)
        };
        assert_eq!(
            choice.decide(&est(0.2), &unknown, &c, t0),
            None,
            "relay unmeasured"
        );
        let partial = Estimate {
            full: false,
            ..est(0.5)
        };
        assert_eq!(
            choice.decide(&partial, &est(0.0), &c, t0),
            None,
            "not a whole window"
        );
        assert_eq!(
            choice.decide(&est(0.11), &est(0.02), &c, t0),
            Some(Switch::ToRelay)
        );
        assert!(choice.prefers_relay());
    }

    #[test]
    fn the_direct_path_is_taken_back_once_clean_and_not_before_hold() {
        let t0 = Instant::now();
        let c = config();
        let mut choice = Choice::default();
        assert_eq!(
            choice.decide(&est(0.2), &est(0.0), &c, t0),
            Some(Switch::ToRelay)
        );
        assert_eq!(
            choice.decide(&est(0.0), &est(0.0), &c, t0 + 29 * SEC),
            None,
            "hold"
        );
        assert_eq!(
            choice.decide(&est(0.03), &est(0.0), &c, t0 + 30 * SEC),
            None,
            "3 % is not under"
        );
        assert_eq!(
            choice.decide(&est(0.029), &est(0.0), &c, t0 + 30 * SEC),
            Some(Switch::ToDirect)
        );
        // Between the thresholds nothing moves, either way.
        let t1 = t0 + 100 * SEC;
        assert_eq!(choice.decide(&est(0.09), &est(0.0), &c, t1), None);
    }

    #[test]
    fn at_most_one_switch_per_hold() {
        let t0 = Instant::now();
        let c = config();
        let mut choice = Choice::default();
        choice.decide(&est(0.2), &est(0.0), &c, t0);
        choice.decide(&est(0.0), &est(0.0), &c, t0 + 30 * SEC);
        assert_eq!(choice.decide(&est(0.5), &est(0.0), &c, t0 + 59 * SEC), None);
        assert_eq!(
            choice.decide(&est(0.5), &est(0.0), &c, t0 + 60 * SEC),
            Some(Switch::ToRelay)
        );
    }

    #[test]
    fn returns_that_fail_are_tried_ever_more_rarely() {
        let t0 = Instant::now();
        let c = config();
        let mut choice = Choice::default();
        let mut now = t0;
        let mut stays = Vec::new();
        for _ in 0..6 {
            // The relay is taken as soon as hold allows, and the direct path looks clean
            // (sparse probes pass) as soon as the stay allows: a rate limit.
            assert_eq!(
                choice.decide(&est(0.5), &est(0.0), &c, now),
                Some(Switch::ToRelay)
            );
            let Choice::Relay { stay, .. } = choice else {
                unreachable!()
            };
            stays.push(stay.as_secs());
            now += stay;
            assert_eq!(
                choice.decide(&est(0.0), &est(0.0), &c, now),
                Some(Switch::ToDirect)
            );
            now += c.hold;
        }
        assert_eq!(stays, [30, 60, 120, 240, 480, 480]);
        // A return that lasts starts it over.
        now += c.hold * 2;
        choice.decide(&est(0.5), &est(0.0), &c, now);
        assert_eq!(
            choice,
            Choice::Relay {
                since: now,
                stay: c.hold
            }
        );
    }

    #[test]
    fn a_relay_gone_bad_gives_the_direct_path_back() {
        let t0 = Instant::now();
        let c = config();
        let mut choice = Choice::default();
        choice.decide(&est(0.3), &est(0.0), &c, t0);
        let later = t0 + 40 * SEC;
        assert_eq!(
            choice.decide(&est(0.3), &est(0.4), &c, later),
            None,
            "no better"
        );
        assert_eq!(
            choice.decide(&est(0.1), &est(0.4), &c, later),
            Some(Switch::ToDirect)
        );
    }
}
