//! Turning a stream of token ids into text deltas: incremental detokenization that never
//! splits a UTF-8 character, and stop strings that are never emitted, even when they span
//! several tokens.

use std::sync::Arc;

use tokenizers::Tokenizer;

/// Decodes ids as they arrive. Text is released only once it no longer ends in an incomplete
/// character; a window of previous tokens gives the decoder its context (spaces, merges).
pub struct Detokenizer {
    tokenizer: Arc<Tokenizer>,
    /// Special tokens written out as their text (a tool-call marker such as `[TOOL_CALLS]`);
    /// every other special token is skipped.
    visible: Vec<u32>,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl Detokenizer {
    pub fn new(tokenizer: Arc<Tokenizer>) -> Self {
        Self {
            tokenizer,
            visible: Vec::new(),
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, true).unwrap_or_default()
    }

    /// Writes these special tokens out as their text.
    pub fn with_visible(mut self, ids: Vec<u32>) -> Self {
        self.visible = ids;
        self
    }

    /// Adds one token; returns the text it completes (often empty mid-character).
    pub fn push(&mut self, id: u32) -> String {
        if self.visible.contains(&id) {
            let mut out = self.flush();
            out.push_str(&self.tokenizer.id_to_token(id).unwrap_or_default());
            return out;
        }
        self.ids.push(id);
        let prefix = self.decode(&self.ids[self.prefix_offset..self.read_offset]);
        let full = self.decode(&self.ids[self.prefix_offset..]);
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            let delta = full.get(prefix.len()..).unwrap_or_default().to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            delta
        } else {
            String::new()
        }
    }

    /// Whatever is still held back at the end (an incomplete character decodes as U+FFFD).
    pub fn flush(&mut self) -> String {
        let prefix = self.decode(&self.ids[self.prefix_offset..self.read_offset]);
        let full = self.decode(&self.ids[self.prefix_offset..]);
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        full.get(prefix.len()..).unwrap_or_default().to_string()
    }
}

/// Length of the longest end of `text` that is a proper prefix of `marker` (text that must
/// be held back: the marker may be arriving).
pub(crate) fn partial_suffix(text: &str, marker: &str) -> usize {
    marker
        .char_indices()
        .map(|(i, _)| i)
        .skip(1)
        .filter(|&i| text.ends_with(&marker[..i]))
        .max()
        .unwrap_or(0)
}

/// Holds back text that could be the start of a stop string, and cuts the output where one
/// appears.
#[derive(Debug, Default)]
pub struct StopBuffer {
    stops: Vec<String>,
    pending: String,
    matched: Option<usize>,
}

impl StopBuffer {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            pending: String::new(),
            matched: None,
        }
    }

    /// Adds text; returns what can be emitted now, and whether a stop string was reached
    /// (everything from it on is dropped).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.pending.push_str(text);
        let hit = self
            .stops
            .iter()
            .enumerate()
            .filter_map(|(i, s)| Some((self.pending.find(s.as_str())?, i)))
            .min();
        if let Some((at, i)) = hit {
            self.matched = Some(i);
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return (out, true);
        }
        let keep = self
            .stops
            .iter()
            .map(|s| self.partial_suffix(s))
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - keep;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }

    fn partial_suffix(&self, stop: &str) -> usize {
        partial_suffix(&self.pending, stop)
    }

    /// The stop string that was reached, if one was.
    pub fn matched(&self) -> Option<&str> {
        self.matched
            .and_then(|i| self.stops.get(i))
            .map(String::as_str)
    }

    /// The held-back text, at the end of generation.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// The raw bytes of one token. Byte-level BPE vocabularies (GPT-2's scheme, which every GGUF
/// "gpt2" tokenizer uses) spell bytes as printable characters; other tokens are their text.
pub fn token_bytes(tokenizer: &Tokenizer, id: u32) -> Vec<u8> {
    let Some(piece) = tokenizer.id_to_token(id) else {
        return Vec::new();
    };
    if tokenizer.get_added_vocabulary().is_special_token(&piece) {
        return piece.into_bytes();
    }
    if is_sentencepiece(tokenizer) {
        return sentencepiece_bytes(&piece);
    }
    let bytes: Option<Vec<u8>> = piece.chars().map(byte_of_char).collect();
    bytes.unwrap_or_else(|| tokenizer.decode(&[id], false).unwrap_or(piece).into_bytes())
}

/// SentencePiece vocabularies (BPE with byte fallback) spell spaces `▁` and bytes `<0xAB>`;
/// byte-level BPE ones map every byte to a printable character.
fn is_sentencepiece(tokenizer: &Tokenizer) -> bool {
    matches!(tokenizer.get_model(), tokenizers::ModelWrapper::BPE(b) if b.byte_fallback)
}

fn sentencepiece_bytes(piece: &str) -> Vec<u8> {
    if let Some(hex) = piece
        .strip_prefix("<0x")
        .and_then(|p| p.strip_suffix('>'))
        .filter(|h| h.len() == 2)
    {
        if let Ok(b) = u8::from_str_radix(hex, 16) {
            return vec![b];
        }
    }
    piece.replace('\u{2581}', " ").into_bytes()
}

/// The inverse of GPT-2's `bytes_to_unicode`: printable bytes stand for themselves, the
/// others were shifted to U+0100 and up, in order.
fn byte_of_char(c: char) -> Option<u8> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let cp = c as u32;
    if cp < 256 {
        return printable(cp).then_some(cp as u8);
    }
    let n = cp.checked_sub(256)?;
    (0u32..256)
        .filter(|&b| !printable(b))
        .nth(n as usize)
        .map(|b| b as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut b = StopBuffer::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let (emit, stopped) = b.push(p);
            out.push_str(&emit);
            if stopped {
                return (out, true);
            }
        }
        out.push_str(&b.finish());
        (out, false)
    }

    #[test]
    fn stop_string_across_pieces_is_cut_and_not_emitted() {
        assert_eq!(
            run(&["STOP"], &["abc S", "TO", "P tail"]),
            ("abc ".into(), true)
        );
        assert_eq!(run(&["\n\n"], &["one\n", "\ntwo"]), ("one".into(), true));
    }

    #[test]
    fn partial_match_that_fails_is_released() {
        assert_eq!(run(&["STOP"], &["ST", "ay"]), ("STay".into(), false));
        assert_eq!(run(&["STOP"], &["abc ST"]), ("abc ST".into(), false));
    }

    #[test]
    fn earliest_of_several_stops_wins_and_multibyte_is_safe() {
        assert_eq!(run(&["é!", "b"], &["aé", "!b"]), ("a".into(), true));
        assert_eq!(run(&["日本"], &["x日", "y"]), ("x日y".into(), false));
    }

    #[test]
    fn held_back_text_is_bounded_by_stop_length() {
        let mut b = StopBuffer::new(vec!["xyz".into()]);
        let (emit, _) = b.push("aaaaaxy");
        assert_eq!(emit, "aaaaa");
    }
}
