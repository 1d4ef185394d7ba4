//! SentencePiece-style tokenization from a GGUF's `tokenizer.ggml.model = "llama"` vocabulary
//! (Gemma's): pieces with scores, spaces written as `▁`, bytes falling back to `<0xXX>`.
//!
//! Encoding follows llama.cpp's SPM tokenizer so that ids match it: the text's characters
//! are merged pairwise, always the adjacent pair whose joined piece scores highest (the
//! leftmost on ties), while the joined piece is in the vocabulary; a character left that is
//! not a piece becomes its bytes' pieces. Unlike llama.cpp, a merge never yields a control
//! token (`<bos>`, `<start_of_turn>`…): text cannot forge one.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

// GGUF token types (llama.cpp's llama_token_type).
pub(crate) const TYPE_CONTROL: i32 = 3;
pub(crate) const TYPE_USER_DEFINED: i32 = 4;
const TYPE_BYTE: i32 = 6;

/// The space marker of SentencePiece pieces.
const SPACE: char = '\u{2581}';

pub(crate) struct Spm {
    pieces: Vec<String>,
    scores: Vec<f32>,
    types: Vec<i32>,
    ids: HashMap<String, u32>,
    bytes: [Option<u32>; 256],
    /// User-defined pieces (`\n`, runs of tabs…) by first byte, longest first: text is
    /// split at them before merging, as llama.cpp does whether or not specials are parsed.
    user: HashMap<u8, Vec<(String, u32)>>,
}

/// A merge candidate: two adjacent symbols, the joined piece's score and byte length.
struct Bigram {
    left: usize,
    right: usize,
    score: f32,
    len: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Bigram {
    /// Highest score first, then the leftmost.
    fn cmp(&self, o: &Self) -> Ordering {
        self.score
            .total_cmp(&o.score)
            .then_with(|| o.left.cmp(&self.left))
    }
}

/// A symbol in the merge chain: a byte range of the text and its neighbours.
#[derive(Clone, Copy)]
struct Sym {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// The pieces of type `ty` and their ids, by first byte, longest first (so that the first
/// match at a position is the longest).
pub(crate) fn by_first_byte(
    pieces: &[String],
    types: &[i32],
    ty: i32,
) -> HashMap<u8, Vec<(String, u32)>> {
    let mut index: HashMap<u8, Vec<(String, u32)>> = HashMap::new();
    for (i, (p, &t)) in pieces.iter().zip(types).enumerate() {
        if t == ty && !p.is_empty() {
            index
                .entry(p.as_bytes()[0])
                .or_default()
                .push((p.clone(), i as u32));
        }
    }
    for v in index.values_mut() {
        v.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
    }
    index
}

impl Spm {
    pub(crate) fn new(pieces: Vec<String>, scores: Vec<f32>, types: Vec<i32>) -> Self {
        let ids = pieces
            .iter()
            .enumerate()
            .map(|(i, p)| (p.clone(), i as u32))
            .collect::<HashMap<_, _>>();
        let mut bytes = [None; 256];
        for (b, slot) in bytes.iter_mut().enumerate() {
            *slot = ids.get(&format!("<0x{b:02X}>")).copied();
        }
        let user = by_first_byte(&pieces, &types, TYPE_USER_DEFINED);
        Self {
            pieces,
            scores,
            types,
            ids,
            bytes,
            user,
        }
    }

    pub(crate) fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    pub(crate) fn piece(&self, id: u32) -> Option<&str> {
        self.pieces.get(id as usize).map(String::as_str)
    }

    pub(crate) fn is_control(&self, id: u32) -> bool {
        self.types.get(id as usize) == Some(&TYPE_CONTROL)
    }

    /// Ids of plain `text` (no control tokens come out of it).
    pub(crate) fn encode(&self, text: &str, out: &mut Vec<u32>) {
        let mut rest = text;
        let mut plain = String::new();
        while let Some(c) = rest.chars().next() {
            let hit = self.user.get(&rest.as_bytes()[0]).and_then(|v| {
                v.iter()
                    .find(|(p, _)| rest.starts_with(p.as_str()))
                    .map(|(p, id)| (p.len(), *id))
            });
            if let Some((len, id)) = hit {
                self.encode_run(&plain, out);
                plain.clear();
                out.push(id);
                rest = &rest[len..];
                continue;
            }
            plain.push(if c == ' ' { SPACE } else { c });
            rest = &rest[c.len_utf8()..];
        }
        self.encode_run(&plain, out);
    }

    /// The id of `piece` if a merge may produce it.
    fn mergeable(&self, piece: &str) -> Option<u32> {
        self.ids
            .get(piece)
            .copied()
            .filter(|&id| !self.is_control(id))
    }

    /// llama.cpp's bigram merge over one run of text (spaces already `▁`).
    fn encode_run(&self, text: &str, out: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        let mut syms: Vec<Sym> = Vec::new();
        for (i, (start, c)) in text.char_indices().enumerate() {
            syms.push(Sym {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: None,
            });
            if i > 0 {
                syms[i - 1].next = Some(i);
            }
        }
        let mut queue = BinaryHeap::new();
        let push = |queue: &mut BinaryHeap<Bigram>, syms: &[Sym], left: usize, right: usize| {
            let (a, b) = (syms[left], syms[right]);
            let joined = &text[a.start..b.start + b.len];
            if let Some(id) = self.mergeable(joined) {
                queue.push(Bigram {
                    left,
                    right,
                    score: self.scores.get(id as usize).copied().unwrap_or(0.0),
                    len: joined.len(),
                });
            }
        };
        for i in 1..syms.len() {
            push(&mut queue, &syms, i - 1, i);
        }
        while let Some(bg) = queue.pop() {
            let (l, r) = (syms[bg.left], syms[bg.right]);
            // Stale: one side was merged into something else since.
            if l.len == 0 || r.len == 0 || l.len + r.len != bg.len {
                continue;
            }
            syms[bg.left].len += r.len;
            syms[bg.right].len = 0;
            syms[bg.left].next = r.next;
            if let Some(n) = r.next {
                syms[n].prev = Some(bg.left);
            }
            if let Some(p) = syms[bg.left].prev {
                push(&mut queue, &syms, p, bg.left);
            }
            if let Some(n) = syms[bg.left].next {
                push(&mut queue, &syms, bg.left, n);
            }
        }
        let mut i = Some(0);
        while let Some(at) = i {
            let s = syms[at];
            let piece = &text[s.start..s.start + s.len];
            // Only pieces are merged, so a symbol that is not one is a single character.
            match self.mergeable(piece) {
                Some(id) => out.push(id),
                None => out.extend(piece.bytes().filter_map(|b| self.bytes[b as usize])),
            }
            i = s.next;
        }
    }

    /// The bytes of `ids`, control tokens left out when `skip_control`.
    pub(crate) fn decode(&self, ids: &[u32], skip_control: bool) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            let Some(p) = self.piece(id) else { continue };
            match self.types.get(id as usize).copied() {
                Some(TYPE_CONTROL) if skip_control => {}
                Some(TYPE_BYTE) => {
                    if let Some(b) = p
                        .strip_prefix("<0x")
                        .and_then(|h| h.strip_suffix('>'))
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                    {
                        bytes.push(b);
                    }
                }
                _ => bytes.extend_from_slice(p.replace(SPACE, " ").as_bytes()),
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}
