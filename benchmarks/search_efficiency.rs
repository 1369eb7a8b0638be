//! Search efficiency: an exhaustive grid over a 2-D TIES space (the two weights, densities 0.5)
//! versus each solver, on one frozen subset. For every solver: how many evaluations it needed
//! until its best-so-far came within 0.5 points of the grid's best, as a share of the grid.
//! Scores are cached by candidate key, so a point the grid already scored costs nothing twice
//! (the count is what each solver asked for, cached or not).
//!
//! cargo bench --profile dev --bench search_efficiency -- --base B --sft S --pref P
//!     [--tasks LIST] [--docs N] [--grid N] [--tasks-dir DIR]

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use paft::eval::TaskStore;
use paft::search::{
    minimize, CandidateScorer, MergeInputs, SearchSpace, SolverKind, SolverSettings,
};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let need = |n: &str| arg(&args, n).with_context(|| format!("{n} is required"));
    let tasks = arg(&args, "--tasks").unwrap_or("leaderboard".into());
    let docs: usize = arg(&args, "--docs").unwrap_or("10".into()).parse()?;
    let grid: usize = arg(&args, "--grid").unwrap_or("6".into()).parse()?;
    let tasks_dir = arg(&args, "--tasks-dir")
        .map(Into::into)
        .unwrap_or_else(TaskStore::default_root);
    let space = SearchSpace::from_toml(
        &format!(
            r#"
            [search]
            methods = ["ties"]
            evaluations = {budget}
            grid_points = {grid}
            [params]
            "sft.weight" = {{ low = 0.0, high = 1.5 }}
            "pref.weight" = {{ low = 0.0, high = 1.5 }}
            "sft.density" = 0.5
            "pref.density" = 0.5
            [initial]
            "sft.weight" = 1.0
            "pref.weight" = 1.0
            [subset]
            tasks = "{tasks}"
            docs = {docs}
            "#,
            budget = grid * grid
        ),
        "bench",
    )?;
    let inputs = MergeInputs {
        base: need("--base")?,
        sft: need("--sft")?,
        pref: need("--pref")?,
    };
    let mut scorer = CandidateScorer::new(
        inputs,
        TaskStore::new(tasks_dir),
        &tasks,
        0,
        space.objective.clone(),
        candle_core::Device::Cpu,
        0,
    )?;
    let mut cache: BTreeMap<String, f64> = BTreeMap::new();
    let mut unique_evals = 0usize;
    let mut run = |kind: SolverKind, budget: usize| -> Result<Vec<f64>> {
        let mut trace = vec![];
        let problem = paft::search::Problem {
            continuous: 2,
            categorical: vec![],
            initial: Some(space.initial_unit()),
        };
        let settings = SolverSettings {
            budget,
            seed: 0,
            grid_points: grid,
            swarm_size: 6,
        };
        minimize(kind, &problem, &settings, &mut |c| {
            let cand = space.candidate(&c.choices, &c.x);
            let key = cand.key();
            let v = match cache.get(&key) {
                Some(v) => *v,
                None => {
                    let v = scorer.score(&cand, Some(docs))?.objective;
                    unique_evals += 1;
                    eprintln!("{key}: {v:.3}");
                    cache.insert(key, v);
                    v
                }
            };
            trace.push(v);
            Ok(-v)
        })?;
        Ok(trace)
    };
    let grid_trace = run(SolverKind::Grid, grid * grid)?;
    let best = grid_trace.iter().cloned().fold(f64::MIN, f64::max);
    let n_grid = grid_trace.len();
    println!("{{\"solver\":\"grid\",\"evaluations\":{n_grid},\"best\":{best:.4}}}");
    for kind in [
        SolverKind::NelderMead,
        SolverKind::ParticleSwarm,
        SolverKind::Random,
    ] {
        let trace = run(kind, n_grid)?;
        let mut best_so_far = f64::MIN;
        let hit = trace.iter().position(|&v| {
            best_so_far = best_so_far.max(v);
            best_so_far >= best - 0.5
        });
        let found = trace.iter().cloned().fold(f64::MIN, f64::max);
        println!(
            "{{\"solver\":\"{}\",\"evaluations_to_within_0.5\":{},\"share_of_grid\":{},\"best\":{found:.4},\"asked\":{}}}",
            kind.name(),
            hit.map_or("null".into(), |h| (h + 1).to_string()),
            hit.map_or("null".into(), |h| format!("{:.3}", (h + 1) as f64 / n_grid as f64)),
            trace.len()
        );
    }
    eprintln!("{unique_evals} distinct candidates scored");
    Ok(())
}
