//! Jittered exponential reconnect backoff (rumqttc reconnects at once on the
//! next `poll` after an error, so without this a down broker is hammered).

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
    rng: fastrand::Rng,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            attempt: 0,
            rng: fastrand::Rng::new(),
        }
    }

    #[cfg(test)]
    fn with_seed(initial: Duration, max: Duration, seed: u64) -> Backoff {
        Backoff {
            initial,
            max,
            attempt: 0,
            rng: fastrand::Rng::with_seed(seed),
        }
    }

    /// The next delay: a uniformly random point in `[ceiling/2, ceiling]`,
    /// where the ceiling doubles per attempt up to `max` ("equal jitter", so
    /// a fleet that lost its broker together does not reconnect together).
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .initial
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        half + half.mul_f64(self.rng.f64())
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_within_bounds_and_reset() {
        let (initial, max) = (Duration::from_millis(100), Duration::from_secs(5));
        let mut b = Backoff::with_seed(initial, max, 1);
        let mut ceiling = initial;
        for _ in 0..12 {
            let d = b.next_delay();
            assert!(
                d >= ceiling / 2 && d <= ceiling,
                "{d:?} outside [{:?}, {ceiling:?}]",
                ceiling / 2
            );
            ceiling = (ceiling * 2).min(max);
        }
        b.reset();
        assert!(b.next_delay() <= initial);
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut a = Backoff::with_seed(Duration::from_secs(1), Duration::from_secs(1), 1);
        let delays: std::collections::HashSet<_> = (0..20).map(|_| a.next_delay()).collect();
        assert!(delays.len() > 10);
    }
}
