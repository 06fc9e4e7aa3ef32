//! SentencePiece-style BPE: start from UTF-8 characters, repeatedly merge the adjacent pair whose
//! concatenation is a vocabulary piece with the highest score (leftmost on ties), then map characters that
//! are not pieces to `<0xXX>` byte tokens.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use crate::{token_type, Result, TokenizerError};

pub struct SpmTokenizer {
    tokens: Vec<String>,
    scores: Vec<f32>,
    types: Vec<u8>,
    lookup: HashMap<String, u32>,
    byte_tokens: [Option<u32>; 256],
    unk: Option<u32>,
    /// Control / user-defined token strings: (text, id, is control).
    specials: Vec<(String, u32, bool)>,
    add_space_prefix: bool,
}

#[derive(PartialEq)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    len: usize,
}
impl Eq for Bigram {}
impl Ord for Bigram {
    fn cmp(&self, o: &Self) -> Ordering {
        self.score.total_cmp(&o.score).then(o.left.cmp(&self.left))
    }
}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

#[derive(Clone, Copy)]
struct Sym {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

impl SpmTokenizer {
    pub fn new(tokens: Vec<String>, scores: Vec<f32>, types: Vec<u8>, add_space_prefix: bool) -> Result<Self> {
        let n = tokens.len();
        if n == 0 || scores.len() != n || types.len() != n {
            return Err(TokenizerError::Spec(format!(
                "{} tokens, {} scores, {} types: must be equal and non-zero",
                n,
                scores.len(),
                types.len()
            )));
        }
        let mut lookup = HashMap::with_capacity(n);
        let mut byte_tokens = [None; 256];
        let mut unk = None;
        let mut specials = Vec::new();
        for (i, t) in tokens.iter().enumerate() {
            let id = i as u32;
            match types[i] {
                token_type::BYTE => {
                    if let Some(b) = parse_byte_piece(t) {
                        byte_tokens[b as usize] = Some(id);
                    }
                }
                token_type::UNKNOWN => unk = unk.or(Some(id)),
                token_type::CONTROL | token_type::USER_DEFINED if !t.is_empty() => {
                    specials.push((t.clone(), id, types[i] == token_type::CONTROL))
                }
                _ => {}
            }
            lookup.entry(t.clone()).or_insert(id);
        }
        Ok(SpmTokenizer { tokens, scores, types, lookup, byte_tokens, unk, specials, add_space_prefix })
    }

    pub fn adds_space_prefix(&self) -> bool {
        self.add_space_prefix
    }

    /// Control and user-defined token strings with their ids (matched in text only on request).
    pub fn special_strings(&self) -> &[(String, u32, bool)] {
        &self.specials
    }

    /// Encodes plain text (no special-token matching); `prefix` prepends the space marker.
    pub fn encode_fragment(&self, frag: &str, prefix: bool, out: &mut Vec<u32>) {
        if frag.is_empty() {
            return;
        }
        let mut text = String::with_capacity(frag.len() + 3);
        if prefix {
            text.push('▁');
        }
        for c in frag.chars() {
            text.push(if c == ' ' { '▁' } else { c });
        }
        let mut syms: Vec<Sym> = Vec::new();
        for (i, (start, c)) in text.char_indices().enumerate() {
            syms.push(Sym { start, len: c.len_utf8(), prev: i.checked_sub(1), next: None });
            if i > 0 {
                syms[i - 1].next = Some(i);
            }
        }
        let mut heap = BinaryHeap::new();
        let try_push = |heap: &mut BinaryHeap<Bigram>, syms: &[Sym], l: usize, r: usize| {
            let s = &text[syms[l].start..syms[r].start + syms[r].len];
            if let Some(&id) = self.lookup.get(s) {
                heap.push(Bigram { score: self.scores[id as usize], left: l, right: r, len: s.len() });
            }
        };
        for i in 1..syms.len() {
            try_push(&mut heap, &syms, i - 1, i);
        }
        while let Some(b) = heap.pop() {
            let (l, r) = (b.left, b.right);
            // Skip stale entries: one side was merged away since this pair was queued.
            if syms[l].len == 0 || syms[r].len == 0 || syms[l].next != Some(r) || syms[l].len + syms[r].len != b.len {
                continue;
            }
            syms[l].len += syms[r].len;
            syms[r].len = 0;
            syms[l].next = syms[r].next;
            if let Some(n) = syms[r].next {
                syms[n].prev = Some(l);
            }
            if let Some(p) = syms[l].prev {
                try_push(&mut heap, &syms, p, l);
            }
            if let Some(n) = syms[l].next {
                try_push(&mut heap, &syms, l, n);
            }
        }
        let mut i = if syms.is_empty() { None } else { Some(0) };
        while let Some(k) = i {
            let s = &text[syms[k].start..syms[k].start + syms[k].len];
            match self.lookup.get(s) {
                Some(&id) => out.push(id),
                None => {
                    for b in s.bytes() {
                        if let Some(id) = self.byte_tokens[b as usize].or(self.unk) {
                            out.push(id);
                        }
                    }
                }
            }
            i = syms[k].next;
        }
    }

    pub fn token_text(&self, id: u32) -> Option<String> {
        self.tokens.get(id as usize).cloned()
    }

    /// Bytes each token decodes to: `▁` → space, `<0xXX>` → that byte, control tokens → nothing.
    pub fn all_token_bytes(&self) -> Vec<Vec<u8>> {
        self.tokens
            .iter()
            .zip(&self.types)
            .map(|(t, &ty)| match ty {
                token_type::CONTROL | token_type::UNKNOWN | token_type::UNUSED => Vec::new(),
                token_type::BYTE => parse_byte_piece(t).map(|b| vec![b]).unwrap_or_default(),
                _ => t.replace('▁', " ").into_bytes(),
            })
            .collect()
    }
}

fn parse_byte_piece(t: &str) -> Option<u8> {
    let hex = t.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}
