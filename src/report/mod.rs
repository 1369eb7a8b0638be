//! `paft report`: a run directory turned into leaderboard, trajectory, parameter and sparsity
//! tables (Polars DataFrames written as Markdown, CSV and Parquet), SVG plots and one
//! self-contained `index.html`.
//!
//! A run directory holds what the earlier stages wrote, every part optional:
//! `journal.jsonl` (the search), `evals/<row>/results.json` (full evaluations, `paft eval
//! --output`) with, beside it, `samples_<task>.jsonl` (`--log-samples`) and
//! `alignment_tax.json`, `deltas/*.json` (`paft inspect-delta --json`: `sft`, `dpo` or `orpo`,
//! and `sft-<variant>` for an experiment's SFT variants), `searches/<name>/journal.jsonl` (an
//! experiment with several searches; their best merges are rows `paft-<name>`) and
//! `stages/*.done` (`paft run`'s stage marks, with the seconds each took).
//!
//! Uncertainty comes from the rows' per-document records: a standard error per number on the
//! leaderboard and paired-bootstrap intervals for PAFT against its baselines (the verdict table
//! and the sentence at the top of the page).

pub mod bars;
pub mod bootstrap;
mod conclusion;
mod evidence;
pub mod html;
mod pairing;
pub mod plots;
pub mod rows;
mod samples;
pub mod search;
pub mod sparsity;
pub mod stages;
mod stats;
pub mod tables;
mod verdicts;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::io::write_file_atomic;
use crate::search::run::RunFiles;
use crate::search::{Journal, JournalEntry};
pub use bootstrap::BootstrapSettings;
use evidence::RowEvidence;
pub use rows::{scores_from_results, RowSpec};
use tables::FloatFormat;

#[derive(Debug, Clone)]
pub struct ReportOptions {
    /// Rows added to the leaderboard besides `evals/*` (named like them).
    pub adds: Vec<RowSpec>,
    /// Journal candidates shown in the leaderboard.
    pub top_k: usize,
    /// Seed and size of the paired bootstrap.
    pub bootstrap: BootstrapSettings,
}

impl Default for ReportOptions {
    fn default() -> Self {
        Self {
            adds: vec![],
            top_k: 5,
            bootstrap: BootstrapSettings::default(),
        }
    }
}

/// What a report wrote.
#[derive(Debug, Clone)]
pub struct ReportPaths {
    pub out_dir: PathBuf,
    pub index_html: PathBuf,
    /// Every file written, index.html last.
    pub files: Vec<PathBuf>,
    /// The page's opening sentence: what the run can and cannot conclude.
    pub conclusion: String,
}

/// `reports/<run directory's name>`.
pub fn default_out_dir(run_dir: &Path) -> Result<PathBuf> {
    let dir = run_dir
        .canonicalize()
        .with_context(|| format!("run directory {} not found", run_dir.display()))?;
    Ok(Path::new("reports").join(run_name(&dir)))
}

fn run_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "run".into())
}

/// One search's journal: the run's own (`journal.jsonl`, no name) or one of an experiment's
/// several searches (`searches/<name>/journal.jsonl`).
struct SearchRun {
    name: Option<String>,
    entries: Vec<JournalEntry>,
    /// `objective_stderr` by evaluation index (optional in the journal).
    objective_stderrs: BTreeMap<usize, f64>,
    /// The screening fidelity its candidates were scored in (`fewshot_mode=shared, …`); `None`
    /// for lm-eval's.
    screening: Option<String>,
}

impl SearchRun {
    /// The search whose files are in `dir` (its journal, its search-documents.json).
    fn read(name: Option<String>, dir: &Path) -> Result<Self> {
        let journal = RunFiles::journal(dir);
        Ok(Self {
            name,
            entries: Journal::read(&journal)?,
            objective_stderrs: search::objective_stderrs(&journal)?,
            screening: search_screening(&RunFiles::search_documents(dir))?,
        })
    }

    /// Suffix of its files (`trajectory-<name>.csv`) and prefix of its candidates' labels.
    fn suffix(&self) -> String {
        self.name
            .as_ref()
            .map_or(String::new(), |n| format!("-{}", search::file_stem(n)))
    }
}

/// The screening fidelity a search-documents.json names, as `fewshot_mode=shared,
/// gsm8k_scoring=gold_likelihood`; `None` for lm-eval's, or when the file is absent (searches
/// from before the held-out protocol, all in lm-eval's fidelity).
fn search_screening(path: &Path) -> Result<Option<String>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let doc: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", path.display()))?;
    let settings = rows::screening_settings(&doc);
    Ok((!settings.is_empty()).then(|| {
        settings
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }))
}

/// What the run directory holds.
struct RunInputs {
    name: String,
    searches: Vec<SearchRun>,
    evals: Vec<RowSpec>,
    deltas: Vec<sparsity::NamedDelta>,
    /// Wall time of each finished `paft run` stage.
    stages: Vec<stages::StageTime>,
}

impl RunInputs {
    fn load(run_dir: &Path) -> Result<Self> {
        if !run_dir.is_dir() {
            bail!(
                "run directory {} not found (or not a directory)",
                run_dir.display()
            );
        }
        let mut searches = vec![];
        if RunFiles::journal(run_dir).is_file() {
            searches.push(SearchRun::read(None, run_dir)?);
        }
        for (name, path) in entries(&run_dir.join("searches"))? {
            if RunFiles::journal(&path).is_file() {
                searches.push(SearchRun::read(Some(name), &path)?);
            }
        }
        Ok(Self {
            name: run_name(&run_dir.canonicalize()?),
            searches,
            evals: eval_specs(&run_dir.join("evals"))?,
            deltas: sparsity::read_deltas(&run_dir.join("deltas"))?,
            stages: stages::read_stages(&run_dir.join("stages"))?,
        })
    }
}

/// `evals/<row>/results.json`, by row name; a row directory without results.json (an
/// evaluation still running) is skipped with a warning.
fn eval_specs(dir: &Path) -> Result<Vec<RowSpec>> {
    let mut specs = vec![];
    for (name, path) in entries(dir)? {
        if !path.is_dir() {
            continue;
        }
        let results = path.join("results.json");
        if !results.is_file() {
            tracing::warn!("{}: no results.json, row skipped", path.display());
            continue;
        }
        specs.push(RowSpec { name, results });
    }
    Ok(specs)
}

/// The entries of `dir` as (file name, path), sorted by name; none when `dir` is missing (a
/// run directory's parts are all optional).
pub(crate) fn entries(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    if !dir.is_dir() {
        return Ok(vec![]);
    }
    let mut out = vec![];
    for item in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let item = item.with_context(|| format!("cannot list {}", dir.display()))?;
        out.push((item.file_name().to_string_lossy().into_owned(), item.path()));
    }
    out.sort();
    Ok(out)
}

/// Leaderboard: percent with two decimals; the per-token loss and the reward margin, whose
/// differences are small, with three.
fn leaderboard_format(column: &str) -> FloatFormat {
    let base = column.strip_suffix(rows::STDERR_SUFFIX).unwrap_or(column);
    if base == rows::SFT_LOSS_COLUMN || base == rows::REWARD_MARGIN_COLUMN {
        FloatFormat::Fixed(3)
    } else {
        FloatFormat::Fixed(2)
    }
}

/// Sparsity: shares with two decimals, norms in scientific notation.
fn sparsity_format(column: &str) -> FloatFormat {
    if sparsity::NORM_COLUMNS.contains(&column) {
        FloatFormat::Sci(3)
    } else {
        FloatFormat::Fixed(2)
    }
}

/// Reads `run_dir` and writes the report into `out_dir` (created if needed), every file
/// atomically.
pub fn write_report(run_dir: &Path, out_dir: &Path, opts: &ReportOptions) -> Result<ReportPaths> {
    if opts.bootstrap.resamples < bootstrap::MIN_RESAMPLES {
        bail!(
            "{} bootstrap resamples are too few for a 95% percentile interval (at least {})",
            opts.bootstrap.resamples,
            bootstrap::MIN_RESAMPLES
        );
    }
    let run = RunInputs::load(run_dir)?;
    if run.searches.is_empty()
        && run.evals.is_empty()
        && run.deltas.is_empty()
        && opts.adds.is_empty()
    {
        bail!(
            "nothing to report in {}: no journal.jsonl, searches/*/journal.jsonl, \
             evals/*/results.json or deltas/*.json",
            run_dir.display()
        );
    }
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let mut files = vec![];

    // Leaderboard: full evaluations, then the search's best candidates.
    let specs: Vec<RowSpec> = run.evals.iter().chain(&opts.adds).cloned().collect();
    let pref = rows::run_pref(
        specs
            .iter()
            .map(|s| s.name.as_str())
            .chain(
                run.deltas
                    .iter()
                    .map(|d| if d.label == "ORPO" { "orpo" } else { "dpo" }),
            ),
    );
    let evaluated = rows::evaluated_rows(&specs)?;
    let evidence: Vec<RowEvidence> = evaluated
        .iter()
        .map(RowEvidence::read)
        .collect::<Result<_>>()?;
    let mut board: Vec<rows::LeaderboardRow> = evaluated
        .iter()
        .zip(&evidence)
        .map(|(r, ev)| rows::LeaderboardRow {
            label: r.kind.label(pref),
            docs: r.file.docs,
            scores: r.file.scores.clone(),
            stderrs: ev.stderrs(),
            tax: ev.tax_estimates(),
        })
        .collect();
    let mut uncertainty_notes: Vec<String> = board
        .iter()
        .zip(&evidence)
        .flat_map(|(row, ev)| {
            ev.notes()
                .into_iter()
                .map(move |n| format!("{}: {n}", row.label))
        })
        .collect();
    let candidates: Vec<rows::LeaderboardRow> = run
        .searches
        .iter()
        .flat_map(|search| {
            let mut rows = rows::top_candidates(&search.entries, opts.top_k, pref);
            for row in &mut rows {
                if let Some(name) = &search.name {
                    row.label = format!("{name}: {}", row.label);
                }
                if let Some(f) = &search.screening {
                    row.label = format!("{} [screening: {f}]", row.label);
                }
            }
            rows
        })
        .collect();
    for search in &run.searches {
        let Some(label) = &search.screening else {
            continue;
        };
        uncertainty_notes.push(format!(
            "{} candidates: scored in a screening fidelity ({label}), which ranks candidates but \
             does not give lm-eval's numbers; evaluate a candidate with `paft eval` for a \
             comparable row",
            search.name.as_deref().unwrap_or("search")
        ));
    }
    if !candidates.is_empty() {
        uncertainty_notes.push(
            "search candidates: the journal keeps their scores, not their per-document records"
                .into(),
        );
    }
    let leaderboard_svg = if board.is_empty() {
        None
    } else {
        let svg = bars::leaderboard_svg(&board)?;
        files.push(write_text(out_dir, "leaderboard.svg", &svg)?);
        Some(svg)
    };
    board.extend(candidates);
    let mut df = rows::leaderboard_frame(&board)?;
    let board_cells = tables::with_stderr(
        &tables::cells(&df, &leaderboard_format)?,
        rows::STDERR_SUFFIX,
    );
    // Four decimals: the per-token loss and its stderr need more than the percentages' two.
    files.extend(tables::write_table(
        out_dir,
        "leaderboard",
        &mut df,
        &board_cells,
        Some(4),
    )?);

    // PAFT against its baselines, paired over the same documents.
    let sides: Vec<_> = evaluated.iter().zip(&evidence).collect();
    let verdict_rows = verdicts::verdicts(&sides, pref, &opts.bootstrap);
    let verdict_cells = if verdict_rows.is_empty() {
        None
    } else {
        let cells = verdicts::verdict_cells(&verdict_rows);
        files.extend(tables::write_table(
            out_dir,
            "verdicts",
            &mut verdicts::verdict_frame(&verdict_rows)?,
            &cells,
            None,
        )?);
        Some(cells)
    };
    let pafts: Vec<String> = evaluated
        .iter()
        .filter(|r| matches!(r.kind, rows::RowKind::Paft(_)))
        .map(|r| verdicts::short_name(&r.kind))
        .collect();
    let has_sequential = evaluated
        .iter()
        .any(|r| r.kind == rows::RowKind::Sequential);
    let conclusion = conclusion::conclusion(&verdict_rows, &pafts, has_sequential, pref);
    tracing::info!(
        "leaderboard: {} evaluated model(s), {} search candidate(s)",
        specs.len(),
        board.len() - specs.len()
    );

    // Trajectory and parameters of each search.
    let mut search_views = vec![];
    for search in &run.searches {
        let (view, written) = search_section(search, out_dir, pref)?;
        files.extend(written);
        search_views.push(view);
    }

    let sparsity_cells = if run.deltas.is_empty() {
        None
    } else {
        let mut df = sparsity::sparsity_frame(&run.deltas)?;
        let cells = tables::cells(&df, &sparsity_format)?;
        files.extend(tables::write_table(
            out_dir, "sparsity", &mut df, &cells, None,
        )?);
        Some(cells)
    };

    let stage_cells = if run.stages.is_empty() {
        None
    } else {
        let mut df = stages::stages_frame(&run.stages)?;
        let cells = tables::cells(&df, &|_| FloatFormat::Fixed(1))?;
        files.extend(tables::write_table(
            out_dir, "stages", &mut df, &cells, None,
        )?);
        Some(cells)
    };

    let page = html::render(&html::Page {
        run_name: &run.name,
        conclusion: &conclusion,
        searches: &search_views,
        leaderboard: &board_cells,
        leaderboard_svg: leaderboard_svg.as_deref(),
        uncertainty_notes: &uncertainty_notes,
        verdicts: verdict_cells.as_ref(),
        bootstrap: opts.bootstrap,
        sparsity: sparsity_cells.as_ref(),
        stages: stage_cells.as_ref(),
    });
    let index_html = write_text(out_dir, "index.html", &page)?;
    files.push(index_html.clone());
    Ok(ReportPaths {
        out_dir: out_dir.to_path_buf(),
        index_html,
        files,
        conclusion: conclusion.to_string(),
    })
}

/// One search's trajectory and parameter tables and plots (files suffixed with its name when
/// the run has several), and what the page shows of it.
fn search_section(
    search: &SearchRun,
    out_dir: &Path,
    pref: rows::Pref,
) -> Result<(html::SearchView, Vec<PathBuf>)> {
    let suffix = search.suffix();
    let mut files = vec![];
    let points = search::trajectory(&search.entries, &search.objective_stderrs);
    files.extend(tables::write_data(
        out_dir,
        &format!("trajectory{suffix}"),
        &mut search::trajectory_frame(&points)?,
        None,
    )?);
    let trajectory_svg = plots::trajectory_svg(&points)?;
    files.push(write_text(
        out_dir,
        &format!("trajectory{suffix}.svg"),
        &trajectory_svg,
    )?);
    let params = search::varying_params(&search.entries);
    if !params.is_empty() {
        files.extend(tables::write_data(
            out_dir,
            &format!("params{suffix}"),
            &mut search::params_frame(&params)?,
            None,
        )?);
    }
    let mut stems = BTreeSet::new();
    let mut param_svgs = vec![];
    for (name, points) in &params {
        let svg = plots::param_svg(name, points)?;
        let mut stem = search::file_stem(name);
        while !stems.insert(stem.clone()) {
            stem.push('_');
        }
        files.push(write_text(
            out_dir,
            &format!("param{suffix}_{stem}.svg"),
            &svg,
        )?);
        param_svgs.push((name.clone(), svg));
    }
    tracing::info!(
        "search{}: {} evaluation(s), {} varying parameter(s)",
        search
            .name
            .as_deref()
            .map_or(String::new(), |n| format!(" {n}")),
        search.entries.len(),
        params.len()
    );
    let view = html::SearchView {
        name: search.name.clone(),
        evaluations: search.entries.len(),
        best: best(&search.entries, &search.objective_stderrs, pref),
        objective_stderrs: !search.objective_stderrs.is_empty(),
        trajectory_svg: Some(trajectory_svg),
        param_svgs,
    };
    Ok((view, files))
}

fn write_text(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    write_file_atomic(&path, text.as_bytes())?;
    Ok(path)
}

/// The best candidate on the highest rung (lower rungs score smaller subsets).
fn best(
    entries: &[JournalEntry],
    stderrs: &BTreeMap<usize, f64>,
    pref: rows::Pref,
) -> Option<html::Best> {
    let top = entries.iter().map(|e| e.rung).max()?;
    let e = entries
        .iter()
        .filter(|e| e.rung == top)
        .max_by(|a, b| a.objective.total_cmp(&b.objective))?;
    Some(html::Best {
        objective: e.objective,
        objective_stderr: stderrs.get(&e.index).copied(),
        rung: e.rung,
        docs_per_task: e.docs_per_task,
        label: rows::candidate_label(e, pref),
    })
}
