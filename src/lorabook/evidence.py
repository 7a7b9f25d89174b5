"""The evidence path: records -> statistics -> verdicts -> the claims ledger (chapter 4, ledger page).

- **Records**: the results files of ``lorabook.record`` (``benchmarks/results/{model}_record*.jsonl``,
  the QLoRA grid in ``qlora_record*.jsonl``);
  every test run keeps each test example's 1/0 score (``per_example``).
- **Statistics**: a configuration's score is the mean over its seeds and the test examples; its
  95% interval comes from a bootstrap that resamples seeds *and* examples. A difference between two
  configurations resamples the *same* examples for both (paired on the test messages) and each
  arm's seeds independently. Resampling both seeds and examples is conservative: with no seed
  effect at all it counts the per-example noise twice (an interval up to about 1.4x too wide);
  with one seed it is the plain bootstrap over examples.
- **Verdicts**: rules fixed before the grid ran (the runs-of-record issue states them):
  "reaches" = the interval of the difference lies within +-``MARGIN``; "below" / "above" = the
  interval lies on one side of 0 without being within the margin; "undecided" otherwise. With
  fewer than ``MIN_SEEDS`` seeds on either side a verdict is marked provisional.
- **Loss spikes**: a run whose training loss (its running mean over ``SPIKE_WINDOW`` steps, so
  that one noisy batch decides nothing), once it had learned (below a tenth of its first value),
  rose above its first value again (``loss_spike``). Such runs stay in the verdict: the
  rule came after a run of record spiked, so dropping them would choose the evidence after seeing
  it. The ledger names them and gives, beside the verdict, the same comparison without them,
  marked post hoc.
- **Ledger**: one row per claim of the talk, with its estimate, verdict, records and chapter.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lorabook.results import read_results

MARGIN = 0.03  # "reaches" = the difference's 95% interval lies within +-3 points
MIN_SEEDS = 3  # fewer seeds on either side: the verdict is provisional
N_BOOT = 4000  # bootstrap resamples
LEVEL = 0.95  # interval coverage
SPIKE_WINDOW = 10  # steps in the running mean of the training loss that loss_spike reads


@dataclass(frozen=True)
class Estimate:
    """A mean (or a difference of means) with its bootstrap interval (chapter 4)."""

    mean: float
    low: float
    high: float
    seeds: int  # seeds behind it (the smaller arm's, for a difference)
    examples: int  # test examples per seed

    def __str__(self) -> str:
        return f"{self.mean:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


# ---------------------------------------------------------------- records


def record_paths(model: str, folder: str | os.PathLike | None = None) -> list[Path]:
    """The results files of record for ``model``: the GPU file, then the CPU one (chapter 4).

    A grid begun on a lent GPU may be continued on a CPU in the same setting
    (``python -m lorabook.record --lr-from``): its runs are then in two files, read together.
    Looked for in ``folder``, else ``$LORABOOK_RESULTS``, else ``benchmarks/results`` of the
    repository this package was installed from or above the current directory; the first folder
    that holds any is used. Empty when none is stored.
    """
    if folder is not None:
        folders = [Path(folder)]
    elif os.environ.get("LORABOOK_RESULTS"):
        folders = [Path(os.environ["LORABOOK_RESULTS"])]
    else:
        roots = [Path(__file__).resolve().parents[2], Path.cwd(), *Path.cwd().parents]
        folders = [root / "benchmarks" / "results" for root in roots]
    for f in folders:
        found = [f / name for name in (f"{model}_record_gpu.jsonl", f"{model}_record.jsonl")
                 if (f / name).is_file() and len(read_results(f / name)[1]) > 0]
        if found:
            return found
    return []


def record_path(model: str, folder: str | os.PathLike | None = None) -> Path | None:
    """The first results file of record for ``model`` (``record_paths``), or None (chapter 4)."""
    paths = record_paths(model, folder)
    return paths[0] if paths else None


def _as_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    return [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]


def test_runs(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[dict, list[dict]]:
    """(header, runs scored on the test split with per-example scores) of one results file or of
    several made in the same setting (a run in two files counts once: the first's) (chapter 4).

    For the LM, the constant-reply baseline (``constant_baseline``, computed from the task data of
    the file's settings, no training) is added as one more run, method "constant".
    """
    paths = _as_paths(paths)
    if not paths:
        raise ValueError("test_runs needs at least one results file")
    header, runs, seen = None, [], set()
    for path in paths:
        this, records = read_results(path)
        if header is None:
            header = this
        elif this.get("settings") != header.get("settings"):
            raise ValueError(f"{path} was made in the setting {this.get('settings')}, "
                             f"{paths[0]} in {header.get('settings')}: their runs are not one grid")
        for r in records:
            if r.get("split") is None and r.get("per_example") and r["key"] not in seen:
                seen.add(r["key"])
                runs.append(r)
    _one_lr_per_configuration(runs)
    if runs and runs[0].get("model") == "lm":
        settings = header["settings"]
        base = constant_baseline(settings["n_train"], settings["n_eval"])
        runs.append({"key": "constant reply (computed from the training data, no model)",
                     "model": "lm", "method": "constant", "seed": 0, "split": None,
                     "label": "constant reply", "trainable": 0, "score": base["exact"],
                     **{f"gen_{k}": v for k, v in base.items() if k.endswith("accuracy")},
                     "gen_exact_match": base["exact"], "per_example": base["per_example"]})
    return header, runs


def _one_lr_per_configuration(runs: Sequence[dict]) -> None:
    """ValueError when one configuration (a run's key without its seed and learning rate) was run
    at two learning rates: its seeds would be pooled as one configuration. Happens when stage 1's
    choice changed after grid runs were made (new candidates): keep one rate's runs per file."""
    rates: dict[str, set] = {}
    for r in runs:
        config = "|".join(p for p in r["key"].split("|") if not p.startswith(("seed=", "lr=")))
        rates.setdefault(config, set()).add(r.get("lr"))
    mixed = {c: sorted(v, key=str) for c, v in rates.items() if len(v) > 1}
    if mixed:
        raise ValueError(f"configurations run at more than one learning rate: {mixed}; a verdict "
                         "pools seeds of one rate (see lorabook.record.lr_choices)")


def select(runs: Sequence[dict], **fields) -> list[dict]:
    """The runs whose fields equal ``fields`` (e.g. method="lora", r=8, targets="all") (chapter 4)."""
    return [r for r in runs if all(r.get(k) == v for k, v in fields.items())]


def score_matrix(runs: Sequence[dict]) -> np.ndarray:
    """(seeds, examples) 0/1 matrix of a configuration's runs, one row per seed (chapter 4)."""
    if not runs:
        raise ValueError("no runs: this configuration has no records yet")
    rows = [np.frombuffer(r["per_example"].encode(), dtype=np.uint8) - ord("0") for r in runs]
    if len({len(x) for x in rows}) != 1:
        raise ValueError("the runs were scored on different numbers of test examples")
    seeds = [r.get("seed") for r in runs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"runs share a seed ({seeds}): pass one configuration at a time")
    return np.stack(rows).astype(float)


def running_mean(losses: Sequence[float], window: int = SPIKE_WINDOW) -> np.ndarray:
    """Each step's mean over the last ``window`` steps (fewer at the start) (ledger)."""
    x = np.asarray(losses, dtype=float)
    if window < 1:
        raise ValueError(f"window must be a positive number of steps, got {window}")
    c = np.concatenate([[0.0], np.cumsum(x)])
    i = np.arange(len(x))
    lo = np.maximum(0, i - window + 1)
    return (c[i + 1] - c[lo]) / (i + 1 - lo)


def _learned_at(losses: Sequence[float]) -> int | None:
    """The index at which the (smoothed) training loss first fell below a tenth of its first value."""
    return next((i for i, loss in enumerate(losses) if loss < losses[0] / 10), None)


def loss_spike(run: dict, window: int = SPIKE_WINDOW) -> int | None:
    """The step (1-based) at which ``run``'s training loss, after it had fallen below a tenth of
    its first value, rose above that first value: the run lost what it had learned. The loss is
    the running mean over ``window`` steps: one batch, even one that is much easier or harder than
    the rest, decides nothing (a classifier's batch loss swings by 10x from step to step). None
    when it never did, or when the record keeps no training losses (ledger)."""
    raw = run.get("train_loss") or []
    return _spike_step(running_mean(raw, window)) if raw else None


def _spike_step(losses: np.ndarray) -> int | None:
    """``loss_spike`` on an already smoothed loss curve."""
    learned = _learned_at(losses)
    if learned is None:
        return None
    return next((i + 1 for i in range(learned, len(losses)) if losses[i] > losses[0]), None)


def stability_table(runs: Sequence[dict], window: int = SPIKE_WINDOW) -> pd.DataFrame:
    """Per configuration, from the running mean of each run's training loss over ``window`` steps:
    its seeds; how many learned (the mean fell below a tenth of the first loss); how many had a
    ``loss_spike``; the highest mean after the run had learned and the mean over the last
    ``window`` steps, each as a fraction of the first loss, the largest over seeds. Above 1 after
    learning is a spike; a final loss near 1 is a run that ended where it began (a classifier
    that collapsed to one class ends at ln 2, its first loss) (ledger)."""
    rows = []
    for r in runs:
        raw = r.get("train_loss") or []
        if not raw:
            continue
        losses = running_mean(raw, window)
        learned = _learned_at(losses)
        rows.append({"configuration": short_label(r), "seed": r.get("seed"),
                     "learned": learned is not None, "spiked": _spike_step(losses) is not None,
                     "worst": np.nan if learned is None else max(losses[learned:]) / losses[0],
                     "final": losses[-1] / losses[0]})
    if not rows:
        return pd.DataFrame()
    return (pd.DataFrame(rows).groupby("configuration")
            .agg(seeds=("seed", "size"), learned=("learned", "sum"), spiked=("spiked", "sum"),
                 final=("final", "max"), worst=("worst", "max"))
            .rename(columns={"spiked": "spikes", "final": "final loss / first loss",
                             "worst": "peak after learning / first loss"})
            .sort_values("final loss / first loss", ascending=False))


# ---------------------------------------------------------------- statistics


def _resampled_means(M: np.ndarray, examples: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap means of M (S, N): seeds drawn with replacement, examples given (B, N)."""
    S = M.shape[0]
    seeds = rng.integers(0, S, size=(examples.shape[0], S))  # (B, S)
    rows = M[seeds]  # (B, S, N)
    picked = np.take_along_axis(rows, examples[:, None, :].repeat(S, axis=1), axis=2)
    return picked.mean(axis=(1, 2))  # (B,)


def _interval(samples: np.ndarray) -> tuple[float, float]:
    tail = (1 - LEVEL) / 2
    return float(np.quantile(samples, tail)), float(np.quantile(samples, 1 - tail))


def estimate(M: np.ndarray, n_boot: int = N_BOOT, seed: int = 0) -> Estimate:
    """Mean of a (seeds, examples) score matrix and its 95% bootstrap interval (chapter 4)."""
    M = np.asarray(M, dtype=float)
    if M.ndim != 2 or M.size == 0:
        raise ValueError(f"expected a non-empty (seeds, examples) matrix, got shape {M.shape}")
    rng = np.random.default_rng(seed)
    examples = rng.integers(0, M.shape[1], size=(n_boot, M.shape[1]))
    low, high = _interval(_resampled_means(M, examples, rng))
    return Estimate(float(M.mean()), low, high, M.shape[0], M.shape[1])


def difference(A: np.ndarray, B: np.ndarray, n_boot: int = N_BOOT, seed: int = 0) -> Estimate:
    """mean(A) - mean(B), paired on the test examples (same resampled examples for both) (chapter 4)."""
    A, B = np.asarray(A, dtype=float), np.asarray(B, dtype=float)
    if A.ndim != 2 or B.ndim != 2 or A.shape[1] != B.shape[1]:
        raise ValueError(f"A and B must be (seeds, examples) on the same examples, got {A.shape} "
                         f"and {B.shape}")
    rng = np.random.default_rng(seed)
    examples = rng.integers(0, A.shape[1], size=(n_boot, A.shape[1]))
    diffs = _resampled_means(A, examples, rng) - _resampled_means(B, examples, rng)
    low, high = _interval(diffs)
    return Estimate(float(A.mean() - B.mean()), low, high, min(A.shape[0], B.shape[0]), A.shape[1])


def verdict(diff: Estimate, margin: float = MARGIN, min_seeds: int = MIN_SEEDS) -> str:
    """"reaches" (interval within +-margin), "above", "below" or "undecided" (chapter 4).

    Prefixed with "provisional: " when fewer than ``min_seeds`` seeds stand behind it.
    """
    if diff.low >= -margin and diff.high <= margin:
        word = "reaches"
    elif diff.low > 0:
        word = "above"
    elif diff.high < 0:
        word = "below"
    else:
        word = "undecided"
    return word if diff.seeds >= min_seeds else f"provisional: {word}"


# ---------------------------------------------------------------- baselines without training


def constant_reply(train_records: Sequence[dict]) -> dict:
    """The best constant reply: each field's most common value in the training records (chapter 4)."""
    if not train_records:
        raise ValueError("constant_reply needs training records")
    keys = list(train_records[0])
    return {k: Counter(r[k] for r in train_records).most_common(1)[0][0] for k in keys}


def constant_baseline(n_train: int, n_test: int, seed: int = 0) -> dict:
    """The loan task's constant-reply baseline on the test split: reply, exact per example, fields (chapter 4)."""
    from lorabook.tasks import TASK_KEYS, loan_intent_task

    split = loan_intent_task(n_train, n_test, seed=seed)
    reply = constant_reply([ex.record for ex in split["train"]])
    exact = [int(ex.record == reply) for ex in split["test"]]
    fields = {k: float(np.mean([ex.record[k] == reply[k] for ex in split["test"]]))
              for k in TASK_KEYS["loan_intent"]}
    return {"reply": reply, "per_example": "".join(map(str, exact)), "exact": float(np.mean(exact)),
            "field_accuracy": float(np.mean(list(fields.values()))), **{f"{k}_accuracy": v
                                                                     for k, v in fields.items()}}


# ---------------------------------------------------------------- the ledger


@dataclass(frozen=True)
class Claim:
    """One claim of the talk, decided by comparing two configurations of the records (ledger)."""

    talk: str  # the claim, as the talk states it
    chapter: str  # where the book shows it
    a: dict  # fields selecting configuration A (e.g. {"method": "lora", "r": 8, ...})
    b: dict  # fields selecting configuration B (the reference)
    rule: str = "reaches"  # "reaches": is A within the margin of B; "above": is A above B

    def decide(self, diff: Estimate) -> str:
        """The verdict by this claim's rule: verdict() for "reaches", else "holds" / "does not hold"."""
        word = verdict(diff)
        if self.rule == "reaches":
            return word
        core = word.removeprefix("provisional: ")
        said = {"above": "holds", "reaches": "does not hold (within the margin)",
                "below": "does not hold (below)", "undecided": "undecided"}[core]
        return said if core == word else f"provisional: {said}"


def _lora(r: int, targets: str, scaling: str = "rslora") -> dict:
    return {"method": "lora", "r": r, "targets": targets, "scaling": scaling}


FULL = {"method": "full"}
UNTRAINED = ("none", "constant")  # deterministic: one run stands for every seed
LM_CLAIMS = (
    Claim("Fine-tuning is needed: the base model does not do the task zero-shot",
          "1", FULL, {"method": "none"}, rule="above"),
    Claim("Fine-tuning learns more than a constant reply (each field's most common value)",
          "1", FULL, {"method": "constant"}, rule="above"),
    Claim("LoRA (r = 8, all linear layers) reaches full fine-tuning", "3", _lora(8, "all"), FULL),
    Claim("Ranks of 1-2 already work: r = 1 reaches full fine-tuning", "4", _lora(1, "all"), FULL),
    Claim("Ranks of 1-2 already work: r = 2 reaches full fine-tuning", "4", _lora(2, "all"), FULL),
    Claim("As r grows LoRA recovers full fine-tuning: r = 64 reaches it", "4", _lora(64, "all"), FULL),
    Claim("Larger r is not needed: r = 1 reaches r = 64", "4", _lora(1, "all"), _lora(64, "all")),
    Claim("Fixed budget (Table 5): W_q, W_v at r = 4 beat W_q alone at r = 8", "4",
          _lora(4, "qv"), _lora(8, "q"), rule="above"),
    Claim("Fixed budget (Table 5): all attention at r = 2 reaches W_q, W_v at r = 4", "4",
          _lora(2, "attn"), _lora(4, "qv")),
    Claim("All linear layers beat W_q, W_v alone at r = 8 (QLoRA, section 4)", "4",
          _lora(8, "all"), _lora(8, "qv"), rule="above"),
    Claim("The alpha / r confound: at r = 64, alpha / r trains like alpha / sqrt(r)", "4",
          _lora(64, "all", "lora"), _lora(64, "all")),
    Claim("Adapter layers (bottleneck 8) reach full fine-tuning", "1",
          {"method": "adapter", "size": 8}, FULL),
    Claim("Prefix tuning (32 tokens) reaches full fine-tuning", "1",
          {"method": "prefix", "size": 32}, FULL),
)
ENCODER_CLAIMS = (
    Claim("Encoder: LoRA (r = 8, W_q, W_v) reaches full fine-tuning", "4", _lora(8, "qv"), FULL),
    Claim("Encoder: LoRA r = 1 on W_q, W_v reaches full fine-tuning", "4", _lora(1, "qv"), FULL),
    Claim("Encoder: LoRA r = 64 on all layers reaches full fine-tuning", "4", _lora(64, "all"), FULL),
    # the rows below were written on 2026-12-06 before their runs of record (one seed of r = 2 seen)
    Claim("Encoder: ranks of 1-2 already work: r = 2 on W_q, W_v reaches full fine-tuning", "4",
          _lora(2, "qv"), FULL),
    Claim("Encoder: as r grows LoRA recovers full fine-tuning: r = 64 on W_q, W_v reaches it", "4",
          _lora(64, "qv"), FULL),
    Claim("Encoder: larger r is not needed: r = 1 reaches r = 64 (W_q, W_v)", "4",
          _lora(1, "qv"), _lora(64, "qv")),
    Claim("Encoder: all linear layers beat W_q, W_v alone at r = 8 (QLoRA, section 4)", "4",
          _lora(8, "all"), _lora(8, "qv"), rule="above"),
)
FORMAT_NAMES = {"nf4": "NF4 + DQ", "fp4": "FP4", "int4": "Int4"}


def _q(r: int, targets: str, base: str) -> dict:
    """A QLoRA quality run of record: LoRA over the de-quantized 4-bit base (record.qlora_grid_specs)."""
    return {**_lora(r, targets), "base": base, "dense_base": True}


def _f(r: int, targets: str) -> dict:
    """16-bit LoRA of the QLoRA grid: the same adapter over the float base."""
    return {**_lora(r, targets), "base": "float"}


QLORA_CLAIMS = (  # the QLoRA grid's file, qlora_record*.jsonl (record.qlora_grid_specs)
    *(Claim(f"QLoRA, base in {FORMAT_NAMES[f]} (r = 8, all linear layers), matches 16-bit LoRA",
            "6" if f == "nf4" else "7", _q(8, "all", f), _f(8, "all")) for f in FORMAT_NAMES),
    *(Claim(f"QLoRA, base in {FORMAT_NAMES[f]}, matches 16-bit LoRA at r = {r}", "7",
            _q(r, "all", f), _f(r, "all")) for r in (2, 64) for f in FORMAT_NAMES),
    Claim("With a 4-bit base, all linear layers beat attention only at r = 8 (QLoRA, section 4)",
          "6", _q(8, "all", "nf4"), _q(8, "attn", "nf4"), rule="above"),
    # is attention only's shortfall the 4-bit base's doing, or the placement's? (rules fixed
    # before the float attention-only runs were made)
    Claim("With a 16-bit base too, all linear layers beat attention only at r = 8",
          "6", _f(8, "all"), _f(8, "attn"), rule="above"),
    Claim("Attention only at r = 8: the 4-bit base (NF4 + DQ) matches the 16-bit base",
          "6", _q(8, "attn", "nf4"), _f(8, "attn")),
)


def _compare(claim: Claim, a: Sequence[dict], b: Sequence[dict]) -> tuple[np.ndarray, np.ndarray,
                                                                           Estimate]:
    """A's and B's score matrices and their paired difference, seeds counted as the claim needs."""
    A, B = score_matrix(a), score_matrix(b)
    diff = difference(A, B)
    if claim.b.get("method") in UNTRAINED:  # no seeds to vary: A's seeds are what count
        diff = Estimate(diff.mean, diff.low, diff.high, A.shape[0], diff.examples)
    return A, B, diff


def _row(claim: Claim, runs: Sequence[dict], file: str) -> dict:
    a, b = select(runs, **claim.a), select(runs, **claim.b)
    row = {"claim": claim.talk, "chapter": claim.chapter, "file": file}
    if not a or not b:
        missing = " and ".join(name for name, x in (("A", a), ("B", b)) if not x)
        return {**row, "A": None, "B": None, "difference": None, "low": None, "high": None,
                "seeds": 0, "verdict": f"no records yet ({missing})", "keys": "", "spikes": 0,
                "spiked": "", "without spikes": ""}
    A, B, diff = _compare(claim, a, b)
    spiked = {r["key"]: f"{short_label(r)}, seed {r.get('seed')} (step {loss_spike(r)})"
              for r in a + b if loss_spike(r)}
    kept_a, kept_b = ([r for r in x if r["key"] not in spiked] for x in (a, b))
    without = ""
    if spiked and kept_a and kept_b:  # the same comparison without them: post hoc
        _, _, other = _compare(claim, kept_a, kept_b)
        without = f"{other} ({other.seeds} seed{'s' if other.seeds != 1 else ''}): {claim.decide(other)}"
    return {**row, "A": float(A.mean()), "B": float(B.mean()), "difference": diff.mean,
            "low": diff.low, "high": diff.high, "seeds": diff.seeds,
            "verdict": claim.decide(diff), "keys": "; ".join(r["key"] for r in a + b),
            "spikes": len(spiked), "spiked": "; ".join(spiked.values()),
            "without spikes": without}


def ledger_paths(model: str) -> list[Path]:
    """The files a model's ledger rows read. The QLoRA grid's float-base LoRA runs are the main
    grid's (the same keys, at the same learning rate when the grid was run with ``--lr-from``):
    its rows read the main LM files after its own, which win where both hold a run."""
    return record_paths(model) + (record_paths("lm") if model == "qlora" else [])


def ledger(files: dict[str, str | os.PathLike | Sequence[str | os.PathLike] | None] | None = None,
           claims: dict[str, Sequence[Claim]] | None = None, learned: bool = True) -> pd.DataFrame:
    """The claims ledger: each claim, A and B's scores, the difference with its 95% interval,
    the verdict, the records and the chapter (ledger page). ``files`` maps "lm"/"encoder"/"qlora"
    to a results file or a list of them (default: ``ledger_paths``; "qlora" is the LM's QLoRA
    grid, read with the main LM grid's files). ``learned`` adds the rows of ``what_was_learned``
    (Table 7, Figure 3) when the adapters' factors are stored."""
    claims = claims or {"lm": LM_CLAIMS, "encoder": ENCODER_CLAIMS, "qlora": QLORA_CLAIMS}
    files = files if files is not None else {m: ledger_paths(m) for m in claims}
    rows = []
    for model, model_claims in claims.items():
        paths = _as_paths(files.get(model) or [])
        runs = test_runs(paths)[1] if paths else []
        name = " + ".join(p.name for p in paths) if paths else "(none)"
        rows += [_row(c, runs, name) for c in model_claims]
        if model == "lm" and paths and learned:
            rows += learned_rows(Records(tuple(paths), {}, runs))
    return pd.DataFrame(rows)


def claim_sentence(row: pd.Series | dict) -> str:
    """One ledger row as a sentence for a chapter's "What we measured" (chapters 1, 3, 4)."""
    if row.get("difference") is None or row["difference"] != row["difference"]:
        if row.get("A") is None or row["A"] != row["A"]:
            return f"{row['claim']}: {row['verdict']}."
        return f"{row['claim']}: A = {row['A']:.3f}, B = {row['B']:.3f}: {row['verdict']}."
    said = (f"{row['claim']}: {row['A']:.3f} against {row['B']:.3f}, difference "
            f"{row['difference']:+.3f} (95% interval {row['low']:+.3f} to {row['high']:+.3f}, "
            f"{row['seeds']} seed{'s' if row['seeds'] != 1 else ''}): **{row['verdict']}**.")
    n = row.get("spikes")
    if n and n == n:  # NaN in the rows without a comparison
        n = int(n)
        said += (f" Behind it, {n} run{'s' if n != 1 else ''} had a loss spike "
                 f"(`evidence.loss_spike`): {row['spiked']}"
                 + (f"; without {'them' if n != 1 else 'it'}, post hoc and not the verdict: "
                    f"{row['without spikes']}." if row.get("without spikes") else "."))
    return said


def field_scores(runs: Sequence[dict]) -> pd.DataFrame:
    """Mean generation scores per configuration (exact match, valid JSON, each field) (chapter 1)."""
    keys = ("gen_exact_match", "gen_valid_json", "gen_intent_accuracy", "gen_amount_accuracy",
            "gen_account_accuracy")
    rows = [{"configuration": r.get("label"), **{k.removeprefix("gen_"): r.get(k) for k in keys}}
            for r in runs if any(r.get(k) is not None for k in keys)]
    if not rows:
        return pd.DataFrame()
    table = pd.DataFrame(rows).groupby("configuration", sort=False).mean()
    table["seeds"] = pd.DataFrame(rows).groupby("configuration", sort=False).size()
    return table


def learned_rows(records: Records) -> list[dict]:
    """Ledger rows for what the adapters learned (Table 7, Figure 3); none without stored factors."""
    w = what_was_learned(records)
    if not w:
        return []
    amp = w["amplification"]
    files = " + ".join(p.name for p in records.paths)
    where = f"{w['layer']}, LoRA r = 8 (r = 64) on all layers, seed 0"
    holds = amp["proj_delta"] < 0.5 * amp["proj_w"]
    return [
        {"claim": "Interpretable: delta_W amplifies directions W0 does not emphasise (Table 7): "
                  "||U^T W0 V|| on delta_W's top-8 directions (A) against W0's own (B)",
         "chapter": "4", "file": files, "A": amp["proj_delta"], "B": amp["proj_w"],
         "difference": None, "low": None, "high": None, "seeds": 1,
         "verdict": "provisional: " + ("holds" if holds else "does not hold")
                    + f" (amplification factor {amp['factor']:.1f}; random directions "
                      f"{amp['proj_random']:.2f}; one layer)",
         "keys": where},
        {"claim": "Figure 3: the top direction of A is shared by r = 8 and r = 64 "
                  "(phi(1, 1) > 0.5; A: phi, B: its value for random directions)",
         "chapter": "4", "file": files, "A": w["phi_r8_r64"], "B": w["phi_random"],
         "difference": None, "low": None, "high": None, "seeds": 1,
         "verdict": "provisional: " + ("holds" if w["phi_r8_r64"] > 0.5 else "does not hold")
                    + (f" (between two seeds at r = 8: {w['phi_seeds']:.3f}; one layer)"
                       if "phi_seeds" in w else " (one layer)"),
         "keys": where},
    ]


def short_label(run: dict) -> str:
    """A few characters naming a configuration on a crowded plot: "r=8 all", "b=8", "P=32", and a
    4-bit base's format: "r=64 all fp4" (chapter 4)."""
    method = run.get("method")
    if method == "lora":
        return (f"r={run['r']} {run['targets']}" + ("" if run.get("scaling") == "rslora" else " a/r")
                + ("" if run.get("base") in (None, "float") else f" {run['base']}"))
    return {"full": "full", "adapter": f"b={run.get('size')}", "prefix": f"P={run.get('size')}",
            "none": "zero-shot", "constant": "constant"}.get(method, str(method))


def _machine(provenance: dict) -> str:
    """A run's machine in words: the GPU's name, or "CPU, N threads" (a CPU's name is often just
    its architecture, e.g. "x86_64")."""
    if provenance.get("device") == "cpu":
        return f"CPU, {provenance.get('cpu_threads', '?')} threads"
    return provenance.get("device_name", "?")


def _command(provenance: dict) -> str:
    """The command that made a run, as a reader would type it: ``python -m lorabook.record ...``
    (a process records its script's path); a worker of ``--workers N`` made before its parent's
    command was recorded is named as such."""
    args = provenance.get("command", "?").split(" ")
    if args[0].endswith(("lorabook/record.py", "lorabook.record")):
        if "--worker" in args:
            return "a worker of python -m lorabook.record --workers N (its command line was not stored)"
        args = ["python -m lorabook.record"] + args[1:]
    return " ".join(args)


def _commands(made: Sequence[dict]) -> str:
    """The commands that made the runs, each with its number of runs. Commands that differ only
    in their ``--only`` patterns (a grid continued a few runs at a time) share one line, which
    lists the patterns of each."""
    groups: dict[str, list[tuple[str, ...]]] = {}
    typed: dict[str, str] = {}
    for p in made:
        command, rest, patterns = _command(p), [], []
        args = iter(command.split(" "))
        for a in args:
            if a == "--only":
                patterns.append(next(args, ""))
            else:
                rest.append(a)
        shape = " ".join(rest)
        groups.setdefault(shape, []).append(tuple(patterns))
        typed.setdefault(shape, command)
    lines = []
    for shape, onlys in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        n, sets = len(onlys), list(dict.fromkeys(onlys))
        said = typed[shape] if len(sets) == 1 else (
            f"{shape}, each with --only one of: " + ", ".join(" and ".join(s) for s in sets))
        lines.append(f"{n} run{'' if n == 1 else 's'}: {said}")
    return "; ".join(lines)


@dataclass(frozen=True)
class Records:
    """Results files of record, read: their paths (GPU file first), header and test runs (chapter 4)."""

    paths: tuple[Path, ...]
    header: dict
    runs: list

    @property
    def path(self) -> Path:
        """The first file: the GPU one when there is one."""
        return self.paths[0]

    @property
    def provenance(self) -> dict:
        """Where the runs came from: setting, hardware, dtype, commits, dates, the command (chapter 4)."""
        made = [r["provenance"] for r in self.runs if "provenance" in r]
        settings = self.header.get("settings", {})
        model = self.runs[0].get("model") if self.runs else "?"
        return {
            "file": ", ".join(f"benchmarks/results/{p.name}" for p in self.paths),
            "setting": self.header.get("mode"),
            "steps x batch": f"{settings.get('train_steps')} x {settings.get('batch_size')}"
            if model == "lm" else f"{settings.get('encoder_steps')} x 16",
            "test examples": len(self.runs[0]["per_example"]) if self.runs else 0,
            "runs": len([r for r in self.runs if r.get("method") != "constant"]),
            "hardware": ", ".join(f"{name} ({n} run{'' if n == 1 else 's'})" for name, n in
                                  sorted(Counter(map(_machine, made)).items())),
            "dtype": sorted({r.get("dtype") for r in self.runs if r.get("dtype")}),
            "commits": sorted({m.get("commit", "?")[:10] for m in made}),
            "made": f"{min(m['created'] for m in made)} to {max(m['created'] for m in made)}"
            if made else "",
            "commands": _commands(made),
        }


def load(model: str, folder: str | os.PathLike | None = None) -> Records | None:
    """The records of ``model`` ("lm" or "encoder"), or None when none are stored (chapter 4)."""
    paths = record_paths(model, folder)
    if not paths:
        return None
    header, runs = test_runs(paths)
    return Records(tuple(paths), header, runs)


def summary_table(runs: Sequence[dict], by: Sequence[str] = ("method", "targets", "r", "scaling",
                                                              "size"),
                  label: Callable[[dict], str] | None = None) -> pd.DataFrame:
    """Per configuration: label, seeds, trainable parameters, mean score and 95% interval (chapter 4)."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault(tuple(r.get(k) for k in by), []).append(r)
    rows = []
    for key, group in groups.items():
        est = estimate(score_matrix(group))
        rows.append({**dict(zip(by, key, strict=True)),
                     "label": label(group[0]) if label else group[0].get("label", ""),
                     "short": short_label(group[0]),
                     "seeds": est.seeds, "trainable": group[0].get("trainable"),
                     "score": est.mean, "low": est.low, "high": est.high})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- what the 4-bit path costs


def _same_machine(a: dict, b: dict) -> bool:
    """Whether two runs' timings compare: the same device and, on a CPU, the same recorded CPU
    model and vector instructions (``experiments.cpu_identity``; runs made before it was recorded
    do not pair: one "x86_64" was AMX, another only AVX2, eightfold apart in bf16)."""
    pa, pb = a.get("provenance", {}), b.get("provenance", {})
    keys = ("device", "device_name", "cpu_threads") + (
        ("cpu_model", "cpu_capability") if pa.get("device") == "cpu" else ())
    return bool(pa) and all(pa.get(k) is not None and pa.get(k) == pb.get(k) for k in keys)


def four_bit_path_costs(runs: Sequence[dict]) -> pd.DataFrame:
    """Each run of record trained on the 4-bit codes (``dense_base`` None) beside the dense Q(W0)
    run of the same configuration, seed and dtype (fp32, or bf16 autocast), made on the same
    machine (chapter 6): median seconds per step, the process's memory rise during training and
    its peak (CUDA's max allocated on a GPU, the process's peak RSS on a CPU, which includes
    loading the fp32 model before quantizing it), exact match, and the ratios 4-bit path / dense.
    One seed each: a measurement, not a verdict. A 4-bit run without such a partner is left out."""
    fields = ("method", "r", "targets", "scaling", "base", "seed", "lr", "dtype")
    rows = []
    for codes in runs:
        if codes.get("base") in (None, "float") or codes.get("dense_base") is not None:
            continue
        dense = [d for d in select(runs, **{k: codes.get(k) for k in fields}, dense_base=True)
                 if _same_machine(codes, d)]
        if not dense:
            continue
        d = dense[0]
        gb = 2**30
        rows.append({
            "base": FORMAT_NAMES.get(codes["base"], codes["base"]), "r": codes.get("r"),
            "targets": codes.get("targets"), "seed": codes.get("seed"), "steps": codes.get("steps"),
            "machine": _machine(codes["provenance"]), "dtype": codes.get("dtype"),
            "s / step, 4-bit codes": codes["step_s"], "s / step, dense Q(W0)": d["step_s"],
            "time x": codes["step_s"] / d["step_s"],
            "memory rise (GB), 4-bit codes": codes["memory_increase_bytes"] / gb,
            "memory rise (GB), dense Q(W0)": d["memory_increase_bytes"] / gb,
            "memory rise x": codes["memory_increase_bytes"] / d["memory_increase_bytes"],
            "peak (GB), 4-bit codes": codes["peak_memory_bytes"] / gb,
            "peak (GB), dense Q(W0)": d["peak_memory_bytes"] / gb,
            "scoring (s), 4-bit codes": codes.get("eval_s"), "scoring (s), dense Q(W0)": d.get("eval_s"),
            "exact, 4-bit codes": codes["score"], "exact, dense Q(W0)": d["score"],
            "keys": f"{codes['key']}; {d['key']}"})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- what the adapters learned


SUBSPACE_LAYER = "model.layers.14.self_attn.q_proj"  # the middle block's W_q (the paper: layer 48 of 96)


def stored_factors(records: Records) -> dict:
    """{run key: {layer: {"A", "B", "scaling"}}} kept beside the results files (``lorabook.record``)."""
    import torch

    factors: dict = {}
    for p in reversed(records.paths):  # the first file's wins, as in test_runs
        path = p.with_suffix(".factors.pt")
        if path.exists():
            factors.update(torch.load(path))
    return factors


def _base_weight(name: str):
    """W0 of one layer of the offline LM, read from its safetensors file alone (no model load)."""
    from safetensors import safe_open

    from lorabook.models import lm_path

    with safe_open(str(lm_path() / "model.safetensors"), framework="pt") as f:
        return f.get_tensor(f"{name}.weight").float()


def _key_of(records: Records, **fields) -> str | None:
    runs = select(records.runs, **fields)
    return runs[0]["key"] if runs else None


def what_was_learned(records: Records, layer: str = SUBSPACE_LAYER) -> dict:
    """The LoRA paper's Figure 3 and Table 7 on the stored adapters of record (chapter 4, ledger).

    ``phi_r8_r64``: phi(A_8, A_64, 1, 1), the top direction shared by r = 8 and r = 64 (seed 0);
    ``phi_seeds``: the same between two seeds at r = 8; ``phi_random``: its value for random
    directions (1 / in_features). ``amplification``: ``analysis.amplification`` of W0 by
    delta_W = scaling B A at r = 8 (||U^T W0 V||_F for delta_W's, W0's own and random directions).
    Empty when the factors are not stored.
    """
    from lorabook.analysis import amplification, subspace_similarity

    factors = stored_factors(records)
    keys = {name: _key_of(records, method="lora", targets="all", scaling="rslora", r=r, seed=s)
            for name, r, s in (("r8", 8, 0), ("r64", 64, 0), ("r8_seed1", 8, 1))}
    if not all(keys[k] in factors for k in ("r8", "r64")):
        return {}
    A = {k: factors[v][layer]["A"].float() for k, v in keys.items() if v in factors}
    out = {"layer": layer, "keys": keys,
           "phi_r8_r64": subspace_similarity(A["r8"], A["r64"], 1, 1),
           "phi_random": 1 / A["r8"].shape[1]}
    if "r8_seed1" in A:
        out["phi_seeds"] = subspace_similarity(A["r8"], A["r8_seed1"], 1, 1)
    f = factors[keys["r8"]][layer]
    delta = f["scaling"] * (f["B"].float() @ f["A"].float())  # (out, in)
    out["amplification"] = amplification(_base_weight(layer), delta, r=8)
    return out


# ---------------------------------------------------------------- chapter 8: after LoRA


def _variant(variant: str | None, r: int = 8, scaling: str = "rslora", base: str = "float") -> dict:
    """Fields selecting one configuration of the variants file: LoRA on all linear layers."""
    return {"method": "lora", "r": 256 if variant == "vera" else r, "targets": "all",
            "scaling": scaling, "base": base, "variant": variant}


_LORA8 = _variant(None)
_QLORA8 = _variant(None, base="nf4")
# The authors' claims, each decided by the rule it states: "beats" = "above" (the difference's
# interval lies above 0 and outside the margin), "matches" = "reaches"
_VARIANTS_BOTH = (
    ("DoRA beats LoRA at the same rank (DoRA paper: +1 to +4 points on LLaMA commonsense tasks)",
     _variant("dora"), _LORA8, "above"),
    ("rsLoRA: at r = 64, alpha / sqrt(r) beats alpha / r (rsLoRA paper: larger ranks then help)",
     _variant(None, 64), _variant(None, 64, "lora"), "above"),
    ("rsLoRA: with alpha / sqrt(r), r = 64 beats r = 8", _variant(None, 64), _LORA8, "above"),
    ("LoRA+ (B's learning rate 16 x A's) beats LoRA (LoRA+ paper: 1-2 points, up to 2x faster)",
     _variant("loraplus"), _LORA8, "above"),
    ("PiSSA beats LoRA (PiSSA paper: higher scores, faster convergence)", _variant("pissa"),
     _LORA8, "above"),
    ("VeRA (r = 256, far fewer trainable numbers) reaches LoRA (VeRA paper)", _variant("vera"),
     _LORA8, "reaches"),
)
_VARIANTS_4BIT = (
    ("QPiSSA (PiSSA on an NF4 base) beats QLoRA (PiSSA paper)", _variant("pissa", base="nf4"),
     _QLORA8, "above"),
    ("LoftQ (5 alternations) beats QLoRA (LoftQ paper, at 4 bits)", _variant("loftq", base="nf4"),
     _QLORA8, "above"),
)
VARIANT_CLAIMS = {
    "lm": tuple(Claim(t, "8", a, b, rule) for t, a, b, rule in _VARIANTS_BOTH + _VARIANTS_4BIT),
    "encoder": tuple(Claim(f"Encoder: {t}", "8", a, b, rule) for t, a, b, rule in _VARIANTS_BOTH),
}


def variants_record_path(model: str, folder: str | os.PathLike | None = None) -> Path | None:
    """The after-LoRA results file ``{model}_variants_record[_gpu].jsonl``, or None (chapter 8)."""
    return record_path(f"{model}_variants", folder)


def variants_ledger(folder: str | os.PathLike | None = None) -> pd.DataFrame:
    """The ledger rows of chapter 8: each variant's claim against LoRA (or QLoRA) as the records
    decide it; "no records yet" while the variants file is absent (chapter 8)."""
    files = {m: variants_record_path(m, folder) for m in VARIANT_CLAIMS}
    return ledger(files, VARIANT_CLAIMS, learned=False)
