//! CPython's `random.Random` (MT19937 seeded by `init_by_array`, `getrandbits`, `_randbelow`,
//! `sample`), ported so few-shot examples are drawn exactly as lm-evaluation-harness draws them.

const N: usize = 624;
const M: usize = 397;

pub struct PyRandom {
    mt: [u32; N],
    index: usize,
}

impl PyRandom {
    /// `random.Random(seed)` for a non-negative integer seed.
    pub fn new(seed: u64) -> Self {
        // CPython splits |seed| into little-endian 32-bit words; 0 becomes the one-word key [0].
        let mut key = vec![seed as u32];
        if seed >> 32 != 0 {
            key.push((seed >> 32) as u32);
        }
        let mut r = Self {
            mt: [0; N],
            index: N,
        };
        r.init_by_array(&key);
        r
    }

    fn init_genrand(&mut self, s: u32) {
        self.mt[0] = s;
        for i in 1..N {
            let prev = self.mt[i - 1];
            self.mt[i] = 1812433253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        self.index = N;
    }

    fn init_by_array(&mut self, key: &[u32]) {
        self.init_genrand(19650218);
        let (mut i, mut j) = (1usize, 0usize);
        for _ in 0..N.max(key.len()) {
            let prev = self.mt[i - 1];
            self.mt[i] = (self.mt[i] ^ (prev ^ (prev >> 30)).wrapping_mul(1664525))
                .wrapping_add(key[j])
                .wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= N {
                self.mt[0] = self.mt[N - 1];
                i = 1;
            }
            if j >= key.len() {
                j = 0;
            }
        }
        for _ in 0..N - 1 {
            let prev = self.mt[i - 1];
            self.mt[i] = (self.mt[i] ^ (prev ^ (prev >> 30)).wrapping_mul(1566083941))
                .wrapping_sub(i as u32);
            i += 1;
            if i >= N {
                self.mt[0] = self.mt[N - 1];
                i = 1;
            }
        }
        self.mt[0] = 0x8000_0000;
    }

    fn twist(&mut self) {
        for k in 0..N {
            let y = (self.mt[k] & 0x8000_0000) | (self.mt[(k + 1) % N] & 0x7fff_ffff);
            let mag = if y & 1 == 1 { 0x9908_b0df } else { 0 };
            self.mt[k] = self.mt[(k + M) % N] ^ (y >> 1) ^ mag;
        }
        self.index = 0;
    }

    pub fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            self.twist();
        }
        let mut y = self.mt[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// `getrandbits(k)` for `k <= 32`.
    pub fn getrandbits(&mut self, k: u32) -> u32 {
        assert!(k <= 32, "getrandbits is only ported for k <= 32");
        if k == 0 {
            return 0;
        }
        self.next_u32() >> (32 - k)
    }

    /// `_randbelow_with_getrandbits(n)`: rejection sampling on `bit_length(n)` bits.
    pub fn randbelow(&mut self, n: u32) -> u32 {
        let k = 32 - n.leading_zeros();
        loop {
            let r = self.getrandbits(k);
            if r < n {
                return r;
            }
        }
    }

    /// `sample(range(n), k)`: indices in draw order, taking the pool or the set branch exactly
    /// where CPython does.
    pub fn sample_indices(&mut self, n: usize, k: usize) -> Vec<usize> {
        assert!(k <= n, "sample larger than population");
        let mut setsize = 21usize;
        if k > 5 {
            let exp = ((k * 3) as f64).log(4.0).ceil() as u32;
            setsize += 4usize.pow(exp);
        }
        let mut out = Vec::with_capacity(k);
        if n <= setsize {
            let mut pool: Vec<usize> = (0..n).collect();
            for i in 0..k {
                let j = self.randbelow((n - i) as u32) as usize;
                out.push(pool[j]);
                pool[j] = pool[n - i - 1];
            }
        } else {
            let mut selected = std::collections::HashSet::with_capacity(k);
            for _ in 0..k {
                let mut j = self.randbelow(n as u32) as usize;
                while selected.contains(&j) {
                    j = self.randbelow(n as u32) as usize;
                }
                selected.insert(j);
                out.push(j);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn getrandbits_matches_cpython() {
        // random.Random(1234).getrandbits(32) three times (leaderboard-tasks.md §3).
        let mut r = PyRandom::new(1234);
        let got: Vec<u32> = (0..3).map(|_| r.getrandbits(32)).collect();
        assert_eq!(got, vec![4150886329, 3342196574, 1892932127]);
    }

    #[test]
    fn set_branch_matches_cpython_arc_shots() {
        // ARC doc 0: sample(test, 26) with Random(1234), the first 25 after dropping doc 0 (§11).
        let mut r = PyRandom::new(1234);
        let drawn = r.sample_indices(1172, 26);
        let shots: Vec<usize> = drawn.into_iter().filter(|&i| i != 0).take(25).collect();
        assert_eq!(
            shots,
            vec![
                902, 239, 15, 185, 71, 171, 201, 726, 484, 35, 63, 32, 708, 991, 949, 304, 186,
                374, 234, 29, 1030, 996, 511, 132, 1108
            ]
        );
    }

    #[test]
    fn pool_branch_matches_cpython() {
        // python3 -c "import random; r=random.Random(7); print(r.sample(range(20), 6), r.sample(range(10), 10))"
        let mut r = PyRandom::new(7);
        assert_eq!(r.sample_indices(20, 6), vec![10, 4, 12, 1, 2, 13]);
        assert_eq!(r.sample_indices(10, 10), vec![8, 1, 5, 4, 0, 6, 9, 7, 2, 3]);
    }

    #[test]
    fn wide_and_zero_seeds_match_cpython() {
        // random.Random(2**40 + 5).getrandbits(32) x2; Random(0): randrange(1000), sample(range(100), 3)
        let mut r = PyRandom::new((1 << 40) + 5);
        assert_eq!(
            [r.getrandbits(32), r.getrandbits(32)],
            [2166296868, 2220160828]
        );
        let mut r = PyRandom::new(0);
        assert_eq!(r.randbelow(1000), 864);
        assert_eq!(r.sample_indices(100, 3), vec![49, 97, 53]);
    }
}
