//! `splitserve econ`: the economics library with the engine behind its two hooks.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use splitserve_econ::{EconArgs, EconHooks, ModelShape};
use splitserve_engine::{Engine, EngineConfig, Event, KvTransfer, Model, Request, SamplingParams};

struct Hooks;

/// The KV shape of the GGUF at `path`, as `econ --model` reads it.
pub(crate) fn shape_of(path: &Path) -> anyhow::Result<ModelShape> {
    Hooks.shape_from_gguf(path).map_err(anyhow::Error::msg)
}

impl EconHooks for Hooks {
    fn shape_from_gguf(&self, path: &Path) -> Result<ModelShape, String> {
        // A preset's name (gemma3-270m) stands for its file, as in `serve --model`.
        let path = &crate::model_path(&Some(path.to_path_buf())).map_err(|e| e.to_string())?;
        let (c, params) = splitserve_engine::inspect(path).map_err(|e| e.to_string())?;
        Ok(ModelShape {
            name: path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            layers: c.n_layer as u64,
            kv_heads: c.n_head_kv as u64,
            head_dim: c.head_dim as u64,
            heads: c.n_head as u64,
            params,
            window: c.sliding_window.map(|w| splitserve_econ::Window {
                positions: w.window as u64,
                layers: (0..c.n_layer)
                    .filter(|&l| c.layer_window(l).is_some())
                    .count() as u64,
            }),
        })
    }

    /// Best of three 512-token prefills on the local engine.
    fn calibrate_prefill_tok_s(&self, model: Option<&Path>) -> Result<f64, String> {
        let path = crate::model_path(&model.map(Path::to_path_buf)).map_err(|e| e.to_string())?;
        let model = Arc::new(Model::load(&path).map_err(|e| e.to_string())?);
        let text = "The quick brown fox jumps over the lazy dog. ".repeat(120);
        let mut ids = model.tokenizer.encode(&text)?;
        ids.truncate(512);
        // The same prompt three times: timed as computed, not as found in the prefix cache.
        let cfg = EngineConfig {
            enable_prefix_caching: false,
            ..EngineConfig::default()
        };
        let engine = Engine::start(model, cfg, None).map_err(|e| e.to_string())?;
        let mut best = f64::MAX;
        for i in 0..3 {
            let t0 = Instant::now();
            let mut rx = engine
                .submit(Request {
                    id: format!("calibrate-{i}"),
                    prompt: ids.clone(),
                    params: SamplingParams::greedy(1),
                    return_logits: false,
                    kv: KvTransfer::None,
                    cache_salt: None,

                    resumed: 0,
                })
                .map_err(|e| e.to_string())?;
            while let Some(ev) = rx.blocking_recv() {
                if matches!(ev, Event::Finished(_)) {
                    break;
                }
            }
            best = best.min(t0.elapsed().as_secs_f64());
        }
        Ok(ids.len() as f64 / best)
    }
}

pub fn run(a: EconArgs) -> Result<()> {
    print!("{}", splitserve_econ::run(&a, &Hooks)?);
    if a.json {
        println!();
    }
    Ok(())
}
