//! What the broker sources (NATS JetStream, RabbitMQ) share to reconnect:
//! why a source is not reading, the backoff between attempts, and the
//! reports that an outage began and ended.

use std::time::Duration;

pub(crate) const FIRST_BACKOFF: Duration = Duration::from_millis(250);
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Why the source is not reading.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Trouble {
    /// The broker cannot be reached, or the connection dropped: retried quietly.
    #[error("{0}")]
    Unreachable(String),
    /// What the source reads (stream, consumer, queue) cannot be used as
    /// configured (missing, no permission): someone must act; retried in
    /// case they did.
    #[error("{0}")]
    Setup(String),
}

/// `FIRST_BACKOFF` doubled per failure in a row, at most `MAX_BACKOFF`.
pub(crate) fn backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    (FIRST_BACKOFF * 2u32.pow(doublings)).min(MAX_BACKOFF)
}

/// Says once that the source stopped reading and once that it reads again,
/// not at every retry: an outage is one warning; a setup problem is an
/// error, said again only when it changes.
#[derive(Debug)]
pub(crate) struct Health {
    /// The broker, as in "cannot read from NATS".
    service: &'static str,
    /// The kind of source, as in "the JetStream source reads again".
    source: &'static str,
    failures: u32,
    reported: Option<Trouble>,
}

impl Health {
    pub(crate) fn new(service: &'static str, source: &'static str) -> Self {
        Self { service, source, failures: 0, reported: None }
    }

    pub(crate) fn failed(&mut self, flow: &str, server: &str, trouble: &Trouble) {
        self.failures += 1;
        let already = match (&self.reported, trouble) {
            (Some(Trouble::Unreachable(_)), Trouble::Unreachable(_)) => true,
            (Some(reported), _) => reported == trouble,
            (None, _) => false,
        };
        if already {
            return;
        }
        match trouble {
            Trouble::Unreachable(why) => tracing::warn!(
                flow,
                server,
                error = %why,
                "cannot read from {}; retrying with backoff, quietly until it is back",
                self.service
            ),
            Trouble::Setup(why) => {
                tracing::error!(flow, server, error = %why, "the {} source cannot read; retrying", self.source)
            }
        }
        self.reported = Some(trouble.clone());
    }

    /// The source reads again: call it once a session has read (a pull
    /// answered, a delivery taken), not when it merely connected, so a
    /// session that connects and fails at once keeps backing off, quietly.
    pub(crate) fn recovered(&mut self, flow: &str) {
        if self.reported.take().is_some() {
            tracing::info!(flow, failures = self.failures, "the {} source reads again", self.source);
        }
        self.failures = 0;
    }

    pub(crate) fn delay(&self) -> Duration {
        backoff(self.failures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_a_ceiling() {
        assert_eq!(backoff(1), FIRST_BACKOFF);
        assert_eq!(backoff(2), FIRST_BACKOFF * 2);
        assert_eq!(backoff(40), MAX_BACKOFF);
    }

    #[test]
    fn an_outage_is_reported_once() {
        let mut h = Health::new("RabbitMQ", "RabbitMQ");
        h.failed("f", "amqp://h", &Trouble::Unreachable("refused".into()));
        h.failed("f", "amqp://h", &Trouble::Unreachable("reset".into()));
        assert_eq!(h.reported, Some(Trouble::Unreachable("refused".into())));
        assert_eq!(h.delay(), FIRST_BACKOFF * 2);
        h.recovered("f");
        assert_eq!(h.reported, None);
    }

    #[test]
    fn sessions_that_fail_at_once_back_off_further() {
        let mut h = Health::new("RabbitMQ", "RabbitMQ");
        for _ in 0..5 {
            // Connected, then failed before reading: not recovered.
            h.failed("f", "amqp://h", &Trouble::Unreachable("channel closed".into()));
        }
        assert_eq!(h.delay(), FIRST_BACKOFF * 16);
        assert_eq!(h.reported, Some(Trouble::Unreachable("channel closed".into())));
    }

    #[test]
    fn an_outage_is_reported_once_and_a_changed_setup_problem_again() {
        let mut h = Health::new("NATS", "JetStream");
        h.failed("f", "nats://h", &Trouble::Unreachable("refused".into()));
        assert_eq!(h.reported, Some(Trouble::Unreachable("refused".into())));
        h.failed("f", "nats://h", &Trouble::Unreachable("timed out".into()));
        assert_eq!(h.reported, Some(Trouble::Unreachable("refused".into())), "the same outage");
        h.failed("f", "nats://h", &Trouble::Setup("no stream".into()));
        assert_eq!(h.reported, Some(Trouble::Setup("no stream".into())));
        assert_eq!(h.delay(), FIRST_BACKOFF * 4);
        h.recovered("f");
        assert_eq!((h.reported.clone(), h.delay()), (None, FIRST_BACKOFF));
    }
}
