//! The experiment file of `paft run` / `paft parallel` / `paft sequential`: one base model, the
//! SFT run and the preference run (their `paft train` keys), the search space and the final
//! evaluation. Relative paths are relative to the current directory, like every other command.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::cluster::{Executor, ExecutorKind, SlurmConfig};
use crate::train::{Objective, TrainConfig};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    pub name: String,
    /// Base model: HF directory, .gguf or Hub id.
    pub base: String,
    /// Run directory (default `runs/<name>`).
    #[serde(default)]
    pub out: Option<PathBuf>,
    /// Report directory (default `reports/<name>`).
    #[serde(default)]
    pub report: Option<PathBuf>,
    /// CPU threads for the whole experiment (default: all); the parallel stage splits them.
    #[serde(default)]
    pub threads: Option<usize>,
    /// Devices for the two parallel runs (`["cuda:0", "cuda:1"]`); default CPU.
    #[serde(default)]
    pub devices: Vec<String>,
    /// `paft train sft` keys (model and output are set by the experiment).
    pub sft: toml::Table,
    /// Further SFT runs, each `[sft]` with these keys overridden (e.g. a sparse variant with
    /// `l1_lambda`): trained after the parallel stage into `train/sft-<name>/`, evaluated as row
    /// `sft-<name>` and merged with the preference run in every search space. The sequential
    /// baseline trains from `[sft]`.
    #[serde(default)]
    pub sft_variants: std::collections::BTreeMap<String, toml::Table>,
    /// `paft train dpo|orpo` keys plus `objective = "dpo" | "orpo"`.
    pub pref: toml::Table,
    /// Overrides of `pref` for the sequential baseline's preference stage.
    #[serde(default)]
    pub sequential: toml::Table,
    pub search: SearchStage,
    #[serde(default)]
    pub eval: EvalStage,
    /// Held-out SFT loss and preference accuracy/margin for every row of the comparison.
    #[serde(default)]
    pub alignment_tax: Option<crate::eval::alignment_tax::AlignmentTaxSpec>,
    /// Where the stages and the search's candidates run: `local` (default) or `slurm`.
    #[serde(default)]
    pub executor: ExecutorKind,
    /// sbatch settings for `executor = "slurm"` (see `cluster::config`).
    #[serde(default)]
    pub slurm: Option<toml::Table>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchStage {
    /// Search space file (`search-spaces/*.toml`).
    #[serde(default)]
    pub space: Option<PathBuf>,
    /// Several spaces (e.g. TIES and linear), each searched for every SFT: instead of `space`.
    #[serde(default)]
    pub spaces: Vec<PathBuf>,
    #[serde(default)]
    pub solver: Option<crate::search::SolverKind>,
}

impl SearchStage {
    /// The space files, in order.
    pub fn space_files(&self) -> Result<Vec<PathBuf>> {
        match (&self.space, self.spaces.is_empty()) {
            (Some(one), true) => Ok(vec![one.clone()]),
            (None, false) => Ok(self.spaces.clone()),
            (Some(_), false) => bail!("[search] takes `space` or `spaces`, not both"),
            (None, true) => bail!("[search] needs `space` (a search space file) or `spaces`"),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalStage {
    /// Documents per task for the final comparison (stratified sample, seed below); omit for
    /// the full task sets.
    #[serde(default)]
    pub docs: Option<usize>,
    /// Whether each SFT variant is also scored as its own row `sft-<name>` (default true); its
    /// merges are rows either way.
    #[serde(default = "yes")]
    pub sft_variant_rows: bool,
    /// MMLU's documents in total over its 57 subjects, when they should differ from `docs`
    /// (e.g. 285, spread over the 57 subjects by their sizes); default `docs`.
    #[serde(default)]
    pub mmlu_docs: Option<usize>,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub tasks: Option<String>,
}

fn yes() -> bool {
    true
}

impl Default for EvalStage {
    fn default() -> Self {
        Self {
            docs: None,
            sft_variant_rows: true,
            mmlu_docs: None,
            seed: 0,
            tasks: None,
        }
    }
}

impl Experiment {
    /// Reads an experiment file; `{shared}` in it stands for the shared assets directory
    /// (`PAFT_SHARED`, else `../shared`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read experiment {}", path.display()))?;
        Self::from_toml(&crate::paths::expand_shared(&text))
            .with_context(|| format!("invalid experiment {}", path.display()))
    }

    pub fn from_toml(text: &str) -> Result<Self> {
        let e: Experiment = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        if e.name.is_empty() || e.name.contains(['/', '\\']) {
            bail!("`name` must be a plain non-empty name, got `{}`", e.name);
        }
        e.pref_objective()?;
        e.train_config(Stage::Sft)?;
        e.train_config(Stage::Pref)?;
        e.train_config(Stage::SequentialPref)?;
        for name in e.sft_variants.keys() {
            let plain = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !plain {
                bail!("[sft_variants.{name}]: a variant's name must be letters, digits, - or _");
            }
            e.variant_config(name)?;
        }
        e.search.space_files()?;
        if e.eval.mmlu_docs.is_some() && e.eval.docs.is_none() {
            bail!("[eval] mmlu_docs needs `docs` (without it every task is scored in full)");
        }
        if !e.sft_variants.is_empty() && e.executor == ExecutorKind::Slurm {
            bail!(
                "[sft_variants] run locally only for now: executor = \"slurm\" does not train them"
            );
        }
        if let Some(spec) = &e.alignment_tax {
            spec.validate().context("[alignment_tax]")?;
        }
        if e.devices.len() > 2 {
            bail!("`devices` takes at most two devices (SFT, preference)");
        }
        let executor = e.executor()?;
        if !e.devices.is_empty() && executor != Executor::Local {
            bail!(
                "`devices` places the two runs in this process; with executor = \"slurm\" each \
                 training job sees only the GPUs it asked for: set `gres` in [slurm.train] and \
                 `device = \"cuda:0\"` in [sft] and [pref] instead"
            );
        }
        Ok(e)
    }

    /// The executor the experiment asks for, with its `[slurm]` settings.
    pub fn executor(&self) -> Result<Executor> {
        let slurm = self
            .slurm
            .as_ref()
            .map(SlurmConfig::from_table)
            .transpose()?;
        Executor::new(self.executor, slurm)
    }

    pub fn out(&self) -> PathBuf {
        self.out
            .clone()
            .unwrap_or_else(|| PathBuf::from("runs").join(&self.name))
    }

    pub fn report_dir(&self) -> PathBuf {
        self.report
            .clone()
            .unwrap_or_else(|| PathBuf::from("reports").join(&self.name))
    }

    pub fn pref_objective(&self) -> Result<Objective> {
        match self.pref.get("objective").and_then(|v| v.as_str()) {
            Some("dpo") | None => Ok(Objective::Dpo),
            Some("orpo") => Ok(Objective::Orpo),
            Some(other) => bail!("[pref] objective must be `dpo` or `orpo`, got `{other}`"),
        }
    }

    /// The preference row's name (`dpo` or `orpo`), used for directories and labels.
    pub fn pref_name(&self) -> &'static str {
        match self.pref_objective() {
            Ok(Objective::Orpo) => "orpo",
            _ => "dpo",
        }
    }

    /// The `paft train` config of a stage, with the base model and output directory filled in.
    pub fn train_config(&self, stage: Stage) -> Result<TrainConfig> {
        let table = match stage {
            Stage::Sft => self.sft.clone(),
            Stage::Pref => self.pref.clone(),
            Stage::SequentialPref => {
                let mut t = self.pref.clone();
                t.extend(self.sequential.clone());
                t
            }
        };
        self.config_from(table, stage.section(), &stage.dir(self.pref_name()))
    }

    /// The `paft train sft` config of SFT variant `name`: `[sft]` with the variant's keys over
    /// it, trained into `train/sft-<name>/`.
    pub fn variant_config(&self, name: &str) -> Result<TrainConfig> {
        let Some(over) = self.sft_variants.get(name) else {
            bail!("no SFT variant `{name}` in [sft_variants]");
        };
        let mut table = self.sft.clone();
        table.extend(over.clone());
        self.config_from(
            table,
            &format!("sft_variants.{name}"),
            &format!("sft-{name}"),
        )
    }

    fn config_from(&self, mut table: toml::Table, section: &str, dir: &str) -> Result<TrainConfig> {
        table.remove("objective");
        for key in ["model", "output"] {
            if table.contains_key(key) {
                bail!("[{section}] must not set `{key}`: the experiment sets it");
            }
        }
        let out = self.out().join("train").join(dir);
        table.insert("model".into(), toml::Value::String(self.base.clone()));
        table.insert(
            "output".into(),
            toml::Value::String(out.to_string_lossy().into_owned()),
        );
        let json = serde_json::to_value(&table)?;
        let cfg: TrainConfig =
            serde_json::from_value(json).with_context(|| format!("[{section}]"))?;
        cfg.validate().with_context(|| format!("[{section}]"))?;
        Ok(cfg)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Sft,
    Pref,
    SequentialPref,
}

impl Stage {
    pub(crate) fn section(self) -> &'static str {
        match self {
            Stage::Sft => "sft",
            Stage::Pref => "pref",
            Stage::SequentialPref => "sequential",
        }
    }

    pub(crate) fn dir(self, pref: &str) -> String {
        match self {
            Stage::Sft => "sft".into(),
            Stage::Pref => pref.into(),
            Stage::SequentialPref => format!("sequential-{pref}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXP: &str = r#"
        name = "t"
        base = "base-dir"
        [sft]
        dataset = "sft.jsonl"
        max_steps = 4
        [pref]
        objective = "orpo"
        dataset = "pref.jsonl"
        beta = 0.2
        [sequential]
        max_steps = 2
        [search]
        space = "space.toml"
    "#;

    #[test]
    fn stages_get_the_base_and_their_own_outputs() {
        let e = Experiment::from_toml(EXP).unwrap();
        assert_eq!(e.pref_objective().unwrap(), Objective::Orpo);
        let sft = e.train_config(Stage::Sft).unwrap();
        assert_eq!(sft.model, "base-dir");
        assert_eq!(sft.output, Path::new("runs/t/train/sft"));
        let seq = e.train_config(Stage::SequentialPref).unwrap();
        assert_eq!((seq.max_steps, seq.beta), (2, 0.2));
        assert_eq!(seq.output, Path::new("runs/t/train/sequential-orpo"));
    }

    #[test]
    fn the_executor_and_its_table_are_read_and_checked() {
        let with = |top: &str, tail: &str| {
            let text = EXP.replacen("name = \"t\"", &format!("name = \"t\"\n{top}"), 1);
            Experiment::from_toml(&format!("{text}\n{tail}"))
        };
        let e = with(
            "executor = \"slurm\"",
            "[slurm]\nretries = 3\n[slurm.train]\ngres = \"gpu:1\"",
        )
        .unwrap();
        match e.executor().unwrap() {
            Executor::Slurm(cfg) => {
                assert_eq!((cfg.retries, cfg.train.gres.as_deref()), (3, Some("gpu:1")))
            }
            Executor::Local => panic!("local"),
        }
        assert_eq!(with("", "").unwrap().executor().unwrap(), Executor::Local);
        let err = |top: &str, tail: &str| format!("{:#}", with(top, tail).unwrap_err());
        assert!(err("", "[slurm]\nretries = 1").contains("executor is \"local\""));
        assert!(err("executor = \"slurm\"", "[slurm]\nqueue = \"x\"").contains("queue"));
        assert!(err("executor = \"k8s\"", "").contains("k8s"));
        let devices = err(
            "executor = \"slurm\"\ndevices = [\"cuda:0\", \"cuda:1\"]",
            "",
        );
        assert!(devices.contains("gres"), "{devices}");
    }

    #[test]
    fn variants_and_spaces_are_read_and_checked() {
        let e = Experiment::from_toml(EXP).unwrap();
        assert!(e.eval.sft_variant_rows && e.sft_variants.is_empty());
        let with_variant = EXP.replace(
            "[pref]",
            "[sft_variants.sparse]\nl1_lambda = 1e-4\nmax_steps = 3\n[pref]",
        );
        let e = Experiment::from_toml(&format!("{with_variant}\n[eval]\nsft_variant_rows = false"))
            .unwrap();
        assert!(!e.eval.sft_variant_rows);
        let v = e.variant_config("sparse").unwrap();
        assert_eq!((v.max_steps, v.l1_lambda), (3, 1e-4));
        assert_eq!(v.output, Path::new("runs/t/train/sft-sparse"));
        assert_eq!(v.dataset, e.train_config(Stage::Sft).unwrap().dataset);
        let err = |text: &str| format!("{:#}", Experiment::from_toml(text).unwrap_err());
        let bad = with_variant.replace("l1_lambda", "l1_lamda");
        assert!(err(&bad).contains("[sft_variants.sparse]"), "{}", err(&bad));
        let both = EXP.replace("space = \"space.toml\"", "space = \"a\"\nspaces = [\"b\"]");
        assert!(err(&both).contains("not both"));
        let none = EXP.replace("space = \"space.toml\"", "");
        assert!(err(&none).contains("needs `space`"));
        let mmlu = format!("{EXP}\n[eval]\nmmlu_docs = 285");
        assert!(err(&mmlu).contains("mmlu_docs needs `docs`"));
    }

    #[test]
    fn bad_experiments_name_the_section() {
        let err = |from: &str, to: &str| {
            format!(
                "{:#}",
                Experiment::from_toml(&EXP.replace(from, to)).unwrap_err()
            )
        };
        assert!(err("beta = 0.2", "betta = 0.2").contains("[pref]"));
        assert!(err("max_steps = 4", "model = \"x\"").contains("must not set `model`"));
        assert!(err("\"orpo\"", "\"ppo\"").contains("objective"));
    }
}
