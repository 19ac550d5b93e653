//! The event recorder: Kubernetes-style events about pods and the node. Every event is logged,
//! kept in a bounded ring for `/events`, and handed to any sink (the API, in cluster mode).
//! Recording never blocks and never fails the caller.
//!
//! Events are cut and correlated as the kubelet's recorder (client-go's `EventCorrelator`) does,
//! so that nothing a manifest says can grow them and a repeating event cannot push the others
//! out of the ring:
//! - the message is cut to the API's 1024 bytes (as Kubernetes components cut them: the first
//!   1020 bytes and ` ...`), the reason to 128;
//! - the same event again (same source, object, type, reason and message) is the same Event with
//!   its `count` bumped and `lastTimestamp` moved, not a new one (the sink patches it);
//! - from the 10th event of one object and reason with different messages within 10 minutes,
//!   they are one Event, its message prefixed `(combined from similar events): `.
//!
//! This is written here rather than taken from the `kube` crate's events `Recorder`
//! (`kube::runtime::events`, kube 5.0), which was weighed for #14 and does not keep what the
//! kubelet writes:
//! - it keys a series by type, action, reason, reporter and object but not the message, and its
//!   repeat patches the cached Event, so a different message is merged into the first and lost;
//!   it has no "combined from similar events" aggregation and cuts nothing to the API's limits;
//! - it writes `events.k8s.io/v1` with `deprecatedSource` and `deprecatedCount` unset, so the
//!   core v1 view (what `kubectl describe` and the status-parity test compare) has no
//!   `source.component`/`source.host` and no `count`;
//! - `publish` is an async API call the caller awaits (and whose failure it must handle, with
//!   no retry), where recording here never blocks or fails a worker;
//! - it needs a `kube::Client`: a standalone node has none, and its `/events` ring would still
//!   need a recorder of its own.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hasher;
use std::sync::{Arc, Mutex};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use tokio::sync::mpsc;

pub(crate) const RING: usize = 1000;
/// The API's limit on an event's message (bytes), and on its reason.
pub const MESSAGE_LIMIT: usize = 1024;
const REASON_LIMIT: usize = 128;
/// client-go's correlator: how many remembered events, how many similar ones before they are
/// combined, and within what window.
const CACHE_ENTRIES: usize = 4096;
const AGGREGATE_MAX: usize = 10;
const AGGREGATE_WINDOW: jiff::SignedDuration = jiff::SignedDuration::from_secs(600);

/// Normal or Warning, as the API's `type` field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Normal,
    Warning,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

/// An event as the ring keeps it: what varies from one event to the next. The rest (its
/// source and reporter, this node) is the same in every event and is filled in by
/// [`Recorder::event`] when one is handed out; a whole `Event` in the ring took 2.4 times the
/// heap.
#[derive(Clone)]
struct Kept {
    name: Option<String>,
    namespace: Option<String>,
    object: ObjectReference,
    type_: Option<String>,
    reason: Option<String>,
    message: Option<String>,
    first: Option<Time>,
    last: Option<Time>,
    event_time: Option<MicroTime>,
    count: Option<i32>,
}

/// Records events; cheap to clone, one per component.
#[derive(Clone)]
pub struct Recorder {
    node: String,
    ring: Arc<Mutex<VecDeque<Kept>>>,
    correlator: Arc<Mutex<Correlator>>,
    /// Where every event goes besides the ring: the API writer in cluster mode, none
    /// standalone.
    sink: Option<mpsc::UnboundedSender<Event>>,
}

/// What the recorder remembers to correlate events: per dedup key what a repeat takes over
/// (as client-go's event log keeps it, not the whole Event), and the distinct messages per
/// aggregate key in the current window. Keys and messages are kept as 64-bit hashes of client-go's
/// keys (the event's fields joined, hundreds of bytes each): only their equality counts.
#[derive(Default)]
struct Correlator {
    seen: HashMap<u64, Seen>,
    similar: HashMap<u64, Similar>,
}

/// The distinct messages of one aggregate key in the current window.
struct Similar {
    /// The hash of the involved object's UID (what `Recorder::forget` matches).
    uid: u64,
    last: Timestamp,
    messages: HashSet<u64>,
}

/// A hash of `parts` as client-go joins them into a key (each followed by a NUL).
fn key_hash<'a>(parts: impl IntoIterator<Item = &'a str>) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    for part in parts {
        hasher.write(part.as_bytes());
        hasher.write_u8(0);
    }
    hasher.finish()
}

/// The part of a recorded Event its repeats carry on: its name, when it was first seen, its
/// count, and when it was last seen (for evicting the oldest).
struct Seen {
    /// The hash of the involved object's UID (what `Recorder::forget` matches).
    uid: u64,
    name: Option<String>,
    first: Option<Time>,
    event_time: Option<MicroTime>,
    count: i32,
    last: Timestamp,
}

impl Correlator {
    /// `event` as it is to be recorded: combined with similar ones, and the same Event again
    /// (its count bumped) when it repeats one.
    fn observe(&mut self, mut event: Kept, now: Timestamp) -> Kept {
        let object = &event.object;
        let aggregate_parts = [
            object.kind.as_deref(),
            object.namespace.as_deref(),
            object.name.as_deref(),
            object.uid.as_deref(),
            object.api_version.as_deref(),
            event.type_.as_deref(),
            event.reason.as_deref(),
        ]
        .map(Option::unwrap_or_default);
        let aggregate = key_hash(aggregate_parts);
        let uid = key_hash([object.uid.as_deref().unwrap_or_default()]);
        let message = event.message.clone().unwrap_or_default();
        if self.similar.len() >= CACHE_ENTRIES && !self.similar.contains_key(&aggregate) {
            self.similar.retain(|_, s| s.last + AGGREGATE_WINDOW > now);
            if self.similar.len() >= CACHE_ENTRIES {
                self.similar.clear();
            }
        }
        let similar = self.similar.entry(aggregate).or_insert_with(|| Similar {
            uid,
            last: now,
            messages: HashSet::new(),
        });
        if similar.last + AGGREGATE_WINDOW <= now {
            similar.messages.clear();
        }
        similar.last = now;
        similar.messages.insert(key_hash([message.as_str()]));
        let key = match similar.messages.len() >= AGGREGATE_MAX {
            true => {
                let combined = format!("(combined from similar events): {message}");
                event.message = Some(truncate(&combined, MESSAGE_LIMIT));
                aggregate
            }
            false => {
                let path = object.field_path.as_deref().unwrap_or_default();
                let parts = aggregate_parts.into_iter().chain([path, message.as_str()]);
                key_hash(parts)
            }
        };
        if let Some(previous) = self.seen.get(&key) {
            event.name = previous.name.clone();
            event.first = previous.first.clone();
            event.event_time = previous.event_time.clone();
            event.count = Some(previous.count.saturating_add(1));
        } else if self.seen.len() >= CACHE_ENTRIES {
            // The oldest remembered event goes, as from client-go's LRU.
            let oldest = self
                .seen
                .iter()
                .min_by_key(|(_, e)| e.last)
                .map(|(k, _)| *k);
            oldest.map(|k| self.seen.remove(&k));
        }
        let seen = Seen {
            uid,
            name: event.name.clone(),
            first: event.first.clone(),
            event_time: event.event_time.clone(),
            count: event.count.unwrap_or(1),
            last: now,
        };
        self.seen.insert(key, seen);
        event
    }
}

/// `text` cut to `limit` bytes as Kubernetes components cut event messages: the first
/// `limit - 4` bytes (on a character boundary) and ` ...`.
pub fn truncate(text: &str, limit: usize) -> String {
    if text.len() <= limit {
        return text.to_string();
    }
    let suffix = " ...";
    let mut end = limit.saturating_sub(suffix.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{suffix}", &text[..end])
}

impl Recorder {
    /// A recorder for `node`; every event also goes to `sink` when there is one (cluster
    /// mode's API writer, `cluster::ClusterClient::event_sink`).
    pub fn new(node: &str, sink: Option<mpsc::UnboundedSender<Event>>) -> Self {
        Self {
            node: node.to_string(),
            ring: Arc::default(),
            correlator: Arc::default(),
            sink,
        }
    }

    /// The node this recorder reports from.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Records an event about `object` (a pod, or the node).
    pub fn record(&self, object: ObjectReference, kind: EventType, reason: &str, message: &str) {
        let message = truncate(message, MESSAGE_LIMIT);
        let reason = truncate(reason, REASON_LIMIT);
        let reason = reason.as_str();
        match kind {
            EventType::Normal => tracing::info!(
                object = object.name.as_deref().unwrap_or(""),
                ns = object.namespace.as_deref().unwrap_or(""),
                reason,
                "{message}"
            ),
            EventType::Warning => tracing::warn!(
                object = object.name.as_deref().unwrap_or(""),
                ns = object.namespace.as_deref().unwrap_or(""),
                reason,
                "{message}"
            ),
        }
        let now = Timestamp::now();
        let base = object.name.clone().unwrap_or_default();
        let event = Kept {
            name: Some(format!("{base}.{:x}", now.as_nanosecond())),
            namespace: Some(object.namespace.clone().unwrap_or_else(|| "default".into())),
            object,
            type_: Some(kind.as_str().to_string()),
            reason: Some(reason.to_string()),
            message: Some(message),
            first: Some(Time(now)),
            last: Some(Time(now)),
            event_time: Some(MicroTime(now)),
            count: Some(1),
        };
        let event = self
            .correlator
            .lock()
            .expect("correlator lock")
            .observe(event, now);
        {
            let mut ring = self.ring.lock().expect("ring lock");
            // A repeated Event moves to the end with its new count; others are not pushed out.
            ring.retain(|e| e.name != event.name);
            if ring.len() == RING {
                ring.pop_front();
            }
            ring.push_back(event.clone());
        }
        if let Some(sink) = &self.sink {
            let _ = sink.send(self.event(event));
        }
    }

    /// The Event `kept` stands for.
    fn event(&self, kept: Kept) -> Event {
        Event {
            metadata: ObjectMeta {
                name: kept.name,
                namespace: kept.namespace,
                ..Default::default()
            },
            involved_object: kept.object,
            type_: kept.type_,
            reason: kept.reason,
            message: kept.message,
            source: Some(EventSource {
                component: Some("nodelet".into()),
                host: Some(self.node.clone()),
            }),
            reporting_component: Some("nodelet".into()),
            reporting_instance: Some(self.node.clone()),
            first_timestamp: kept.first,
            last_timestamp: kept.last,
            event_time: kept.event_time,
            count: kept.count,
            ..Default::default()
        }
    }

    /// The most recent events, oldest first.
    /// Forgets what correlates the events of the object with `uid` (a pod gone for good, whose
    /// events cannot repeat), so a node that ran many pods holds nothing for the gone ones
    /// beyond the bounded ring.
    pub fn forget(&self, uid: &str) {
        let mut correlator = self.correlator.lock().expect("correlator lock");
        let uid = key_hash([uid]);
        correlator.seen.retain(|_, s| s.uid != uid);
        correlator.similar.retain(|_, s| s.uid != uid);
        crate::memory::shrink_spare(&mut correlator.seen);
        crate::memory::shrink_spare(&mut correlator.similar);
    }

    pub fn recent(&self) -> Vec<Event> {
        let ring = self.ring.lock().expect("ring lock").clone();
        ring.into_iter().map(|kept| self.event(kept)).collect()
    }
}

/// A reference to a pod (optionally a field path such as `spec.containers{app}`) for events.
pub fn pod_ref(
    pod: &k8s_openapi::api::core::v1::Pod,
    field_path: Option<String>,
) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: pod.metadata.name.clone(),
        namespace: pod.metadata.namespace.clone(),
        uid: pod.metadata.uid.clone(),
        resource_version: pod.metadata.resource_version.clone(),
        field_path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, field_path: Option<&str>) -> ObjectReference {
        ObjectReference {
            kind: Some("Pod".into()),
            name: Some(name.into()),
            namespace: Some("default".into()),
            uid: Some(format!("uid-{name}")),
            field_path: field_path.map(str::to_string),
            ..Default::default()
        }
    }

    /// #17: the ring keeps what varies between events, not whole Events (with the node's
    /// fields, the same in every event, copied into each): a full ring of typical pod events
    /// holds 490 bytes each (1,199 with whole Events), bound 600; the correlator is forgotten.
    #[test]
    fn a_full_ring_holds_little_per_event() {
        let recorder = Recorder::new("node-with-a-typical-name", None);
        let before = crate::heap::live();
        for i in 0..RING {
            let object = pod(&format!("web-{i}"), Some("spec.containers{app}"));
            let message = "Started container app";
            recorder.record(object, EventType::Normal, "Started", message);
            recorder.forget(&format!("uid-web-{i}"));
        }
        let per_event = (crate::heap::live() - before) / RING as isize;
        assert_eq!(recorder.recent().len(), RING);
        assert!(per_event < 600, "{per_event} bytes per event in the ring");
    }

    #[test]
    fn messages_and_reasons_are_cut_to_the_apis_limits() {
        let recorder = Recorder::new("n", None);
        let long = "é".repeat(1_000_000);
        recorder.record(pod("p", None), EventType::Warning, &"R".repeat(300), &long);
        let event = &recorder.recent()[0];
        let message = event.message.as_deref().unwrap();
        assert!(message.len() <= MESSAGE_LIMIT, "{}", message.len());
        assert!(
            message.ends_with("é ..."),
            "{}",
            &message[message.len() - 10..]
        );
        assert_eq!(event.reason.as_deref().unwrap().len(), 128);
        assert_eq!(truncate("short", MESSAGE_LIMIT), "short");
        assert_eq!(truncate(&"a".repeat(1025), 1024).len(), 1024);
    }

    #[test]
    fn a_repeated_event_is_counted_not_recorded_again() {
        let recorder = Recorder::new("n", None);
        let probe = pod("p", Some("spec.containers{app}"));
        for _ in 0..5000 {
            recorder.record(
                probe.clone(),
                EventType::Warning,
                "Unhealthy",
                "Liveness probe failed",
            );
        }
        recorder.record(pod("p", None), EventType::Warning, "Failed", "bad manifest");
        let events = recorder.recent();
        assert_eq!(events.len(), 2, "{events:#?}");
        assert_eq!(events[0].count, Some(5000));
        assert_eq!(events[0].message.as_deref(), Some("Liveness probe failed"));
        assert!(events[0].first_timestamp <= events[0].last_timestamp);
        assert_eq!(events[1].count, Some(1));
        // Another container's identical message is an Event of its own.
        recorder.record(
            pod("p", Some("spec.containers{other}")),
            EventType::Warning,
            "Unhealthy",
            "Liveness probe failed",
        );
        assert_eq!(recorder.recent().len(), 3);
    }

    #[test]
    fn a_forgotten_pods_events_leave_the_correlator_and_stay_in_the_ring() {
        let recorder = Recorder::new("n", None);
        for name in ["gone", "kept"] {
            for i in 0..12 {
                let message = format!("Back-off {i}");
                recorder.record(pod(name, None), EventType::Warning, "BackOff", &message);
            }
        }
        let entries = |r: &Recorder| {
            let c = r.correlator.lock().unwrap();
            (c.seen.len(), c.similar.len())
        };
        assert_eq!(
            entries(&recorder),
            (2 * 10, 2),
            "10 distinct then one combined, per pod"
        );
        recorder.forget("uid-gone");
        assert_eq!(entries(&recorder), (10, 1), "only the kept pod's");
        assert_eq!(
            recorder.recent().len(),
            2 * 10,
            "the ring keeps both pods' events"
        );
        // The kept pod's repeat still counts on.
        recorder.record(
            pod("kept", None),
            EventType::Warning,
            "BackOff",
            "Back-off 11",
        );
        let combined = recorder
            .recent()
            .into_iter()
            .filter(|e| e.involved_object.uid.as_deref() == Some("uid-kept") && e.count > Some(1));
        assert_eq!(combined.count(), 1);
    }

    #[test]
    fn similar_events_are_combined_from_the_tenth_and_the_ring_keeps_the_rest() {
        let recorder = Recorder::new("n", None);
        recorder.record(
            pod("bad", None),
            EventType::Warning,
            "Failed",
            "invalid manifest",
        );
        for i in 0..3000 {
            let message = format!("Readiness probe failed: attempt {i}");
            recorder.record(pod("p", None), EventType::Warning, "Unhealthy", &message);
        }
        let events = recorder.recent();
        assert_eq!(events.len(), 1 + 9 + 1, "9 on their own, then one combined");
        assert_eq!(events[0].message.as_deref(), Some("invalid manifest"));
        let combined = events.last().unwrap();
        assert_eq!(
            combined.message.as_deref(),
            Some("(combined from similar events): Readiness probe failed: attempt 2999")
        );
        assert_eq!(combined.count, Some(3000 - 9));
    }

    #[test]
    fn the_sink_sees_the_repeat_as_the_same_event() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let recorder = Recorder::new("n", Some(tx));
        recorder.record(pod("p", None), EventType::Normal, "Pulled", "image pulled");
        recorder.record(pod("p", None), EventType::Normal, "Pulled", "image pulled");
        let (first, second) = (rx.try_recv().unwrap(), rx.try_recv().unwrap());
        assert_eq!(first.metadata.name, second.metadata.name);
        assert_eq!((first.count, second.count), (Some(1), Some(2)));
    }
}
