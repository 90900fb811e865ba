//! Rate limits on guessing: failed logins and wrong enrollment codes.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Allows `max` failures per key within `window`; past that the key is refused until the
/// oldest failure leaves the window.
pub struct Throttle {
    max: usize,
    window: Duration,
    failures: Mutex<HashMap<String, Vec<Instant>>>,
}

impl Throttle {
    pub fn new(max: usize, window: Duration) -> Self {
        Self { max, window, failures: Mutex::new(HashMap::new()) }
    }

    /// `Err(wait)` if `key` is locked out for `wait` more.
    pub fn check(&self, key: &str) -> Result<(), Duration> {
        let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let list = f.entry(key.to_string()).or_default();
        list.retain(|t| now.duration_since(*t) < self.window);
        if list.len() >= self.max {
            return Err(self.window - now.duration_since(list[0]));
        }
        Ok(())
    }

    pub fn fail(&self, key: &str) {
        let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        f.entry(key.to_string()).or_default().push(Instant::now());
        if f.len() > 100_000 {
            // Bound memory under a flood of distinct keys: forget the quiet ones.
            let window = self.window;
            f.retain(|_, l| l.last().is_some_and(|t| t.elapsed() < window));
        }
    }

    pub fn succeed(&self, key: &str) {
        self.failures.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_out_after_max_failures() {
        let t = Throttle::new(3, Duration::from_secs(60));
        for _ in 0..3 {
            assert!(t.check("k").is_ok());
            t.fail("k");
        }
        assert!(t.check("k").is_err());
        assert!(t.check("other").is_ok());
        t.succeed("k");
        assert!(t.check("k").is_ok());
    }
}
