//! The API event sink: every event the [`crate::events::Recorder`] records is created as a core
//! v1 Event in the involved object's namespace (`default` for the node). Events are best effort:
//! a failed create is retried twice, then the event is dropped with a log line.

use std::time::Duration;

use k8s_openapi::api::core::v1::Event;
use kube::api::PostParams;
use kube::Api;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::sleep_or_cancel;

const ATTEMPTS: usize = 3;

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
                Some(e) => e,
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
            match api.create(&PostParams::default(), &event).await {
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
                Err(_) => {
                    if !sleep_or_cancel(Duration::from_millis(500), &token).await {
                        return;
                    }
                }
            }
        }
    }
}
