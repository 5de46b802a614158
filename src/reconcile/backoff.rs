//! Capped exponential backoff with jitter.

use std::time::Duration;

/// Capped exponential backoff with "equal jitter": the n-th delay is drawn uniformly from
/// `[d/2, d]` where `d = min(max, min * 2^n)`. Jitter keeps many clients that lost the same
/// stream from relisting in lockstep; the lower half keeps a delay from collapsing to zero.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    /// A backoff starting at `min` and doubling up to `max` (`max` is raised to `min` if lower).
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            current: min,
        }
    }

    /// The `n`-th delay's ceiling (`n` from 0), without jitter: `min(max, min * 2^n)`. For a
    /// schedule that must be the same wherever it is computed (a retry time stored in a
    /// record).
    pub fn ceiling(min: Duration, max: Duration, n: u32) -> Duration {
        min.saturating_mul(1 << n.min(20)).min(max.max(min))
    }

    /// The next delay to wait.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.current;
        self.current = (self.current * 2).min(self.max);
        let half = d / 2;
        half + half.mul_f64(fastrand::f64())
    }

    /// Back to the first (shortest) delay, after things went well again.
    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

/// After a compare-and-swap lost a race: wait a random number of CAS round trips, up to
/// `min(conflicts, 8)` of them, so contenders that collided spread out instead of colliding
/// again (each failed CAS is a full consensus write). `cas_took` is how long the lost CAS took.
pub(crate) async fn after_collision(conflicts: u32, cas_took: Duration) {
    let spread = f64::from(conflicts.clamp(1, 8)) * fastrand::f64();
    tokio::time::sleep(cas_took.mul_f64(spread)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_with_jitter_in_the_upper_half() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let expected = [100, 200, 400, 800, 1000, 1000];
        for cap in expected {
            let d = b.next_delay();
            let cap = Duration::from_millis(cap);
            assert!(
                d <= cap && d >= cap / 2,
                "{d:?} not in [{:?}, {cap:?}]",
                cap / 2
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
        let ceiling = |n| Backoff::ceiling(Duration::from_millis(100), Duration::from_secs(1), n);
        assert_eq!(
            [0, 1, 3, 4, 40].map(|n| ceiling(n).as_millis()),
            [100, 200, 800, 1000, 1000]
        );
    }
}
