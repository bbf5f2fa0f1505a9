//! Generation speed and bundle-size statistics, or one patient bundle.
//!
//! ```text
//! cargo run --release -p custos-synth --example synth_stats [PATIENTS]
//! cargo run --release -p custos-synth --example synth_stats -- --dump [INDEX]
//! ```
use std::collections::HashSet;
use std::time::Instant;

use custos_synth::{Detail, Synth, SynthConfig};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config = |patients, detail| SynthConfig {
        patients,
        seed: 1,
        detail,
    };
    if args.first().map(String::as_str) == Some("--dump") {
        let index = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(0);
        let synth = Synth::new(config(index + 1, Detail::Full));
        let (bundle, _) = synth.patient(index);
        println!("{}", serde_json::to_string_pretty(&bundle).expect("json"));
        return;
    }
    let n: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(2_000);

    let full = Synth::new(config(n, Detail::Full));
    let t = Instant::now();
    let mut sizes = Vec::with_capacity(n);
    let mut bytes = 0;
    for i in 0..n {
        let (bundle, _) = full.patient(i);
        sizes.push(bundle["entry"].as_array().map_or(0, Vec::len));
        if i < 100 {
            bytes += serde_json::to_vec(&bundle).expect("json").len();
        }
    }
    let elapsed = t.elapsed();
    sizes.sort_unstable();
    println!(
        "Full: {:.1} µs/patient; entries avg {:.1}, min {}, median {}, p95 {}, max {}; ~{} bytes of JSON",
        elapsed.as_secs_f64() * 1e6 / n as f64,
        sizes.iter().sum::<usize>() as f64 / n as f64,
        sizes[0],
        sizes[n / 2],
        sizes[n * 95 / 100],
        sizes[n - 1],
        bytes / n.min(100)
    );

    let demo = Synth::new(config(n * 10, Detail::DemographicsOnly));
    let mut families = HashSet::new();
    let mut givens = HashSet::new();
    let t = Instant::now();
    for i in 0..n * 10 {
        let (_, facts) = std::hint::black_box(demo.patient(i));
        families.insert(facts.family);
        givens.insert(facts.given);
    }
    println!(
        "DemographicsOnly: {:.2} µs/patient; {} distinct family and {} distinct given names in {} patients",
        t.elapsed().as_secs_f64() * 1e6 / (n * 10) as f64,
        families.len(),
        givens.len(),
        n * 10
    );
}
