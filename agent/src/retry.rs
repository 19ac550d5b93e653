//! The delays between retries of an action that failed (an API call, a signal, a subscription):
//! doubling from a first delay up to a cap, and back to the first after a success. Built on
//! backon's exponential back-off (no jitter, no limit on attempts); the kubelet's per-container
//! restart and image-pull back-off is another rule, in [`crate::pod::backoff`].

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// Retry delays from `min`, doubling to `max`.
#[derive(Debug)]
pub struct Retry {
    builder: ExponentialBuilder,
    delays: ExponentialBackoff,
    max: Duration,
}

impl Retry {
    pub fn new(min: Duration, max: Duration) -> Self {
        let builder = ExponentialBuilder::new()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_factor(2.0)
            .without_max_times();
        Retry {
            delays: builder.build(),
            builder,
            max,
        }
    }

    /// The delay before the next attempt after a failure.
    pub fn fail(&mut self) -> Duration {
        self.delays.next().unwrap_or(self.max)
    }

    /// After a success: the next failure waits the first delay again.
    pub fn reset(&mut self) {
        self.delays = self.builder.build();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_to_their_cap_and_reset() {
        let mut r = Retry::new(Duration::from_millis(200), Duration::from_secs(1));
        // backon multiplies in f32: whole milliseconds are what is promised.
        let delays: Vec<_> = (0..6).map(|_| r.fail().as_millis()).collect();
        assert_eq!(delays, [200, 400, 800, 1000, 1000, 1000]);
        r.reset();
        assert_eq!(r.fail(), Duration::from_millis(200));
    }
}
