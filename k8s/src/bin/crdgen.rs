//! `crdgen`: writes the CRD YAML generated from `k8s::api` into `manifests/crds/` (or the
//! directory given as the only argument). `k8s/tests/crds.rs` fails when the checked-in files
//! differ from what this writes, so run it after changing the types.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests/crds"));
    let docs = match k8s::api::crd_documents() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("crdgen: serialising the CRDs: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("crdgen: creating {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    for (name, yaml) in docs {
        let path = dir.join(name);
        if let Err(e) = std::fs::write(&path, format!("{}{yaml}", k8s::api::GENERATED_HEADER)) {
            eprintln!("crdgen: writing {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        eprintln!("crdgen: wrote {}", path.display());
    }
    ExitCode::SUCCESS
}
