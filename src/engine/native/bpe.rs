//! A fast byte-level BPE encoder for the tokenizer shapes our models use: GPT-2, Qwen2, Llama 3
//! or SmolLM splitting, NFC or no normalizer, merges by rank, added tokens matched whole.
//!
//! Why it exists: the `tokenizers` crate takes ~27 ms for an 8,000-token dialogue on this CPU,
//! two thirds of it in its fancy-regex pre-tokenizer, and the server tokenizes every dialogue
//! four times (once to count it against the input limit, once per branch prompt). Here the split
//! is a hand-written scanner over a character-class table and the merges run on a heap with a
//! per-thread word cache.
//!
//! It is built from the `tokenizers::Tokenizer`'s own serialization, and only when every stage
//! has a shape implemented here; otherwise [`FastBpe::from_tokenizer`] says why and the caller
//! keeps the `tokenizers` path. The tests compare ids with `tokenizers` on the corpus, on
//! prompts with special tokens, and on random text.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use rustc_hash::FxHashMap;
use serde_json::Value;
use unicode_normalization_alignments::{is_nfc_quick, IsNormalized, UnicodeNormalization};

/// Qwen2/Qwen3's split pattern (a `Split` pre-tokenizer, `Isolated`).
pub const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3's: Qwen2's with numbers in runs of up to three digits.
pub const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// GPT-2's pattern: what `ByteLevel` with `use_regex` splits by (SmolLM2, Llama-2-era BPEs).
const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// Words longer than this skip the cache (long CJK runs, base64): they are rare and would
/// crowd out the short words that repeat.
const CACHE_WORD_BYTES: usize = 48;
/// The cache is per thread (no lock on the hot path), so its bound is per thread: about 1 MiB
/// at 8,192 words. Frequent words fill it first; it is emptied when full.
const CACHE_ENTRIES: usize = 1 << 13;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Splitter {
    Qwen2,
    Llama3,
    Gpt2,
    /// Every digit alone (`Digits`, individual), then GPT-2's split of the text between.
    Smollm,
}

pub struct FastBpe {
    splitter: Splitter,
    nfc: bool,
    /// Id of the single-byte token of each byte; [`NO_TOKEN`] where the vocabulary has none
    /// (SmolLM2's GGUF lacks a few control bytes): such bytes are dropped, as `tokenizers` does
    /// for a character without a token when there is no unknown token.
    byte_ids: [u32; 256],
    /// (left id << 32 | right id) -> (rank, merged id).
    merges: FxHashMap<u64, (u32, u32)>,
    added: AddedTokens,
    /// Distinguishes this encoder's entries in the per-thread word caches.
    instance: u64,
}

/// Added tokens are found in the raw text before anything else, leftmost first and the longest
/// at a position, as `tokenizers` does; each is one token.
struct AddedTokens {
    starts: [bool; 256],
    /// Longest first.
    tokens: Vec<(Box<[u8]>, u32)>,
}

impl AddedTokens {
    fn at(&self, bytes: &[u8], i: usize) -> Option<(usize, u32)> {
        if !self.starts[bytes[i] as usize] {
            return None;
        }
        self.tokens
            .iter()
            .find(|(t, _)| bytes[i..].starts_with(t))
            .map(|(t, id)| (t.len(), *id))
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Class {
    Letter,
    Number,
    /// `\r` and `\n`.
    Newline,
    /// Other white space (`\s`).
    Space,
    Other,
}

/// The regex classes `\p{L}`, `\p{N}` and `\s`, taken from regex-syntax's Unicode tables so they
/// are exactly what the `tokenizers` regex matches: a byte per BMP character, ranges beyond.
struct Classes {
    bmp: Vec<Class>,
    letters: Vec<(u32, u32)>,
    numbers: Vec<(u32, u32)>,
    spaces: Vec<(u32, u32)>,
}

fn class_ranges(pattern: &str) -> Vec<(u32, u32)> {
    use regex_syntax::hir::{Class as HirClass, HirKind};
    let hir = regex_syntax::Parser::new()
        .parse(pattern)
        .expect("a Unicode class pattern");
    match hir.kind() {
        HirKind::Class(HirClass::Unicode(c)) => c
            .ranges()
            .iter()
            .map(|r| (r.start() as u32, r.end() as u32))
            .collect(),
        other => panic!("{pattern} parsed to {other:?}"),
    }
}

fn in_ranges(ranges: &[(u32, u32)], c: u32) -> bool {
    ranges
        .binary_search_by(|&(lo, hi)| {
            if hi < c {
                std::cmp::Ordering::Less
            } else if lo > c {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        })
        .is_ok()
}

impl Classes {
    fn get() -> &'static Classes {
        static CLASSES: OnceLock<Classes> = OnceLock::new();
        CLASSES.get_or_init(|| {
            let mut c = Classes {
                bmp: Vec::new(),
                letters: class_ranges(r"\p{L}"),
                numbers: class_ranges(r"\p{N}"),
                spaces: class_ranges(r"\s"),
            };
            c.bmp = (0..0x10000u32).map(|u| c.slow(u)).collect();
            c
        })
    }

    fn slow(&self, u: u32) -> Class {
        if u == '\r' as u32 || u == '\n' as u32 {
            Class::Newline
        } else if in_ranges(&self.spaces, u) {
            Class::Space
        } else if in_ranges(&self.letters, u) {
            Class::Letter
        } else if in_ranges(&self.numbers, u) {
            Class::Number
        } else {
            Class::Other
        }
    }

    #[inline]
    fn of(&self, c: char) -> Class {
        let u = c as u32;
        if u < 0x10000 {
            self.bmp[u as usize]
        } else {
            self.slow(u)
        }
    }
}

/// A scanner over one normalized segment: each call to [`Scanner::piece`] returns the end of the
/// piece that starts at `i`, as the split regex would match it.
struct Scanner<'a> {
    s: &'a str,
    classes: &'static Classes,
}

impl Scanner<'_> {
    fn char_at(&self, i: usize) -> Option<(char, Class)> {
        self.s[i..].chars().next().map(|c| (c, self.classes.of(c)))
    }

    /// End of the run of characters from `i` whose class satisfies `keep`.
    fn run(&self, mut i: usize, keep: impl Fn(Class) -> bool) -> usize {
        for c in self.s[i..].chars() {
            if !keep(self.classes.of(c)) {
                break;
            }
            i += c.len_utf8();
        }
        i
    }

    /// `'s|'t|'re|'ve|'m|'ll|'d` after an apostrophe at `i`, case-insensitive when asked
    /// (Unicode simple case folding: `s` also matches `ſ`).
    fn contraction(&self, i: usize, insensitive: bool) -> Option<usize> {
        let fold = |c: char| match c {
            _ if !insensitive => c,
            'ſ' => 's',
            _ => c.to_ascii_lowercase(),
        };
        let mut chars = self.s[i + 1..].chars();
        let c0 = chars.next()?;
        let second = match fold(c0) {
            's' | 't' | 'm' | 'd' => return Some(i + 1 + c0.len_utf8()),
            'r' | 'v' => 'e',
            'l' => 'l',
            _ => return None,
        };
        let c1 = chars.next()?;
        (fold(c1) == second).then(|| i + 1 + c0.len_utf8() + c1.len_utf8())
    }

    /// `\s+(?!\S)|\s+` from `i` (a white-space character): the run, less its last character
    /// when a non-space follows and the run is longer than one.
    fn spaces(&self, i: usize) -> usize {
        let end = self.run(i, |k| matches!(k, Class::Space | Class::Newline));
        if end == self.s.len() {
            return end;
        }
        let last = self.s[..end].chars().next_back().map_or(0, char::len_utf8);
        if end - last > i {
            end - last
        } else {
            end
        }
    }

    fn piece(&self, i: usize, splitter: Splitter) -> usize {
        match splitter {
            Splitter::Qwen2 => self.qwen2(i, 1),
            Splitter::Llama3 => self.qwen2(i, 3),
            Splitter::Gpt2 => self.gpt2(i),
            Splitter::Smollm => self.smollm(i),
        }
    }

    /// Qwen2's pattern, with numbers in runs of up to `digits`.
    fn qwen2(&self, i: usize, digits: usize) -> usize {
        let (c, class) = self.char_at(i).expect("a piece starts inside the text");
        let after = i + c.len_utf8();
        let letters = |from: usize| self.run(from, |k| k == Class::Letter);
        // (?i:'s|'t|'re|'ve|'m|'ll|'d)
        if c == '\'' {
            if let Some(end) = self.contraction(i, true) {
                return end;
            }
        }
        // [^\r\n\p{L}\p{N}]?\p{L}+
        match class {
            Class::Letter => return letters(i),
            Class::Space | Class::Other => {
                if let Some((_, Class::Letter)) = self.char_at(after) {
                    return letters(after);
                }
            }
            _ => {}
        }
        // \p{N} (or \p{N}{1,digits})
        if class == Class::Number {
            let mut end = after;
            for c in self.s[after..].chars().take(digits - 1) {
                if self.classes.of(c) != Class::Number {
                    break;
                }
                end += c.len_utf8();
            }
            return end;
        }
        //  ?[^\s\p{L}\p{N}]+[\r\n]*
        let j = if c == ' ' { after } else { i };
        if let Some((_, Class::Other)) = self.char_at(j) {
            let end = self.run(j, |k| k == Class::Other);
            return self.run(end, |k| k == Class::Newline);
        }
        // Only white space is left. \s*[\r\n]+ : up to the run's last newline, if any.
        let end = self.run(i, |k| matches!(k, Class::Space | Class::Newline));
        if let Some(nl) = self.s[i..end].rfind(['\r', '\n']) {
            return i + nl + 1;
        }
        self.spaces(i)
    }

    fn gpt2(&self, i: usize) -> usize {
        let (c, _) = self.char_at(i).expect("a piece starts inside the text");
        if c == '\'' {
            if let Some(end) = self.contraction(i, false) {
                return end;
            }
        }
        //  ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+
        let j = if c == ' ' { i + 1 } else { i };
        if let Some((_, class)) = self.char_at(j) {
            if matches!(class, Class::Letter | Class::Number | Class::Other) {
                return self.run(j, |k| k == class);
            }
        }
        self.spaces(i)
    }

    /// A digit alone; otherwise GPT-2's pattern run on the text up to the next digit, which
    /// differs from running it on the whole text only where a piece would reach a digit: ` 1`
    /// (the space is then a piece of its own) and a space run before a digit (kept whole, as
    /// at the end of a text).
    fn smollm(&self, i: usize) -> usize {
        let (c, class) = self.char_at(i).expect("a piece starts inside the text");
        if class == Class::Number {
            return i + c.len_utf8();
        }
        if c == '\'' {
            if let Some(end) = self.contraction(i, false) {
                return end;
            }
        }
        let j = if c == ' ' { i + 1 } else { i };
        if let Some((_, class)) = self.char_at(j) {
            if matches!(class, Class::Letter | Class::Other) {
                return self.run(j, |k| k == class);
            }
        }
        let end = self.run(i, |k| matches!(k, Class::Space | Class::Newline));
        match self.char_at(end) {
            Some((_, Class::Number)) => end,
            _ => self.spaces(i),
        }
    }
}

struct WordCache {
    instance: u64,
    words: FxHashMap<Box<[u8]>, Box<[u32]>>,
}

thread_local! {
    static CACHE: RefCell<WordCache> = RefCell::new(WordCache {
        instance: u64::MAX,
        words: FxHashMap::default(),
    });
}

/// Empty this thread's word cache: benchmarks use it to measure the cold cost.
pub fn clear_thread_cache() {
    CACHE.with_borrow_mut(|c| c.words.clear());
}

/// GPT-2's byte-to-character map: printable Latin-1 bytes stand for themselves, the others for
/// code points from 256 on, in byte order.
fn byte_chars() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        out[b as usize] = if printable {
            b as char
        } else {
            let c = char::from_u32(next).expect("a code point below 0x200");
            next += 1;
            c
        };
    }
    out
}

const NO_TOKEN: u32 = u32::MAX;

fn key(left: u32, right: u32) -> u64 {
    (left as u64) << 32 | right as u64
}

/// Why a tokenizer is left to `tokenizers`.
fn unsupported(what: &str, v: &Value) -> String {
    format!("{what} {v} is not a shape the fast encoder implements")
}

impl FastBpe {
    /// Build from the tokenizer's own serialization; `Err` says which stage is not supported.
    pub fn from_tokenizer(tok: &tokenizers::Tokenizer) -> Result<Self, String> {
        let json = serde_json::to_value(tok).map_err(|e| e.to_string())?;
        Self::from_json(&json)
    }

    fn from_json(json: &Value) -> Result<Self, String> {
        for field in ["truncation", "padding"] {
            if !json[field].is_null() {
                return Err(unsupported(field, &json[field]));
            }
        }
        let nfc = match &json["normalizer"] {
            Value::Null => false,
            n if n["type"] == "NFC" => true,
            n if n["type"] == "Sequence"
                && n["normalizers"].as_array().is_some_and(|a| a.is_empty()) =>
            {
                false
            }
            n => return Err(unsupported("normalizer", n)),
        };
        let splitter = Self::splitter(&json["pre_tokenizer"])?;

        let model = &json["model"];
        let empty = |v: &Value| v.is_null() || v == "";
        let plain = model["type"] == "BPE"
            && model["dropout"].is_null()
            && empty(&model["continuing_subword_prefix"])
            && empty(&model["end_of_word_suffix"])
            && model["byte_fallback"] != true
            && model["ignore_merges"] != true;
        if !plain {
            let mut shown = model.clone();
            shown["vocab"] = Value::from("...");
            shown["merges"] = Value::from("...");
            return Err(unsupported("model", &shown));
        }
        let vocab: FxHashMap<&str, u32> = model["vocab"]
            .as_object()
            .ok_or("model.vocab is not an object")?
            .iter()
            .map(|(k, v)| Ok((k.as_str(), v.as_u64().ok_or("vocab id")? as u32)))
            .collect::<Result<_, String>>()?;
        let chars = byte_chars();
        if !model["unk_token"].is_null() {
            return Err(unsupported("model.unk_token", &model["unk_token"]));
        }
        let mut byte_ids = [NO_TOKEN; 256];
        for (b, c) in chars.iter().enumerate() {
            if let Some(&id) = vocab.get(c.to_string().as_str()) {
                byte_ids[b] = id;
            }
        }
        let mut merges = FxHashMap::default();
        for (rank, m) in model["merges"]
            .as_array()
            .ok_or("model.merges is not a list")?
            .iter()
            .enumerate()
        {
            let (a, b) = match m {
                Value::String(s) => s.split_once(' ').ok_or("merge without a space")?,
                Value::Array(p) if p.len() == 2 => (
                    p[0].as_str().ok_or("merge part")?,
                    p[1].as_str().ok_or("merge part")?,
                ),
                other => return Err(unsupported("merge", other)),
            };
            let id = |s: &str| {
                vocab
                    .get(s)
                    .copied()
                    .ok_or_else(|| format!("merge part {s:?} not in the vocabulary"))
            };
            let merged = id(&format!("{a}{b}"))?;
            // The first (best-ranked) occurrence of a pair wins, as in `tokenizers`.
            merges
                .entry(key(id(a)?, id(b)?))
                .or_insert((rank as u32, merged));
        }

        let mut added = AddedTokens {
            starts: [false; 256],
            tokens: Vec::new(),
        };
        for t in json["added_tokens"].as_array().into_iter().flatten() {
            let flags_plain = ["lstrip", "rstrip", "single_word"]
                .iter()
                .all(|f| t[*f] != true);
            // With a normalizer, normalized added tokens are matched after normalization.
            if !flags_plain || (nfc && t["normalized"] == true) {
                return Err(unsupported("added token", t));
            }
            let content = t["content"].as_str().ok_or("added token content")?;
            if content.is_empty() {
                continue;
            }
            let id = t["id"].as_u64().ok_or("added token id")? as u32;
            added.starts[content.as_bytes()[0] as usize] = true;
            added.tokens.push((content.as_bytes().into(), id));
        }
        added.tokens.sort_by_key(|(t, _)| Reverse(t.len()));

        static INSTANCES: AtomicU64 = AtomicU64::new(0);
        Ok(Self {
            splitter,
            nfc,
            byte_ids,
            merges,
            added,
            instance: INSTANCES.fetch_add(1, Ordering::Relaxed),
        })
    }

    fn splitter(pre: &Value) -> Result<Splitter, String> {
        let byte_level = |v: &Value, use_regex: bool| {
            v["type"] == "ByteLevel"
                && v["add_prefix_space"] != true
                && (v["use_regex"] == true) == use_regex
        };
        if byte_level(pre, true) {
            return Ok(Splitter::Gpt2);
        }
        if pre["type"] == "Sequence" {
            if let Some([digits, bl]) = pre["pretokenizers"].as_array().map(Vec::as_slice) {
                if digits["type"] == "Digits"
                    && digits["individual_digits"] == true
                    && byte_level(bl, true)
                {
                    return Ok(Splitter::Smollm);
                }
            }
            if let Some([split, bl]) = pre["pretokenizers"].as_array().map(Vec::as_slice) {
                let isolated = split["type"] == "Split"
                    && split["behavior"] == "Isolated"
                    && split["invert"] != true;
                if isolated && byte_level(bl, false) {
                    match split["pattern"]["Regex"].as_str() {
                        Some(QWEN2_PATTERN) => return Ok(Splitter::Qwen2),
                        Some(LLAMA3_PATTERN) => return Ok(Splitter::Llama3),
                        Some(GPT2_PATTERN) => return Ok(Splitter::Gpt2),
                        _ => {}
                    }
                }
            }
        }
        Err(unsupported("pre_tokenizer", pre))
    }

    /// Token ids of `text`, as `tokenizers`' `encode_fast(text, false)` gives them.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3);
        self.each_segment(text, &mut out);
        out
    }

    /// Token ids of `text` without added-token matching: the text of a special token in it is
    /// only text, split and merged like any other. For message contents, which a client wrote.
    pub fn encode_plain(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3);
        self.segment(text, &mut out);
        out
    }

    /// Number of tokens of `text`.
    pub fn count(&self, text: &str) -> usize {
        // The ids are the count's by-product; a counting-only path would save only the pushes.
        self.encode(text).len()
    }

    fn each_segment(&self, text: &str, out: &mut Vec<u32>) {
        let bytes = text.as_bytes();
        let mut start = 0;
        let mut i = 0;
        while i < bytes.len() {
            if let Some((len, id)) = self.added.at(bytes, i) {
                self.segment(&text[start..i], out);
                out.push(id);
                i += len;
                start = i;
            } else {
                i += 1;
            }
        }
        self.segment(&text[start..], out);
    }

    fn segment(&self, raw: &str, out: &mut Vec<u32>) {
        if raw.is_empty() {
            return;
        }
        let normalized: std::borrow::Cow<str> =
            if self.nfc && is_nfc_quick(raw.chars()) != IsNormalized::Yes {
                raw.nfc().map(|(c, _)| c).collect::<String>().into()
            } else {
                raw.into()
            };
        let scanner = Scanner {
            s: &normalized,
            classes: Classes::get(),
        };
        CACHE.with_borrow_mut(|cache| {
            if cache.instance != self.instance || cache.words.len() >= CACHE_ENTRIES {
                cache.words.clear();
                cache.instance = self.instance;
            }
            let mut i = 0;
            while i < normalized.len() {
                let end = scanner.piece(i, self.splitter);
                self.word(&normalized.as_bytes()[i..end], cache, out);
                i = end;
            }
        });
    }

    fn word(&self, word: &[u8], cache: &mut WordCache, out: &mut Vec<u32>) {
        if let [b] = word {
            let id = self.byte_ids[*b as usize];
            if id != NO_TOKEN {
                out.push(id);
            }
            return;
        }
        if word.len() <= CACHE_WORD_BYTES {
            if let Some(ids) = cache.words.get(word) {
                out.extend_from_slice(ids);
                return;
            }
        }
        let from = out.len();
        self.merge(word, out);
        if word.len() <= CACHE_WORD_BYTES {
            cache.words.insert(word.into(), out[from..].into());
        }
    }

    /// Apply merges best rank first (leftmost among equals) until none applies: symbols in a
    /// linked list, candidate pairs in a heap, stale candidates skipped when popped.
    fn merge(&self, word: &[u8], out: &mut Vec<u32>) {
        const NONE: u32 = NO_TOKEN;
        let mut ids: Vec<u32> = word
            .iter()
            .map(|&b| self.byte_ids[b as usize])
            .filter(|&id| id != NO_TOKEN)
            .collect();
        let n = ids.len();
        if n < 2 {
            out.extend_from_slice(&ids);
            return;
        }
        let mut next: Vec<u32> = (1..=n as u32)
            .map(|j| if j as usize == n { NONE } else { j })
            .collect();
        let mut prev: Vec<u32> = (0..n as u32)
            .map(|j| j.checked_sub(1).unwrap_or(NONE))
            .collect();
        let mut heap = BinaryHeap::with_capacity(n);
        for p in 0..n - 1 {
            if let Some(&(rank, _)) = self.merges.get(&key(ids[p], ids[p + 1])) {
                heap.push(Reverse((rank, p as u32)));
            }
        }
        while let Some(Reverse((rank, p))) = heap.pop() {
            let p = p as usize;
            let q = next[p];
            // Merged away (its slot's id is NONE) or now last.
            if ids[p] == NONE || q == NONE {
                continue;
            }
            let q = q as usize;
            let Some(&(r, merged)) = self.merges.get(&key(ids[p], ids[q])) else {
                continue;
            };
            if r != rank {
                continue;
            }
            ids[p] = merged;
            ids[q] = NONE;
            let after = next[q];
            next[p] = after;
            if after != NONE {
                prev[after as usize] = p as u32;
                if let Some(&(r, _)) = self.merges.get(&key(merged, ids[after as usize])) {
                    heap.push(Reverse((r, p as u32)));
                }
            }
            let before = prev[p];
            if before != NONE {
                if let Some(&(r, _)) = self.merges.get(&key(ids[before as usize], merged)) {
                    heap.push(Reverse((r, before)));
                }
            }
        }
        let mut p = 0u32;
        while p != NONE {
            out.push(ids[p as usize]);
            p = next[p as usize];
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::PathBuf;

    /// The real Qwen3 tokenizer, when fetched (see `test_files`).
    fn qwen3(test: &str) -> Option<tokenizers::Tokenizer> {
        let path = crate::test_files::cached(
            "models/qwen3-tokenizer/tokenizer.json",
            test,
            "--qwen3-tokenizer",
        )?;
        Some(tokenizers::Tokenizer::from_file(&path).unwrap())
    }

    /// The tiny test model's tokenizer: byte tokens, no merges, ChatML added tokens.
    fn tiny() -> tokenizers::Tokenizer {
        let dir = tempfile::tempdir().unwrap();
        crate::tiny_model::write(dir.path(), 1).unwrap();
        tokenizers::Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap()
    }

    /// Qwen3's vocabulary with the split a GGUF's `tokenizer.ggml.pre` names (as the engine builds
    /// it for a bare GGUF) and no normalizer.
    fn with_split(mut t: tokenizers::Tokenizer, pre: &str) -> tokenizers::Tokenizer {
        let (nfc, split) = super::super::tokenizer::pre_tokenizer(pre).unwrap();
        assert!(!nfc, "{pre} has no normalizer");
        t.with_normalizer(None::<tokenizers::NormalizerWrapper>);
        t.with_pre_tokenizer(Some(split));
        t
    }

    pub(crate) fn corpus() -> Vec<String> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("loadtest/corpus");
        let mut out = Vec::new();
        for lang in ["en", "zh"] {
            let text = std::fs::read_to_string(dir.join(format!("{lang}.json"))).unwrap();
            let v: Value = serde_json::from_str(&text).unwrap();
            collect_strings(&v, &mut out);
        }
        assert!(out.len() > 100, "corpus has {} strings", out.len());
        out
    }

    fn collect_strings(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::String(s) => out.push(s.clone()),
            Value::Array(a) => a.iter().for_each(|x| collect_strings(x, out)),
            Value::Object(o) => o.values().for_each(|x| collect_strings(x, out)),
            _ => {}
        }
    }

    /// Strings built to hit every branch of the split patterns, normalization and added tokens.
    pub(crate) fn tricky() -> Vec<String> {
        [
            "",
            " ",
            "  ",
            "\n",
            "a",
            "Hello world",
            "I'm here, you're there; we'll see. It's JOHN'S car, I'VE been, she'd go",
            "don't 'tis 'S 'Ll 'lL 'ſ 'x ' s",
            "x  y   z    \tw \t\n v",
            "tail spaces   ",
            "line\nline\r\nline\n\n\n  indented\n\t\ttabbed  \n  ",
            "12345 67.89 3,000,000 ½ ² Ⅻ ٣٤ 一二三",
            " 42 !!! ?? ... --- ...\n\n### heading\n",
            "@#$%^&*()_+-=[]{}|;:\",.<>/?`~",
            "我搬到了杭州。我喜欢喝咖啡，不喜欢茶！",
            "混合 mixed 文本 text：第3章",
            "e\u{301}cole cafe\u{301} A\u{30a} \u{212b} \u{1e9b}\u{323}",
            "\u{a0}nbsp\u{3000}ideographic\u{2009}thin\u{85}nel\u{2028}ls",
            "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇨🇳",
            "<|im_start|>user\nI moved to Hangzhou.<|im_end|>\n<|im_start|>assistant\n",
            "<think>\n\n</think>\n\n{\"ok\":true}<|endoftext|>",
            "<|im_start|<|im_end|><<|im_start|>>",
            "\u{feff}bom \u{200b}zero\u{200d}width",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// Random strings over a palette that mixes the classes the scanners distinguish.
    pub(crate) fn fuzz(n: usize, seed: u64) -> Vec<String> {
        let palette: Vec<char> = "aZé ſ'sStTrReEvVmMlLdD \t\n\r\u{a0}\u{3000}0987½_.,!?-\"(<|>)我们杭州。，😀\u{301}\u{30a}"
            .chars()
            .collect();
        let mut state = seed;
        let mut rand = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        (0..n)
            .map(|_| {
                let len = (rand() % 40) as usize;
                (0..len)
                    .map(|_| palette[(rand() % palette.len() as u64) as usize])
                    .collect()
            })
            .collect()
    }

    fn assert_same(hf: &tokenizers::Tokenizer, fast: &FastBpe, texts: &[String]) {
        for text in texts {
            let want = hf.encode_fast(text.as_str(), false).unwrap();
            assert_eq!(
                fast.encode(text),
                want.get_ids(),
                "ids differ for {text:?} (pieces {:?})",
                want.get_tokens()
            );
        }
    }

    #[test]
    fn qwen3_ids_match_tokenizers() {
        let Some(hf) = qwen3("qwen3_ids_match_tokenizers") else {
            return;
        };
        let fast = FastBpe::from_tokenizer(&hf).expect("Qwen3's tokenizer is supported");
        assert_eq!(fast.splitter, Splitter::Qwen2);
        assert!(fast.nfc);
        assert_same(&hf, &fast, &tricky());
        assert_same(&hf, &fast, &fuzz(3_000, 0x9e3779b97f4a7c15));
        let corpus = corpus();
        assert_same(&hf, &fast, &corpus);
        // Whole dialogues: long texts, words seen again through the cache.
        assert_same(&hf, &fast, &[corpus.join("\n")]);
    }

    #[test]
    fn gpt2_split_ids_match_tokenizers() {
        let Some(hf) = qwen3("gpt2_split_ids_match_tokenizers").map(|t| with_split(t, "gpt2"))
        else {
            return;
        };
        let fast = FastBpe::from_tokenizer(&hf).expect("ByteLevel with its regex is supported");
        assert_eq!(fast.splitter, Splitter::Gpt2);
        assert!(!fast.nfc);
        assert_same(&hf, &fast, &tricky());
        assert_same(&hf, &fast, &fuzz(3_000, 0x2545f4914f6cdd1d));
        assert_same(&hf, &fast, &corpus());
    }

    #[test]
    fn llama3_and_smollm_splits_match_tokenizers() {
        for (pre, splitter) in [
            ("llama-bpe", Splitter::Llama3),
            ("smollm", Splitter::Smollm),
        ] {
            let Some(hf) = qwen3("llama3_and_smollm_splits_match_tokenizers") else {
                return;
            };
            let hf = with_split(hf, pre);
            let fast = FastBpe::from_tokenizer(&hf).expect("a split we implement");
            assert_eq!(fast.splitter, splitter);
            let mut texts = tricky();
            texts.push("1 22 333 4444 55555 a1b22c333 x  7 \n 8".into());
            assert_same(&hf, &fast, &texts);
            assert_same(&hf, &fast, &fuzz(3_000, 0x1234_5678_9abc_def1));
            assert_same(&hf, &fast, &corpus());
        }
    }

    #[test]
    fn long_words_merge_like_tokenizers() {
        // One 6,000-character CJK run without punctuation is a single piece: the heap keeps it
        // from going quadratic, and the ids must still agree.
        let Some(hf) = qwen3("long_words_merge_like_tokenizers") else {
            return;
        };
        let fast = FastBpe::from_tokenizer(&hf).unwrap();
        let run: String = "我们今天去杭州西湖边散步然后喝了龙井茶"
            .chars()
            .cycle()
            .take(6_000)
            .collect();
        assert_same(&hf, &fast, &[run]);
    }

    #[test]
    fn the_engines_encoder_is_the_fast_one_for_both_test_tokenizers() {
        // The tiny model's byte tokenizer (no merges, ChatML added tokens) and Qwen3's: if either
        // fell back to `tokenizers`, every engine test would silently stop covering this file.
        let real =
            qwen3("the_engines_encoder_is_the_fast_one_for_both_test_tokenizers (Qwen3 part)");
        for hf in std::iter::once(tiny()).chain(real) {
            let hf = std::sync::Arc::new(hf);
            let encoder = super::super::tokenizer::Encoder::new(hf.clone());
            assert!(encoder.is_fast());
            let text = "<|im_start|>user\nI'm moving to Hangzhou in 2027.<|im_end|>\n";
            let want = hf.encode_fast(text, false).unwrap().get_ids().to_vec();
            assert_eq!(encoder.encode(text).unwrap(), want);
            assert_eq!(encoder.count(text).unwrap(), want.len());
        }
    }

    #[test]
    fn bytes_without_a_token_are_dropped_like_tokenizers() {
        // A vocabulary without the control bytes 0x00-0x08 (as SmolLM2's GGUF), and merges that
        // then apply across a dropped byte.
        let chars = byte_chars();
        let mut vocab = serde_json::Map::new();
        for c in chars.iter().skip(9) {
            vocab.insert(c.to_string(), Value::from(vocab.len()));
        }
        let merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("Ġ", "w"), ("a", "b")];
        for (a, b) in merges {
            vocab.insert(format!("{a}{b}"), Value::from(vocab.len()));
        }
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": null, "decoder": null,
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": false, "vocab": vocab,
                      "merges": merges.iter().map(|(a, b)| format!("{a} {b}")).collect::<Vec<_>>()}
        });
        let hf: tokenizers::Tokenizer = serde_json::from_value(json).unwrap();
        let fast = FastBpe::from_tokenizer(&hf).unwrap();
        let texts: Vec<String> = [
            "hello world",
            "he\u{4}llo a\u{1}b \u{0}",
            "\u{3}",
            "\u{2}\u{5}\u{6}",
            "h\u{8}e\u{7}l\u{4}l",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(fuzz(500, 7).into_iter().map(|s| s.replace('a', "\u{4}")))
        .collect();
        assert_same(&hf, &fast, &texts);
    }

    #[test]
    fn unsupported_shapes_are_refused_with_the_reason() {
        let base = tiny();
        let mut nfkc = base.clone();
        nfkc.with_normalizer(Some(tokenizers::normalizers::unicode::NFKC));
        let mut whitespace = base;
        whitespace.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::whitespace::Whitespace));
        for (t, stage) in [(nfkc, "normalizer"), (whitespace, "pre_tokenizer")] {
            let err = FastBpe::from_tokenizer(&t)
                .err()
                .unwrap_or_else(|| panic!("a {stage} that is not implemented was accepted"));
            assert!(err.contains(stage), "{err}");
        }
    }
}
