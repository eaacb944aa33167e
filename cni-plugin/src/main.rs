//! The `ztunnel-cni` binary: [`ztunnel_cni::run`] on this process's environment and stdin.

use std::io::Read;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut stdin = Vec::new();
    // What the runtime sends is small; more than this is not a network configuration.
    let read = std::io::stdin()
        .take(redirect::cni::MAX_MESSAGE as u64 + 1)
        .read_to_end(&mut stdin);
    let env = |name: &str| std::env::var(name).ok();
    let outcome = match read {
        Err(e) => Err(ztunnel_cni::CniError {
            code: ztunnel_cni::DECODING_FAILURE,
            msg: "cannot read the network configuration from stdin".into(),
            details: e.to_string(),
        }),
        Ok(_) => ztunnel_cni::run(&env, &stdin, &ztunnel_cni::SocketAgent),
    };
    match outcome {
        Ok(out) => {
            if !out.is_empty() {
                println!("{out}");
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            // The error in the caller's version, when its configuration says which.
            let version = serde_json::from_slice::<serde_json::Value>(&stdin)
                .ok()
                .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_owned))
                .unwrap_or_else(|| "1.0.0".to_owned());
            println!("{}", error.to_json(&version));
            eprintln!("ztunnel-cni: {}: {}", error.msg, error.details);
            ExitCode::FAILURE
        }
    }
}
