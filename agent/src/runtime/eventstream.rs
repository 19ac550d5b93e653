//! The one task that subscribes to containerd's `/tasks/exit` events and rebroadcasts init
//! process exits as [`ExitEvent`]s. It resubscribes with back-off when the stream breaks (e.g.
//! containerd restarted) and ends when the last `Runtime` handle is dropped.

use std::time::Duration;

use containerd_client::events::TaskExit;
use containerd_client::services::v1::events_client::EventsClient;
use containerd_client::services::v1::SubscribeRequest;
use prost::Message;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::{to_system_time, ExitEvent};
use crate::retry::Retry;

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Runs until `token` is cancelled.
pub(super) async fn exit_events(
    channel: Channel,
    namespace: String,
    tx: broadcast::Sender<ExitEvent>,
    token: CancellationToken,
) {
    let mut retry = Retry::new(MIN_BACKOFF, MAX_BACKOFF);
    loop {
        let mut client = EventsClient::new(channel.clone());
        let req = SubscribeRequest {
            filters: vec![format!("topic==\"/tasks/exit\",namespace==\"{namespace}\"")],
        };
        let subscribed = tokio::select! {
            _ = token.cancelled() => return,
            r = client.subscribe(req) => r,
        };
        match subscribed {
            Ok(resp) => {
                retry.reset();
                let mut stream = resp.into_inner();
                loop {
                    let msg = tokio::select! {
                        _ = token.cancelled() => return,
                        m = stream.message() => m,
                    };
                    match msg {
                        Ok(Some(envelope)) => {
                            if envelope.namespace != namespace {
                                continue;
                            }
                            let Some(any) = envelope.event else { continue };
                            let Ok(exit) = TaskExit::decode(any.value.as_slice()) else {
                                tracing::warn!(type_url = any.type_url, "undecodable exit event");
                                continue;
                            };
                            if let Some(event) = to_exit_event(exit) {
                                let id = &event.container_id;
                                tracing::debug!(container_id = %id, code = event.exit_code, "exit event");
                                // No receiver is fine: nobody listens yet.
                                let _ = tx.send(event);
                            }
                        }
                        Ok(None) => {
                            tracing::warn!("containerd event stream ended; resubscribing");
                            break;
                        }
                        Err(status) => {
                            tracing::warn!(%status, "containerd event stream broke; resubscribing");
                            break;
                        }
                    }
                }
            }
            Err(status) => {
                tracing::warn!(%status, "subscribing to containerd events failed");
            }
        }
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(retry.fail()) => {}
        }
    }
}

/// Exits of exec processes (id != container id) are not container exits.
fn to_exit_event(exit: TaskExit) -> Option<ExitEvent> {
    if !exit.id.is_empty() && exit.id != exit.container_id {
        return None;
    }
    Some(ExitEvent {
        exit_code: exit.exit_status as i32,
        exited_at: to_system_time(exit.exited_at).unwrap_or_else(std::time::SystemTime::now),
        container_id: exit.container_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_exits_are_not_container_exits() {
        let exit = TaskExit {
            container_id: "c1".into(),
            id: "exec-1".into(),
            pid: 9,
            exit_status: 1,
            exited_at: None,
        };
        assert!(to_exit_event(exit).is_none());
        let exit = TaskExit {
            container_id: "c1".into(),
            id: "c1".into(),
            pid: 9,
            exit_status: 137,
            exited_at: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
        };
        let e = to_exit_event(exit).unwrap();
        assert_eq!(e.container_id, "c1");
        assert_eq!(e.exit_code, 137);
        assert_eq!(
            e.exited_at,
            std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
        );
    }
}
