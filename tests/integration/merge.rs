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
        .map(|(n, t)| common::max_abs_diff(t, &y.weights[n]))
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
    let _two = rayon::ThreadPoolBuilder::new()
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
    // TIES of the base and one model.
    let ties_with = |m: &str| yaml("ties", &f.base, &[(m, "{weight: 1, density: 0.5}")], "{}");
    // Unknown method: rejected from the YAML alone (the model paths do not even exist).
    let e = run(yaml(
        "dare-ties",
        "/nonexistent/base",
        &[("/nonexistent/a", "{weight: 1}")],
        "{}",
    ));
    assert!(e.contains("dare-ties") && e.contains("dare_ties"), "{e}");
    // A misspelt parameter is one the method does not read: refused under --strict (without
    // it, a warning; see unread_parameters_warn_by_default_and_fail_under_strict).
    let path = tmp.path().join("typo.yaml");
    std::fs::write(
        &path,
        yaml(
            "ties",
            &f.base,
            &[(&f.a, "{weight: 1, denstiy: 0.5}")],
            "{}",
        ),
    )
    .unwrap();
    let e = expect_clean_failure(&run_paft(&[
        "--quiet",
        "merge",
        "--strict",
        path.to_str().unwrap(),
        out.to_str().unwrap(),
    ]));
    assert!(e.contains("denstiy") && !out.exists(), "{e}");
    // A model with a different shape.
    let q = tmp.path().join("narrow");
    TinySpec {
        hidden_size: 32,
        ..TinySpec::llama(5)
    }
    .write(&q, common::tokenizer_dir().unwrap())
    .unwrap();
    let e = run(ties_with(q.to_str().unwrap()));
    assert!(
        e.contains(q.to_str().unwrap()) && e.contains("shape"),
        "{e}"
    );
    // A model missing a tensor.
    let holey = tmp.path().join("holey");
    let src = Pretrained::load(Path::new(&f.a), None, &Device::Cpu).unwrap();
    let mut w = src.weights.clone();
    w.remove("model.layers.1.mlp.up_proj.weight");
    std::fs::create_dir_all(&holey).unwrap();
    std::fs::copy(
        Path::new(&f.a).join("config.json"),
        holey.join("config.json"),
    )
    .unwrap();
    paft::model::weights::write_weights(&holey, &w, None, usize::MAX).unwrap();
    let e = run(ties_with(holey.to_str().unwrap()));
    assert!(
        e.contains("holey") && e.contains("model.layers.1.mlp.up_proj.weight"),
        "{e}"
    );
    // A model with another vocabulary.
    let small = tmp.path().join("small_vocab");
    let spec = TinySpec::llama(6);
    let cfg = spec.config(1000).unwrap();
    std::fs::create_dir_all(&small).unwrap();
    cfg.write(&small.join("config.json")).unwrap();
    paft::model::weights::write_weights(
        &small,
        &spec.weights(&cfg, DType::F32, &Device::Cpu).unwrap(),
        None,
        usize::MAX,
    )
    .unwrap();
    let e = run(ties_with(small.to_str().unwrap()));
    assert!(
        e.contains("small_vocab") && e.contains("vocab_size 1000"),
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

/// Every fixture case mergekit 0.1.5 produced, within 1e-6 (every fixture's method is implemented).
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
        assert!(
            paft::merge::MergeMethod::parse(&method).is_ok(),
            "{}: fixture of unimplemented method {method}",
            dir.display()
        );
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
        // Frankenmerges change the layer count; config.json must say so, as mergekit's does.
        let layers = |d: &Path| {
            let c: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap())
                    .unwrap();
            c["num_hidden_layers"].as_u64()
        };
        assert_eq!(
            layers(&out),
            layers(&dir),
            "{}: num_hidden_layers",
            dir.display()
        );
        let case = dir.file_name().unwrap().to_str().unwrap().to_string();
        // Cases whose tokenizer mergekit wrote (a chat_template or a tokenizer source): the
        // template a reader of paft's output sees is the one mergekit wrote; a configured
        // template is saved as transformers 5 saves one, with no second one in the config.
        if dir.join("chat_template.jinja").is_file() {
            let read = |d: &Path, f: &str| std::fs::read_to_string(d.join(f)).unwrap();
            let tok = paft::model::ModelTokenizer::load_dir(&out).unwrap();
            assert_eq!(
                tok.chat_template.as_deref(),
                Some(read(&dir, "chat_template.jinja").as_str()),
                "{case}"
            );
            if text.contains("chat_template:") {
                assert_eq!(
                    read(&out, "chat_template.jinja"),
                    read(&dir, "chat_template.jinja")
                );
                let cfg: serde_json::Value =
                    serde_json::from_str(&read(&out, "tokenizer_config.json")).unwrap();
                assert!(cfg.get("chat_template").is_none(), "{case}");
            }
        }
        let mut worst = 0f32;
        let mut flips = (0usize, 0usize);
        for name in theirs.names() {
            let a = ours.load(&name, Some(DType::F32), &Device::Cpu).unwrap();
            let b = theirs.load(&name, Some(DType::F32), &Device::Cpu).unwrap();
            if method == "arcee_fusion" {
                let (a, b) = (flat(&a), flat(&b));
                let n = arcee_fusion_flips(&root, &name, &a, &b);
                flips = (flips.0 + n, flips.1 + a.len());
                continue;
            }
            worst = worst.max(common::max_abs_diff(&a, &b));
        }
        if method == "arcee_fusion" {
            // mergekit's importance is a KL divergence between nearly equal softmaxes in f32,
            // where cancellation leaves ~1e-4 relative error: entries that close to the
            // threshold may fall on either side. Each such entry is a clean flip (the base's
            // or the model's value, nothing in between), and they must stay rare.
            eprintln!(
                "{case:<30} {} of {} entries on the other side of the threshold",
                flips.0, flips.1
            );
            assert!(flips.0 * 1000 <= flips.1, "{case}: {} flips", flips.0);
        }
        if method != "arcee_fusion" {
            eprintln!("{case:<30} max |paft - mergekit| = {worst:.2e}");
        }
        assert!(worst <= 1e-6, "{case}: max abs diff {worst}");
        checked.push(case);
    }
    assert!(
        checked.len() >= 34,
        "only {} cases checked: {checked:?}",
        checked.len()
    );
}

/// mergekit ignores parameters a method does not read; paft merges the same tensors but names
/// each one in a warning at the default verbosity, and `--strict` refuses the config before any
/// weight is read. Unknown methods and malformed YAML are errors either way.
#[test]
fn unread_parameters_warn_by_default_and_fail_under_strict() {
    let case = common::fixture("merge").join("task_arithmetic_unread_params");
    let cfg = case.join("config.yaml");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let r = run_paft(&["merge", cfg.to_str().unwrap(), out.to_str().unwrap()]);
    crate::common::expect_success(&r);
    let stderr = String::from_utf8_lossy(&r.stderr);
    for (param, place) in [
        ("density", "model tests/fixtures/merge/models/ft_a"),
        ("density", "model tests/fixtures/merge/models/ft_b"),
        ("gamma", "global parameters"),
    ] {
        assert!(
            stderr
                .lines()
                .any(|l| l.contains("WARN") && l.contains(&format!("`{param}` ({place})"))),
            "no warning for {param} at {place}: {stderr}"
        );
    }
    // The same tensors as mergekit, which ignores them silently.
    let ours = paft::model::SafetensorsFiles::open_dir(&out).unwrap();
    let theirs =
        paft::model::SafetensorsFiles::open_files(&[case.join("model.safetensors")]).unwrap();
    for name in theirs.names() {
        let a = ours.load(&name, Some(DType::F32), &Device::Cpu).unwrap();
        let b = theirs.load(&name, Some(DType::F32), &Device::Cpu).unwrap();
        assert!(common::max_abs_diff(&a, &b) <= 1e-6, "{name}");
    }

    let strict_out = tmp.path().join("strict");
    let e = expect_clean_failure(&run_paft(&[
        "merge",
        "--strict",
        cfg.to_str().unwrap(),
        strict_out.to_str().unwrap(),
    ]));
    assert!(
        e.contains("config.yaml") && e.contains("`density`") && e.contains("`gamma`"),
        "{e}"
    );
    assert!(!strict_out.exists());

    // Config errors come before any model is opened: these model paths do not exist.
    for (yaml, expect) in [
        (
            "merge_method: task_arithmetc\nbase_model: /nonexistent/b\nmodels: [/nonexistent/a]\n",
            "task_arithmetc",
        ),
        (
            "merge_method: task_arithmetic\nbase_model: /nonexistent/b\nmodels: [/nonexistent/a\n",
            "not valid YAML",
        ),
    ] {
        let path = tmp.path().join("bad.yaml");
        std::fs::write(&path, yaml).unwrap();
        let e = expect_clean_failure(&run_paft(&[
            "merge",
            path.to_str().unwrap(),
            strict_out.to_str().unwrap(),
        ]));
        assert!(
            e.contains(expect) && e.contains("bad.yaml") && !e.contains("nonexistent/a: "),
            "{e}"
        );
    }
}

/// A slice asking for layers a model does not have, or sources of different shapes, is refused
/// from the headers, naming the model and the tensor, and nothing is written.
#[test]
fn bad_slices_fail_before_writing_anything() {
    let m = common::fixture("merge").join("models");
    let (a, b) = (m.join("ft_a"), m.join("ft_b"));
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let run = |slices: String| {
        let path = tmp.path().join("s.yaml");
        std::fs::write(
            &path,
            format!("merge_method: passthrough\nslices:\n{slices}dtype: float32\n"),
        )
        .unwrap();
        let e = expect_clean_failure(&run_paft(&[
            "--quiet",
            "merge",
            path.to_str().unwrap(),
            out.to_str().unwrap(),
        ]));
        assert!(!out.exists(), "output left behind");
        e
    };
    let e = run(format!(
        "- sources: [{{model: {}, layer_range: [1, 3]}}]\n",
        a.display()
    ));
    assert!(e.contains("ft_a") && e.contains("model.layers.2."), "{e}");
    let e = run(format!(
        "- sources: [{{model: {}, layer_range: [0, 1]}}, {{model: {}, layer_range: [0, 2]}}]\n",
        a.display(),
        b.display()
    ));
    assert!(e.contains("same number of layers"), "{e}");
    let e = run(format!(
        "- sources: [{{model: {}, layer_range: [0, 1]}}, {{model: {}, layer_range: [1, 2]}}]\n",
        a.display(),
        b.display()
    ));
    assert!(e.contains("passthrough takes exactly one model"), "{e}");
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Entries where paft and mergekit disagree (> 1e-6), each checked to be a mask flip: one side
/// is the base (`models/base`), the other base + (ft_a − base) in f32.
fn arcee_fusion_flips(root: &Path, name: &str, ours: &[f32], theirs: &[f32]) -> usize {
    let load = |m: &str| {
        let f = paft::model::SafetensorsFiles::open_dir(&root.join("models").join(m)).unwrap();
        flat(&f.load(name, Some(DType::F32), &Device::Cpu).unwrap())
    };
    let (base, a) = (load("base"), load("ft_a"));
    let mut flips = 0;
    for i in 0..ours.len() {
        if (ours[i] - theirs[i]).abs() <= 1e-6 {
            continue;
        }
        let taken = base[i] + (a[i] - base[i]);
        let is = |x: f32, y: f32| (x - y).abs() <= 1e-6;
        assert!(
            (is(ours[i], base[i]) && is(theirs[i], taken))
                || (is(ours[i], taken) && is(theirs[i], base[i])),
            "arcee_fusion `{name}`[{i}]: paft {} mergekit {} is not a mask flip",
            ours[i],
            theirs[i]
        );
        flips += 1;
    }
    flips
}

#[test]
fn inspect_delta_reports_sparsity_for_full_and_lora_models() {
    let m = common::fixture("merge").join("models");
    let (base, ft_b) = (m.join("base"), m.join("ft_b"));
    let out = run_paft(&[
        "--quiet",
        "inspect-delta",
        "--base",
        base.to_str().unwrap(),
        "--model",
        ft_b.to_str().unwrap(),
        "--json",
    ]);
    crate::common::expect_success(&out);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // ft_b was made by changing ~30% of the base's entries.
    let zero = r["overall"]["frac_zero"].as_f64().unwrap();
    assert!((0.6..0.8).contains(&zero), "frac_zero {zero}");
    assert!(r["lora_a"].is_null());
    let lora = format!("{}+{}", base.display(), m.join("lora_b").display());
    let out = run_paft(&[
        "--quiet",
        "inspect-delta",
        "--base",
        base.to_str().unwrap(),
        "--model",
        &lora,
        "--json",
    ]);
    crate::common::expect_success(&out);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        r["lora_a"]["numel"].as_u64().unwrap() > 0 && r["lora_b"]["numel"].as_u64().unwrap() > 0
    );
    // Only q/v/down carry a delta: every other tensor is exactly zero.
    let k = r["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"].as_str().unwrap().ends_with("k_proj.weight"))
        .unwrap();
    assert_eq!(k["frac_zero"].as_f64().unwrap(), 1.0);
    // The table form prints a row per tensor plus the total.
    let out = run_paft(&[
        "--quiet",
        "inspect-delta",
        "--base",
        base.to_str().unwrap(),
        "--model",
        ft_b.to_str().unwrap(),
    ]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("(all)") && table.contains("model.norm.weight"),
        "{table}"
    );
}

#[test]
fn in_memory_merge_equals_mergekit() {
    let root = common::fixture("merge");
    let load = |d: &Path| {
        paft::model::SafetensorsFiles::open_dir(d)
            .unwrap()
            .load_all(Some(DType::F32), &Device::Cpu)
            .unwrap()
    };
    let m = root.join("models");
    let (base, a, b) = (
        load(&m.join("base")),
        load(&m.join("ft_a")),
        load(&m.join("ft_b")),
    );
    let mut merger = paft::merge::InMemoryMerger::new(&base, &[&a, &b], 2).unwrap();
    // Every method a search space can name, on a fixture that merges ft_a and ft_b.
    let cases = [
        "ties_d03_norm",
        "task_arithmetic_extrapolate",
        "ties_params",
        "breadcrumbs_ties",
        "linear",
        "sce",
        "nuslerp",
        "multislerp",
        "ram",
        "ramplus_tl",
    ];
    let mut deterministic: Vec<&str> = paft::merge::MergeMethod::all()
        .filter(|m| {
            m.searchable()
                && ![
                    "dare_ties",
                    "dare_linear",
                    "della",
                    "della_linear",
                    "breadcrumbs",
                ]
                .contains(&m.name())
        })
        .map(|m| m.name())
        .collect();
    for case in cases {
        let cfg = MergeConfig::from_file(&root.join(case).join("config.yaml")).unwrap();
        let ours = merger.merge(&cfg, 0, DType::F32, &Device::Cpu).unwrap();
        let theirs = load(&root.join(case));
        for (name, t) in &theirs {
            let d = common::max_abs_diff(t, &ours[name]);
            assert!(d <= 1e-6, "{case} `{name}`: {d}");
        }
        // The search's path on CPU: into the previous candidate's buffers.
        let reused = merger.merge_reusing(&cfg, 0).unwrap();
        for (name, t) in &theirs {
            let d = common::max_abs_diff(t, &reused[name]);
            assert!(d <= 1e-6, "{case} `{name}` (reusing buffers): {d}");
        }
        drop(reused);
        deterministic.retain(|m| *m != cfg.method.name());
    }
    // breadcrumbs shares breadcrumbs_ties' pruning; DARE/DELLA are random (no fixture).
    assert!(
        deterministic.is_empty(),
        "searchable methods without an in-memory check: {deterministic:?}"
    );
}

#[test]
fn merge_killed_mid_write_leaves_no_output() {
    let Some(smollm) = common::smollm_dir() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("c.yaml");
    let s = smollm.to_str().unwrap();
    // The same directory through another path, so it is a model and not the base again.
    let same = format!("{s}/.");
    std::fs::write(
        &cfg,
        yaml("task_arithmetic", s, &[(&same, "{weight: 0.5}")], "{}"),
    )
    .unwrap();
    let out = tmp.path().join("out");
    let mut child = common::paft()
        .args([
            "--quiet",
            "merge",
            cfg.to_str().unwrap(),
            out.to_str().unwrap(),
            "--out-shard-size",
            "50MB",
        ])
        .spawn()
        .unwrap();
    // Kill once the partial directory has its first shard, i.e. mid-write.
    let started = std::time::Instant::now();
    let partial = || {
        std::fs::read_dir(tmp.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .find(|e| e.file_name().to_string_lossy().starts_with(".out.partial-"))
    };
    while started.elapsed().as_secs() < 60 && child.try_wait().unwrap().is_none() {
        if partial().is_some_and(|p| {
            std::fs::read_dir(p.path()).unwrap().any(|f| {
                f.unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(".shard-")
            })
        }) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        partial().is_some(),
        "merge finished before it could be killed"
    );
    assert!(!out.exists(), "a killed merge left {}", out.display());
}

/// The bytes of every file of a model directory's checkpoint, by file name.
fn checkpoint_bytes(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.ends_with(".safetensors") || n.ends_with(".index.json")
        })
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect()
}

#[test]
fn block_wise_merging_writes_the_same_bytes_as_whole_tensors() {
    let Some(f) = fixture() else { return };
    let tmp = tempfile::tempdir().unwrap();
    // The fine-tunes again in bf16: blocks are converted as they are read.
    for (src, name) in [(&f.a, "a16"), (&f.b, "b16")] {
        let p = Pretrained::load(Path::new(src), None, &Device::Cpu).unwrap();
        p.save(&tmp.path().join(name), Some(DType::BF16), usize::MAX)
            .unwrap();
    }
    let (a16, b16) = (
        tmp.path().join("a16").display().to_string(),
        tmp.path().join("b16").display().to_string(),
    );
    let cases = [
        (
            "ties",
            f.a.as_str(),
            f.b.as_str(),
            "{weight: 1.0, density: 0.3}",
            "{normalize: true}",
        ),
        (
            "dare_ties",
            &f.a,
            &f.b,
            "{weight: 0.7, density: 0.5}",
            "{normalize: true}",
        ),
        (
            "dare_linear",
            &f.a,
            &f.b,
            "{weight: 0.7, density: 0.5}",
            "{rescale: true}",
        ),
        (
            "task_arithmetic",
            &a16,
            &b16,
            "{weight: 0.6}",
            "{lambda: 1.5}",
        ),
        (
            "ties",
            &a16,
            &b16,
            "{weight: 0.5, density: 0.7}",
            "{normalize: false}",
        ),
        // Not block-wise (L1 rescale, per-row ranks): the option changes nothing.
        (
            "breadcrumbs_ties",
            &f.a,
            &f.b,
            "{weight: 1.0, density: 0.8, gamma: 0.01}",
            "{}",
        ),
        (
            "della",
            &f.a,
            &f.b,
            "{weight: 1.0, density: 0.5, epsilon: 0.1}",
            "{}",
        ),
    ];
    for (i, (method, a, b, params, globals)) in cases.iter().enumerate() {
        let cfg = yaml(method, &f.base, &[(a, params), (b, params)], globals).replace(
            "dtype: float32",
            if i == 4 {
                "dtype: bfloat16"
            } else {
                "dtype: float32"
            },
        );
        let cfg_path = tmp.path().join(format!("{i}.yaml"));
        std::fs::write(&cfg_path, &cfg).unwrap();
        let run = |out: &str, block: &str, shard: &str| {
            let out = tmp.path().join(format!("{i}-{out}"));
            let res = run_paft(&[
                "--quiet",
                "merge",
                cfg_path.to_str().unwrap(),
                out.to_str().unwrap(),
                "--seed",
                "5",
                "--block-size",
                block,
                "--out-shard-size",
                shard,
            ]);
            common::expect_success(&res);
            out
        };
        // 4 KB blocks: every matrix of the tiny model merges in many blocks of 1024 entries.
        let whole = run("whole", "1GB", "5GB");
        let blocks = run("blocks", "4KB", "5GB");
        assert_eq!(
            checkpoint_bytes(&whole),
            checkpoint_bytes(&blocks),
            "{method} ({a}): block-wise output differs"
        );
        // Streamed into several shards: the same tensors.
        let sharded = run("sharded", "4KB", "200KB");
        assert!(sharded.join("model.safetensors.index.json").exists());
        let load = |d: &Path| Pretrained::load(d, None, &Device::Cpu).unwrap();
        let (x, y) = (load(&whole), load(&sharded));
        assert_eq!(x.weights.len(), y.weights.len());
        for (n, t) in &x.weights {
            assert_eq!(t.dtype(), y.weights[n].dtype());
            let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            assert_eq!(
                common::max_abs_diff(&f32(t), &f32(&y.weights[n])),
                0.0,
                "{method}: {n}"
            );
        }
    }
}

/// A tokenizer source makes mergekit realign every input's embedding rows to the output
/// tokenizer; paft merges rows as stored, so it refuses inputs whose vocabulary differs, and
/// a vocabulary smaller than the embedding (mergekit would shrink it). Without a source, rows
/// merge as stored in both tools.
#[test]
fn a_tokenizer_source_needs_one_shared_vocabulary_filling_the_embedding() {
    let models = common::fixture("merge").join("models");
    let tmp = tempfile::tempdir().unwrap();
    for m in ["base", "ft_a", "ft_b"] {
        let d = tmp.path().join(m);
        std::fs::create_dir(&d).unwrap();
        for f in std::fs::read_dir(models.join(m)).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, d.join(f.file_name().unwrap())).unwrap();
        }
    }
    let edit_vocab = |m: &str, edit: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)| {
        let p = tmp.path().join(m).join("tokenizer.json");
        let mut t: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        edit(t["model"]["vocab"].as_object_mut().unwrap());
        std::fs::write(&p, t.to_string()).unwrap();
    };
    let d = |m: &str| tmp.path().join(m).display().to_string();
    let cfg = |extra: &str| {
        format!(
            "merge_method: ties\nbase_model: {}\nmodels:\n  - model: {}\n    parameters: {{weight: 1, density: 0.5}}\n  - model: {}\n    parameters: {{weight: 0.5, density: 0.5}}\n{extra}",
            d("base"),
            d("ft_a"),
            d("ft_b")
        )
    };
    let run = |yaml: &str, out: &str| {
        run_merge(
            &MergeConfig::from_yaml(yaml).unwrap(),
            &tmp.path().join(out),
            &MergeOptions::default(),
        )
    };
    // ft_b's `w5` and `w6` trade ids.
    edit_vocab("ft_b", &|v| {
        v.insert("w5".into(), 6.into());
        v.insert("w6".into(), 5.into());
    });
    let e = format!(
        "{:#}",
        run(&cfg("tokenizer_source: union"), "union").unwrap_err()
    );
    assert!(
        e.contains("ft_b") && e.contains("`w5` is id 6, not 5") && e.contains("realign"),
        "{e}"
    );
    assert!(!tmp.path().join("union").exists());
    run(&cfg(""), "plain").unwrap();

    // Every tokenizer 8 tokens short of the 128 embedding rows.
    for m in ["base", "ft_a", "ft_b"] {
        edit_vocab(m, &|v| {
            v.insert("w5".into(), 5.into());
            v.insert("w6".into(), 6.into());
            v.retain(|_, id| id.as_u64().unwrap() < 120);
        });
    }
    let e = format!(
        "{:#}",
        run(&cfg("tokenizer: {source: base}"), "short").unwrap_err()
    );
    assert!(e.contains("120 tokens") && e.contains("128 rows"), "{e}");
}
