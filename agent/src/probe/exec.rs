//! The exec handler: runs the probe's command in the container through [`Exec`] (the runtime
//! kills it at the timeout); exit 0 is a success, anything else a failure with the output.

use std::time::Duration;

use super::{capped_text, Exec, ExecError, Outcome};

/// How long past the probe's timeout the runtime gets to kill the command, clean up and
/// report (it normally answers within milliseconds of the timeout; the run is abandoned, and
/// the runtime's cleanup with it, only past this).
pub const KILL_GRACE: Duration = Duration::from_secs(5);

/// Runs `command` in `container_id` within `timeout`. Err: the runtime could not be asked,
/// which is no result at all.
pub async fn exec_probe(
    exec: &dyn Exec,
    container_id: &str,
    command: &[String],
    timeout: Duration,
) -> Result<Outcome, String> {
    let run = exec.exec(container_id, command, timeout);
    Ok(
        match tokio::time::timeout(timeout + KILL_GRACE, run).await {
            Ok(Ok((0, output))) => Outcome::Success(capped_text(&output)),
            Ok(Ok((code, output))) => {
                let text = capped_text(&output);
                if text.trim().is_empty() {
                    Outcome::Failure(format!("command exited with code {code}"))
                } else {
                    Outcome::Failure(text)
                }
            }
            Ok(Err(ExecError::Failed(message))) => Outcome::Failure(message),
            Ok(Err(ExecError::Errored(message))) => return Err(message),
            Err(_) => Outcome::Failure(format!("command {:?} timed out", command.join(" "))),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::future::BoxFuture;
    use futures::FutureExt;

    struct Fixed(Result<(i32, Vec<u8>), ExecError>);

    impl Exec for Fixed {
        fn exec(
            &self,
            _: &str,
            _: &[String],
            _: Duration,
        ) -> BoxFuture<'static, Result<(i32, Vec<u8>), ExecError>> {
            futures::future::ready(self.0.clone()).boxed()
        }
    }

    struct Hang;

    impl Exec for Hang {
        fn exec(
            &self,
            _: &str,
            _: &[String],
            _: Duration,
        ) -> BoxFuture<'static, Result<(i32, Vec<u8>), ExecError>> {
            futures::future::pending().boxed()
        }
    }

    fn cmd() -> Vec<String> {
        vec!["cat".into(), "/tmp/healthy".into()]
    }

    #[tokio::test(start_paused = true)]
    async fn exit_codes_map_to_outcomes() {
        let t = Duration::from_secs(1);
        let ok = Fixed(Ok((0, b"fine".to_vec())));
        assert_eq!(
            exec_probe(&ok, "c1", &cmd(), t).await,
            Ok(Outcome::Success("fine".into()))
        );
        let bad = Fixed(Ok((1, b"cat: can't open".to_vec())));
        assert_eq!(
            exec_probe(&bad, "c1", &cmd(), t).await,
            Ok(Outcome::Failure("cat: can't open".into()))
        );
        let silent = Fixed(Ok((3, Vec::new())));
        assert_eq!(
            exec_probe(&silent, "c1", &cmd(), t).await,
            Ok(Outcome::Failure("command exited with code 3".into()))
        );
        let slow = Fixed(Err(ExecError::Failed("timed out".into())));
        assert_eq!(
            exec_probe(&slow, "c1", &cmd(), t).await,
            Ok(Outcome::Failure("timed out".into()))
        );
        // A command that cannot start, or a runtime that cannot be asked, is no result.
        let missing = Fixed(Err(ExecError::Errored(
            "exec: \"nope\": executable file not found".into(),
        )));
        assert_eq!(
            exec_probe(&missing, "c1", &cmd(), t).await,
            Err("exec: \"nope\": executable file not found".into())
        );
    }

    #[tokio::test(start_paused = true)]
    async fn output_is_capped() {
        let big = Fixed(Ok((1, vec![b'x'; 50_000])));
        let outcome = exec_probe(&big, "c1", &cmd(), Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(outcome.output().len(), super::super::MAX_OUTPUT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_command_times_out() {
        let start = tokio::time::Instant::now();
        let outcome = exec_probe(&Hang, "c1", &cmd(), Duration::from_secs(2)).await;
        assert_eq!(
            outcome.unwrap(),
            Outcome::Failure("command \"cat /tmp/healthy\" timed out".into())
        );
        assert!(start.elapsed() >= Duration::from_secs(2) + KILL_GRACE);
    }
}
