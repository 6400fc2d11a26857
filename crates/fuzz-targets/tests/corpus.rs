//! Replay every saved fuzz input (`fuzz/corpus/<target>/`, seeds and any
//! finding saved there) through its target: none may panic or hang. Runs on
//! every CI run, without the fuzzer.

use std::path::Path;

#[test]
fn every_corpus_input_passes_through_its_target() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
    let mut replayed = 0;
    for (name, target) in chipsite_fuzz_targets::TARGETS {
        let dir = corpus.join(name);
        let mut inputs: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .flatten()
            .map(|e| e.path())
            .collect();
        inputs.sort();
        assert!(!inputs.is_empty(), "{name}: no seed inputs in {}", dir.display());
        for input in inputs {
            let data = std::fs::read(&input).unwrap_or_else(|e| panic!("{}: {e}", input.display()));
            target(&data);
            replayed += 1;
        }
    }
    assert!(replayed >= 30, "only {replayed} inputs");
}

#[test]
fn the_targets_hold_on_simple_mutations_of_the_seeds() {
    // A cheap stand-in for the fuzzer on every run: each seed truncated at
    // every length, and with each byte flipped.
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
    for (name, target) in chipsite_fuzz_targets::TARGETS {
        for entry in std::fs::read_dir(corpus.join(name))
            .into_iter()
            .flatten()
            .flatten()
        {
            let data = std::fs::read(entry.path()).unwrap_or_default();
            for cut in 0..data.len().min(400) {
                target(&data[..cut]);
            }
            for i in 0..data.len().min(400) {
                let mut flipped = data.clone();
                flipped[i] ^= 0x5a;
                target(&flipped);
            }
        }
    }
}
