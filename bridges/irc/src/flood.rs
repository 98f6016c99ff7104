//! Per-connection flood control: a token bucket (Biboumi's default is a burst of
//! 10 lines, then one line per second). The irc crate's own flood settings are
//! read by nothing, so the bridge paces its writes here.

use std::time::Duration;

use tokio::time::Instant;

/// A token bucket; `take` waits until a line may be sent.
#[derive(Debug)]
pub struct TokenBucket {
    enabled: bool,
    capacity: f64,
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(enabled: bool, burst: u32, lines_per_second: f64) -> Self {
        let capacity = f64::from(burst.max(1));
        TokenBucket {
            enabled,
            capacity,
            rate: lines_per_second.max(f64::MIN_POSITIVE),
            tokens: capacity,
            last: Instant::now(),
        }
    }

    /// How long to wait before the next line may go (zero when a token is there); takes the token.
    pub fn reserve(&mut self) -> Duration {
        if !self.enabled {
            return Duration::ZERO;
        }
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.capacity);
        self.last = now;
        self.tokens -= 1.0;
        if self.tokens >= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(-self.tokens / self.rate) }
    }

    /// Wait for a token.
    /// Take a token if one is there now (always, when disabled).
    pub fn try_take(&mut self) -> bool {
        if !self.enabled {
            return true;
        }
        if self.reserve().is_zero() {
            return true;
        }
        self.tokens += 1.0; // not taken after all
        false
    }

    /// Return a token taken with [`TokenBucket::try_take`] and not used.
    pub fn give_back(&mut self) {
        if self.enabled {
            self.tokens = (self.tokens + 1.0).min(self.capacity);
        }
    }

    pub async fn take(&mut self) {
        let wait = self.reserve();
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn burst_then_rate() {
        let mut b = TokenBucket::new(true, 3, 2.0);
        for _ in 0..3 {
            assert_eq!(b.reserve(), Duration::ZERO);
        }
        assert_eq!(b.reserve(), Duration::from_millis(500));
        assert_eq!(b.reserve(), Duration::from_millis(1000));
        tokio::time::advance(Duration::from_secs(10)).await;
        // refilled, but never beyond the burst
        for _ in 0..3 {
            assert_eq!(b.reserve(), Duration::ZERO);
        }
        assert!(b.reserve() > Duration::ZERO);
    }

    #[test]
    fn disabled_never_waits() {
        let mut b = TokenBucket::new(false, 1, 0.001);
        for _ in 0..100 {
            assert_eq!(b.reserve(), Duration::ZERO);
        }
    }
}
