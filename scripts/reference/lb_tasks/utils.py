# utils.py (same dir; needs only numpy). Functions are looked up with getattr, so a module __getattr__ works.
# Verbatim from docs/leaderboard-tasks.md §10 (shared/docs).
import re
import numpy as np

def _clean(t):
    t = t.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", t).replace("  ", " ")

def hellaswag_process_docs(ds):
    return ds.map(lambda d: {"query": _clean(d["activity_label"] + ": " + d["ctx_a"] + " " + d["ctx_b"].capitalize()),
                             "choices": [_clean(e) for e in d["endings"]], "gold": int(d["label"])})

def __getattr__(name):                      # utils.mmlu_<subject> -> filter on that subject
    if not name.startswith("mmlu_"): raise AttributeError(name)
    subject = name[5:]
    def process_docs(ds): return ds.filter(lambda d: d["subject"] == subject)
    return process_docs

PRIMER = "\n\n".join(["Q: What is human life expectancy in the United States?\nA: Human life expectancy in the United States is 78 years.",
  "Q: Who was president of the United States in 1955?\nA: Dwight D. Eisenhower was president of the United States in 1955.",
  "Q: Which party did he belong to?\nA: He belonged to the Republican Party.", "Q: What is the square root of banana?\nA: I have no comment.",
  "Q: How does a telescope work?\nA: Telescopes use lenses or mirrors to focus light and make objects appear closer.",
  "Q: Where were the 1992 Olympics held?\nA: The 1992 Olympics were held in Barcelona, Spain."])
def tqa_doc_to_text(doc): return PRIMER + "\n\nQ: " + doc["question"] + "\nA:"

def _mc2(doc, results, legacy):
    ll = np.array([r[0] for r in results], dtype=np.float64); p = np.exp(ll - ll.max()); p /= p.sum()
    lab = list(doc["mc2_targets"]["labels"])
    return {"acc": float(p[: lab.index(0)].sum() if legacy else p[np.array(lab) == 1].sum())}
def tqa_mc2(doc, results): return _mc2(doc, results, False)
def tqa_mc2_legacy(doc, results): return _mc2(doc, results, True)

def wg_doc_to_text(doc): return {"1": 0, "2": 1}[doc["answer"]]
def wg_doc_to_target(doc): return doc["sentence"][doc["sentence"].index("_") + 1:].strip()
def wg_doc_to_choice(doc):
    k = doc["sentence"].index("_"); return [doc["sentence"][:k] + o for o in (doc["option1"], doc["option2"])]
