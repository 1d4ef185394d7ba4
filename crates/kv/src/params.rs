//! `kv_transfer_params`, the per-request field of vLLM's disaggregation contract, parsed
//! once where a request arrives. The two flags are read here; a producer's grant is read by
//! [`crate::RemoteAddr::verify`]; every other field (a proxy's own, say) passes through
//! untouched.

use serde_json::{Map, Value};

/// Largest `kv_transfer_params` accepted, serialized, in bytes.
pub const MAX_PARAMS_BYTES: usize = 16 << 10;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamsError {
    #[error("kv_transfer_params must be an object")]
    NotAnObject,
    #[error("kv_transfer_params.{0} must be true or false")]
    Flag(&'static str),
    #[error("kv_transfer_params are {0} bytes; at most {MAX_PARAMS_BYTES} are accepted")]
    TooLarge(usize),
    #[error("do_remote_decode and do_remote_prefill are exclusive")]
    Both,
}

/// What a request asks of the KV connector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// Nothing: serve it here.
    Local,
    /// `do_remote_decode`: prefill, hold the KV for a decode instance.
    Produce,
    /// `do_remote_prefill`: the prompt's KV waits elsewhere.
    Consume,
}

/// A request's `kv_transfer_params`.
#[derive(Debug, Clone, PartialEq)]
pub struct KvTransferParams {
    pub ask: Ask,
    fields: Map<String, Value>,
}

impl KvTransferParams {
    /// Reads the field as a request carries it (`None`: absent or null).
    pub fn parse(v: Option<&Value>) -> Result<Option<Self>, ParamsError> {
        let fields = match v {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Object(o)) => o,
            Some(_) => return Err(ParamsError::NotAnObject),
        };
        let n = serde_json::to_vec(fields).map(|b| b.len()).unwrap_or(0);
        if n > MAX_PARAMS_BYTES {
            return Err(ParamsError::TooLarge(n));
        }
        let flag = |name: &'static str| match fields.get(name) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(ParamsError::Flag(name)),
        };
        let ask = match (flag("do_remote_decode")?, flag("do_remote_prefill")?) {
            (true, true) => return Err(ParamsError::Both),
            (true, false) => Ask::Produce,
            (false, true) => Ask::Consume,
            (false, false) => Ask::Local,
        };
        Ok(Some(Self {
            ask,
            fields: fields.clone(),
        }))
    }

    /// The params as JSON, every field as it came.
    pub fn to_value(&self) -> Value {
        Value::Object(self.fields.clone())
    }

    pub fn get(&self, name: &str) -> Option<&Value> {
        self.fields.get(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn flags_are_read_and_other_fields_pass_through() {
        assert_eq!(KvTransferParams::parse(None), Ok(None));
        assert_eq!(KvTransferParams::parse(Some(&Value::Null)), Ok(None));
        let v = json!({"do_remote_prefill": true, "remote_host": "h", "x_proxy_hop": 3});
        let p = KvTransferParams::parse(Some(&v)).unwrap().unwrap();
        assert_eq!(p.ask, Ask::Consume);
        assert_eq!(p.to_value(), v, "untouched");
        let p = KvTransferParams::parse(Some(&json!({"do_remote_decode": true})))
            .unwrap()
            .unwrap();
        assert_eq!(p.ask, Ask::Produce);
        let p = KvTransferParams::parse(Some(&json!({"remote_engine_id": "e"})))
            .unwrap()
            .unwrap();
        assert_eq!(p.ask, Ask::Local);
        for (v, e) in [
            (json!([1]), ParamsError::NotAnObject),
            (
                json!({"do_remote_decode": "yes"}),
                ParamsError::Flag("do_remote_decode"),
            ),
            (
                json!({"do_remote_decode": true, "do_remote_prefill": true}),
                ParamsError::Both,
            ),
        ] {
            assert_eq!(KvTransferParams::parse(Some(&v)), Err(e));
        }
        let big = json!({"pad": "x".repeat(MAX_PARAMS_BYTES)});
        assert!(matches!(
            KvTransferParams::parse(Some(&big)),
            Err(ParamsError::TooLarge(_))
        ));
    }
}
