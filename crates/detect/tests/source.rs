//! The pipeline on an external source (no NATS: a source that replays the
//! log, delivering some events again each time): every event is judged
//! once, the source hears of each save of the cursor, a stopped pipeline
//! judges nothing more, and a new one resumes from the saved cursor.
use std::sync::Arc;
use std::time::Duration;

use custos_audit::{AuditRecord, AuditTrail};
use custos_detect::{DetectConfig, Detection, EventSource, SealedEvent, Source, SourceError};
use parking_lot::Mutex;

mod common;

/// Replays the log from three events before `from` (duplicates the
/// pipeline must skip); records the cursors it is told were saved.
struct Replaying {
    trail: AuditTrail,
    asked: Arc<Mutex<Vec<u64>>>,
    saved: Arc<Mutex<Vec<u64>>>,
}

#[async_trait::async_trait]
impl EventSource for Replaying {
    async fn next(
        &mut self,
        from: u64,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<SealedEvent>, SourceError> {
        self.asked.lock().push(from);
        let size = self
            .trail
            .size()
            .await
            .map_err(|e| SourceError(e.to_string()))?;
        if from >= size {
            tokio::time::sleep(wait.min(Duration::from_millis(50))).await;
            return Ok(Vec::new());
        }
        let rows = self
            .trail
            .entries(from.saturating_sub(3), size, max)
            .await
            .map_err(|e| SourceError(e.to_string()))?;
        Ok(rows
            .into_iter()
            .map(|r| SealedEvent {
                index: r.index,
                leaf: r.data,
            })
            .collect())
    }

    async fn saved(&mut self, cursor: u64) -> Result<(), SourceError> {
        self.saved.lock().push(cursor);
        Ok(())
    }
}

async fn append(trail: &AuditTrail, n: u64) {
    let rec = AuditRecord {
        at: custos_auth::now_micros(),
        action: format!("GET /metadata #{n}"),
        interaction: Some("capabilities".into()),
        status: 200,
        ..AuditRecord::default()
    };
    trail.append(rec).await.expect("appended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_source_is_judged_once_and_acknowledged_after_saves() {
    let w = common::world().await;
    let (records, trail, auth) = (w.records.clone(), w.trail.clone(), w.auth.clone());
    for n in 0..40 {
        append(&trail, n).await;
    }
    let config = DetectConfig {
        save_secs: 1,
        ..DetectConfig::default()
    };
    let (asked, saved) = (
        Arc::new(Mutex::new(Vec::new())),
        Arc::new(Mutex::new(Vec::new())),
    );
    let source = Replaying {
        trail: trail.clone(),
        asked: asked.clone(),
        saved: saved.clone(),
    };
    let d = Detection::start_with(
        records.clone(),
        auth.clone(),
        config.clone(),
        Source::External(Box::new(source)),
    )
    .await
    .unwrap();
    assert!(d.caught_up(Duration::from_secs(20)).await);
    let size = trail.size().await.unwrap();
    assert_eq!(d.stats().processed, size, "every event judged once");
    assert_eq!(d.stats().cursor, size);
    d.stop().await.unwrap();
    let s = saved.lock().clone();
    assert_eq!(
        s.last(),
        Some(&size),
        "the stop's save is acknowledged: {s:?}"
    );
    assert!(s.windows(2).all(|w| w[0] <= w[1]), "{s:?}");

    // Stopped: nothing more is judged.
    append(&trail, 40).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(d.stats().processed, size);
    d.stop().await.unwrap(); // stopping again does nothing

    // A new pipeline resumes from the saved cursor.
    let asked_again = Arc::new(Mutex::new(Vec::new()));
    let source = Replaying {
        trail: trail.clone(),
        asked: asked_again.clone(),
        saved: Arc::new(Mutex::new(Vec::new())),
    };
    let d = Detection::start_with(records, auth, config, Source::External(Box::new(source)))
        .await
        .unwrap();
    assert!(d.caught_up(Duration::from_secs(20)).await);
    assert_eq!(asked_again.lock().first(), Some(&size));
    assert_eq!(d.stats().processed, trail.size().await.unwrap() - size);
    d.stop().await.unwrap();
    assert!(asked.lock().iter().all(|f| *f <= size));
}
