//! Capped exponential backoff with full jitter for transient sink errors. Never gives up on a
//! transient error (an audit trail may not skip); only cancellation ends the wait.

use std::time::Duration;

use rand::Rng;
use tokio_util::sync::CancellationToken;

use crate::config::RetryConfig;
use crate::metrics;
use crate::sinks::SinkError;

#[derive(Debug, thiserror::Error)]
pub enum RetryError {
    #[error(transparent)]
    Sink(SinkError),
    #[error("cancelled while retrying: {last}")]
    Cancelled { last: SinkError },
}

/// Delay before attempt `attempt` (1-based): uniform in [0, min(max, initial * 2^(attempt-1))].
pub fn backoff(policy: &RetryConfig, attempt: u32) -> Duration {
    let cap =
        policy.initial_backoff_ms.saturating_mul(1u64 << attempt.saturating_sub(1).min(20)).min(policy.max_backoff_ms);
    // Full jitter keeps a fleet of workers from hammering a recovering backend in lockstep.
    Duration::from_millis(rand::thread_rng().gen_range(cap / 2..=cap.max(1)))
}

/// Runs `op` until it succeeds, fails fatally, or `cancel` fires. `context` names the record
/// range (topic/partition/offsets) for the log line; each failure streak logs once when it
/// starts, then every 10th attempt, and once when it recovers.
pub async fn retry<T, F, Fut>(
    context: &str,
    policy: &RetryConfig,
    cancel: &CancellationToken,
    on_state: impl Fn(bool),
    mut op: F,
) -> Result<T, RetryError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, SinkError>>,
{
    let mut attempt = 0u32;
    loop {
        match op().await {
            Ok(value) => {
                if attempt > 0 {
                    tracing::info!(context, attempts = attempt + 1, "backend recovered");
                    on_state(true);
                }
                return Ok(value);
            }
            Err(err @ SinkError::FenceLost { .. }) => {
                // Not a backend failure, and not yet a loss: the caller first checks whether its
                // own earlier attempt landed; the worker counts a real loss when it stops.
                if attempt > 0 {
                    on_state(true);
                }
                return Err(RetryError::Sink(err));
            }
            Err(err) => {
                metrics::backend_error(&err);
                if !err.is_retryable() {
                    tracing::error!(context, error = %err, "fatal backend error");
                    // The streak is over; a stopped partition reports itself separately.
                    if attempt > 0 {
                        on_state(true);
                    }
                    return Err(RetryError::Sink(err));
                }
                attempt += 1;
                if attempt == 1 {
                    on_state(false);
                }
                if attempt == 1 || attempt % 10 == 0 {
                    tracing::warn!(context, attempt, error = %err, "backend write failed; retrying with backoff");
                }
                let delay = backoff(policy, attempt);
                tokio::select! {
                    // A revoked or stopping worker no longer waits on the backend: do not leave
                    // readiness marked failing by an operation nobody is retrying.
                    _ = cancel.cancelled() => {
                        on_state(true);
                        return Err(RetryError::Cancelled { last: err });
                    }
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn policy() -> RetryConfig {
        RetryConfig { initial_backoff_ms: 1, max_backoff_ms: 4 }
    }

    fn transient() -> SinkError {
        SinkError::Transient { backend: "t", operation: "op", target: "x".into(), message: "down".into() }
    }

    #[test]
    fn backoff_grows_to_its_cap_and_never_hammers() {
        let p = RetryConfig { initial_backoff_ms: 100, max_backoff_ms: 1000 };
        for attempt in 1..40 {
            // initial * 2^(attempt-1), capped; the jitter keeps at least half of it.
            let cap = (100u64 << (attempt - 1).min(20)).min(1000);
            for _ in 0..20 {
                let d = backoff(&p, attempt).as_millis() as u64;
                assert!((cap / 2..=cap).contains(&d), "attempt {attempt}: {d} ms, expected {}..={cap}", cap / 2);
            }
        }
    }

    #[tokio::test]
    async fn retries_transient_until_success() {
        let calls = AtomicU32::new(0);
        let states = std::sync::Mutex::new(Vec::new());
        let out = retry(
            "ctx",
            &policy(),
            &CancellationToken::new(),
            |ok| states.lock().unwrap().push(ok),
            || async {
                if calls.fetch_add(1, Ordering::SeqCst) < 3 {
                    Err(transient())
                } else {
                    Ok(7)
                }
            },
        )
        .await
        .unwrap();
        assert_eq!(out, 7);
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        assert_eq!(*states.lock().unwrap(), vec![false, true]);
    }

    #[tokio::test]
    async fn fatal_stops_immediately() {
        let calls = AtomicU32::new(0);
        let err = retry(
            "ctx",
            &policy(),
            &CancellationToken::new(),
            |_| {},
            || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(SinkError::Fatal {
                    backend: "t",
                    operation: "op",
                    target: "x".into(),
                    message: "denied".into(),
                })
            },
        )
        .await
        .unwrap_err();
        assert!(matches!(err, RetryError::Sink(SinkError::Fatal { .. })));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn cancellation_ends_an_outage_wait_and_clears_the_failing_mark() {
        let cancel = CancellationToken::new();
        cancel.cancel();
        let states = std::sync::Mutex::new(Vec::new());
        let err = retry(
            "ctx",
            &policy(),
            &cancel,
            |ok| states.lock().unwrap().push(ok),
            || async { Err::<(), _>(transient()) },
        )
        .await
        .unwrap_err();
        assert!(matches!(err, RetryError::Cancelled { .. }));
        assert_eq!(*states.lock().unwrap(), vec![false, true]);
    }

    #[tokio::test]
    async fn fatal_after_a_transient_streak_clears_the_failing_mark() {
        let calls = AtomicU32::new(0);
        let states = std::sync::Mutex::new(Vec::new());
        let err = retry(
            "ctx",
            &policy(),
            &CancellationToken::new(),
            |ok| states.lock().unwrap().push(ok),
            || async {
                if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    Err::<(), _>(transient())
                } else {
                    Err(SinkError::Fatal {
                        backend: "t",
                        operation: "op",
                        target: "x".into(),
                        message: "denied".into(),
                    })
                }
            },
        )
        .await
        .unwrap_err();
        assert!(matches!(err, RetryError::Sink(SinkError::Fatal { .. })));
        assert_eq!(*states.lock().unwrap(), vec![false, true]);
    }
}
