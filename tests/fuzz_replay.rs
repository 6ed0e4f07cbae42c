//! The fuzz targets on stable: every seed (golden vectors, the example configuration, the
//! import CSV seeds), any corpus `cargo fuzz` left in `fuzz/corpus/`, and a few thousand
//! random mutations of the seeds go through the same `sluice::fuzz_entry` functions the
//! fuzzer runs. A panic here is a fuzz finding (see RELIABILITY.md, "Fuzzing").

use std::path::{Path, PathBuf};

use sluice::fuzz_entry;
use sluice::sim::rng::Rng;

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 4] = [
    ("lender_decoder", fuzz_entry::lender_decoder),
    ("channel_decoder", fuzz_entry::channel_decoder),
    ("import_parser", fuzz_entry::import_parser),
    ("config_loader", fuzz_entry::config_loader),
];

/// Random mutations per target (on top of the seeds).
const MUTATIONS: usize = 3000;
/// At most this many files per corpus directory (a long fuzz run leaves thousands).
const CORPUS_MAX: usize = 2000;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.sort();
    v.truncate(CORPUS_MAX);
    v
}

fn hex_frames_from_channel_vector(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for line in text.lines() {
        if let Some((k, v)) = line.split_once(':') {
            if matches!(k, "frame" | "logon_req" | "logon_rsp") {
                out.extend(hex::decode(v.trim()).expect("vector hex"));
            }
        }
    }
    out
}

/// The seeds `fuzz/seed.sh` writes, built here from the same sources.
fn seeds(target: &str) -> Vec<Vec<u8>> {
    let r = root();
    match target {
        "lender_decoder" => files(&r.join("protocol/vectors/lender"))
            .iter()
            .map(|p| {
                let v: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
                hex::decode(v["frame_hex"].as_str().unwrap()).unwrap()
            })
            .collect(),
        "channel_decoder" => files(&r.join("protocol/vectors/channel"))
            .iter()
            .map(|p| hex_frames_from_channel_vector(&std::fs::read_to_string(p).unwrap()))
            .filter(|f| !f.is_empty())
            .collect(),
        "import_parser" => files(&r.join("fuzz/seeds/import_parser"))
            .iter()
            .map(|p| std::fs::read(p).unwrap())
            .collect(),
        "config_loader" => vec![std::fs::read(r.join("config/sluice.example.toml")).unwrap()],
        _ => unreachable!(),
    }
}

/// One mutation in the spirit of libFuzzer's: flip, overwrite, insert, delete, splice,
/// duplicate a range, or truncate.
fn mutate(rng: &mut Rng, seed: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..=rng.below(4) {
        let n = v.len().max(1) as u64;
        let at = rng.below(n) as usize;
        let last = v.len().saturating_sub(1);
        match rng.below(7) {
            0 if !v.is_empty() => v[at.min(last)] ^= 1 << rng.below(8),
            1 if !v.is_empty() => v[at.min(last)] = rng.next_u64() as u8,
            2 => v.insert(at.min(v.len()), rng.next_u64() as u8),
            3 if !v.is_empty() => {
                v.remove(at.min(v.len() - 1));
            }
            4 if !other.is_empty() => {
                let from = rng.below(other.len() as u64) as usize;
                let len = rng.below((other.len() - from) as u64 + 1) as usize;
                let at = at.min(v.len());
                v.splice(at..at, other[from..from + len].iter().copied());
            }
            5 if !v.is_empty() => {
                let at = at.min(v.len() - 1);
                let len = rng.below((v.len() - at) as u64 + 1) as usize;
                let copy = v[at..at + len].to_vec();
                v.extend(copy);
            }
            _ => v.truncate(at),
        }
    }
    v
}

#[test]
fn seeds_and_corpus_replay_without_findings() {
    for (name, target) in TARGETS {
        let seeds = seeds(name);
        assert!(!seeds.is_empty(), "{name}: no seeds");
        for s in &seeds {
            target(s);
        }
        for p in files(&root().join("fuzz/corpus").join(name)) {
            // A running fuzzer replaces corpus files as it minimises them: skip the gone.
            if let Ok(input) = std::fs::read(&p) {
                target(&input);
            }
        }
    }
}

#[test]
fn random_mutations_of_the_seeds_find_nothing() {
    for (i, (name, target)) in TARGETS.into_iter().enumerate() {
        let seeds = seeds(name);
        let mut rng = Rng::new(0x5eed_0000 + i as u64);
        for _ in 0..MUTATIONS {
            let a = &seeds[rng.below(seeds.len() as u64) as usize];
            let b = &seeds[rng.below(seeds.len() as u64) as usize];
            let input = mutate(&mut rng, a, b);
            target(&input);
        }
    }
}

/// The decoders' round-trip assertions are live: every golden frame decodes (so the
/// assertion ran on it), and a frame with one body byte changed is still handled.
#[test]
fn golden_frames_reach_the_round_trip_check() {
    use sluice::message::LenderCodec;
    for f in seeds("lender_decoder") {
        let raw = LenderCodec::decode_slice(&f).unwrap().unwrap().unwrap();
        assert!(sluice::message::decode(&raw).is_ok());
    }
    use sluice::channel::ChannelCodec;
    for f in seeds("channel_decoder") {
        let raw = ChannelCodec::decode_slice(&f).unwrap().unwrap().unwrap();
        assert!(sluice::channel::message::decode(&raw).is_ok());
    }
}
