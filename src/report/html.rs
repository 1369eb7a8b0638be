//! `index.html`: one self-contained page (inline CSS, inline SVG, no scripts, nothing fetched), so
//! it can be mailed, archived or opened from a file system without its neighbours.

use super::bootstrap::BootstrapSettings;
use super::tables::Cells;

/// The search's best candidate, as the header states it.
#[derive(Debug, Clone, PartialEq)]
pub struct Best {
    pub objective: f64,
    pub objective_stderr: Option<f64>,
    pub rung: usize,
    pub docs_per_task: Option<usize>,
    pub label: String,
}

/// One search of the run: its journal's size, best candidate, trajectory and parameter plots.
pub struct SearchView {
    /// `None` for a run with one search (`journal.jsonl`), else `searches/<name>`.
    pub name: Option<String>,
    pub evaluations: usize,
    pub best: Option<Best>,
    /// Whether the journal carries `objective_stderr`.
    pub objective_stderrs: bool,
    pub trajectory_svg: Option<String>,
    /// (parameter, SVG)
    pub param_svgs: Vec<(String, String)>,
}

/// Everything the page shows; absent parts leave a one-line note instead.
pub struct Page<'a> {
    pub run_name: &'a str,
    /// What the run can and cannot conclude, first thing on the page.
    pub conclusion: &'a str,
    pub searches: &'a [SearchView],
    pub leaderboard: &'a Cells,
    pub leaderboard_svg: Option<&'a str>,
    /// Why some ± are unavailable, one line per row (or benchmark).
    pub uncertainty_notes: &'a [String],
    pub verdicts: Option<&'a Cells>,
    pub bootstrap: BootstrapSettings,
    pub sparsity: Option<&'a Cells>,
    /// Minutes per `paft run` stage (`stages/*.done`).
    pub stages: Option<&'a Cells>,
}

pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const CSS: &str = "
body { font-family: system-ui, -apple-system, 'Segoe UI', Roboto, 'DejaVu Sans', sans-serif;
       margin: 2rem auto; max-width: 1200px; padding: 0 1rem; color: #1f2328; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; }
h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #d0d7de; padding-bottom: .2rem; }
p.meta { color: #57606a; margin-top: 0; }
p.conclusion { font-size: 1.05rem; background: #f6f8fa; border-left: 4px solid #0969da;
               padding: .6rem .9rem; }
ul.note { color: #57606a; font-size: .85rem; }
p.note { color: #57606a; font-size: .85rem; }
table { border-collapse: collapse; font-size: .9rem; }
th, td { border: 1px solid #d0d7de; padding: .3rem .6rem; }
th { background: #f6f8fa; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
div.table { overflow-x: auto; }
tr:nth-child(even) td { background: #fbfcfd; }
.plot svg { max-width: 100%; height: auto; border: 1px solid #d0d7de; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(480px, 1fr)); gap: 1rem; }
.plots .plot svg { width: 100%; }
";

fn table(c: &Cells) -> String {
    let mut s = String::from("<div class=\"table\"><table>\n<thead><tr>");
    for h in &c.header {
        s += &format!("<th>{}</th>", escape(h));
    }
    s += "</tr></thead>\n<tbody>\n";
    for row in &c.rows {
        s += "<tr>";
        for (j, cell) in row.iter().enumerate() {
            let class = if c.numeric[j] { " class=\"num\"" } else { "" };
            s += &format!("<td{class}>{}</td>", escape(cell));
        }
        s += "</tr>\n";
    }
    s + "</tbody>\n</table></div>\n"
}

/// Inline SVG without an XML declaration (not allowed inside HTML).
fn inline_svg(svg: &str) -> &str {
    match svg.find("<svg") {
        Some(i) => &svg[i..],
        None => svg,
    }
}

/// The line under the title: the journal's size and its best candidate.
fn search_meta(s: &SearchView) -> String {
    let best = match &s.best {
        Some(b) => format!(
            "best objective {:.2}{} (rung {}, {}): {}",
            b.objective,
            b.objective_stderr
                .map_or(String::new(), |se| format!(" ± {se:.2}")),
            b.rung,
            b.docs_per_task
                .map_or("full tasks".to_string(), |n| format!("{n} docs/task")),
            escape(&b.label)
        ),
        None => "no search evaluations yet".into(),
    };
    let of = s
        .name
        .as_ref()
        .map_or(String::new(), |n| format!("search {}: ", escape(n)));
    format!(
        "{of}{} evaluation{} in the search journal; {best}",
        s.evaluations,
        if s.evaluations == 1 { "" } else { "s" }
    )
}

/// A search's trajectory and parameter plots (headed by its name when the run has several).
fn search_body(s: &SearchView) -> String {
    let mut body = String::new();
    if let Some(name) = &s.name {
        body += &format!("<h3>Search {}</h3>\n", escape(name));
    }
    match &s.trajectory_svg {
        Some(svg) => {
            body += &format!("<div class=\"plot\">{}</div>\n", inline_svg(svg));
            body += if s.objective_stderrs {
                "<p class=\"note\">Shaded: each rung's best ± 1.96·stderr. Hollow circles: \
                 candidates within 1.96·√(se_best² + se²) of their rung's best, not \
                 distinguishable from it on this subset.</p>\n"
            } else {
                "<p class=\"note\">The journal carries no objective_stderr, so candidates \
                 cannot be told apart from noise here: a small step in the best-so-far line may \
                 be document noise rather than a better merge.</p>\n"
            };
        }
        None => body += "<p class=\"note\">No journal.jsonl in this run.</p>\n",
    }
    if s.name.is_none() {
        body += "<h2>Objective vs searched parameters</h2>\n";
    }
    if s.param_svgs.is_empty() {
        body += "<p class=\"note\">No parameter varied across the journal.</p>\n";
    } else {
        body += "<div class=\"plots\">\n";
        for (name, svg) in &s.param_svgs {
            body += &format!(
                "<div class=\"plot\" title=\"{}\">{}</div>\n",
                escape(name),
                inline_svg(svg)
            );
        }
        body += "</div>\n";
    }
    body
}

pub fn render(p: &Page) -> String {
    let mut body = format!("<h1>PAFT report: {}</h1>\n", escape(p.run_name));
    body += &format!(
        "<p class=\"conclusion\" id=\"conclusion\">{}</p>\n",
        escape(p.conclusion)
    );
    if p.searches.is_empty() {
        body += "<p class=\"meta\">0 evaluations in the search journal; no search evaluations \
                 yet</p>\n";
    }
    for search in p.searches {
        body += &format!("<p class=\"meta\">{}</p>\n", search_meta(search));
    }

    body += "<h2>Leaderboard</h2>\n";
    if p.leaderboard.rows.is_empty() {
        body += "<p class=\"note\">No evaluations found (evals/*/results.json, --add).</p>\n";
    } else {
        body += &table(p.leaderboard);
        body += "<p class=\"note\">Open LLM Leaderboard headline metrics in percent (ARC \
                 acc_norm 25-shot, HellaSwag acc_norm 10-shot, MMLU acc 5-shot mean over \
                 subjects, TruthfulQA mc2 0-shot, Winogrande acc 5-shot, GSM8K strict exact \
                 match 5-shot); Average is their mean when all six are present. docs/task: \
                 the subset each row was scored on (full = complete task sets); search \
                 candidates on subsets are not directly comparable with full rows. \
                 <b>±</b> is the standard error from the row's per-document records \
                 (sample standard deviation / √n, as lm-eval; MMLU: √(Σ se²) / k over its k \
                 subjects; Average: √(Σ se²) / 6); value ± 1.96·se is a 95% interval for one \
                 row alone. Two rows scored on the same documents are compared in the verdict \
                 table below, not by overlapping ±. Held-out SFT loss is nats per token (lower \
                 is better; ± by the delta method for a ratio of sums); preference accuracy is \
                 the percent of pairs whose chosen answer gets a strictly higher reward; reward \
                 margin is the mean chosen − rejected reward.</p>\n";
        if !p.uncertainty_notes.is_empty() {
            body += "<p class=\"note\">± n/a: no uncertainty can be given for</p>\n<ul class=\"note\">\n";
            for n in p.uncertainty_notes {
                body += &format!("<li>{}</li>\n", escape(n));
            }
            body += "</ul>\n";
        }
    }
    if let Some(svg) = p.leaderboard_svg {
        body += &format!(
            "<div class=\"plot\" id=\"leaderboard-plot\">{}</div>\n",
            inline_svg(svg)
        );
    }

    body += "<h2 id=\"verdicts\">Verdicts: PAFT against its baselines</h2>\n";
    match p.verdicts {
        Some(c) => {
            body += &table(c);
            body += &format!(
                "<p class=\"note\">Difference = first row − second row (percentage points for \
                 the benchmarks, the average and preference accuracy; nats per token for the \
                 SFT loss; reward units for the margin). 95% interval: paired bootstrap over \
                 documents — {} resamples of each task's documents with replacement (MMLU \
                 within each subject, so the mean over subjects keeps its structure), both rows \
                 scored on the same drawn documents, seed {}; the 2.5th and 97.5th percentiles \
                 of the resampled differences. A verdict names a winner only when the interval \
                 excludes 0 and rests on at least {} documents of every benchmark (fewer: \
                 <b>too few documents</b>, as the percentile bootstrap under-covers on small \
                 samples); <b>not distinguishable</b> is the honest outcome of a small \
                 document budget, not evidence that the two are equal. The interval covers the \
                 choice of documents, not of training seeds.</p>\n",
                p.bootstrap.resamples,
                p.bootstrap.seed,
                super::verdicts::MIN_ITEMS_FOR_VERDICT
            );
        }
        None => {
            body += "<p class=\"note\">No pair to compare: the table needs evals/paft with \
                     evals/sequential, evals/sft or evals/dpo|orpo, or evals/sequential with \
                     evals/base.</p>\n"
        }
    }

    body += "<h2>Search trajectory</h2>\n";
    if p.searches.is_empty() {
        body += "<p class=\"note\">No journal.jsonl in this run.</p>\n";
        body += "<h2>Objective vs searched parameters</h2>\n";
        body += "<p class=\"note\">No parameter varied across the journal.</p>\n";
    }
    for search in p.searches {
        body += &search_body(search);
    }

    body += "<h2>Delta sparsity</h2>\n";
    match p.sparsity {
        Some(c) => {
            body += &table(c);
            body += "<p class=\"note\">Task vectors δ = fine-tuned − base over all tensors \
                     (part all), and for LoRA adapters the A and B factors: share of entries \
                     exactly zero, below 1e-6, below 1e-4 and below 1% of the tensor's max \
                     |δ|; L1 and L2 norms. The claim to check against it: PAFT (arXiv \
                     2406.17923) finds that preference alignment yields a sparse delta while SFT \
                     yields a dense one, which must be sparsified (L1 during SFT) before \
                     merging.</p>\n";
        }
        None => {
            body += "<p class=\"note\">No deltas/sft.json or deltas/dpo.json \
                         (<code>paft inspect-delta --json</code>).</p>\n"
        }
    }

    if let Some(c) = p.stages {
        body += "<h2>Wall time per stage</h2>\n";
        body += &table(c);
        body += "<p class=\"note\">Minutes each <code>paft run</code> stage took in the run \
                 that finished it (a stage resumed after an interruption counts its last part \
                 only).</p>\n";
    }

    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>PAFT report: {}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}</body>\n</html>\n",
        escape(p.run_name)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_is_self_contained_and_escaped() {
        let lb = Cells {
            header: vec!["Model".into(), "ARC".into()],
            rows: vec![vec!["<b>".into(), "1.00".into()]],
            numeric: vec![false, true],
        };
        let svg = "<?xml version=\"1.0\"?><svg></svg>".to_string();
        let params = [("sft.weight".to_string(), svg.clone())];
        let notes = ["SFT: no samples".to_string()];
        let search = SearchView {
            name: None,
            evaluations: 1,
            best: None,
            objective_stderrs: false,
            trajectory_svg: Some(svg.clone()),
            param_svgs: params.to_vec(),
        };
        let html = render(&Page {
            run_name: "run & co",
            conclusion: "PAFT − sequential <is> fine",
            searches: std::slice::from_ref(&search),
            leaderboard: &lb,
            leaderboard_svg: Some(&svg),
            uncertainty_notes: &notes,
            verdicts: Some(&lb),
            bootstrap: BootstrapSettings::default(),
            sparsity: None,
            stages: None,
        });
        assert!(html.contains("run &amp; co") && html.contains("&lt;b&gt;"));
        assert!(html.contains("sequential &lt;is&gt; fine"));
        assert!(html.contains("<li>SFT: no samples</li>") && html.contains("seed 1234"));
        assert!(!html.contains("<?xml") && html.matches("<svg").count() == 3);
        assert!(!html.contains("<script") && !html.contains("src=") && !html.contains("href="));
        assert!(html.contains("<td class=\"num\">1.00</td>"));
    }
}
