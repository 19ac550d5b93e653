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
