//! The audit stream against a real NATS JetStream server
//! (`CUSTOS_TEST_NATS_URL`, e.g. nats://127.0.0.1:4222; skipped when unset):
//! the publisher puts every leaf in the stream once and in order, across
//! restarts and a second publisher racing the first; a cut of NATS slows no
//! append and loses nothing; the detection source delivers every event in
//! order and, restarted, resumes from the saved cursor.
mod support;

use std::time::Duration;

use async_nats::jetstream::consumer::AckPolicy;
use custos_detect::EventSource;
use custos_stream::{Publisher, StreamSource};
use support::*;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publisher_publishes_every_leaf_once_in_order_and_resumes() {
    let Some(url) = nats_url() else { return };
    let config = unique_config(&url, "resume");
    let env = env().await;
    for n in 0..40 {
        append(&env.trail, n).await;
    }
    let p = Publisher::start(env.trail.clone(), config.clone())
        .await
        .unwrap();
    assert!(
        eventually(WAIT, || async { p.stats().published == 40 }).await,
        "published: {:?}",
        p.stats()
    );
    let s = p.stats();
    assert!(
        s.connected && s.last_error.is_none() && s.log_size == 40,
        "{s:?}"
    );
    p.stop().await;
    assert_stream_is_the_log(&config, &env.trail, 40).await;

    // Stopped while the log grows: the next one resumes from the stream's
    // last message, publishing nothing twice.
    for n in 40..70 {
        append(&env.trail, n).await;
    }
    let p = Publisher::start(env.trail.clone(), config.clone())
        .await
        .unwrap();
    assert!(eventually(WAIT, || async { p.stats().published == 70 }).await);

    // A second publisher (two nodes both believing they lead, for a
    // moment) and the first one killed mid-way: still every index once.
    let second = Publisher::start(env.trail.clone(), config.clone())
        .await
        .unwrap();
    let appender = {
        let trail = env.trail.clone();
        tokio::spawn(async move {
            for n in 70..400 {
                append(&trail, n).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    drop(p); // aborted, acknowledgements possibly outstanding
    appender.await.unwrap();
    assert!(
        eventually(WAIT, || async { second.stats().published == 400 }).await,
        "{:?}",
        second.stats()
    );
    second.stop().await;
    assert_stream_is_the_log(&config, &env.trail, 400).await;

    // A republication of an index inside the window is de-duplicated.
    let client = async_nats::connect(&url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let row = env.trail.entries(399, 400, 1).await.unwrap().remove(0);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "399");
    headers.insert(custos_stream::INDEX_HEADER, "399");
    let ack = js
        .publish_with_headers(config.subject.clone(), headers, row.data.into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(ack.duplicate, "{ack:?}");
    assert_eq!(stream_len(&config).await, 400);
    delete_stream(&config).await;
}

/// Drive a source as the pipeline does: from the cursor, skipping nothing
/// (the source skips duplicates itself), saving after every batch.
async fn consume(source: &mut StreamSource, cursor: &mut u64, seen: &mut Vec<u64>, until: u64) {
    let deadline = std::time::Instant::now() + WAIT;
    while *cursor < until && std::time::Instant::now() < deadline {
        match source.next(*cursor, 100, Duration::from_millis(250)).await {
            Ok(batch) => {
                for ev in batch {
                    assert_eq!(ev.index, *cursor, "in order, no gap, no duplicate");
                    assert!(!ev.leaf.is_empty());
                    seen.push(ev.index);
                    *cursor += 1;
                }
                source.saved(*cursor).await.ok();
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_cut_slows_no_request_and_loses_nothing() {
    let Some(url) = nats_url() else { return };
    let config = unique_config(&url, "cut");
    let proxy = Proxy::start(&url).await;
    let via_proxy = custos_stream::StreamConfig {
        nats_url: proxy.url.clone(),
        ..config.clone()
    };
    let env = env().await;
    let publisher = Publisher::start(env.trail.clone(), via_proxy.clone())
        .await
        .unwrap();
    let mut source = StreamSource::open(env.trail.clone(), via_proxy.clone())
        .await
        .unwrap();
    let mut cursor = 0;
    let mut seen = Vec::new();

    // Before the cut: flowing.
    let mut n = 0;
    for _ in 0..100 {
        append(&env.trail, n).await;
        n += 1;
    }
    consume(&mut source, &mut cursor, &mut seen, 100).await;
    assert_eq!(cursor, 100);

    // The cut: every connection dropped, new ones refused, while events
    // keep being appended — none fails, none waits on NATS — until the
    // publisher has noticed (its acknowledgements time out after 5 s).
    proxy.cut();
    let cut_at = std::time::Instant::now();
    let mut slowest = Duration::ZERO;
    loop {
        let (_, took) = append(&env.trail, n).await;
        slowest = slowest.max(took);
        n += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
        let s = publisher.stats();
        if cut_at.elapsed() > Duration::from_secs(4) && s.outages >= 1 {
            break;
        }
        assert!(
            cut_at.elapsed() < WAIT,
            "the publisher never saw the cut: {s:?}"
        );
    }
    // The source fails (or waits) during the cut, never delivers wrongly.
    let during = source.next(cursor, 100, Duration::from_millis(300)).await;
    if let Ok(batch) = &during {
        for (k, ev) in batch.iter().enumerate() {
            assert_eq!(ev.index, cursor + k as u64);
        }
    }
    let s = publisher.stats();
    assert!(
        !s.connected && s.last_error.is_some() && s.published < n,
        "the publisher saw the outage: {s:?}"
    );
    assert!(
        slowest < Duration::from_millis(500),
        "an append took {slowest:?} during the cut"
    );
    println!(
        "cut for {:?}: {} events appended, the slowest append took {slowest:?}",
        cut_at.elapsed(),
        n - 100
    );
    proxy.restore();

    // Back: the stream catches up from the log, the source delivers all.
    let total = n;
    assert!(
        eventually(Duration::from_secs(60), || async {
            publisher.stats().published == total
        })
        .await,
        "caught up: {:?}",
        publisher.stats()
    );
    if let Ok(batch) = during {
        for ev in batch {
            seen.push(ev.index);
            cursor += 1;
        }
    }
    consume(&mut source, &mut cursor, &mut seen, total).await;
    assert_eq!(
        seen,
        (0..total).collect::<Vec<_>>(),
        "every event, in order, once"
    );
    let s = publisher.stats();
    assert!(s.connected && s.last_error.is_none(), "{s:?}");
    publisher.stop().await;
    assert_stream_is_the_log(&config, &env.trail, total).await;

    // The durable consumer: acknowledged through the last save, unlimited
    // acknowledgements pending.
    let info = consumer_info(&config).await;
    assert_eq!(info.config.ack_policy, AckPolicy::All);
    assert_eq!(info.config.max_ack_pending, -1);
    assert_eq!(
        info.config.ack_wait,
        Duration::from_secs(config.ack_wait_secs)
    );
    assert!(
        eventually(WAIT, || async {
            consumer_info(&config).await.ack_floor.stream_sequence == total
        })
        .await,
        "acknowledged through the last save"
    );

    // Restarted from a saved cursor, a new source resumes there.
    drop(source);
    let mut again = StreamSource::open(env.trail.clone(), config.clone())
        .await
        .unwrap();
    let resume = total - 25;
    let mut cursor = resume;
    let mut seen = Vec::new();
    consume(&mut again, &mut cursor, &mut seen, total).await;
    assert_eq!(seen, (resume..total).collect::<Vec<_>>());
    delete_stream(&config).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexes_missing_from_the_stream_come_from_the_log() {
    let Some(url) = nats_url() else { return };
    let config = unique_config(&url, "gap");
    let env = env().await;
    for n in 0..30 {
        append(&env.trail, n).await;
    }
    let p = Publisher::start(env.trail.clone(), config.clone())
        .await
        .unwrap();
    assert!(eventually(WAIT, || async { p.stats().published == 30 }).await);
    p.stop().await;
    // Lose the first ten messages (a purge up to sequence 11).
    let client = async_nats::connect(&url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream(&config.stream).await.unwrap();
    stream.purge().sequence(11).await.unwrap();
    assert_eq!(stream_len(&config).await, 20);
    let mut source = StreamSource::open(env.trail.clone(), config.clone())
        .await
        .unwrap();
    let (mut cursor, mut seen) = (0, Vec::new());
    consume(&mut source, &mut cursor, &mut seen, 30).await;
    assert_eq!(seen, (0..30).collect::<Vec<_>>());
    delete_stream(&config).await;
}

async fn consumer_info(
    config: &custos_stream::StreamConfig,
) -> async_nats::jetstream::consumer::Info {
    let client = async_nats::connect(&config.nats_url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream(&config.stream).await.unwrap();
    stream.consumer_info(&config.consumer).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_acknowledges_only_what_was_saved() {
    let Some(url) = nats_url() else { return };
    let config = unique_config(&url, "ack");
    let env = env().await;
    for n in 0..50 {
        append(&env.trail, n).await;
    }
    let p = Publisher::start(env.trail.clone(), config.clone())
        .await
        .unwrap();
    assert!(eventually(WAIT, || async { p.stats().published == 50 }).await);
    p.stop().await;
    let mut source = StreamSource::open(env.trail.clone(), config.clone())
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < 50 {
        let from = got.len() as u64;
        let batch = source.next(from, 20, Duration::from_secs(1)).await.unwrap();
        got.extend(batch.into_iter().map(|e| e.index));
    }
    assert_eq!(got, (0..50).collect::<Vec<_>>());
    // Judged, not saved: nothing acknowledged.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(consumer_info(&config).await.ack_floor.stream_sequence, 0);
    // Saved through 30: acknowledged through the last delivery below it.
    source.saved(30).await.unwrap();
    assert!(
        eventually(WAIT, || async {
            let floor = consumer_info(&config).await.ack_floor.stream_sequence;
            floor > 0 && floor <= 30
        })
        .await
    );
    // A crash now: a new source asked from the saved cursor redelivers the
    // unsaved rest.
    drop(source);
    let mut again = StreamSource::open(env.trail.clone(), config.clone())
        .await
        .unwrap();
    let (mut cursor, mut seen) = (30, Vec::new());
    consume(&mut again, &mut cursor, &mut seen, 50).await;
    assert_eq!(seen, (30..50).collect::<Vec<_>>());
    delete_stream(&config).await;
}
