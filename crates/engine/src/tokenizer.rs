//! The tokenizer and chat template, built from the GGUF's own `tokenizer.*` metadata.
//!
//! Two kinds: byte-level BPE (`tokenizer.ggml.model = "gpt2"`: SmolLM2, Llama 3…), which we
//! assemble with the `tokenizers` crate (candle's `TokenizerFromGguf` does not know the
//! `smollm` pre-tokenizer and adds a prefix space), and SentencePiece-style pieces with
//! scores (`"llama"`: Gemma), in [`crate::spm`].

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use serde::{Deserialize, Serialize};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab as BpeVocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::AddedToken;

use crate::error::GgufError;
use crate::gguf::GgufFile;
use crate::spm::{
    by_first_byte, Spm, TYPE_CONTROL as TOKEN_TYPE_CONTROL,
    TYPE_USER_DEFINED as TOKEN_TYPE_USER_DEFINED,
};

/// Breaks special-token text inside chat messages (a private-use character; see
/// [`Tokenizer::encode_chat`]).
const ESC: char = '\u{E000}';

/// One chat message as the OpenAI API sends it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// The vocabulary and how text becomes its ids.
enum Vocab {
    Bpe {
        inner: Box<tokenizers::Tokenizer>,
        /// The same tokenizer with special-token text left as text (for message content).
        plain: Box<tokenizers::Tokenizer>,
    },
    Spm(Box<Spm>),
}

/// A tokenizer plus the model's chat template and special ids.
pub struct Tokenizer {
    vocab: Vocab,
    /// Special (control) tokens' texts and ids by first byte, longest first (to split
    /// rendered chat text).
    specials: std::collections::HashMap<u8, Vec<(String, u32)>>,
    /// Ids that end a generation: EOS, and an end-of-turn token where the vocabulary has
    /// one (Gemma's `<end_of_turn>`).
    end_ids: Vec<u32>,
    add_bos: bool,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    bos_text: String,
    eos_text: String,
    chat_template: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.vocab_size())
            .field("eos_id", &self.eos_id)
            .finish()
    }
}

fn strings(v: Option<&Value>) -> Option<Vec<String>> {
    v?.to_vec()
        .ok()?
        .iter()
        .map(|x| x.to_string().ok().cloned())
        .collect()
}

impl Tokenizer {
    pub(crate) fn from_gguf(g: &GgufFile) -> Result<Self, GgufError> {
        let err = |reason: String| GgufError::Tokenizer {
            path: g.path.clone(),
            reason,
        };
        let model = g.meta_str("tokenizer.ggml.model").unwrap_or("");
        let tokens = strings(g.metadata.get("tokenizer.ggml.tokens"))
            .ok_or_else(|| err("missing tokenizer.ggml.tokens".into()))?;
        let types: Vec<i32> = g
            .metadata
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.to_vec().ok())
            .map(|v| v.iter().map(|x| x.to_i32().unwrap_or(1)).collect())
            .unwrap_or_default();
        let id = |key: &str| g.metadata.get(key).and_then(|v| v.to_u32().ok());
        let bos_id = id("tokenizer.ggml.bos_token_id");
        let eos_id = id("tokenizer.ggml.eos_token_id");
        let add_bos = g
            .metadata
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        let vocab = match model {
            "gpt2" => Self::bpe(g, &tokens, &types, &err)?,
            "llama" => {
                let scores: Vec<f32> = g
                    .metadata
                    .get("tokenizer.ggml.scores")
                    .and_then(|v| v.to_vec().ok())
                    .map(|v| v.iter().map(|x| x.to_f32().unwrap_or(0.0)).collect())
                    .ok_or_else(|| err("missing tokenizer.ggml.scores".into()))?;
                if scores.len() != tokens.len() || types.len() != tokens.len() {
                    return Err(err(format!(
                        "{} tokens but {} scores and {} types",
                        tokens.len(),
                        scores.len(),
                        types.len()
                    )));
                }
                // llama.cpp's default for these vocabularies is a space before the text
                // (Llama 2); Gemma's files turn it off, and only that form is built here.
                let space_prefix = g
                    .metadata
                    .get("tokenizer.ggml.add_space_prefix")
                    .and_then(|v| v.to_bool().ok())
                    .unwrap_or(true);
                if space_prefix {
                    return Err(err(
                        "tokenizer.ggml.add_space_prefix is true (a Llama 2-style vocabulary); \
                         only SentencePiece vocabularies without the prefix (Gemma) are supported"
                            .into(),
                    ));
                }
                Vocab::Spm(Box::new(Spm::new(tokens.clone(), scores, types.clone())))
            }
            other => {
                return Err(err(format!(
                    "tokenizer.ggml.model is {other:?}; supported: \"gpt2\" (byte-level BPE), \"llama\" (SentencePiece-style)"
                )))
            }
        };
        let specials = by_first_byte(&tokens, &types, TOKEN_TYPE_CONTROL);
        let text_of = |id: Option<u32>| {
            id.and_then(|i| tokens.get(i as usize).cloned())
                .unwrap_or_default()
        };
        let end_of_turn = tokens
            .iter()
            .zip(&types)
            .position(|(t, &ty)| t == "<end_of_turn>" && ty == TOKEN_TYPE_CONTROL)
            .map(|i| i as u32);
        let mut chat_template = g.meta_str("tokenizer.chat_template").map(str::to_string);
        if chat_template.is_none() && end_of_turn.is_some() {
            chat_template = Some(GEMMA.to_string());
        }
        Ok(Self {
            bos_text: text_of(bos_id),
            eos_text: text_of(eos_id),
            vocab,
            specials,
            end_ids: eos_id.into_iter().chain(end_of_turn).collect(),
            add_bos,
            bos_id,
            eos_id,
            chat_template,
        })
    }

    fn bpe(
        g: &GgufFile,
        tokens: &[String],
        types: &[i32],
        err: &dyn Fn(String) -> GgufError,
    ) -> Result<Vocab, GgufError> {
        let pre = g.meta_str("tokenizer.ggml.pre").unwrap_or("default");
        let merges = strings(g.metadata.get("tokenizer.ggml.merges"))
            .ok_or_else(|| err("missing tokenizer.ggml.merges".into()))?;
        let vocab: BpeVocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let merges = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| err(format!("merge {m:?} has no space")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| err(e.to_string()))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let byte_level = ByteLevel::new(false, false, true);
        // llama.cpp's `smollm` (like `starcoder`, `refact`) splits every digit on its own
        // before the GPT-2 regex; the default pre-tokenizer is the GPT-2 regex alone.
        let pre_tok: PreTokenizerWrapper = match pre {
            "smollm" | "starcoder" | "refact" | "codeshell" => Sequence::new(vec![
                Digits::new(true).into(),
                byte_level.into(),
            ])
            .into(),
            "default" | "gpt-2" | "gpt2" => byte_level.into(),
            other => {
                return Err(err(format!(
                    "pre-tokenizer {other:?} is not supported (known: smollm, starcoder, refact, codeshell, gpt-2, default)"
                )))
            }
        };
        inner.with_pre_tokenizer(Some(pre_tok));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(types.iter())
            .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED)
            .map(|(s, &t)| AddedToken::from(s.clone(), t == TOKEN_TYPE_CONTROL))
            .collect();
        inner
            .add_special_tokens(specials)
            .map_err(|e| err(e.to_string()))?;
        let mut plain = inner.clone();
        plain.set_encode_special_tokens(true);
        Ok(Vocab::Bpe {
            inner: Box::new(inner),
            plain: Box::new(plain),
        })
    }

    /// Ids of `text` in which special-token text is plain text.
    fn encode_plain(&self, text: &str, ids: &mut Vec<u32>) -> Result<(), String> {
        match &self.vocab {
            Vocab::Bpe { plain, .. } => {
                let enc = plain.encode(text, false).map_err(|e| e.to_string())?;
                ids.extend_from_slice(enc.get_ids());
            }
            Vocab::Spm(spm) => spm.encode(text, ids),
        }
        Ok(())
    }

    /// The ids that end a generation (EOS, and Gemma's `<end_of_turn>`).
    pub fn end_ids(&self) -> &[u32] {
        &self.end_ids
    }

    /// Token ids of `text`; special tokens written in the text become their single ids.
    /// A BOS is prepended only when the GGUF says `add_bos_token`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        let mut ids = Vec::new();
        if self.add_bos {
            if let Some(b) = self.bos_id {
                if !text.starts_with(&self.bos_text) || self.bos_text.is_empty() {
                    ids.push(b);
                }
            }
        }
        match &self.vocab {
            Vocab::Bpe { inner, .. } => {
                let enc = inner.encode(text, false).map_err(|e| e.to_string())?;
                ids.extend_from_slice(enc.get_ids());
            }
            Vocab::Spm(spm) => {
                // Special-token text becomes its id; the text between is plain.
                let (mut rest, mut at) = (text, 0);
                while at < rest.len() {
                    if let Some((t, id)) = self.special_at(&rest[at..]) {
                        spm.encode(&rest[..at], &mut ids);
                        ids.push(id);
                        rest = &rest[at + t.len()..];
                        at = 0;
                        continue;
                    }
                    at += rest[at..].chars().next().map_or(1, char::len_utf8);
                }
                spm.encode(rest, &mut ids);
            }
        }
        Ok(ids)
    }

    /// The special tokens whose text could start `s`.
    fn specials_at(&self, s: &str) -> &[(String, u32)] {
        s.as_bytes()
            .first()
            .and_then(|b| self.specials.get(b))
            .map_or(&[], Vec::as_slice)
    }

    /// The special token whose text starts `s`, if any (the longest).
    fn special_at(&self, s: &str) -> Option<(&str, u32)> {
        self.specials_at(s)
            .iter()
            .find(|(t, _)| s.starts_with(t.as_str()))
            .map(|(t, id)| (t.as_str(), *id))
    }

    /// `content` with every special token's text broken by [`ESC`] (and `ESC` doubled), so
    /// that no split at special tokens can match inside it.
    fn escape(&self, content: &str) -> String {
        let mut out = String::with_capacity(content.len());
        for (i, c) in content.char_indices() {
            out.push(c);
            let tail = &content[i..];
            // Also a special token's beginning at the end: template text could complete it.
            if c == ESC
                || self.special_at(tail).is_some()
                || self
                    .specials_at(tail)
                    .iter()
                    .any(|(t, _)| t.len() > tail.len() && t.starts_with(tail))
            {
                out.push(ESC);
            }
        }
        out
    }

    /// Token ids of `messages` rendered with the chat template. Unlike encoding the
    /// rendered text, only the template's own special-token text becomes special tokens;
    /// text inside a message is always plain text (no prompt-format injection). For
    /// messages without such text the ids equal `encode(apply_chat_template(..))`.
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>, String> {
        let escaped: Vec<ChatMessage> = messages
            .iter()
            .map(|m| ChatMessage {
                role: self.escape(&m.role),
                content: self.escape(&m.content),
            })
            .collect();
        let text = self.apply_chat_template(&escaped, add_generation_prompt)?;
        let mut ids = Vec::new();
        if self.add_bos {
            if let Some(b) = self.bos_id {
                if !text.starts_with(&self.bos_text) || self.bos_text.is_empty() {
                    ids.push(b);
                }
            }
        }
        let mut plain = String::new();
        let flush = |plain: &mut String, ids: &mut Vec<u32>| -> Result<(), String> {
            if !plain.is_empty() {
                self.encode_plain(plain.as_str(), ids)?;
                plain.clear();
            }
            Ok(())
        };
        let mut rest = text.as_str();
        while let Some(c) = rest.chars().next() {
            if c == ESC {
                // An escape: the next character is text (a doubled ESC is one ESC).
                rest = &rest[c.len_utf8()..];
                if let Some(n) = rest.chars().next() {
                    plain.push(n);
                    rest = &rest[n.len_utf8()..];
                }
                continue;
            }
            if let Some((t, id)) = self.special_at(rest) {
                flush(&mut plain, &mut ids)?;
                ids.push(id);
                rest = &rest[t.len()..];
                continue;
            }
            plain.push(c);
            rest = &rest[c.len_utf8()..];
        }
        flush(&mut plain, &mut ids)?;
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, String> {
        match &self.vocab {
            Vocab::Bpe { inner, .. } => inner.decode(ids, skip_special).map_err(|e| e.to_string()),
            Vocab::Spm(spm) => Ok(spm.decode(ids, skip_special)),
        }
    }

    /// The text of one token as the vocabulary holds it, bytes decoded.
    pub fn token_text(&self, id: u32) -> String {
        self.decode(&[id], false).unwrap_or_default()
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    pub fn vocab_size(&self) -> usize {
        match &self.vocab {
            Vocab::Bpe { inner, .. } => inner.get_vocab_size(true),
            Vocab::Spm(spm) => spm.vocab_size(),
        }
    }

    /// Renders `messages` with the GGUF's chat template (ChatML when it has none).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
        let source = self.chat_template.as_deref().unwrap_or(CHATML);
        let mut env = minijinja::Environment::new();
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", source)
            .map_err(|e| format!("chat template: {e}"))?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| format!("chat template: {e}"))?;
        tmpl.render(minijinja::context! {
            messages => minijinja::Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_text,
            eos_token => &self.eos_text,
        })
        .map_err(|e| format!("chat template: {e}"))
    }
}

/// Gemma's turn format (its GGUFs carry no template): a system message opens the first user
/// turn, the assistant's role is `model`, and the turn to generate is opened at the end.
const GEMMA: &str = "{%- set ns = namespace(system='') -%}\
{%- for message in messages -%}\
{%- if message['role'] == 'system' -%}{%- set ns.system = ns.system + message['content'] + '\n\n' -%}\
{%- else -%}\
{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' + ns.system + (message['content'] | trim) + '<end_of_turn>\n' }}\
{%- set ns.system = '' -%}\
{%- endif -%}\
{%- endfor -%}\
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}";

/// Turns a growing list of token ids into text deltas without splitting a UTF-8 character
/// (a multi-byte character may span tokens; hold it back until it is whole).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IncrementalDecoder {
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    /// Returns the new text after `ids` grew by one or more tokens.
    pub fn step(&mut self, tok: &Tokenizer, ids: &[u32]) -> String {
        let prefix = tok
            .decode(&ids[self.prefix_offset..self.read_offset], true)
            .unwrap_or_default();
        let full = tok
            .decode(&ids[self.prefix_offset..], true)
            .unwrap_or_default();
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.starts_with(&prefix) {
            let delta = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = ids.len();
            delta
        } else {
            String::new()
        }
    }
}

/// Loads only the tokenizer of a GGUF file (reads the whole file once).
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer, GgufError> {
    let g = GgufFile::open(path)?;
    Tokenizer::from_gguf(&g)
}
