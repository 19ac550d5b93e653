//! Restart and image-pull back-off, as the kubelet's: the first failure is retried at once, the
//! next after 10 s, doubling up to 300 s; an attempt that ran for 10 minutes resets the delay.
//! Pure (explicit clocks) and keyed per container (or per image); owned by one pod worker.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

/// The delay after the second failure.
pub const INITIAL: Duration = Duration::from_secs(10);
/// The longest delay.
pub const MAX: Duration = Duration::from_secs(300);
/// An attempt that ran at least this long resets the delay.
pub const RESET_AFTER: Duration = Duration::from_secs(600);

/// A back-off window: no new attempt before `until`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub until: SystemTime,
    /// The delay this window applies (for "back-off 20s restarting failed container").
    pub delay: Duration,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    /// The delay the next failure will wait.
    next: Duration,
    /// The window of the latest failure.
    window: Option<Window>,
}

/// Back-off state for many keys.
#[derive(Clone, Debug, Default)]
pub struct Backoff {
    entries: HashMap<String, Entry>,
}

impl Backoff {
    /// Records a failure of `key` at `failed_at`; `ran_for` is how long the failed attempt ran
    /// (None for a failure that never ran, e.g. an image pull). Returns the window before the
    /// next attempt (None: retry at once).
    pub fn failed(
        &mut self,
        key: &str,
        failed_at: SystemTime,
        ran_for: Option<Duration>,
    ) -> Option<Window> {
        let reset = ran_for.is_some_and(|d| d >= RESET_AFTER);
        let entry = match self.entries.get_mut(key) {
            Some(entry) if !reset => entry,
            _ => {
                self.entries.insert(
                    key.to_string(),
                    Entry {
                        next: INITIAL,
                        window: None,
                    },
                );
                return None;
            }
        };
        let window = Window {
            until: failed_at + entry.next,
            delay: entry.next,
        };
        entry.next = (entry.next * 2).min(MAX);
        entry.window = Some(window);
        Some(window)
    }

    /// The window `key` is in at `now`, if any.
    pub fn window(&self, key: &str, now: SystemTime) -> Option<Window> {
        self.entries
            .get(key)
            .and_then(|e| e.window)
            .filter(|w| w.until > now)
    }

    /// Forgets `key` (a successful image pull).
    pub fn reset(&mut self, key: &str) {
        self.entries.remove(key);
    }
}

/// A whole-second duration as Go's `time.Duration` prints it (`10s`, `1m20s`, `5m0s`,
/// `1h0m0s`): the kubelet's back-off messages carry this form.
pub fn go_duration(d: Duration) -> String {
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
    }

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn durations_print_as_go_prints_them() {
        let table = [
            (0, "0s"),
            (10, "10s"),
            (80, "1m20s"),
            (160, "2m40s"),
            (300, "5m0s"),
            (3600, "1h0m0s"),
            (3723, "1h2m3s"),
        ];
        for (secs, text) in table {
            assert_eq!(go_duration(s(secs)), text);
        }
    }

    #[test]
    fn first_failure_retries_at_once() {
        let mut b = Backoff::default();
        assert_eq!(b.failed("c", t(0), Some(s(1))), None);
        assert_eq!(b.window("c", t(0)), None);
    }

    #[test]
    fn second_failure_waits_ten_seconds() {
        let mut b = Backoff::default();
        b.failed("c", t(0), Some(s(1)));
        let w = b.failed("c", t(5), Some(s(1))).unwrap();
        assert_eq!(w.until, t(15));
        assert_eq!(w.delay, s(10));
        assert_eq!(b.window("c", t(14)), Some(w));
        assert_eq!(b.window("c", t(15)), None);
    }

    #[test]
    fn delay_doubles_up_to_five_minutes() {
        let mut b = Backoff::default();
        b.failed("c", t(0), Some(s(1)));
        let delays: Vec<u64> = (1..=8)
            .map(|i| {
                b.failed("c", t(i * 1000), Some(s(1)))
                    .unwrap()
                    .delay
                    .as_secs()
            })
            .collect();
        assert_eq!(delays, vec![10, 20, 40, 80, 160, 300, 300, 300]);
    }

    #[test]
    fn ten_minutes_running_resets() {
        let mut b = Backoff::default();
        b.failed("c", t(0), Some(s(1)));
        b.failed("c", t(100), Some(s(1)));
        b.failed("c", t(200), Some(s(1)));
        assert_eq!(b.failed("c", t(2000), Some(RESET_AFTER)), None);
        assert_eq!(b.failed("c", t(2001), Some(s(1))).unwrap().delay, s(10));
    }

    #[test]
    fn just_under_ten_minutes_keeps_growing() {
        let mut b = Backoff::default();
        b.failed("c", t(0), Some(s(1)));
        b.failed("c", t(10), Some(s(1)));
        let w = b.failed("c", t(700), Some(s(599))).unwrap();
        assert_eq!(w.delay, s(20));
    }

    #[test]
    fn keys_are_independent() {
        let mut b = Backoff::default();
        b.failed("a", t(0), Some(s(1)));
        b.failed("a", t(1), Some(s(1)));
        assert_eq!(b.failed("b", t(1), Some(s(1))), None);
        assert!(b.window("a", t(2)).is_some());
        assert!(b.window("b", t(2)).is_none());
    }

    #[test]
    fn pull_failures_without_run_time_grow_and_reset_clears() {
        let mut b = Backoff::default();
        assert_eq!(b.failed("img", t(0), None), None);
        assert_eq!(b.failed("img", t(1), None).unwrap().delay, s(10));
        b.reset("img");
        assert_eq!(b.window("img", t(2)), None);
        assert_eq!(b.failed("img", t(3), None), None);
    }
}
