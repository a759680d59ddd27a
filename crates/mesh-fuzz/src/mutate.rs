//! Seeded mutations of real messages.
//!
//! [`Mutator`] turns a corpus entry into a nearby input with a few byte-level edits: bit flips,
//! byte sets, interesting values (0, 0x7f, 0x80, 0xff, ...), arithmetic, truncation, extension,
//! insertion, deletion, duplication, splicing with another entry and tweaks of what looks like a
//! length field. [`json`] does the same one level up, on the parsed tree of a JSON message, so
//! that inputs get past the parser and into the bounds checks behind it.

use rand::rngs::SmallRng;
use rand::Rng;

/// Byte values that sit on boundaries decoders like to get wrong.
const INTERESTING: [u8; 12] = [0, 1, 2, 4, 0x0f, 0x10, 0x3f, 0x40, 0x7f, 0x80, 0xfe, 0xff];

/// Makes inputs from a corpus of real messages.
pub struct Mutator<'a> {
    corpus: &'a [Vec<u8>],
    max_len: usize,
}

impl<'a> Mutator<'a> {
    /// Mutates entries of `corpus` (which must not be empty for useful work; an empty corpus
    /// yields random bytes) into inputs of at most `max_len` bytes.
    pub fn new(corpus: &'a [Vec<u8>], max_len: usize) -> Mutator<'a> {
        Mutator { corpus, max_len }
    }

    /// A random corpus entry, unchanged.
    pub fn pick(&self, rng: &mut SmallRng) -> Vec<u8> {
        if self.corpus.is_empty() {
            return Vec::new();
        }
        self.corpus[rng.gen_range(0..self.corpus.len())].clone()
    }

    /// One input: mostly a corpus entry with one to eight edits; now and then the entry as is,
    /// or plain random bytes.
    pub fn input(&self, rng: &mut SmallRng) -> Vec<u8> {
        match rng.gen_range(0..64) {
            0 => {
                let len = rng.gen_range(0..=self.max_len.min(256));
                (0..len).map(|_| rng.gen()).collect()
            }
            1 | 2 => self.pick(rng),
            _ => {
                let mut bytes = self.pick(rng);
                self.mutate(rng, &mut bytes);
                bytes
            }
        }
    }

    /// Applies one to eight edits to `bytes` (fewer edits more often).
    pub fn mutate(&self, rng: &mut SmallRng, bytes: &mut Vec<u8>) {
        let edits = 1
            + (rng.gen::<u32>() % 256)
                .leading_zeros()
                .saturating_sub(24)
                .min(7);
        for _ in 0..edits {
            self.edit(rng, bytes);
        }
        bytes.truncate(self.max_len);
    }

    fn edit(&self, rng: &mut SmallRng, b: &mut Vec<u8>) {
        if b.is_empty() {
            let n = rng.gen_range(1..=16);
            b.extend((0..n).map(|_| rng.gen::<u8>()));
            return;
        }
        let at = rng.gen_range(0..b.len());
        match rng.gen_range(0..12) {
            0 => b[at] ^= 1 << rng.gen_range(0..8),
            1 => b[at] = rng.gen(),
            2 => b[at] = INTERESTING[rng.gen_range(0..INTERESTING.len())],
            3 => b[at] = b[at].wrapping_add(rng.gen_range(1..=16)),
            4 => b[at] = b[at].wrapping_sub(rng.gen_range(1..=16)),
            5 => b.truncate(at),
            6 => {
                let n = rng.gen_range(1..=64);
                if rng.gen() {
                    b.extend((0..n).map(|_| rng.gen::<u8>()));
                } else {
                    let fill = INTERESTING[rng.gen_range(0..INTERESTING.len())];
                    b.extend(std::iter::repeat_n(fill, n));
                }
            }
            7 => {
                let n = rng.gen_range(1..=16);
                let insert: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
                b.splice(at..at, insert);
            }
            8 => {
                let end = rng.gen_range(at..=b.len().min(at + 32));
                b.drain(at..end);
            }
            9 => {
                // Copy a chunk of the input over or into another place of it.
                let end = rng.gen_range(at..=b.len().min(at + 64));
                let chunk = b[at..end].to_vec();
                let to = rng.gen_range(0..=b.len());
                if rng.gen() {
                    b.splice(to..to, chunk);
                } else {
                    let end = (to + chunk.len()).min(b.len());
                    let n = end - to;
                    b[to..end].copy_from_slice(&chunk[..n]);
                }
            }
            10 => {
                // Head of this entry, tail of another.
                if self.corpus.is_empty() {
                    return;
                }
                let other = &self.corpus[rng.gen_range(0..self.corpus.len())];
                let from = rng.gen_range(0..=other.len());
                b.truncate(at);
                b.extend_from_slice(&other[from..]);
            }
            _ => length_tweak(rng, b, at),
        }
    }
}

/// Treats the byte (or big- or little-endian u16) at `at` as a length or count and moves it to
/// an edge: one off, zero, the maximum, or the input's own length.
fn length_tweak(rng: &mut SmallRng, b: &mut [u8], at: usize) {
    let wide = at + 1 < b.len() && rng.gen();
    let current = if wide {
        u16::from_be_bytes([b[at], b[at + 1]])
    } else {
        u16::from(b[at])
    };
    let len = u16::try_from(b.len()).unwrap_or(u16::MAX);
    let value = match rng.gen_range(0..6) {
        0 => current.wrapping_add(1),
        1 => current.wrapping_sub(1),
        2 => 0,
        3 => u16::MAX,
        4 => len,
        _ => len.wrapping_add(rng.gen_range(1..=8)),
    };
    if wide {
        let bytes = if rng.gen() {
            value.to_be_bytes()
        } else {
            value.to_le_bytes()
        };
        b[at..at + 2].copy_from_slice(&bytes);
    } else {
        b[at] = value as u8;
    }
}

/// Mutations of JSON messages on their parsed tree.
pub mod json {
    use rand::rngs::SmallRng;
    use rand::Rng;
    use serde_json::{Map, Value};

    /// Strings that land on the bounds and parsers behind the JSON layer.
    const STRINGS: [&str; 22] = [
        "",
        "a",
        "node-1",
        "bad name",
        "a/b",
        "é",
        "\u{0}",
        "\u{ffff}",
        "192.0.2.1:51820",
        "[2001:db8::1]:51820",
        "[fe80::1%2]:51820",
        "256.0.0.1:1",
        "192.0.2.1:99999",
        "100.64.0.1",
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "AAAA",
        "zz",
        "welcome",
        "hello",
        "join",
        "peers_changed",
        "ticket_expired",
    ];

    /// Parses `bytes` as JSON, changes one to three nodes of the tree and serializes it again.
    /// `others` are entries a subtree may be taken from. `None` if `bytes` is not JSON.
    pub fn mutate(rng: &mut SmallRng, bytes: &[u8], others: &[Vec<u8>]) -> Option<Vec<u8>> {
        let mut value: Value = serde_json::from_slice(bytes).ok()?;
        for _ in 0..rng.gen_range(1..=3) {
            let n = rng.gen_range(0..count(&value));
            let donor = donor(rng, others);
            if let Some(node) = nth(&mut value, &mut { n }) {
                edit(rng, node, donor);
            }
        }
        serde_json::to_vec(&value).ok()
    }

    fn donor(rng: &mut SmallRng, others: &[Vec<u8>]) -> Option<Value> {
        if others.is_empty() {
            return None;
        }
        let v: Value = serde_json::from_slice(&others[rng.gen_range(0..others.len())]).ok()?;
        let n = rng.gen_range(0..count(&v));
        let mut v = v;
        nth(&mut v, &mut { n }).map(|x| x.take())
    }

    fn count(v: &Value) -> usize {
        1 + match v {
            Value::Array(a) => a.iter().map(count).sum(),
            Value::Object(o) => o.values().map(count).sum(),
            _ => 0,
        }
    }

    fn nth<'v>(v: &'v mut Value, n: &mut usize) -> Option<&'v mut Value> {
        if *n == 0 {
            return Some(v);
        }
        *n -= 1;
        match v {
            Value::Array(a) => {
                for x in a.iter_mut() {
                    if let Some(found) = nth(x, n) {
                        return Some(found);
                    }
                }
            }
            Value::Object(o) => {
                for x in o.values_mut() {
                    if let Some(found) = nth(x, n) {
                        return Some(found);
                    }
                }
            }
            _ => {}
        }
        None
    }

    fn edit(rng: &mut SmallRng, node: &mut Value, donor: Option<Value>) {
        match rng.gen_range(0..8) {
            0 => *node = interesting(rng),
            1 => {
                if let Some(d) = donor {
                    *node = d;
                }
            }
            _ => match node {
                Value::String(s) => edit_string(rng, s),
                Value::Array(a) => edit_array(rng, a),
                Value::Object(o) => edit_object(rng, o),
                Value::Number(_) => *node = number(rng),
                _ => *node = interesting(rng),
            },
        }
    }

    fn interesting(rng: &mut SmallRng) -> Value {
        match rng.gen_range(0..8) {
            0 => Value::Null,
            1 => Value::Bool(rng.gen()),
            2 | 3 => number(rng),
            4 => Value::String(STRINGS[rng.gen_range(0..STRINGS.len())].to_owned()),
            5 => Value::Array(Vec::new()),
            6 => Value::Object(Map::new()),
            _ => {
                // Deep nesting: the parser's recursion limit must hold.
                let mut v = Value::Null;
                for _ in 0..rng.gen_range(1..300) {
                    v = Value::Array(vec![v]);
                }
                v
            }
        }
    }

    fn number(rng: &mut SmallRng) -> Value {
        let n: serde_json::Number = match rng.gen_range(0..10) {
            0 => 0.into(),
            1 => (-1).into(),
            2 => 255.into(),
            3 => 256.into(),
            4 => 65535.into(),
            5 => 65536.into(),
            6 => u64::MAX.into(),
            7 => i64::MIN.into(),
            8 => serde_json::Number::from_f64(1.5e300).unwrap_or_else(|| 1.into()),
            _ => rng.gen::<u32>().into(),
        };
        Value::Number(n)
    }

    fn edit_string(rng: &mut SmallRng, s: &mut String) {
        match rng.gen_range(0..6) {
            0 => *s = STRINGS[rng.gen_range(0..STRINGS.len())].to_owned(),
            1 => {
                // Around the length bounds: 63/64 (names), 128, 255/256, 512/513.
                let n = [62usize, 63, 64, 65, 127, 128, 129, 255, 256, 512, 513, 1000]
                    [rng.gen_range(0..12)];
                *s = "a".repeat(n);
            }
            2 => s.push(['é', ' ', '\u{0}', 'a', '%', ':', ']'][rng.gen_range(0..7)]),
            3 => {
                let keep = rng.gen_range(0..=s.len());
                let keep = (0..=keep)
                    .rev()
                    .find(|i| s.is_char_boundary(*i))
                    .unwrap_or(0);
                s.truncate(keep);
            }
            4 => *s = s.to_uppercase(),
            _ => *s = s.repeat(rng.gen_range(2..=4)),
        }
    }

    fn edit_array(rng: &mut SmallRng, a: &mut Vec<Value>) {
        match rng.gen_range(0..4) {
            0 => a.clear(),
            1 if !a.is_empty() => {
                a.remove(rng.gen_range(0..a.len()));
            }
            _ if !a.is_empty() => {
                // Over the count bounds now and then (16 endpoints or relays, 4096 peers).
                let n = if rng.gen_range(0..512) == 0 {
                    rng.gen_range(4090..=4100)
                } else {
                    rng.gen_range(1..=20)
                };
                let x = a[rng.gen_range(0..a.len())].clone();
                a.extend(std::iter::repeat_n(x, n));
            }
            _ => a.push(interesting(rng)),
        }
    }

    fn edit_object(rng: &mut SmallRng, o: &mut Map<String, Value>) {
        match rng.gen_range(0..3) {
            0 if !o.is_empty() => {
                let key = o.keys().nth(rng.gen_range(0..o.len())).cloned();
                if let Some(k) = key {
                    o.remove(&k);
                }
            }
            1 => {
                o.insert("unknown".to_owned(), interesting(rng));
            }
            _ => {
                o.insert("type".to_owned(), interesting(rng));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn same_seed_same_inputs_and_bounded_length() {
        let corpus = vec![b"hello world".to_vec(), vec![1, 0, 0, 0, 9, 9, 9]];
        let m = Mutator::new(&corpus, 40);
        let run = |seed| {
            let mut rng = SmallRng::seed_from_u64(seed);
            (0..1000).map(|_| m.input(&mut rng)).collect::<Vec<_>>()
        };
        let a = run(7);
        assert_eq!(a, run(7));
        assert_ne!(a, run(8));
        assert!(a.iter().all(|i| i.len() <= 40));
        assert!(a.iter().any(|i| !corpus.contains(i)));
    }

    #[test]
    fn json_mutation_keeps_json() {
        let corpus =
            vec![br#"{"v":1,"msg":{"type":"leave","endpoints":["192.0.2.1:1"]}}"#.to_vec()];
        let mut rng = SmallRng::seed_from_u64(1);
        for _ in 0..200 {
            let out = json::mutate(&mut rng, &corpus[0], &corpus).unwrap();
            // Valid JSON, or nested deeper than the parser takes (on purpose).
            if let Err(e) = serde_json::from_slice::<serde_json::Value>(&out) {
                assert!(e.to_string().contains("recursion limit"), "{e}");
            }
        }
        assert_eq!(json::mutate(&mut rng, b"not json", &corpus), None);
    }
}
