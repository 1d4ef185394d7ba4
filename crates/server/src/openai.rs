//! OpenAI request shapes (with vLLM's extensions) and their checks.

use serde::Deserialize;
use splitserve_engine::SamplingParams;

use crate::error::ApiError;

/// Longest `cache_salt` accepted, in bytes.
pub const MAX_CACHE_SALT: usize = 1024;

#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub enum PromptInput {
    Text(String),
    Ids(Vec<u32>),
    Texts(Vec<String>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub enum StopInput {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize, Clone, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Fields shared by completions and chat completions.
#[derive(Debug, Deserialize, Clone, Default)]
pub struct CommonParams {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub seed: Option<u64>,
    pub stop: Option<StopInput>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub n: Option<i64>,
    pub ignore_eos: Option<bool>,
    pub min_tokens: Option<usize>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    /// vLLM extension: return generated token ids with each choice.
    #[serde(default)]
    pub return_token_ids: bool,
    /// Disaggregation contract (vLLM's NIXL proxy names).
    pub kv_transfer_params: Option<serde_json::Value>,
    /// vLLM extension: requests share cached prefix blocks only with requests of the same
    /// salt.
    pub cache_salt: Option<String>,
    /// Ours: the last this many prompt tokens are the output of an interrupted run of this
    /// request (the router continues a stream whose decode instance died); they are not
    /// sent again, count as completion tokens, and a seeded sampler resumes after them.
    pub resume_tokens: Option<usize>,
}

#[derive(Debug, Deserialize, Clone)]
pub struct CompletionRequest {
    pub prompt: PromptInput,
    #[serde(default)]
    pub echo: bool,
    pub logprobs: Option<i64>,
    #[serde(flatten)]
    pub common: CommonParams,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub enum ContentInput {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize, Clone)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Deserialize, Clone)]
pub struct ChatMessageInput {
    pub role: String,
    pub content: Option<ContentInput>,
}

#[derive(Debug, Deserialize, Clone)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessageInput>,
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<i64>,
    pub add_generation_prompt: Option<bool>,
    #[serde(flatten)]
    pub common: CommonParams,
}

impl CommonParams {
    /// Sampling parameters; `max_tokens` defaults to what is left of the context.
    pub fn sampling(
        &self,
        max_tokens: Option<i64>,
        default_max: usize,
        logprobs: Option<i64>,
    ) -> Result<SamplingParams, ApiError> {
        if let Some(n) = self.n {
            if n != 1 {
                return Err(ApiError::bad(
                    format!("n={n} is not supported: only one choice per prompt (n=1)"),
                    Some("n"),
                ));
            }
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if v.is_some_and(|x| x != 0.0) {
                return Err(ApiError::bad(
                    format!("{name} is not supported (must be 0)"),
                    None,
                ));
            }
        }
        let max_tokens = match max_tokens {
            None => default_max.max(1),
            Some(m) if m < 1 => {
                return Err(ApiError::bad(
                    format!("max_tokens must be at least 1, got {m}"),
                    Some("max_tokens"),
                ))
            }
            Some(m) => m as usize,
        };
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k < 0 => {
                return Err(ApiError::bad(
                    format!("top_k must be -1 (disabled) or at least 1, got {k}"),
                    Some("top_k"),
                ))
            }
            Some(k) => k as usize,
        };
        let logprobs = match logprobs {
            None => None,
            Some(n) if !(0..=20).contains(&n) => {
                return Err(ApiError::bad(
                    format!("logprobs must be between 0 and 20, got {n}"),
                    Some("logprobs"),
                ))
            }
            Some(n) => Some(n as usize),
        };
        if let Some(t) = self.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(ApiError::bad(
                    format!("temperature must be between 0 and 2, got {t}"),
                    Some("temperature"),
                ));
            }
        }
        Ok(SamplingParams {
            max_tokens,
            // OpenAI's default temperature is 1.
            temperature: self.temperature.unwrap_or(1.0),
            top_p: self.top_p.unwrap_or(1.0),
            top_k,
            seed: self.seed,
            stop: match &self.stop {
                None => vec![],
                Some(StopInput::One(s)) => vec![s.clone()],
                Some(StopInput::Many(v)) => v.clone(),
            },
            stop_token_ids: self.stop_token_ids.clone().unwrap_or_default(),
            ignore_eos: self.ignore_eos.unwrap_or(false),
            min_tokens: self.min_tokens.unwrap_or(0),
            logprobs,
        })
    }

    /// The request's cache salt, checked: not empty, at most [`MAX_CACHE_SALT`] bytes.
    pub fn cache_salt(&self) -> Result<Option<&str>, ApiError> {
        match self.cache_salt.as_deref() {
            Some("") => Err(ApiError::bad(
                "cache_salt must be a non-empty string",
                Some("cache_salt"),
            )),
            Some(s) if s.len() > MAX_CACHE_SALT => Err(ApiError::bad(
                format!(
                    "cache_salt is {} bytes; at most {MAX_CACHE_SALT} are allowed",
                    s.len()
                ),
                Some("cache_salt"),
            )),
            s => Ok(s),
        }
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}
