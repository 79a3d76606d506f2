//! Fuzzing entry points: each parser of outside input (wire codec, pgoutput, SQL classification,
//! PRE handlers' answers), fed arbitrary bytes, must return a value or
//! an error and never panic. The targets under `fuzz/` call these; so does the smoke test below,
//! which replays the committed seeds and corpus (and mutations of them) on every `scripts/test`.

use std::sync::LazyLock;

use bytes::Bytes;

use crate::proxy::classify::{self, Watched};
use crate::replication::decode::Decoder;
use crate::wire;

/// The wire codec: startup packets, framing, and the typed decoders of both directions.
pub fn wire(data: &[u8]) {
    let _ = wire::startup_packet(data);
    let mut rest = data;
    while let Ok(Some((_tag, len))) = wire::frame_header(rest) {
        if len == 0 || len > rest.len() {
            break;
        }
        let frame = &rest[..len];
        let _ = wire::decode_frontend(frame);
        let _ = wire::decode_backend(frame);
        rest = &rest[len..];
    }
    let _ = wire::decode_frontend(data);
    let _ = wire::decode_backend(data);
}

/// The pgoutput decoder: `data` is a sequence of XLogData payloads, each prefixed by a 16-bit
/// big-endian length, fed to one decoder in order (so relations, transactions and streamed
/// transactions carry state from one message to the next).
pub fn pgoutput(data: &[u8]) {
    let mut decoder = Decoder::new();
    let mut out = Vec::new();
    for body in payloads(data) {
        if decoder
            .decode(Bytes::copy_from_slice(body), &mut out)
            .is_err()
        {
            decoder.reset();
        }
        while decoder.replaying() {
            if decoder.drain(&mut out, 64).is_err() {
                break;
            }
        }
        out.clear();
    }
}

/// The payloads of a `pgoutput` input: each after its 16-bit big-endian length (the last one
/// cut short where the input ends).
fn payloads(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = data;
    std::iter::from_fn(move || {
        if rest.len() < 2 {
            return None;
        }
        let end = (2 + u16::from_be_bytes([rest[0], rest[1]]) as usize).min(rest.len());
        let body = &rest[2..end];
        rest = &rest[end..];
        Some(body)
    })
}

static WATCHED: LazyLock<Watched> = LazyLock::new(|| {
    Watched::new(["public.users", "app.\"Orders\"", "public.accounts"]).expect("valid names")
});

/// The proxy's statement classification, against a few watched tables.
pub fn classify(data: &[u8]) {
    if let Ok(sql) = std::str::from_utf8(data) {
        let _ = classify::classify(sql, &WATCHED);
    }
}

/// The parser of PRE handlers' answers (webhook bodies, `sql` functions' jsonb).
pub fn answer(data: &[u8]) {
    let _ = crate::proxy::pre::answer::parse(data);
}

/// A fuzz target: arbitrary bytes in, no panic.
pub type Target = fn(&[u8]);

/// Every target by name, as the `fuzz/` crate and `scripts/fuzz` name them.
pub const TARGETS: &[(&str, Target)] = &[
    ("wire", wire),
    ("pgoutput", pgoutput),
    ("classify", classify),
    ("answer", answer),
];

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::TARGETS;

    /// A small deterministic generator (xorshift64*), so a failure replays exactly.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    /// One random edit of `input`: flip, insert, delete, duplicate a span, or set a byte to an
    /// interesting value.
    fn mutate(rng: &mut Rng, input: &mut Vec<u8>) {
        const INTERESTING: [u8; 8] = [0, 1, 0x7f, 0x80, 0xff, b'\'', b'"', b';'];
        match rng.below(5) {
            0 if !input.is_empty() => {
                let i = rng.below(input.len());
                input[i] ^= 1 << rng.below(8);
            }
            1 => {
                let i = rng.below(input.len() + 1);
                input.insert(i, rng.next() as u8);
            }
            2 if !input.is_empty() => {
                let i = rng.below(input.len());
                let n = rng.below(8).min(input.len() - i);
                input.drain(i..i + n);
            }
            3 if !input.is_empty() => {
                let i = rng.below(input.len());
                let n = rng.below(16).min(input.len() - i);
                let span = input[i..i + n].to_vec();
                let at = rng.below(input.len() + 1);
                input.splice(at..at, span);
            }
            _ if !input.is_empty() => {
                let i = rng.below(input.len());
                input[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            _ => input.push(rng.next() as u8),
        }
    }

    /// The hand-made seeds and the corpus the fuzzer grew from them.
    fn corpus(target: &str) -> Vec<Vec<u8>> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
        let mut files: Vec<_> = ["seeds", "corpus"]
            .iter()
            .map(|d| root.join(d).join(target))
            .filter(|d| d.is_dir())
            .flat_map(|d| std::fs::read_dir(d).expect("corpus dir"))
            .map(|e| e.expect("corpus entry").path())
            .collect();
        files.sort();
        files
            .iter()
            .map(|p| std::fs::read(p).expect("corpus file"))
            .collect()
    }

    /// The seeds are what they claim to be, so the mutations start from meaningful input.
    #[test]
    fn the_seeds_decode() {
        use crate::replication::decode::{Decoder, Item};
        for name in ["insert", "update", "delete"] {
            let data = std::fs::read(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join(format!("fuzz/seeds/pgoutput/seed-{name}")),
            )
            .expect("seed");
            let (mut decoder, mut out) = (Decoder::new(), Vec::new());
            for body in super::payloads(&data) {
                decoder
                    .decode(bytes::Bytes::copy_from_slice(body), &mut out)
                    .unwrap_or_else(|e| panic!("seed {name}: {e}"));
            }
            assert!(
                matches!(out.first(), Some(Item::Row(_))),
                "seed {name}: {out:?}"
            );
            assert!(
                matches!(out.last(), Some(Item::Checkpoint(_))),
                "seed {name}"
            );
        }
        let extended = std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/wire/seed-extended"),
        )
        .expect("seed");
        let (_, len) = crate::wire::frame_header(&extended).unwrap().unwrap();
        assert!(matches!(
            crate::wire::decode_frontend(&extended[..len]),
            Ok(Some(crate::wire::Frontend::Parse(_)))
        ));
    }

    /// The fuzz smoke: every corpus entry, then a few thousand mutations of them, per target.
    #[test]
    fn the_parsers_survive_their_corpus_and_its_mutations() {
        for (name, target) in TARGETS {
            let seeds = corpus(name);
            assert!(!seeds.is_empty(), "corpus of {name} is empty");
            for seed in &seeds {
                target(seed);
            }
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ name.len() as u64);
            for round in 0..10_000 {
                let mut input = seeds[round % seeds.len()].clone();
                for _ in 0..=rng.below(4) {
                    mutate(&mut rng, &mut input);
                }
                target(&input);
            }
        }
    }
}
