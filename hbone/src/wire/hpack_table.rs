//! A copy of the peer's HPACK dynamic table (RFC 7541 §2.3.2, §4), kept beside `loona-hpack`'s
//! (which does not show its own), so a connection's decoder can be rebuilt in another process
//! after a handoff: the peer goes on referring to entries it inserted before the move.
//!
//! The copy follows each block the decoder has decoded: the block's representations are walked
//! (only their framing: kinds, integers and string lengths), and the decoded fields of those that
//! insert (literals with incremental indexing) go in, the oldest evicted as RFC 7541 §4.4 says;
//! a dynamic table size update resizes it. A decoder is rebuilt by decoding, in a fresh one, a
//! block that inserts every entry again, oldest first.

use std::collections::VecDeque;

use bytes::{BufMut, BytesMut};

use super::hpack::put_int;

/// The size RFC 7541 §4.1 counts per entry beyond its name and value.
const ENTRY_OVERHEAD: usize = 32;

/// A table's entries (name, value), oldest first.
pub(crate) type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// One representation of a header block, as far as the table is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Representation {
    /// A field; `inserts` when it is a literal with incremental indexing.
    Field { inserts: bool },
    /// A dynamic table size update.
    SizeUpdate(usize),
}

/// The representations of `block` in order, or `None` when it is not well framed (it then did
/// not decode either).
pub(crate) fn representations(block: &[u8]) -> Option<Vec<Representation>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < block.len() {
        let b = block[at];
        if b & 0x80 != 0 {
            at = int(block, at, 7)?.1;
            out.push(Representation::Field { inserts: false });
        } else if b & 0xe0 == 0x20 {
            let (size, next) = int(block, at, 5)?;
            at = next;
            out.push(Representation::SizeUpdate(size));
        } else {
            // A literal: with incremental indexing (a 6-bit name index), or without or never
            // indexed (4 bits); index 0 is a new name, a string of its own.
            let inserts = b & 0xc0 == 0x40;
            let (index, next) = int(block, at, if inserts { 6 } else { 4 })?;
            at = if index == 0 {
                string(block, next)?
            } else {
                next
            };
            at = string(block, at)?;
            out.push(Representation::Field { inserts });
        }
    }
    Some(out)
}

/// An integer with an `n`-bit prefix at `block[at]` (RFC 7541 §5.1): its value and where it
/// ends.
fn int(block: &[u8], at: usize, n: u32) -> Option<(usize, usize)> {
    let max = (1usize << n) - 1;
    let mut value = usize::from(*block.get(at)?) & max;
    let mut at = at + 1;
    if value < max {
        return Some((value, at));
    }
    let mut shift = 0u32;
    loop {
        let b = *block.get(at)?;
        at += 1;
        value = value.checked_add(usize::from(b & 0x7f).checked_shl(shift)?)?;
        if b & 0x80 == 0 {
            return Some((value, at));
        }
        shift += 7;
        if shift > 28 {
            return None;
        }
    }
}

/// Where the string literal at `block[at]` ends.
fn string(block: &[u8], at: usize) -> Option<usize> {
    let (len, start) = int(block, at, 7)?;
    let end = start.checked_add(len)?;
    (end <= block.len()).then_some(end)
}

/// The copy of one peer's dynamic table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TableCopy {
    /// Newest first, as the table indexes them.
    entries: VecDeque<(Vec<u8>, Vec<u8>)>,
    size: usize,
    max: usize,
}

impl TableCopy {
    /// An empty table of `max` bytes.
    pub(crate) fn new(max: usize) -> TableCopy {
        TableCopy {
            entries: VecDeque::new(),
            size: 0,
            max,
        }
    }

    /// Follows a block that decoded: `reps` its representations, `inserted` the decoded fields of
    /// those that insert, in order. `false` when they do not match (the copy is then useless).
    pub(crate) fn follow(&mut self, reps: &[Representation], inserted: Entries) -> bool {
        let mut inserted = inserted.into_iter();
        for rep in reps {
            match *rep {
                Representation::SizeUpdate(size) => {
                    self.max = size;
                    self.evict(0);
                }
                Representation::Field { inserts: true } => {
                    let Some((name, value)) = inserted.next() else {
                        return false;
                    };
                    self.insert(name, value);
                }
                Representation::Field { inserts: false } => {}
            }
        }
        inserted.next().is_none()
    }

    fn insert(&mut self, name: Vec<u8>, value: Vec<u8>) {
        let size = name.len() + value.len() + ENTRY_OVERHEAD;
        if size > self.max {
            // An entry larger than the table empties it and is not kept (RFC 7541 §4.4).
            self.entries.clear();
            self.size = 0;
            return;
        }
        self.evict(size);
        self.size += size;
        self.entries.push_front((name, value));
    }

    /// Evicts the oldest entries until `room` more bytes fit.
    fn evict(&mut self, room: usize) {
        while self.size + room > self.max {
            let Some((name, value)) = self.entries.pop_back() else {
                break;
            };
            self.size -= name.len() + value.len() + ENTRY_OVERHEAD;
        }
    }

    /// The table's size limit and its entries, oldest first.
    pub(crate) fn export(&self) -> (usize, Entries) {
        (self.max, self.entries.iter().rev().cloned().collect())
    }

    /// A table of `max` bytes holding `entries` (oldest first), and the block that builds the
    /// same table in a fresh decoder of `default_max` bytes. Refused when the entries do not fit
    /// in `max`, or `max` is above `allowed`.
    pub(crate) fn import(
        max: usize,
        entries: Entries,
        default_max: usize,
        allowed: usize,
    ) -> Result<(TableCopy, BytesMut), String> {
        if max > allowed {
            return Err(format!(
                "an HPACK table of {max} bytes, more than the {allowed} we allow"
            ));
        }
        let total: usize = entries
            .iter()
            .map(|(n, v)| n.len() + v.len() + ENTRY_OVERHEAD)
            .sum();
        if total > max {
            return Err(format!(
                "HPACK table entries of {total} bytes in a table of {max}"
            ));
        }
        let mut block = BytesMut::new();
        if max != default_max {
            put_int(&mut block, 0x20, 5, max);
        }
        let mut copy = TableCopy::new(max);
        for (name, value) in entries {
            // A literal with incremental indexing, new name, no Huffman coding.
            block.put_u8(0x40);
            put_int(&mut block, 0, 7, name.len());
            block.put_slice(&name);
            put_int(&mut block, 0, 7, value.len());
            block.put_slice(&value);
            copy.insert(name, value);
        }
        if copy.entries.is_empty() && !block.is_empty() {
            // A size update must be followed by a field (decoders refuse one that ends a
            // block): a static one, which leaves the table as it is.
            block.put_u8(0x82);
        }
        Ok((copy, block))
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng, rngs::StdRng};

    use super::super::hpack::{Decoder, TABLE_SIZE};
    use super::*;

    /// Every field of `block` as `decoder` decodes it, or its error.
    fn fields(decoder: &mut Decoder, block: &[u8]) -> Result<Entries, String> {
        let mut out = Vec::new();
        decoder
            .decode_for_test(block, |n, v| out.push((n.to_vec(), v.to_vec())))
            .map(|()| out)
            .map_err(|e| e.to_string())
    }

    /// A well-framed block of random representations for a peer whose table holds `entries`
    /// entries: indexed fields (static or dynamic, rarely past the table), literals of every
    /// kind with new or indexed names, raw strings (rarely Huffman-coded garbage), long values
    /// that evict, and at times a size update first.
    fn random_block(rng: &mut StdRng, entries: usize) -> Vec<u8> {
        let mut b = BytesMut::new();
        if rng.random_ratio(1, 8) {
            put_int(&mut b, 0x20, 5, rng.random_range(0..=TABLE_SIZE));
        }
        let string = |b: &mut BytesMut, rng: &mut StdRng| {
            let len = if rng.random_ratio(1, 8) {
                rng.random_range(500..2500)
            } else {
                rng.random_range(0..40)
            };
            let huffman = rng.random_ratio(1, 50);
            put_int(b, if huffman { 0x80 } else { 0 }, 7, len);
            for _ in 0..len {
                b.put_u8(if huffman {
                    rng.random()
                } else {
                    rng.random_range(b'a'..=b'z')
                });
            }
        };
        let index = |rng: &mut StdRng| {
            if rng.random_ratio(1, 100) {
                61 + entries + 1
            } else {
                rng.random_range(1..=61 + entries)
            }
        };
        for _ in 0..rng.random_range(1..8) {
            match rng.random_range(0..4) {
                0 => put_int(&mut b, 0x80, 7, index(rng)),
                kind => {
                    let (first, n) = [(0x40, 6), (0x00, 4), (0x10, 4)][kind - 1];
                    let name = if rng.random_ratio(1, 2) {
                        0
                    } else {
                        index(rng)
                    };
                    put_int(&mut b, first, n, name);
                    if name == 0 {
                        string(&mut b, rng);
                    }
                    string(&mut b, rng);
                }
            }
        }
        b.to_vec()
    }

    /// Blocks from `seed`, each for the table the ones before it built.
    fn random_blocks(seed: u64, n: usize) -> Vec<Vec<u8>> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut peer = Decoder::movable();
        let mut blocks = Vec::new();
        for _ in 0..n {
            let entries = peer.table().map_or(0, |(_, e)| e.len());
            let block = random_block(&mut rng, entries);
            let ok = fields(&mut peer, &block).is_ok();
            blocks.push(block);
            if !ok {
                break;
            }
        }
        blocks
    }

    /// Moves made with a table behind them (the random blocks must reach some).
    static MOVED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    /// Decoder A takes `blocks`; after `k` of them, B is rebuilt from A's copy of the table, and
    /// from then on both must decode every block alike.
    fn differential(blocks: &[Vec<u8>], k: usize) {
        let mut a = Decoder::movable();
        for block in &blocks[..k] {
            if fields(&mut a, block).is_err() {
                return;
            }
        }
        MOVED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (max, entries) = a.table().expect("a copy is kept");
        let mut b = Decoder::with_table(max, entries).unwrap();
        for (i, block) in blocks[k..].iter().enumerate() {
            let (fa, fb) = (fields(&mut a, block), fields(&mut b, block));
            assert_eq!(fa.is_ok(), fb.is_ok(), "block {} after the move", i);
            if fa.is_err() {
                return;
            }
            assert_eq!(fa, fb, "block {} after the move", i);
            assert_eq!(a.table(), b.table());
        }
    }

    #[test]
    fn a_rebuilt_decoder_decodes_what_follows_as_the_original_does() {
        // A real encoder's blocks: repeated fields become references into the dynamic table.
        let mut rng = StdRng::seed_from_u64(7);
        let mut encoder = loona_hpack::Encoder::new();
        let names: Vec<Vec<u8>> = (0..12)
            .map(|i| format!("x-name-{i}").into_bytes())
            .collect();
        let mut blocks = Vec::new();
        for _ in 0..200 {
            let fields: Vec<(Vec<u8>, Vec<u8>)> = (0..rng.random_range(1..6))
                .map(|_| {
                    let name = names[rng.random_range(0..names.len())].clone();
                    let value = vec![b'v'; [0, 10, 100, 300][rng.random_range(0..4)]];
                    (name, value)
                })
                .collect();
            blocks.push(encoder.encode(fields.iter().map(|(n, v)| (&n[..], &v[..]))));
        }
        let refs = blocks
            .iter()
            .skip(100)
            .filter(|b| b.iter().any(|x| x & 0x80 != 0 && x & 0x7f > 61))
            .count();
        assert!(
            refs > 10,
            "the encoder's blocks refer to its table ({refs})"
        );
        for k in [0, 1, 17, 100, 199] {
            differential(&blocks, k);
        }
        // Random representations of every kind, size updates and evictions included.
        let before = MOVED.load(std::sync::atomic::Ordering::Relaxed);
        let mut evicted = 0;
        for seed in 0..300 {
            let blocks = random_blocks(seed, 40);
            let k = (seed as usize * 7) % blocks.len();
            differential(&blocks, k);
            let mut whole = Decoder::movable();
            let total: usize = blocks
                .iter()
                .map(|b| {
                    let _ = fields(&mut whole, b);
                    b.len()
                })
                .sum();
            if total > 2 * TABLE_SIZE {
                evicted += 1;
            }
        }
        let moved = MOVED.load(std::sync::atomic::Ordering::Relaxed) - before;
        assert!(
            moved > 250 && evicted > 100,
            "moved {moved}, evicting {evicted}"
        );
    }

    #[test]
    fn representations_are_framed_and_a_bad_table_is_refused() {
        assert_eq!(
            representations(&[0x82, 0x3f, 0xe1, 0x1f, 0x40, 1, b'a', 1, b'b']),
            Some(vec![
                Representation::Field { inserts: false },
                Representation::SizeUpdate(4096),
                Representation::Field { inserts: true },
            ])
        );
        // A string running past the block, an integer that never ends.
        assert_eq!(representations(&[0x40, 5, b'a']), None);
        assert_eq!(representations(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff]), None);
        assert!(
            TableCopy::import(TABLE_SIZE + 1, vec![], TABLE_SIZE, TABLE_SIZE)
                .unwrap_err()
                .contains("4097")
        );
        let big = vec![(vec![b'n'; 3000], vec![b'v'; 2000])];
        assert!(
            TableCopy::import(TABLE_SIZE, big, TABLE_SIZE, TABLE_SIZE)
                .unwrap_err()
                .contains("5032")
        );
    }
}
