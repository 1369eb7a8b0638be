//! `paft merge` end to end on tiny models: determinism, native LoRA inputs, clear errors.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use paft::merge::{run_merge, MergeConfig, MergeOptions};
use paft::model::tiny::TinySpec;
use paft::model::{LoraAdapter, LoraConfig, LoraPair, Pretrained, TargetModule};
use rand::{Rng, SeedableRng};

use crate::common::{self, expect_clean_failure, run_paft};

/// base, a dense fine-tune, a sparse fine-tune, and a LoRA adapter of the base.
struct Fixture {
    _tmp: tempfile::TempDir,
    base: String,
    a: String,
    b: String,
    lora: String,
    lora_full: String,
}

fn perturbed(base: &Pretrained, out: &Path, seed: u64, keep: f64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut p = Pretrained {
        dir: base.dir.clone(),
        config: base.config.clone(),
        tokenizer: base.tokenizer.clone(),
        weights: base.weights.clone(),
    };
    for t in p.weights.values_mut() {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let v: Vec<f32> = v
            .iter()
            .map(|x| {
                if rng.random::<f64>() < keep {
                    x + rng.random_range(-0.02..0.02)
                } else {
                    *x
                }
            })
            .collect();
        *t = Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap();
    }
    p.save(out, None, usize::MAX).unwrap();
}

fn fixture() -> Option<Fixture> {
    let tok = common::tokenizer_dir()?;
    let tmp = tempfile::tempdir().unwrap();
    let p = |n: &str| tmp.path().join(n).to_str().unwrap().to_string();
    TinySpec::llama(31)
        .write(Path::new(&p("base")), tok)
        .unwrap();
    let base = Pretrained::load(Path::new(&p("base")), None, &Device::Cpu).unwrap();
    perturbed(&base, Path::new(&p("a")), 1, 1.0);
    perturbed(&base, Path::new(&p("b")), 2, 0.3);
    // A LoRA adapter with nonzero A and B, and the same adapter merged into a full copy.
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let cfg = &base.config;
    let mut layers = BTreeMap::new();
    for l in 0..cfg.num_hidden_layers {
        for m in [TargetModule::QProj, TargetModule::DownProj] {
            let w = &base.weights[&format!("{}.weight", m.module_path(l))];
            let (out, inp) = w.dims2().unwrap();
            let mut r = |n: usize, k: usize| {
                Tensor::from_vec(
                    (0..n * k)
                        .map(|_| rng.random_range(-0.1f32..0.1))
                        .collect::<Vec<_>>(),
                    (n, k),
                    &Device::Cpu,
                )
                .unwrap()
            };
            layers.insert(
                m.module_path(l),
                LoraPair {
                    a: r(4, inp),
                    b: r(out, 4),
                },
            );
        }
    }
    let adapter = LoraAdapter {
        config: LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: vec![TargetModule::QProj, TargetModule::DownProj],
            use_rslora: false,
        },
        layers,
    };
    std::fs::create_dir_all(p("lora")).unwrap();
    adapter.save(Path::new(&p("lora")), None).unwrap();
    let mut full = Pretrained {
        dir: base.dir.clone(),
        config: base.config.clone(),
        tokenizer: base.tokenizer.clone(),
        weights: base.weights.clone(),
    };
    for module in adapter.layers.keys() {
        let key = format!("{module}.weight");
        full.weights.insert(
            key.clone(),
            (&full.weights[&key] + adapter.delta(module).unwrap().unwrap()).unwrap(),
        );
    }
    full.save(Path::new(&p("lora_full")), None, usize::MAX)
        .unwrap();
    Some(Fixture {
        base: p("base"),
        a: p("a"),
        b: p("b"),
        lora: p("lora"),
        lora_full: p("lora_full"),
        _tmp: tmp,
    })
}

fn yaml(method: &str, base: &str, models: &[(&str, &str)], globals: &str) -> String {
    let mut s = format!("merge_method: {method}\nbase_model: {base}\nmodels:\n");
    for (m, params) in models {
        s += &format!("  - model: {m}\n    parameters: {params}\n");
    }
    s + &format!("parameters: {globals}\ndtype: float32\n")
}

fn merged(cfg: &str, out: &Path, seed: u64) -> Pretrained {
    let c = MergeConfig::from_yaml(cfg).unwrap();
    run_merge(
        &c,
        out,
        &MergeOptions {
            seed,
            ..Default::default()
        },
    )
    .unwrap();
    Pretrained::load(out, Some(DType::F32), &Device::Cpu).unwrap()
}

fn max_diff(x: &Pretrained, y: &Pretrained) -> f32 {
    x.weights
        .iter()
        .map(|(n, t)| {
            (t - &y.weights[n])
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .fold(0.0, f32::max)
}

#[test]
fn dare_is_deterministic_across_threads_and_seeded() {
    let Some(f) = fixture() else { return };
    let cfg = yaml(
        "dare_ties",
        &f.base,
        &[
            (&f.a, "{weight: 1.0, density: 0.5}"),
            (&f.b, "{weight: 0.7, density: 0.5}"),
        ],
        "{}",
    );
    let tmp = tempfile::tempdir().unwrap();
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
        .install(|| merged(&cfg, &tmp.path().join("t1"), 7));
    let two = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap()
        .install(|| merged(&cfg, &tmp.path().join("t2"), 7));
    let bytes = |d: &str| std::fs::read(tmp.path().join(d).join("model.safetensors")).unwrap();
    assert_eq!(bytes("t1"), bytes("t2"), "thread count changed the output");
    let other = merged(&cfg, &tmp.path().join("s8"), 8);
    assert!(
        max_diff(&one, &other) > 0.0,
        "a different seed gave the same output"
    );
    assert!(
        max_diff(
            &one,
            &Pretrained::load(Path::new(&f.base), None, &Device::Cpu).unwrap()
        ) > 0.0
    );
    assert!(tmp.path().join("t1").join("mergekit_config.yml").is_file());
}

#[test]
fn base_plus_adapter_equals_the_merged_full_model() {
    let Some(f) = fixture() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let via_adapter = format!("{}+{}", f.base, f.lora);
    let x = merged(
        &yaml(
            "ties",
            &f.base,
            &[
                (&f.a, "{weight: 1.0, density: 0.7}"),
                (&via_adapter, "{weight: 0.5, density: 0.7}"),
            ],
            "{normalize: true}",
        ),
        &tmp.path().join("x"),
        0,
    );
    let y = merged(
        &yaml(
            "ties",
            &f.base,
            &[
                (&f.a, "{weight: 1.0, density: 0.7}"),
                (&f.lora_full, "{weight: 0.5, density: 0.7}"),
            ],
            "{normalize: true}",
        ),
        &tmp.path().join("y"),
        0,
    );
    let d = max_diff(&x, &y);
    assert!(d < 1e-6, "max diff {d}");
}

#[test]
fn bad_merges_fail_before_writing_anything() {
    let Some(f) = fixture() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let run = |cfg: String| {
        let path = tmp.path().join("c.yaml");
        std::fs::write(&path, cfg).unwrap();
        let err = expect_clean_failure(&run_paft(&[
            "--quiet",
            "merge",
            path.to_str().unwrap(),
            out.to_str().unwrap(),
        ]));
        assert!(!out.exists(), "output left behind");
        err
    };
    // Unknown method: rejected from the YAML alone (the model paths do not even exist).
    let e = run(yaml(
        "dare-ties",
        "/nonexistent/base",
        &[("/nonexistent/a", "{weight: 1}")],
        "{}",
    ));
    assert!(e.contains("dare-ties") && e.contains("dare_ties"), "{e}");
    let e = run(yaml(
        "ties",
        &f.base,
        &[(&f.a, "{weight: 1, denstiy: 0.5}")],
        "{}",
    ));
    assert!(e.contains("denstiy"), "{e}");
    // A model with a different shape.
    let q = tmp.path().join("narrow");
    TinySpec {
        hidden_size: 32,
        ..TinySpec::llama(5)
    }
    .write(&q, common::tokenizer_dir().unwrap())
    .unwrap();
    let e = run(yaml(
        "ties",
        &f.base,
        &[(q.to_str().unwrap(), "{weight: 1, density: 0.5}")],
        "{}",
    ));
    assert!(
        e.contains(q.to_str().unwrap()) && e.contains("shape"),
        "{e}"
    );
    // Unreadable adapter.
    let broken = tmp.path().join("broken_lora");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("adapter_config.json"), "{not json").unwrap();
    let e = run(yaml(
        "ties",
        &f.base,
        &[(
            &format!("{}+{}", f.base, broken.display()),
            "{weight: 1, density: 0.5}",
        )],
        "{}",
    ));
    assert!(e.contains("adapter_config.json"), "{e}");
}

/// Every fixture case mergekit 0.1.5 produced for a method paft implements, within 1e-6.
#[test]
fn matches_mergekit_outputs() {
    let root = common::fixture("merge");
    let mut checked = vec![];
    for entry in std::fs::read_dir(&root).unwrap() {
        let dir = entry.unwrap().path();
        let cfg_path = dir.join("config.yaml");
        if !cfg_path.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&cfg_path).unwrap();
        let method = text
            .lines()
            .find_map(|l| l.strip_prefix("merge_method:"))
            .unwrap()
            .trim()
            .to_string();
        if paft::merge::MergeMethod::parse(&method).is_err() {
            continue; // sce, nuslerp, … are not in paft's registry yet
        }
        let cfg = MergeConfig::from_yaml(&text)
            .unwrap_or_else(|e| panic!("{}: {e:#}", cfg_path.display()));
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        run_merge(&cfg, &out, &MergeOptions::default())
            .unwrap_or_else(|e| panic!("{}: {e:#}", dir.display()));
        let ours = paft::model::SafetensorsFiles::open_dir(&out).unwrap();
        let theirs =
            paft::model::SafetensorsFiles::open_files(&[dir.join("model.safetensors")]).unwrap();
        assert_eq!(ours.names(), theirs.names(), "{}", dir.display());
        let mut worst = 0f32;
        for name in theirs.names() {
            let a = ours.load(&name, Some(DType::F32), &Device::Cpu).unwrap();
            let b = theirs.load(&name, Some(DType::F32), &Device::Cpu).unwrap();
            worst = worst.max(
                (a - b)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap(),
            );
        }
        let case = dir.file_name().unwrap().to_str().unwrap().to_string();
        eprintln!("{case:<30} max |paft - mergekit| = {worst:.2e}");
        assert!(worst <= 1e-6, "{case}: max abs diff {worst}");
        checked.push(case);
    }
    assert!(
        checked.len() >= 13,
        "only {} cases checked: {checked:?}",
        checked.len()
    );
}
