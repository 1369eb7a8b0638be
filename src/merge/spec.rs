//! One declarative record per merge method, as mergekit 0.1.5's registry declares them: the name,
//! the reference, how the base model takes part, how many models it merges, and every parameter
//! it reads with its default and domain. The YAML reader (`config`), the merge (`methods`) and the
//! search space (`search::space`) all read these records; a method is one entry of [`SPECS`]
//! plus, when it is not a task-arithmetic variant, its per-tensor formula.

use anyhow::{bail, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MergeMethod {
    Linear,
    TaskArithmetic,
    Ties,
    DareTies,
    DareLinear,
    Breadcrumbs,
    BreadcrumbsTies,
    Della,
    DellaLinear,
    Slerp,
    ModelStock,
    Sce,
    Nuslerp,
    Multislerp,
    Karcher,
    Nearswap,
    Ram,
    RamplusTl,
    ArceeFusion,
    Passthrough,
}

/// Sparsifier family of a task-arithmetic method (mergekit's `SparsificationMethod`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pruning {
    None,
    Magnitude,
    Random,
    Breadcrumbs,
    Della,
}

/// How a method turns its inputs into one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Algorithm {
    /// mergekit's generalized task arithmetic: δᵢ = θᵢ − θ₀, sparsified, weighted, optionally
    /// sign-elected, mixed and added back onto the base.
    TaskArithmetic { pruning: Pruning, consensus: bool },
    /// A formula of its own, dispatched on the method in `methods::merge_tensor`.
    Own,
}

/// What the `base_model` is to a method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BaseRole {
    /// θ₀ of the formula; the config must name one.
    Required,
    /// θ₀ when given (the formula then works on task vectors), else the models are merged as is.
    Optional,
    /// Not special: when given it is one more input, merged like the others (mergekit adds a base
    /// missing from `models:` to the inputs, so linear then wants its weight and karcher averages
    /// it in).
    Input,
}

/// A parameter's default, as mergekit declares it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum ParamDefault {
    /// Must be given (mergekit: `required=True`).
    Required,
    Number(f64),
    Bool(bool),
    Text(&'static str),
    /// No value unless given (mergekit's `default_value=None`).
    Unset,
}

/// The values a parameter may take (checked when the config is read).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Domain {
    /// Any finite number.
    Real,
    /// [0, 1].
    Unit,
    /// [0, 1).
    UnitOpen,
    /// [0, ∞).
    NonNegative,
    /// A whole number ≥ 0.
    Count,
    /// true / false.
    Flag,
    /// One of these strings (`rescale` also takes a flag).
    Choice(&'static [&'static str]),
    /// Read by mergekit but without numeric effect (`int8_mask`: the dtype of a 0/1 mask).
    NoEffect,
}

impl Domain {
    /// The closed interval of numbers the domain allows (for numeric domains).
    pub(crate) fn interval(self) -> (f64, f64) {
        match self {
            Self::Unit => (0.0, 1.0),
            Self::UnitOpen => (0.0, 0.999_999),
            Self::NonNegative | Self::Count => (0.0, f64::INFINITY),
            _ => (f64::NEG_INFINITY, f64::INFINITY),
        }
    }

    pub(crate) fn is_numeric(self) -> bool {
        matches!(
            self,
            Self::Real | Self::Unit | Self::UnitOpen | Self::NonNegative | Self::Count
        )
    }

    /// Whether `x` is allowed (numbers; a flag's 0/1 is checked where it is read).
    pub(crate) fn admits(self, x: f64) -> bool {
        let (lo, hi) = self.interval();
        match self {
            Self::UnitOpen => (0.0..1.0).contains(&x),
            Self::Count => x >= 0.0 && x.fract() == 0.0,
            _ => x >= lo && x <= hi,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct ParamSpec {
    pub name: &'static str,
    pub default: ParamDefault,
    pub domain: Domain,
}

const fn p(name: &'static str, default: ParamDefault, domain: Domain) -> ParamSpec {
    ParamSpec {
        name,
        default,
        domain,
    }
}

/// One merge method.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MethodSpec {
    pub method: MergeMethod,
    /// mergekit's `merge_method` name.
    pub name: &'static str,
    pub pretty_name: &'static str,
    pub reference: &'static str,
    pub algorithm: Algorithm,
    pub base: BaseRole,
    /// How many models it merges besides a `Required`/`Optional` base: at least, at most.
    pub models: (usize, Option<usize>),
    /// Read from the top-level `parameters`.
    pub global: &'static [ParamSpec],
    /// Read per model (`models[i].parameters`, falling back to the top-level `parameters`).
    pub per_model: &'static [ParamSpec],
    /// Whether `paft search` may name it: it merges the two task vectors (SFT and preference)
    /// onto the base, which is what a PAFT candidate is.
    pub searchable: bool,
}

const SUM_COUNT: &[&str] = &["sum", "count"];
const RESCALE: &[&str] = &["l1", "exact"];
const WEIGHT: ParamSpec = p("weight", ParamDefault::Required, Domain::Real);
const DENSITY: ParamSpec = p("density", ParamDefault::Number(1.0), Domain::Unit);
const GAMMA: ParamSpec = p("gamma", ParamDefault::Number(0.01), Domain::UnitOpen);
const DELLA_EPSILON: ParamSpec = p("epsilon", ParamDefault::Number(0.15), Domain::UnitOpen);
const INT8_MASK: ParamSpec = p("int8_mask", ParamDefault::Bool(false), Domain::NoEffect);
const LAMBDA: ParamSpec = p("lambda", ParamDefault::Number(1.0), Domain::Real);
/// paft's extension of the sign election (mergekit fixes `sum`).
const SIGN_RULE: ParamSpec = p(
    "sign_rule",
    ParamDefault::Text("sum"),
    Domain::Choice(SUM_COUNT),
);
const RAM_EPSILON: ParamSpec = p("epsilon", ParamDefault::Number(1e-5), Domain::NonNegative);

/// mergekit's generalized task arithmetic globals for the given `normalize`/`rescale` defaults;
/// the consensus variants also read paft's `sign_rule`.
macro_rules! gta_globals {
    ($normalize:expr, $rescale:expr) => {
        &[
            INT8_MASK,
            p("normalize", ParamDefault::Bool($normalize), Domain::Flag),
            p(
                "rescale",
                ParamDefault::Bool($rescale),
                Domain::Choice(RESCALE),
            ),
            LAMBDA,
        ]
    };
    ($normalize:expr, $rescale:expr, consensus) => {
        &[
            INT8_MASK,
            p("normalize", ParamDefault::Bool($normalize), Domain::Flag),
            p(
                "rescale",
                ParamDefault::Bool($rescale),
                Domain::Choice(RESCALE),
            ),
            LAMBDA,
            SIGN_RULE,
        ]
    };
}

/// What every generalized task-arithmetic record shares; each fills in the rest.
const GTA: MethodSpec = MethodSpec {
    method: MergeMethod::TaskArithmetic,
    name: "",
    pretty_name: "",
    reference: "",
    algorithm: Algorithm::TaskArithmetic {
        pruning: Pruning::None,
        consensus: false,
    },
    base: BaseRole::Required,
    models: (1, None),
    global: &[],
    per_model: &[],
    searchable: true,
};

/// Indexed by `MergeMethod as usize` (checked by a test).
pub(crate) const SPECS: [MethodSpec; 20] = [
    MethodSpec {
        method: MergeMethod::Linear,
        name: "linear",
        pretty_name: "Linear",
        reference: "https://arxiv.org/abs/2203.05482",
        algorithm: Algorithm::Own,
        base: BaseRole::Input,
        models: (1, None),
        global: &[p("normalize", ParamDefault::Bool(true), Domain::Flag)],
        per_model: &[WEIGHT],
        searchable: true,
    },
    MethodSpec {
        method: MergeMethod::TaskArithmetic,
        name: "task_arithmetic",
        pretty_name: "Task Arithmetic",
        reference: "https://arxiv.org/abs/2212.04089",
        algorithm: Algorithm::TaskArithmetic {
            pruning: Pruning::None,
            consensus: false,
        },
        global: gta_globals!(false, false),
        // mergekit declares `density` for every GTA method, but without a sparsifier it has no
        // effect: left out, so a `density` here is reported as unread.
        per_model: &[WEIGHT],
        ..GTA
    },
    MethodSpec {
        method: MergeMethod::Ties,
        name: "ties",
        pretty_name: "TIES",
        reference: "https://arxiv.org/abs/2306.01708",
        algorithm: Algorithm::TaskArithmetic {
            pruning: Pruning::Magnitude,
            consensus: true,
        },
        global: gta_globals!(true, false, consensus),
        per_model: &[WEIGHT, DENSITY],
        ..GTA
    },
    MethodSpec {
        method: MergeMethod::DareTies,
        name: "dare_ties",
        pretty_name: "DARE TIES",
        reference: "https://arxiv.org/abs/2311.03099",
        algorithm: Algorithm::TaskArithmetic {
            pruning: Pruning::Random,
            consensus: true,
        },
        global: gta_globals!(false, true, consensus),
        per_model: &[WEIGHT, DENSITY],
        ..GTA
    },
    MethodSpec {
        method: MergeMethod::DareLinear,
        name: "dare_linear",
        pretty_name: "Linear DARE",
        reference: "https://arxiv.org/abs/2311.03099",
        algorithm: Algorithm::TaskArithmetic {
            pruning: Pruning::Random,
            consensus: false,
        },
        global: gta_globals!(false, true),
        per_model: &[WEIGHT, DENSITY],
        ..GTA
    },
    MethodSpec {
        method: MergeMethod::Breadcrumbs,
        name: "breadcrumbs",
        pretty_name: "Model Breadcrumbs",
        reference: "https://arxiv.org/abs/2312.06795",
        algorithm: Algorithm::TaskArithmetic {
            pruning: Pruning::Breadcrumbs,
            consensus: false,
        },
        global: gta_globals!(false, false),
        per_model: &[WEIGHT, DENSITY, GAMMA],
        ..GTA
    },
    MethodSpec {
        method: MergeMethod::BreadcrumbsTies,
        name: "breadcrumbs_ties",
        pretty_name: "Model Breadcrumbs with TIES",
        reference: "https://arxiv.org/abs/2312.06795",
        algorithm: Algorithm::TaskArithmetic {
            pruning: Pruning::Breadcrumbs,
            consensus: true,
        },
        global: gta_globals!(false, false, consensus),
        per_model: &[WEIGHT, DENSITY, GAMMA],
        ..GTA
    },
    MethodSpec {
        method: MergeMethod::Della,
        name: "della",
        pretty_name: "DELLA",
        reference: "https://arxiv.org/abs/2406.11617",
        algorithm: Algorithm::TaskArithmetic {
            pruning: Pruning::Della,
            consensus: true,
        },
        global: gta_globals!(true, true, consensus),
        per_model: &[WEIGHT, DENSITY, DELLA_EPSILON],
        ..GTA
    },
    MethodSpec {
        method: MergeMethod::DellaLinear,
        name: "della_linear",
        pretty_name: "Linear DELLA",
        reference: "https://arxiv.org/abs/2406.11617",
        algorithm: Algorithm::TaskArithmetic {
            pruning: Pruning::Della,
            consensus: false,
        },
        global: gta_globals!(false, true),
        per_model: &[WEIGHT, DENSITY, DELLA_EPSILON],
        ..GTA
    },
    MethodSpec {
        method: MergeMethod::Slerp,
        name: "slerp",
        pretty_name: "SLERP",
        reference: "https://en.wikipedia.org/wiki/Slerp",
        algorithm: Algorithm::Own,
        base: BaseRole::Required,
        models: (1, Some(1)),
        global: &[p("t", ParamDefault::Required, Domain::Unit)],
        per_model: &[],
        searchable: false,
    },
    MethodSpec {
        method: MergeMethod::ModelStock,
        name: "model_stock",
        pretty_name: "Model Stock",
        reference: "https://arxiv.org/abs/2403.19522",
        algorithm: Algorithm::Own,
        base: BaseRole::Required,
        models: (2, None),
        global: &[p("filter_wise", ParamDefault::Bool(false), Domain::Flag)],
        per_model: &[],
        searchable: false,
    },
    MethodSpec {
        method: MergeMethod::Sce,
        name: "sce",
        pretty_name: "SCE",
        reference: "https://arxiv.org/abs/2408.07990",
        algorithm: Algorithm::Own,
        base: BaseRole::Required,
        models: (1, None),
        global: &[
            INT8_MASK,
            p("select_topk", ParamDefault::Number(1.0), Domain::Unit),
        ],
        per_model: &[],
        searchable: true,
    },
    MethodSpec {
        method: MergeMethod::Nuslerp,
        name: "nuslerp",
        pretty_name: "NuSLERP",
        reference: "https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
        algorithm: Algorithm::Own,
        base: BaseRole::Optional,
        models: (2, Some(2)),
        global: &[
            p("nuslerp_row_wise", ParamDefault::Bool(false), Domain::Flag),
            p("nuslerp_flatten", ParamDefault::Bool(true), Domain::Flag),
        ],
        per_model: &[WEIGHT],
        searchable: true,
    },
    MethodSpec {
        method: MergeMethod::Multislerp,
        name: "multislerp",
        pretty_name: "Multi-SLERP",
        reference: "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
        algorithm: Algorithm::Own,
        base: BaseRole::Optional,
        models: (1, None),
        global: &[
            p("normalize_weights", ParamDefault::Bool(true), Domain::Flag),
            p("eps", ParamDefault::Number(1e-8), Domain::NonNegative),
        ],
        per_model: &[WEIGHT],
        searchable: true,
    },
    MethodSpec {
        method: MergeMethod::Karcher,
        name: "karcher",
        pretty_name: "Karcher Mean",
        reference: "https://arxiv.org/abs/2603.04972",
        algorithm: Algorithm::Own,
        base: BaseRole::Input,
        models: (1, None),
        global: &[
            p("max_iter", ParamDefault::Number(10.0), Domain::Count),
            p("tol", ParamDefault::Number(1e-5), Domain::NonNegative),
        ],
        per_model: &[],
        searchable: false,
    },
    MethodSpec {
        method: MergeMethod::Nearswap,
        name: "nearswap",
        pretty_name: "NearSwap",
        reference: "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
        algorithm: Algorithm::Own,
        base: BaseRole::Required,
        models: (1, Some(1)),
        global: &[p("t", ParamDefault::Required, Domain::NonNegative)],
        per_model: &[],
        searchable: false,
    },
    MethodSpec {
        method: MergeMethod::Ram,
        name: "ram",
        pretty_name: "Reinforced Agent Merging",
        reference: "https://arxiv.org/abs/2601.13572",
        algorithm: Algorithm::Own,
        base: BaseRole::Required,
        models: (1, None),
        global: &[RAM_EPSILON],
        per_model: &[],
        searchable: true,
    },
    MethodSpec {
        method: MergeMethod::RamplusTl,
        name: "ramplus_tl",
        pretty_name: "Reinforced Agent Merging Plus (Tensor-Local)",
        reference: "https://arxiv.org/abs/2601.13572",
        algorithm: Algorithm::Own,
        base: BaseRole::Required,
        models: (1, None),
        global: &[
            p("r", ParamDefault::Number(0.1), Domain::Real),
            p("alpha", ParamDefault::Number(0.2), Domain::Real),
            RAM_EPSILON,
        ],
        per_model: &[],
        searchable: true,
    },
    MethodSpec {
        method: MergeMethod::ArceeFusion,
        name: "arcee_fusion",
        pretty_name: "Arcee Fusion",
        reference: "https://arcee.ai",
        algorithm: Algorithm::Own,
        base: BaseRole::Required,
        models: (1, Some(1)),
        global: &[],
        per_model: &[],
        searchable: false,
    },
    MethodSpec {
        method: MergeMethod::Passthrough,
        name: "passthrough",
        pretty_name: "Passthrough",
        reference: "https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
        algorithm: Algorithm::Own,
        base: BaseRole::Input,
        models: (1, Some(1)),
        global: &[],
        per_model: &[p("scale", ParamDefault::Unset, Domain::Real)],
        searchable: false,
    },
];

impl MergeMethod {
    pub(crate) fn spec(self) -> &'static MethodSpec {
        &SPECS[self as usize]
    }

    pub fn all() -> impl Iterator<Item = MergeMethod> {
        SPECS.iter().map(|s| s.method)
    }

    pub fn name(self) -> &'static str {
        self.spec().name
    }

    /// mergekit's display name (model cards, logs).
    pub fn pretty_name(self) -> &'static str {
        self.spec().pretty_name
    }

    /// Where the method is described.
    pub fn reference(self) -> &'static str {
        self.spec().reference
    }

    pub fn parse(name: &str) -> Result<Self> {
        match SPECS.iter().find(|s| s.name == name) {
            Some(s) => Ok(s.method),
            None => bail!(
                "unknown merge_method `{name}` (known: {})",
                SPECS.map(|s| s.name).join(", ")
            ),
        }
    }

    /// Whether the base is θ₀ of the formula when the config names one (it is then passed
    /// apart from the models, never merged as one of them).
    pub fn uses_base(self) -> bool {
        matches!(self.spec().base, BaseRole::Required | BaseRole::Optional)
    }

    pub fn needs_base(self) -> bool {
        self.spec().base == BaseRole::Required
    }

    pub fn searchable(self) -> bool {
        self.spec().searchable
    }

    pub(crate) fn global_param(self, name: &str) -> Option<&'static ParamSpec> {
        self.spec().global.iter().find(|p| p.name == name)
    }

    pub(crate) fn model_param(self, name: &str) -> Option<&'static ParamSpec> {
        self.spec().per_model.iter().find(|p| p.name == name)
    }

    /// mergekit's default of a flag parameter the method reads (None when it does not read it).
    pub fn default_flag(self, name: &str) -> Option<bool> {
        match self.global_param(name)?.default {
            ParamDefault::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// Names of the global parameters the method reads.
    pub fn global_params(self) -> Vec<&'static str> {
        self.spec().global.iter().map(|p| p.name).collect()
    }

    /// Names of the per-model parameters the method reads.
    pub fn tensor_params(self) -> Vec<&'static str> {
        self.spec().per_model.iter().map(|p| p.name).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_are_indexed_by_method_and_named_uniquely() {
        for (i, s) in SPECS.iter().enumerate() {
            assert_eq!(s.method as usize, i, "{} out of place", s.name);
            assert_eq!(MergeMethod::parse(s.name).unwrap(), s.method);
        }
        let mut names: Vec<_> = SPECS.iter().map(|s| s.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), SPECS.len());
    }

    #[test]
    fn mergekit_defaults_of_the_task_arithmetic_family() {
        // registry.py: (normalize, rescale) defaults per method.
        for (m, normalize, rescale) in [
            (MergeMethod::TaskArithmetic, false, false),
            (MergeMethod::Ties, true, false),
            (MergeMethod::DareTies, false, true),
            (MergeMethod::DareLinear, false, true),
            (MergeMethod::Breadcrumbs, false, false),
            (MergeMethod::BreadcrumbsTies, false, false),
            (MergeMethod::Della, true, true),
            (MergeMethod::DellaLinear, false, true),
        ] {
            assert_eq!(m.default_flag("normalize"), Some(normalize), "{}", m.name());
            assert_eq!(m.default_flag("rescale"), Some(rescale), "{}", m.name());
        }
        assert_eq!(MergeMethod::Linear.default_flag("normalize"), Some(true));
    }

    #[test]
    fn unknown_method_lists_known() {
        let e = MergeMethod::parse("dare-ties").unwrap_err().to_string();
        assert!(e.contains("dare_ties") && e.contains("model_stock") && e.contains("passthrough"));
    }
}
