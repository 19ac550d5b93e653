//! The API event sink: every event the [`crate::events::Recorder`] records is created as a core
//! v1 Event in the involved object's namespace (`default` for the node); an event the recorder
//! correlated with an earlier one (its `count` above 1) is a merge patch of that Event's count,
//! last timestamp and message, as client-go's recorder sends it (created when it is gone).
//! Events are best effort: a failed write is retried twice (one the API refused as invalid or
//! forbidden is not), then the event is dropped with a log line.

use std::time::Duration;

use k8s_openapi::api::core::v1::Event;
use kube::api::{Patch, PatchParams, PostParams};
use kube::Api;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::sleep_or_cancel;

const ATTEMPTS: usize = 3;

/// Fills what the API requires of an event that has an `eventTime`: an `action` (the reason,
/// as the kubelet's recorder does) besides the reporting controller and instance.
fn prepare(mut event: Event) -> Event {
    if event.action.is_none() {
        event.action = event.reason.clone();
    }
    if event.reporting_component.is_none() {
        event.reporting_component = Some("nodelet".into());
    }
    if event.reporting_instance.is_none() {
        event.reporting_instance = event.source.as_ref().and_then(|s| s.host.clone());
    }
    event
}

/// Creates events until the recorder is dropped or `token` is cancelled.
pub(super) async fn run(
    client: kube::Client,
    mut events: mpsc::UnboundedReceiver<Event>,
    token: CancellationToken,
) {
    loop {
        let event = tokio::select! {
            _ = token.cancelled() => return,
            e = events.recv() => match e {
                Some(e) => prepare(e),
                None => return,
            },
        };
        let ns = event
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let api: Api<Event> = Api::namespaced(client.clone(), &ns);
        for attempt in 1..=ATTEMPTS {
            match write(&api, &event).await {
                Ok(_) => break,
                Err(e) if attempt == ATTEMPTS => {
                    tracing::warn!(
                        event = event.metadata.name.as_deref().unwrap_or(""),
                        ns,
                        reason = event.reason.as_deref().unwrap_or(""),
                        error = %e,
                        "event dropped: the API refused it"
                    );
                }
                Err(kube::Error::Api(s)) if s.is_already_exists() => break,
                Err(kube::Error::Api(s)) if (400..500).contains(&s.code) && s.code != 429 => {
                    tracing::warn!(
                        event = event.metadata.name.as_deref().unwrap_or(""),
                        ns,
                        reason = event.reason.as_deref().unwrap_or(""),
                        error = %s,
                        "event dropped: the API refused it"
                    );
                    break;
                }
                Err(_) => {
                    if !sleep_or_cancel(Duration::from_millis(500), &token).await {
                        return;
                    }
                }
            }
        }
    }
}

/// Creates the event, or patches the Event it repeats.
async fn write(api: &Api<Event>, event: &Event) -> Result<(), kube::Error> {
    if event.count.unwrap_or(1) > 1 {
        let name = event.metadata.name.clone().unwrap_or_default();
        let patch = serde_json::json!({
            "count": event.count,
            "lastTimestamp": event.last_timestamp,
            "message": event.message,
        });
        match api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            other => return other.map(drop),
        }
    }
    api.create(&PostParams::default(), event).await.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::fake_api::{until, FakeApi};
    use crate::events::{EventType, Recorder};
    use k8s_openapi::api::core::v1::ObjectReference;

    const EVENTS: &str = "/api/v1/namespaces/default/events";
    /// Catches a hang; paused time gets there at once.
    const HANG: Duration = Duration::from_secs(600);

    fn web() -> ObjectReference {
        ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some("web".into()),
            namespace: Some("default".into()),
            uid: Some("u1".into()),
            field_path: Some("spec.containers{app}".into()),
            ..Default::default()
        }
    }

    /// A recorder on node `n1` whose sink is the events loop writing to `api`.
    fn start(api: &FakeApi) -> (Recorder, CancellationToken) {
        let (tx, rx) = mpsc::unbounded_channel();
        let token = CancellationToken::new();
        tokio::spawn(run(api.client(), rx, token.clone()));
        (Recorder::new("n1", Some(tx)), token)
    }

    fn posts(api: &FakeApi) -> Vec<crate::cluster::fake_api::Request> {
        api.requests_to("POST", EVENTS)
    }

    /// #14: an event is created once with what the kubelet writes; its repeat is a merge
    /// patch of that Event's count, never a second Event.
    #[tokio::test(start_paused = true)]
    async fn an_event_is_posted_once_and_its_repeat_patches_the_count() {
        let api = FakeApi::new();
        let (recorder, token) = start(&api);
        recorder.record(
            web(),
            EventType::Warning,
            "Unhealthy",
            "Liveness probe failed",
        );
        until("the event is posted", HANG, || posts(&api).len() == 1).await;
        let body = &posts(&api)[0].body;
        assert_eq!(body["reason"], "Unhealthy");
        assert_eq!(body["message"], "Liveness probe failed");
        assert_eq!(body["type"], "Warning");
        assert_eq!(body["count"], 1);
        assert_eq!(body["source"]["component"], "nodelet");
        assert_eq!(body["source"]["host"], "n1");
        assert_eq!(body["involvedObject"]["uid"], "u1");
        assert_eq!(body["involvedObject"]["fieldPath"], "spec.containers{app}");
        let name = body["metadata"]["name"]
            .as_str()
            .expect("a name")
            .to_string();
        let path = format!("{EVENTS}/{name}");
        recorder.record(
            web(),
            EventType::Warning,
            "Unhealthy",
            "Liveness probe failed",
        );
        until("the repeat is patched", HANG, || {
            !api.requests_to("PATCH", &path).is_empty()
        })
        .await;
        let patch = &api.requests_to("PATCH", &path)[0];
        assert_eq!(patch.content_type, "application/merge-patch+json");
        assert_eq!(patch.body["count"], 2);
        assert_eq!(api.get(&path).expect("the Event")["count"], 2);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(posts(&api).len(), 1, "the repeat was posted again");
        token.cancel();
    }

    /// #14: a write the API failed is retried; one it refused as forbidden is dropped.
    #[tokio::test(start_paused = true)]
    async fn a_failed_event_write_is_retried_and_a_refused_one_dropped() {
        let api = FakeApi::new();
        let (recorder, token) = start(&api);
        api.fail("POST", EVENTS, 2, 500);
        recorder.record(web(), EventType::Normal, "Pulled", "image pulled");
        until("the third try is answered", HANG, || posts(&api).len() == 3).await;
        let codes: Vec<u16> = posts(&api).iter().map(|r| r.code).collect();
        assert_eq!(codes, [500, 500, 201]);
        api.fail("POST", EVENTS, 1, 403);
        recorder.record(web(), EventType::Normal, "Started", "container started");
        until("the refusal is answered", HANG, || posts(&api).len() == 4).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(posts(&api).len(), 4, "a forbidden event was retried");
        token.cancel();
    }

    #[test]
    fn an_event_gets_the_fields_the_api_requires() {
        let e = prepare(Event {
            reason: Some("Started".into()),
            source: Some(k8s_openapi::api::core::v1::EventSource {
                component: Some("nodelet".into()),
                host: Some("n1".into()),
            }),
            ..Default::default()
        });
        assert_eq!(e.action.as_deref(), Some("Started"));
        assert_eq!(e.reporting_component.as_deref(), Some("nodelet"));
        assert_eq!(e.reporting_instance.as_deref(), Some("n1"));
        let kept = prepare(Event {
            reason: Some("Killing".into()),
            action: Some("Kill".into()),
            ..Default::default()
        });
        assert_eq!(kept.action.as_deref(), Some("Kill"));
    }
}
