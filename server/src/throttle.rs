//! Rate limits on guessing: failed logins and wrong enrollment codes.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Allows `max` attempts per key within `window` (each counted as a failure until forgiven);
/// past that the key is refused until the oldest leaves the window.
pub struct Throttle {
    max: usize,
    window: Duration,
    failures: Mutex<HashMap<String, Vec<Instant>>>,
}

impl Throttle {
    pub fn new(max: usize, window: Duration) -> Self {
        Self { max, window, failures: Mutex::new(HashMap::new()) }
    }

    /// Check `key` and, if it is not locked out, count this attempt as a failure at once, in
    /// one step: attempts made in parallel each take their place, so forty sent together
    /// cannot all pass a check made before any of them failed. [`Throttle::forgive`] takes the
    /// attempt back when it succeeds.
    pub fn attempt(&self, key: &str) -> Result<(), Duration> {
        let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let list = f.entry(key.to_string()).or_default();
        list.retain(|t| now.duration_since(*t) < self.window);
        if list.len() >= self.max {
            return Err(self.window - now.duration_since(list[0]));
        }
        list.push(now);
        let too_many = f.len() > 100_000;
        drop(f);
        if too_many {
            self.forget_quiet();
        }
        Ok(())
    }

    /// Whether `key` is locked out now: its next attempt would be refused.
    pub fn locked(&self, key: &str) -> bool {
        let f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        f.get(key).is_some_and(|l| l.iter().filter(|t| now.duration_since(**t) < self.window).count() >= self.max)
    }

    /// Take back one attempt counted by [`Throttle::attempt`] (it succeeded).
    pub fn forgive(&self, key: &str) {
        let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(list) = f.get_mut(key) {
            list.pop();
            if list.is_empty() {
                f.remove(key);
            }
        }
    }

    /// Bound memory under a flood of distinct keys: forget the quiet ones.
    fn forget_quiet(&self) {
        let window = self.window;
        self.failures.lock().unwrap_or_else(|e| e.into_inner()).retain(|_, l| l.last().is_some_and(|t| t.elapsed() < window));
    }

    /// Forget every failure counted for `key` (a coordinator logged in: their typos are past).
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
            assert!(!t.locked("k"));
            t.attempt("k").unwrap();
        }
        assert!(t.locked("k"), "the third failure locks");
        let t = Throttle::new(3, Duration::from_secs(60));
        for _ in 0..3 {
            assert!(t.attempt("k").is_ok());
        }
        assert!(t.attempt("k").is_err());
        assert!(t.attempt("other").is_ok());
        t.succeed("k");
        assert!(t.attempt("k").is_ok());
    }

    /// Attempts made at once each count before any is judged: the sixth of six sent together
    /// is refused, whatever the timing.
    #[test]
    fn parallel_attempts_each_take_a_place() {
        let t = std::sync::Arc::new(Throttle::new(5, Duration::from_secs(60)));
        let passed: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..40).map(|_| s.spawn(|| t.attempt("k").is_ok())).collect();
            handles.into_iter().map(|h| usize::from(h.join().unwrap())).sum()
        });
        assert_eq!(passed, 5);
        // A success gives its place back.
        t.forgive("k");
        assert!(t.attempt("k").is_ok());
        assert!(t.attempt("k").is_err());
    }
}
