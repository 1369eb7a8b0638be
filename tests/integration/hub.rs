//! Hub access against a real HTTP server on 127.0.0.1 that serves a tiny model under the Hub's
//! `/{repo}/resolve/{revision}/{file}` scheme.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use paft::model::tiny::TinySpec;

use crate::common::{self, expect_clean_failure};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const REPO: &str = "paft-test/tiny-llama";

pub struct HubServer {
    pub url: String,
    pub requests: Arc<Mutex<Vec<String>>>,
}

/// Serves the files of `dir` for repo `REPO` at any revision.
fn serve(dir: PathBuf) -> HubServer {
    serve_routes(vec![(format!("/{REPO}/resolve/"), dir)])
}

/// Serves, for each `(prefix, dir)`, `{prefix}{revision}/{file}` from `dir/{file}` (file may
/// contain slashes), as the Hub's resolve endpoint does; anything else is a 404.
pub fn serve_routes(routes: Vec<(String, PathBuf)>) -> HubServer {
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let url = format!("http://{}", server.server_addr().to_ip().unwrap());
    let requests = Arc::new(Mutex::new(vec![]));
    let log = requests.clone();
    std::thread::spawn(move || {
        for req in server.incoming_requests() {
            let path = req.url().to_string();
            log.lock().unwrap().push(format!("{} {path}", req.method()));
            let local = routes
                .iter()
                .find_map(|(prefix, dir)| {
                    path.strip_prefix(prefix.as_str())
                        .and_then(|rest| rest.split_once('/'))
                        .map(|(_, f)| dir.join(f))
                })
                .filter(|p| p.is_file());
            let response = match local {
                Some(p) => {
                    let bytes = std::fs::read(&p).unwrap();
                    let etag = format!(
                        "\"{:x}-{}\"",
                        bytes.len(),
                        p.file_name().unwrap().to_str().unwrap().len()
                    );
                    let body = if req.method() == &tiny_http::Method::Head {
                        vec![]
                    } else {
                        bytes.clone()
                    };
                    tiny_http::Response::from_data(body)
                        .with_header(tiny_http::Header::from_bytes("ETag", etag).unwrap())
                        .with_header(
                            tiny_http::Header::from_bytes("X-Repo-Commit", COMMIT).unwrap(),
                        )
                        .with_header(
                            tiny_http::Header::from_bytes("X-Linked-Size", bytes.len().to_string())
                                .unwrap(),
                        )
                }
                None => tiny_http::Response::from_data(b"Entry not found".to_vec())
                    .with_status_code(404)
                    .with_header(
                        tiny_http::Header::from_bytes("X-Error-Code", "EntryNotFound").unwrap(),
                    ),
            };
            let _ = req.respond(response);
        }
    });
    HubServer { url, requests }
}

pub fn paft_with_hub(endpoint: &str, hf_home: &Path) -> std::process::Command {
    let mut cmd = common::paft();
    cmd.env("HF_ENDPOINT", endpoint)
        .env("HF_HOME", hf_home)
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE")
        .arg("--quiet");
    cmd
}

fn closed_port_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    url
}

#[test]
fn fetch_into_cache_then_use_offline() {
    let Some(model) = common::tiny_model(&TinySpec::llama(9)) else {
        return;
    };
    // Serve it sharded, to exercise the index path.
    let files = paft::model::SafetensorsFiles::open_dir(model.path()).unwrap();
    let w = files.load_all(None, &candle_core::Device::Cpu).unwrap();
    drop(files);
    std::fs::remove_file(model.path().join("model.safetensors")).unwrap();
    paft::model::weights::write_weights(model.path(), &w, None, 200_000).unwrap();

    let hub = serve(model.path().to_path_buf());
    let hf_home = tempfile::tempdir().unwrap();
    let out = paft_with_hub(&hub.url, hf_home.path())
        .args(["fetch", "model", REPO])
        .output()
        .unwrap();
    crate::common::expect_success(&out);
    let snapshot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let want = hf_home
        .path()
        .join("hub")
        .join("models--paft-test--tiny-llama")
        .join("snapshots")
        .join(COMMIT);
    assert_eq!(snapshot, want);
    for entry in std::fs::read_dir(model.path()).unwrap() {
        let p = entry.unwrap().path();
        let cached = snapshot.join(p.file_name().unwrap());
        assert_eq!(
            std::fs::read(&p).unwrap(),
            std::fs::read(&cached).unwrap(),
            "{}",
            cached.display()
        );
    }
    let reqs = hub.requests.lock().unwrap().clone();
    assert!(
        reqs.iter()
            .any(|r| r == &format!("GET /{REPO}/resolve/main/model.safetensors.index.json")),
        "{reqs:?}"
    );

    // The hub id now works with the network off, and scores like the local directory.
    let score = |cmd: &mut std::process::Command, model: &str| {
        let out = cmd
            .args([
                "score",
                "--model",
                model,
                "--text",
                "offline works",
                "--json",
            ])
            .output()
            .unwrap();
        crate::common::expect_success(&out);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["sum_logprob"].as_f64().unwrap()
    };
    let mut offline = paft_with_hub(&closed_port_url(), hf_home.path());
    offline.env("HF_HUB_OFFLINE", "1");
    let from_cache = score(&mut offline, REPO);
    let from_dir = score(
        &mut paft_with_hub(&closed_port_url(), hf_home.path()),
        model.path().to_str().unwrap(),
    );
    assert_eq!(from_cache, from_dir);

    // A revision goes into the resolve URL.
    let out = paft_with_hub(&hub.url, hf_home.path())
        .args(["fetch", "model", REPO, "--revision", "v1.0"])
        .output()
        .unwrap();
    crate::common::expect_success(&out);
    assert!(hub
        .requests
        .lock()
        .unwrap()
        .iter()
        .any(|r| r.contains("/resolve/v1.0/config.json")));
}

#[test]
fn unreachable_hub_says_how_to_pass_a_local_path() {
    let hf_home = tempfile::tempdir().unwrap();
    let out = paft_with_hub(&closed_port_url(), hf_home.path())
        .args(["score", "--model", REPO, "--text", "x"])
        .output()
        .unwrap();
    let err = expect_clean_failure(&out);
    assert!(
        err.contains(REPO) && err.contains("pass its directory"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one message: {err}");
}

#[test]
fn offline_without_cache_is_a_clear_error() {
    let hf_home = tempfile::tempdir().unwrap();
    let mut cmd = paft_with_hub(&closed_port_url(), hf_home.path());
    cmd.env("HF_HUB_OFFLINE", "1");
    let err = expect_clean_failure(&cmd.args(["fetch", "model", REPO]).output().unwrap());
    assert!(
        err.contains("HF_HUB_OFFLINE") && err.contains("pass its directory"),
        "{err}"
    );
}
