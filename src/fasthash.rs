//! A fast hasher for maps looked up per event: the delivery engine's per-key maps (row keys are
//! hashed several times per event) and the catalog's sources and subscriptions (the standard
//! SipHash showed in profiles): FxHash's multiply-rotate, seeded at random per process
//! so that keys chosen by a table's writers do not collide by design across installations.

use std::hash::{BuildHasher, Hasher};

#[derive(Clone, Copy)]
pub struct FastState(u64);

impl Default for FastState {
    fn default() -> Self {
        use std::sync::OnceLock;
        static SEED: OnceLock<u64> = OnceLock::new();
        FastState(*SEED.get_or_init(|| {
            std::collections::hash_map::RandomState::new().hash_one(0x9E37_79B9_u64)
        }))
    }
}

impl BuildHasher for FastState {
    type Hasher = FastHasher;
    fn build_hasher(&self) -> FastHasher {
        FastHasher(self.0)
    }
}

pub struct FastHasher(u64);

const K: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FastHasher {
    #[inline]
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(K);
    }
}

impl Hasher for FastHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            self.add(u64::from_le_bytes(b));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut b = [0u8; 8];
            b[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(b) ^ ((rest.len() as u64) << 56));
        }
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(i as u64);
    }

    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    #[inline]
    fn finish(&self) -> u64 {
        // A final mix, so the low bits hashbrown uses depend on every input bit.
        let mut z = self.0;
        z = (z ^ (z >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
        z ^ (z >> 33)
    }
}

pub type FastMap<K, V> = std::collections::HashMap<K, V, FastState>;
pub type FastSet<K> = std::collections::HashSet<K, FastState>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_keys_hash_apart() {
        let s = FastState::default();
        let a = s.hash_one("public.users:1");
        let b = s.hash_one("public.users:2");
        let c = s.hash_one("public.users:1");
        assert_ne!(a, b);
        assert_eq!(a, c);
        let mut m: FastMap<String, u32> = FastMap::default();
        for i in 0..1000 {
            m.insert(format!("t:{i}"), i);
        }
        assert_eq!(m.len(), 1000);
        assert_eq!(m["t:500"], 500);
    }
}
