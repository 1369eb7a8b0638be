//! The stages of `paft run` and the two training commands built from them.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use serde_json::json;

use super::experiment::{Experiment, Stage};
use super::jobs;
use crate::cluster::Executor;
use crate::eval::alignment_tax::AlignmentTaxSets;
use crate::eval::{parse_task_list, DocSet, EvalConfig, Evaluator, Pool, PoolSplit, TaskStore};
use crate::io::write_file_atomic;
use crate::merge::inspect::inspect_delta;
use crate::merge::load_f32;
use crate::merge::ModelRef;
use crate::model::{self, LlamaModel, Mode, Pretrained};
use crate::search::{run_search, MergeInputs, SearchOptions, SearchSpace};
use crate::train::{TrainConfig, Trainer};

/// Marks finished stages so a rerun of the pipeline skips them.
struct StageMarks {
    dir: PathBuf,
}

impl StageMarks {
    fn new(out: &Path) -> Result<Self> {
        let dir = out.join("stages");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Self { dir })
    }

    fn done(&self, stage: &str) -> bool {
        self.dir.join(format!("{stage}.done")).exists()
    }

    fn finish(&self, stage: &str, seconds: f64) -> Result<()> {
        tracing::info!("stage {stage} finished in {seconds:.0}s");
        write_file_atomic(
            &self.dir.join(format!("{stage}.done")),
            json!({"seconds": seconds}).to_string().as_bytes(),
        )
    }

    /// Runs `work` unless the stage is already marked done.
    fn run(&self, stage: &str, work: impl FnOnce() -> Result<()>) -> Result<()> {
        if self.done(stage) {
            tracing::info!("stage {stage}: already done, skipped");
            return Ok(());
        }
        tracing::info!("stage {stage}");
        let t = Instant::now();
        work().with_context(|| format!("stage {stage}"))?;
        self.finish(stage, t.elapsed().as_secs_f64())
    }
}

fn threads(exp: &Experiment) -> usize {
    exp.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    })
}

/// A run ready to train, or one whose result already exists.
enum Prepared {
    Done(PathBuf),
    Ready(Box<Trainer>, bool),
}

/// Loads a run's model and data (and DPO's reference log-probs) without training yet.
fn prepare(cfg: TrainConfig, objective: crate::train::Objective) -> Result<Prepared> {
    let result = cfg
        .output
        .join(if cfg.lora_r > 0 { "adapter" } else { "model" });
    if result.exists() {
        return Ok(Prepared::Done(result));
    }
    let resume = cfg.output.join("checkpoints").exists();
    Ok(Prepared::Ready(
        Box::new(Trainer::new(cfg, objective)?),
        resume,
    ))
}

fn finish_training(p: Prepared) -> Result<PathBuf> {
    match p {
        Prepared::Done(path) => Ok(path),
        Prepared::Ready(mut trainer, resume) => trainer.train(resume),
    }
}

/// Trains one run to completion, resuming from its last checkpoint if there is one.
fn train_one(cfg: TrainConfig, objective: crate::train::Objective) -> Result<PathBuf> {
    finish_training(prepare(cfg, objective)?)
}

/// The reference of a trained run's model: `BASE+ADAPTER` for LoRA, the directory otherwise.
fn trained_ref(base_dir: &Path, result: &Path) -> String {
    if result.ends_with("adapter") {
        format!("{}+{}", base_dir.display(), result.display())
    } else {
        result.display().to_string()
    }
}

/// Where a run leaves its result: the adapter for LoRA, the full model otherwise.
fn result_dir(cfg: &TrainConfig) -> PathBuf {
    cfg.output
        .join(if cfg.lora_r > 0 { "adapter" } else { "model" })
}

/// One stage trained to completion in this process (what a Slurm training job runs): SFT and
/// preference from the base, the sequential preference stage from the SFT result, which must
/// exist. Returns the model reference.
pub(crate) fn train_stage(exp: &Experiment, stage: Stage) -> Result<String> {
    let base_dir = model::source::resolve_model(&exp.base, None)?;
    let objective = match stage {
        Stage::Sft => crate::train::Objective::Sft,
        _ => exp.pref_objective()?,
    };
    if stage == Stage::SequentialPref {
        let sft = exp.train_config(Stage::Sft)?;
        let sft_out = result_dir(&sft);
        if !sft_out.exists() {
            bail!(
                "the SFT result {} is missing; the sequential stage trains from it",
                sft_out.display()
            );
        }
        return train_sequential_local(exp, &trained_ref(&base_dir, &sft_out));
    }
    let mut cfg = exp.train_config(stage)?;
    cfg.model = base_dir.display().to_string();
    let out = train_one(cfg, objective)?;
    Ok(trained_ref(&base_dir, &out))
}

/// `paft parallel`: the SFT and the preference run from the same base, concurrently — on two
/// devices when the experiment names two, else each on half of the CPU threads (or as two
/// Slurm jobs). Returns the two model references (SFT, preference).
pub fn train_parallel(exp: &Experiment) -> Result<(String, String)> {
    if let Executor::Slurm(cfg) = exp.executor()? {
        let refs = jobs::train_on_slurm(exp, &cfg, &[Stage::Sft, Stage::Pref])?;
        let base_dir = model::source::resolve_model(&exp.base, None)?;
        write_manifest(
            exp,
            &base_dir,
            &result_dir(&exp.train_config(Stage::Sft)?),
            &result_dir(&exp.train_config(Stage::Pref)?),
        )?;
        return Ok((refs[&Stage::Sft].clone(), refs[&Stage::Pref].clone()));
    }
    let base_dir = model::source::resolve_model(&exp.base, None)?;
    let mut sft = exp.train_config(Stage::Sft)?;
    let mut pref = exp.train_config(Stage::Pref)?;
    let objective = exp.pref_objective()?;
    sft.model = base_dir.display().to_string();
    pref.model = base_dir.display().to_string();
    if let [a, b] = exp.devices.as_slice() {
        sft.device = a.clone();
        pref.device = b.clone();
    }
    let per_run = (threads(exp) / 2).max(1);
    let pool = || {
        rayon::ThreadPoolBuilder::new()
            .num_threads(per_run)
            .build()
            .context("cannot start a thread pool")
    };
    let (sft_pool, pref_pool) = (pool()?, pool()?);
    tracing::info!(
        "training SFT and {} in parallel, {per_run} thread(s) each",
        exp.pref_name()
    );
    let pref_label = format!("{} run", exp.pref_name());
    // Both runs load (data, DPO reference log-probs) before either trains, so a bad dataset
    // stops the experiment at once instead of after the other run's training.
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| sft_pool.install(|| prepare(sft, crate::train::Objective::Sft)));
        let b = s.spawn(|| pref_pool.install(|| prepare(pref, objective)));
        (
            a.join().expect("the SFT thread panicked"),
            b.join().expect("the preference thread panicked"),
        )
    });
    let (a, b) = (a.context("SFT run")?, b.context(pref_label.clone())?);
    let (sft_out, pref_out) = std::thread::scope(|s| {
        let a = s.spawn(|| sft_pool.install(|| finish_training(a)));
        let b = s.spawn(|| pref_pool.install(|| finish_training(b)));
        (
            a.join().expect("the SFT thread panicked"),
            b.join().expect("the preference thread panicked"),
        )
    });
    let sft_out = sft_out.context("SFT run")?;
    let pref_out = pref_out.context(pref_label)?;
    write_manifest(exp, &base_dir, &sft_out, &pref_out)?;
    Ok((
        trained_ref(&base_dir, &sft_out),
        trained_ref(&base_dir, &pref_out),
    ))
}

fn write_manifest(exp: &Experiment, base_dir: &Path, sft: &Path, pref: &Path) -> Result<()> {
    let manifest = json!({
        "experiment": exp.name,
        "base": exp.base,
        "base_dir": base_dir,
        "sft": {"result": sft, "config": exp.train_config(Stage::Sft)?},
        exp.pref_name(): {"result": pref, "config": exp.train_config(Stage::Pref)?},
        "paft_version": env!("CARGO_PKG_VERSION"),
    });
    let path = exp.out().join("train").join("manifest.json");
    std::fs::create_dir_all(path.parent().unwrap())?;
    write_file_atomic(&path, &serde_json::to_vec_pretty(&manifest)?)
}

/// `paft sequential`: SFT, then the preference stage from its result — here, or as two Slurm
/// jobs, the second waiting for the first. Returns (SFT, sequential) model references.
pub fn train_sft_then_sequential(exp: &Experiment) -> Result<(String, String)> {
    if let Executor::Slurm(cfg) = exp.executor()? {
        let refs = jobs::train_on_slurm(exp, &cfg, &[Stage::Sft, Stage::SequentialPref])?;
        return Ok((
            refs[&Stage::Sft].clone(),
            refs[&Stage::SequentialPref].clone(),
        ));
    }
    let sft_ref = train_stage(exp, Stage::Sft)?;
    let seq = train_sequential_local(exp, &sft_ref)?;
    Ok((sft_ref, seq))
}

/// The sequential baseline's preference stage, in this process: trained from the SFT result
/// (LoRA adapters are merged into a full model first), with the SFT model as DPO reference.
pub fn train_sequential_local(exp: &Experiment, sft_ref: &str) -> Result<String> {
    let sft_full = exp.out().join("train").join("sft-merged");
    if !sft_full.exists() {
        materialize(sft_ref, &sft_full)?;
    }
    let mut cfg = exp.train_config(Stage::SequentialPref)?;
    cfg.model = sft_full.display().to_string();
    cfg.reference_model = None; // the policy's start, i.e. the SFT model
    let out = train_one(cfg, exp.pref_objective()?)?;
    Ok(trained_ref(&sft_full, &out))
}

/// Writes `reference` (possibly `BASE+ADAPTER`) as a full Hugging Face directory.
fn materialize(reference: &str, out: &Path) -> Result<()> {
    let r = ModelRef::parse(reference);
    let base_dir = model::source::resolve_model(&r.model, r.revision.as_deref())?;
    let base = Pretrained::load(&base_dir, Some(DType::F32), &Device::Cpu)?;
    let merged = Pretrained {
        weights: load_f32(&r, &base.config)?,
        ..base
    };
    merged.save(out, None, crate::model::weights::DEFAULT_SHARD_BYTES)
}

/// The trained models of an experiment (SFT, preference, sequential), training what is not
/// trained yet: locally, the parallel stage then the sequential one; on Slurm, all three jobs
/// at once, the sequential one waiting for the SFT job.
fn trained_models(exp: &Experiment, marks: &StageMarks) -> Result<(String, String, String)> {
    if let Executor::Slurm(cfg) = exp.executor()? {
        let t = Instant::now();
        let all = [Stage::Sft, Stage::Pref, Stage::SequentialPref];
        let refs = jobs::train_on_slurm(exp, &cfg, &all)?;
        let base_dir = model::source::resolve_model(&exp.base, None)?;
        let dir = |stage| Ok::<_, anyhow::Error>(result_dir(&exp.train_config(stage)?));
        write_manifest(exp, &base_dir, &dir(Stage::Sft)?, &dir(Stage::Pref)?)?;
        for stage in ["train-parallel", "train-sequential"] {
            if !marks.done(stage) {
                marks.finish(stage, t.elapsed().as_secs_f64())?;
            }
        }
        let get = |s: Stage| refs[&s].clone();
        return Ok((
            get(Stage::Sft),
            get(Stage::Pref),
            get(Stage::SequentialPref),
        ));
    }
    let mut refs: Option<(String, String)> = None;
    marks.run("train-parallel", || {
        refs = Some(train_parallel(exp)?);
        Ok(())
    })?;
    let (sft_ref, pref_ref) = match refs {
        Some(r) => r,
        None => train_parallel(exp)?, // finished before: returns the saved results at once
    };
    let mut seq_ref = None;
    marks.run("train-sequential", || {
        seq_ref = Some(train_sequential_local(exp, &sft_ref)?);
        Ok(())
    })?;
    let seq_ref = match seq_ref {
        Some(r) => r,
        None => train_sequential_local(exp, &sft_ref)?,
    };
    Ok((sft_ref, pref_ref, seq_ref))
}

/// Scores report rows: every row on the report pool, with the same documents and shots, none
/// of them seen by the search (which scored only the search pool of the same split), plus the
/// held-out alignment-tax rows. One per process: a local run's rows share it, a Slurm row job
/// opens its own.
pub(crate) struct RowEvaluator<'e> {
    exp: &'e Experiment,
    evaluator: Evaluator,
    tasks: String,
    docs: DocSet,
    tax_sets: Option<AlignmentTaxSets>,
}

impl<'e> RowEvaluator<'e> {
    pub(crate) fn open(exp: &'e Experiment, tasks_dir: &Path, pools: PoolSplit) -> Result<Self> {
        let tasks = match &exp.eval.tasks {
            Some(t) => t.clone(),
            None => search_spaces(exp)?.swap_remove(0).0.budget.tasks,
        };
        let base_dir = model::source::resolve_model(&exp.base, None)?;
        let mut config = EvalConfig::new(parse_task_list(&tasks)?);
        config.split = pools;
        let docs = DocSet::sampled(Pool::Report, exp.eval.docs, exp.eval.seed)
            .with_mmlu(exp.eval.mmlu_docs);
        let evaluator = Evaluator::open(
            &base_dir.display().to_string(),
            TaskStore::new(tasks_dir.to_path_buf()),
            config,
        )?;
        // The held-out alignment-tax sets, tokenized and scored by the base once.
        let tax_sets = exp
            .alignment_tax
            .as_ref()
            .map(|spec| AlignmentTaxSets::prepare(evaluator.base(), spec, Pool::Report, &pools))
            .transpose()
            .context("[alignment_tax]")?;
        Ok(Self {
            exp,
            evaluator,
            tasks,
            docs,
            tax_sets,
        })
    }

    /// Evaluates the model `r` as row `name` into `RUN/evals/<name>/`.
    pub(crate) fn evaluate(&mut self, name: &str, r: &str) -> Result<()> {
        let (exp, docs) = (self.exp, self.docs);
        let config = &self.evaluator.base().config;
        let weights = load_f32(&ModelRef::parse(r), config)?;
        let net = LlamaModel::from_weights(config, &weights, None, Mode::Inference)?;
        let result = self
            .evaluator
            .evaluate(&net, docs)
            .with_context(|| format!("evaluating {r}"))?;
        let dir = exp.out().join("evals").join(name);
        let config = json!({"model": r, "tasks": self.tasks, "docs_per_task": exp.eval.docs,
                            "mmlu_docs": exp.eval.mmlu_docs, "subset_seed": exp.eval.seed});
        self.evaluator.write(&dir, docs, &result, config, true)?;
        print!("{}", result.table(name));
        if let Some(sets) = &self.tax_sets {
            let tax = sets
                .measure(&net)
                .with_context(|| format!("alignment tax of {r}"))?;
            tax.write(&dir)?;
            println!("{name}: {}", tax.summary());
        }
        Ok(())
    }
}

/// One of the experiment's search spaces (with the experiment's alignment-tax rows when it names
/// none) and its text, `{shared}` expanded.
fn load_space(exp: &Experiment, path: &Path) -> Result<(SearchSpace, String)> {
    let space_text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read search space {}", path.display()))?;
    // `{shared}` as in the experiment file (the space's own alignment-tax sets).
    let space_text = crate::paths::expand_shared(&space_text);
    // A space without `name` is named by its file, as `paft search` names it.
    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
    let mut space = SearchSpace::from_toml(&space_text, &stem)
        .with_context(|| format!("invalid search space {}", path.display()))?;
    // Alignment-tax terms in the space's objective measure the experiment's held-out rows
    // unless the space names its own.
    if space.alignment_tax.is_none() {
        space.alignment_tax = exp.alignment_tax.clone();
    }
    Ok((space, space_text))
}

/// The experiment's search spaces. The comparison rows are scored once, on one report pool, so
/// every space must split the tasks the same way and score the same tasks.
fn search_spaces(exp: &Experiment) -> Result<Vec<(SearchSpace, String)>> {
    let files = exp.search.space_files()?;
    let spaces: Vec<(SearchSpace, String)> = files
        .iter()
        .map(|f| load_space(exp, f))
        .collect::<Result<_>>()?;
    let (first, _) = &spaces[0];
    for ((space, _), file) in spaces.iter().zip(&files).skip(1) {
        if space.pools != first.pools || space.budget.tasks != first.budget.tasks {
            bail!(
                "search space {} has other [pools] or [subset] tasks than {}: the comparison \
                 rows are scored on one report pool, so the spaces must agree",
                file.display(),
                files[0].display()
            );
        }
        if spaces.iter().filter(|(s, _)| s.name == space.name).count() > 1 {
            bail!("two search spaces are named `{}`", space.name);
        }
    }
    Ok(spaces)
}

/// One search of the experiment: an SFT model (`[sft]` or a variant) merged with the
/// preference model in one space.
struct SearchPlan {
    /// `None` when the experiment runs a single search (row `paft`, results in the run
    /// directory); else `<space>` for `[sft]` and `<variant>-<space>` for a variant (row
    /// `paft-<name>`, results in `searches/<name>/`).
    name: Option<String>,
    sft_ref: String,
    space: SearchSpace,
    space_text: String,
}

impl SearchPlan {
    fn out(&self, run: &Path) -> PathBuf {
        match &self.name {
            None => run.to_path_buf(),
            Some(name) => run.join("searches").join(name),
        }
    }

    fn stage(&self) -> String {
        self.name
            .as_ref()
            .map_or("search".into(), |n| format!("search-{n}"))
    }

    fn row(&self) -> String {
        self.name
            .as_ref()
            .map_or("paft".into(), |n| format!("paft-{n}"))
    }
}

/// Every (SFT, space) pair: `[sft]` first, then the variants in name order.
fn search_plans(
    spaces: Vec<(SearchSpace, String)>,
    sfts: &[(Option<String>, String)],
) -> Vec<SearchPlan> {
    let single = sfts.len() == 1 && spaces.len() == 1;
    let mut plans = vec![];
    for (variant, sft_ref) in sfts {
        for (space, text) in &spaces {
            let name = match variant {
                _ if single => None,
                None => Some(space.name.clone()),
                Some(v) => Some(format!("{v}-{}", space.name)),
            };
            plans.push(SearchPlan {
                name,
                sft_ref: sft_ref.clone(),
                space: space.clone(),
                space_text: text.clone(),
            });
        }
    }
    plans
}

/// The SFT variants, each trained from the base (skipped when its stage is done).
fn trained_variants(exp: &Experiment, marks: &StageMarks) -> Result<Vec<(String, String)>> {
    let base_dir = model::source::resolve_model(&exp.base, None)?;
    let mut out = vec![];
    for name in exp.sft_variants.keys() {
        let mut cfg = exp.variant_config(name)?;
        cfg.model = base_dir.display().to_string();
        marks.run(&format!("train-sft-{name}"), || {
            train_one(cfg.clone(), crate::train::Objective::Sft).map(drop)
        })?;
        out.push((name.clone(), trained_ref(&base_dir, &result_dir(&cfg))));
    }
    Ok(out)
}

/// `paft run`: every stage, skipping those already done. Returns what the report wrote.
pub fn run_experiment(exp: &Experiment, tasks_dir: &Path) -> Result<crate::report::ReportPaths> {
    let out = exp.out();
    let marks = StageMarks::new(&out)?;
    let started = Instant::now();
    let executor = exp.executor()?;
    let base_dir = model::source::resolve_model(&exp.base, None)?;
    let base_ref = base_dir.display().to_string();
    let pref = exp.pref_name();

    // The spaces are read first, so a bad space stops the run before hours of training.
    let spaces = search_spaces(exp)?;
    let (sft_ref, pref_ref, seq_ref) = trained_models(exp, &marks)?;
    let variants = trained_variants(exp, &marks)?;

    marks.run("deltas", || {
        let dir = out.join("deltas");
        std::fs::create_dir_all(&dir)?;
        let variant_rows = variants.iter().map(|(v, r)| (format!("sft-{v}"), r));
        let all = [("sft".to_string(), &sft_ref), (pref.to_string(), &pref_ref)]
            .into_iter()
            .chain(variant_rows);
        for (name, r) in all {
            let report = inspect_delta(&ModelRef::parse(&base_ref), &ModelRef::parse(r))?;
            write_file_atomic(
                &dir.join(format!("{name}.json")),
                &serde_json::to_vec_pretty(&report)?,
            )?;
        }
        Ok(())
    })?;

    let pools = spaces[0].0.pools;
    let sfts: Vec<(Option<String>, String)> = std::iter::once((None, sft_ref.clone()))
        .chain(variants.iter().map(|(v, r)| (Some(v.clone()), r.clone())))
        .collect();
    let plans = search_plans(spaces, &sfts);
    for plan in &plans {
        let search_out = plan.out(&out);
        marks.run(&plan.stage(), || {
            let inputs = MergeInputs {
                base: base_ref.clone(),
                sft: plan.sft_ref.clone(),
                pref: pref_ref.clone(),
            };
            let opts = SearchOptions {
                out: search_out.clone(),
                solver: exp.search.solver,
                resume: true,
                device: Device::Cpu,
                tasks_dir: tasks_dir.to_path_buf(),
                executor: executor.clone(),
            };
            run_search(&plan.space, &plan.space_text, inputs, &opts)?;
            Ok(())
        })?;
    }

    let mut rows: Vec<(String, String)> = vec![
        ("base".into(), base_ref.clone()),
        ("sft".into(), sft_ref.clone()),
    ];
    if exp.eval.sft_variant_rows {
        let named = variants
            .iter()
            .map(|(v, r)| (format!("sft-{v}"), r.clone()));
        rows.extend(named);
    }
    rows.push((pref.into(), pref_ref.clone()));
    rows.push(("sequential".into(), seq_ref.clone()));
    for plan in &plans {
        let best = crate::search::run::RunFiles::best_model(&plan.out(&out));
        rows.push((plan.row(), best.display().to_string()));
    }
    let pending: Vec<(&str, String)> = rows
        .iter()
        .filter(|(name, _)| !marks.done(&format!("eval-{name}")))
        .map(|(n, r)| (n.as_str(), r.clone()))
        .collect();
    match &executor {
        _ if pending.is_empty() => {}
        Executor::Slurm(cfg) => {
            jobs::evaluate_rows_on_slurm(
                exp,
                cfg,
                tasks_dir,
                pools,
                &pending,
                &mut |row, secs| marks.finish(&format!("eval-{row}"), secs),
            )?;
        }
        Executor::Local => {
            let mut rows = RowEvaluator::open(exp, tasks_dir, pools)?;
            for (name, r) in &pending {
                marks.run(&format!("eval-{name}"), || rows.evaluate(name, r))?;
            }
        }
    }

    let report_dir = exp.report_dir();
    let report = crate::report::write_report(&out, &report_dir, &Default::default())?;
    let index = report.index_html.clone();
    tracing::info!(
        "experiment {} done in {:.0}s",
        exp.name,
        started.elapsed().as_secs_f64()
    );
    if !index.exists() {
        bail!("the report was not written to {}", index.display());
    }
    Ok(report)
}
