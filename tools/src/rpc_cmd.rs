//! `spool rpc METHOD [PARAMS-JSON | --key value ...]`: one JSON-RPC call to a running daemon;
//! prints the result as JSON on stdout, or the server's error (`code: message`) on stderr
//! with exit status 1.

use std::path::Path;
use std::time::Duration;

use serde_json::{Map, Value};
use spool_engine::rpc::client::call_until_stopped;

use crate::cli::RpcArgs;
use crate::error::ToolError;

/// The parameters `args` give: one JSON object or array, or `--key value` pairs (a value
/// that parses as JSON is taken as such: numbers, true, false, null, objects; anything else
/// is a string), or none.
pub fn params(args: &[String]) -> Result<Option<Value>, ToolError> {
    match args {
        [] => Ok(None),
        [one] if !one.starts_with("--") => {
            let value: Value = serde_json::from_str(one)
                .map_err(|err| ToolError::Usage(format!("PARAMS {one:?} is not JSON: {err}")))?;
            if !value.is_object() && !value.is_array() {
                return Err(ToolError::Usage(
                    "PARAMS must be a JSON object or array".into(),
                ));
            }
            Ok(Some(value))
        }
        pairs => {
            let mut object = Map::new();
            let mut rest = pairs.iter();
            while let Some(key) = rest.next() {
                let Some(name) = key.strip_prefix("--").filter(|name| !name.is_empty()) else {
                    return Err(ToolError::Usage(format!(
                        "expected --key value, got {key:?}"
                    )));
                };
                let Some(text) = rest.next() else {
                    return Err(ToolError::Usage(format!("--{name} has no value")));
                };
                let value =
                    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.clone()));
                object.insert(name.replace('-', "_"), value);
            }
            Ok(Some(Value::Object(object)))
        }
    }
}

/// Runs `spool rpc`.
pub fn rpc(args: &RpcArgs) -> Result<(), ToolError> {
    let params = params(&args.params)?;
    if !(args.timeout > 0.0 && args.timeout <= 86_400.0) {
        return Err(ToolError::Usage(format!(
            "--timeout {}: above 0 and at most 86400 seconds",
            args.timeout
        )));
    }
    let answer = call_until_stopped(
        Path::new(&args.socket),
        &args.method,
        params,
        Duration::from_secs_f64(args.timeout),
    )?;
    match answer {
        Ok(result) => {
            let text = serde_json::to_string_pretty(&result)
                .map_err(|err| ToolError::Failed(err.to_string()))?;
            println!("{text}");
            Ok(())
        }
        Err(error) => Err(ToolError::Failed(format!(
            "{} failed: code {}: {}",
            args.method, error.code, error.message
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_from_json_or_pairs() {
        assert_eq!(params(&[]).unwrap(), None);
        let given = params(&["{\"name\": \"lv0\"}".into()]).unwrap().unwrap();
        assert_eq!(given["name"], "lv0");
        let pairs = params(&[
            "--lvs-name".into(),
            "lvs0".into(),
            "--size-in-mib".into(),
            "16".into(),
            "--thin-provision".into(),
            "true".into(),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(pairs["lvs_name"], "lvs0");
        assert_eq!(pairs["size_in_mib"], 16);
        assert_eq!(pairs["thin_provision"], true);
        assert!(params(&["--lonely".into()]).is_err());
        assert!(params(&["42".into()]).is_err());
        assert!(params(&["{bad".into()]).is_err());
    }
}
