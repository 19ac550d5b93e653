//! The event recorder: Kubernetes-style events about pods and the node. Every event is logged,
//! kept in a bounded ring for the read-only endpoint, and handed to any sink (the API, in cluster
//! mode). Recording never blocks and never fails the caller.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use tokio::sync::mpsc;

const RING: usize = 1000;

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

/// Records events; cheap to clone, one per component.
#[derive(Clone)]
pub struct Recorder {
    node: String,
    ring: Arc<Mutex<VecDeque<Event>>>,
    sink: Arc<Mutex<Option<mpsc::UnboundedSender<Event>>>>,
}

impl Recorder {
    pub fn new(node: &str) -> Self {
        Self {
            node: node.to_string(),
            ring: Arc::default(),
            sink: Arc::default(),
        }
    }

    /// The node this recorder reports from.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Routes every later event to `sink` as well (the API writer in cluster mode).
    pub fn set_sink(&self, sink: mpsc::UnboundedSender<Event>) {
        *self.sink.lock().expect("sink lock") = Some(sink);
    }

    /// Records an event about `object` (a pod, or the node).
    pub fn record(&self, object: ObjectReference, kind: EventType, reason: &str, message: &str) {
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
        let event = Event {
            metadata: ObjectMeta {
                name: Some(format!("{base}.{:x}", now.as_nanosecond())),
                namespace: Some(object.namespace.clone().unwrap_or_else(|| "default".into())),
                ..Default::default()
            },
            involved_object: object,
            type_: Some(kind.as_str().to_string()),
            reason: Some(reason.to_string()),
            message: Some(message.to_string()),
            source: Some(EventSource {
                component: Some("nodelet".into()),
                host: Some(self.node.clone()),
            }),
            reporting_component: Some("nodelet".into()),
            reporting_instance: Some(self.node.clone()),
            first_timestamp: Some(Time(now)),
            last_timestamp: Some(Time(now)),
            event_time: Some(MicroTime(now)),
            count: Some(1),
            ..Default::default()
        };
        {
            let mut ring = self.ring.lock().expect("ring lock");
            if ring.len() == RING {
                ring.pop_front();
            }
            ring.push_back(event.clone());
        }
        if let Some(sink) = self.sink.lock().expect("sink lock").as_ref() {
            let _ = sink.send(event);
        }
    }

    /// The most recent events, oldest first.
    pub fn recent(&self) -> Vec<Event> {
        self.ring
            .lock()
            .expect("ring lock")
            .iter()
            .cloned()
            .collect()
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
