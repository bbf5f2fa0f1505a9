//! Streaming Half-Space Trees (Tan, Ting and Liu, "Fast Anomaly Detection
//! for Streaming Data", IJCAI 2011): the learned baseline of each user and
//! each role.
//!
//! Written here rather than taken from a crate: the Random Cut Forest ports
//! on crates.io are young single-maintainer crates, and what Custos needs is
//! particular — thousands of small models (one per user) that share one
//! random tree structure, so that a model is only its mass counters, cheap
//! to keep, serialize and restore. The algorithm is a page of arithmetic.
//!
//! Features are scaled to [0, 1] by the caller. Each tree halves a random
//! feature's range at each node; a model counts how many points of its
//! reference window fell into each node. A point that lands in nodes where
//! the reference saw little mass is anomalous. Every `window` points the
//! latest counts become the reference.
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// The random structure shared by every model: per tree, per internal node,
/// the feature split and the split point.
#[derive(Debug, Clone)]
pub struct Forest {
    dims: usize,
    depth: usize,
    trees: Vec<Vec<(u8, f32)>>,
}

impl Forest {
    /// `trees` trees of `depth` levels over `dims` features, from `seed`.
    pub fn new(dims: usize, trees: usize, depth: usize, seed: u64) -> Forest {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let internal = (1usize << depth) - 1;
        let trees = (0..trees)
            .map(|_| {
                // Each tree works on a randomly perturbed workspace (as in
                // the paper): node ranges start from [lo, hi] around [0, 1].
                let mut lo = vec![0f32; dims];
                let mut hi = vec![0f32; dims];
                for d in 0..dims {
                    let s: f32 = rng.random();
                    let r = 2.0 * s.max(1.0 - s);
                    lo[d] = s - r;
                    hi[d] = s + r;
                }
                let mut nodes = vec![(0u8, 0f32); internal];
                fill(&mut nodes, 0, &mut lo, &mut hi, &mut rng, dims);
                nodes
            })
            .collect();
        Forest { dims, depth, trees }
    }

    pub fn dims(&self) -> usize {
        self.dims
    }

    fn nodes(&self) -> usize {
        (1usize << (self.depth + 1)) - 1
    }

    /// The node path of `x` in tree `t` (root first).
    fn path(&self, t: usize, x: &[f32], out: &mut Vec<usize>) {
        out.clear();
        let tree = &self.trees[t];
        let mut n = 0usize;
        out.push(n);
        while n < tree.len() {
            let (d, split) = tree[n];
            n = if x[d as usize] < split {
                2 * n + 1
            } else {
                2 * n + 2
            };
            out.push(n);
        }
    }

    /// An empty model on this structure.
    pub fn model(&self, window: u32) -> Model {
        Model {
            window,
            seen: 0,
            in_window: 0,
            reference: vec![0; self.trees.len() * self.nodes()],
            latest: vec![0; self.trees.len() * self.nodes()],
            mean: vec![0.0; self.dims],
            var: vec![0.0; self.dims],
        }
    }
}

fn fill(
    nodes: &mut [(u8, f32)],
    n: usize,
    lo: &mut [f32],
    hi: &mut [f32],
    rng: &mut impl Rng,
    dims: usize,
) {
    if n >= nodes.len() {
        return;
    }
    let d = rng.random_range(0..dims);
    let split = (lo[d] + hi[d]) / 2.0;
    nodes[n] = (d as u8, split);
    let old_hi = hi[d];
    hi[d] = split;
    fill(nodes, 2 * n + 1, lo, hi, rng, dims);
    hi[d] = old_hi;
    let old_lo = lo[d];
    lo[d] = split;
    fill(nodes, 2 * n + 2, lo, hi, rng, dims);
    lo[d] = old_lo;
}

/// One learned baseline: mass counters on the shared [`Forest`], and the
/// running mean and variance of each feature (which explain a score).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Model {
    window: u32,
    /// Points learned in all.
    pub seen: u64,
    in_window: u32,
    #[serde(with = "sparse")]
    reference: Vec<u16>,
    #[serde(with = "sparse")]
    latest: Vec<u16>,
    mean: Vec<f64>,
    var: Vec<f64>,
}

/// Nodes with less reference mass than this end a path (the paper's size limit).
const SIZE_LIMIT: u16 = 2;

impl Model {
    /// Whether a full reference window has been learned.
    pub fn ready(&self) -> bool {
        self.seen >= self.window as u64
    }

    /// Anomaly score of `x` in [0, 1]: 0 where the reference put the usual
    /// mass, towards 1 where it saw (almost) nothing.
    pub fn score(&self, forest: &Forest, x: &[f32]) -> f64 {
        let nodes = forest.nodes();
        let mut path = Vec::with_capacity(forest.depth + 1);
        let window = self.window.max(1) as f64;
        let mut mass = 0f64;
        for t in 0..forest.trees.len() {
            forest.path(t, x, &mut path);
            let base = t * nodes;
            // The HS-tree score: r(node)·2^depth at the first node on the
            // path whose reference mass falls under the size limit (or the
            // leaf). A point where the reference is as dense as average
            // scores about `window`; each tree's share is capped there, so
            // that one very dense region cannot hide an empty one elsewhere.
            let mut s = 0f64;
            for (k, &n) in path.iter().enumerate() {
                let r = self.reference[base + n];
                s = r as f64 * (1u64 << k) as f64;
                if r < SIZE_LIMIT {
                    break;
                }
            }
            mass += (s / window).min(1.0);
        }
        1.0 - mass / forest.trees.len() as f64
    }

    /// Learn `x` (`weight` times: a dismissed false positive is learned as
    /// several ordinary points, so that its like scores normal).
    pub fn learn(&mut self, forest: &Forest, x: &[f32], weight: u32) {
        let nodes = forest.nodes();
        let mut path = Vec::with_capacity(forest.depth + 1);
        for t in 0..forest.trees.len() {
            forest.path(t, x, &mut path);
            for &n in &path {
                self.latest[t * nodes + n] =
                    self.latest[t * nodes + n].saturating_add(weight as u16);
                if self.seen < self.window as u64 {
                    // Until the first window is complete, learn straight
                    // into the reference so the model is usable sooner.
                    self.reference[t * nodes + n] =
                        self.reference[t * nodes + n].saturating_add(weight as u16);
                }
            }
        }
        for _ in 0..weight {
            self.seen += 1;
            let n = self.seen.min(1000) as f64;
            for (d, &v) in x.iter().enumerate() {
                let delta = v as f64 - self.mean[d];
                self.mean[d] += delta / n;
                self.var[d] += (delta * (v as f64 - self.mean[d]) - self.var[d]) / n;
            }
        }
        self.in_window += weight;
        if self.in_window >= self.window {
            std::mem::swap(&mut self.reference, &mut self.latest);
            self.latest.iter_mut().for_each(|m| *m = 0);
            self.in_window = 0;
        }
    }

    /// The features that most set `x` apart from what this model learned:
    /// `(feature index, standard deviations above (+) or below (−) the mean)`,
    /// largest first, those beyond 2σ only.
    pub fn explain(&self, x: &[f32]) -> Vec<(usize, f64)> {
        let mut out: Vec<(usize, f64)> = x
            .iter()
            .enumerate()
            .map(|(d, &v)| {
                let sd = self.var[d].sqrt().max(0.02);
                (d, (v as f64 - self.mean[d]) / sd)
            })
            .filter(|(_, z)| z.abs() > 2.0)
            .collect();
        out.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()));
        out.truncate(3);
        out
    }
}

/// Mass counters are mostly zero: saved as `[len, index, count, …]`.
mod sparse {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &[u16], s: S) -> Result<S::Ok, S::Error> {
        let mut out: Vec<u32> = vec![v.len() as u32];
        for (i, &c) in v.iter().enumerate() {
            if c != 0 {
                out.push(i as u32);
                out.push(c as u32);
            }
        }
        out.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u16>, D::Error> {
        let raw = Vec::<u32>::deserialize(d)?;
        let Some((&len, pairs)) = raw.split_first() else {
            return Ok(Vec::new());
        };
        if len > 1 << 24 || !pairs.len().is_multiple_of(2) {
            return Err(serde::de::Error::custom("malformed mass counters"));
        }
        let mut v = vec![0u16; len as usize];
        for p in pairs.chunks(2) {
            let slot = v
                .get_mut(p[0] as usize)
                .ok_or_else(|| serde::de::Error::custom("mass counter out of range"))?;
            *slot = p[1].min(u16::MAX as u32) as u16;
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn outliers_score_high_and_inliers_low() {
        let forest = Forest::new(4, 25, 8, 7);
        let mut m = forest.model(128);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for _ in 0..512 {
            let x: Vec<f32> = (0..4).map(|_| 0.2 + 0.1 * rng.random::<f32>()).collect();
            m.learn(&forest, &x, 1);
        }
        assert!(m.ready());
        let normal = m.score(&forest, &[0.25, 0.25, 0.25, 0.25]);
        let odd = m.score(&forest, &[0.25, 0.25, 0.95, 0.25]);
        assert!(normal < 0.3, "normal {normal}");
        assert!(odd > 0.7, "odd {odd}");
        let why = m.explain(&[0.25, 0.25, 0.95, 0.25]);
        assert_eq!(why[0].0, 2);
        assert!(why[0].1 > 2.0);
    }

    #[test]
    fn the_structure_is_deterministic_and_models_serialize() {
        let a = Forest::new(3, 5, 4, 42);
        let b = Forest::new(3, 5, 4, 42);
        assert_eq!(a.trees, b.trees);
        let mut m = a.model(8);
        m.learn(&a, &[0.1, 0.2, 0.3], 3);
        let back: Model = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(back, m);
    }
}
