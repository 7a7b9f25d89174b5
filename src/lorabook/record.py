"""Runs of record: the grids that decide the talk's claims, made once and stored (chapter 4, ledger).

A run of record differs from a book-build run in three ways: it is long enough to converge (the
``record`` setting), its learning rate was chosen on a validation split (never the test split),
and it is repeated over seeds. Two stages, one results file per model:

1. **Learning rates.** For each method, a few candidate learning rates are trained once (seed 0)
   on the *fit* part of the training data and scored on the *val* part (templates or movies the
   fit part never shows; ``split="val"``). ``choose_lr`` picks the best from those records, so the
   choice is stored with the runs and re-computed from them, never typed.
2. **The grid**, in order of priority (so a grid cut short still decides the main claims), seeds
   0-2 first, then 3-4: each point with the chosen learning rate, scored on the test split with
   every example's 1/0 score kept for paired statistics (``lorabook.evidence``).

Runs go through ``sweep.run_one``; several run at once on one GPU (``workers``), each finished run
appended at once, so the command resumes where it stopped. From a shell::

    LORABOOK_MODE=record python -m lorabook.record --model lm --workers 8 \\
        --out benchmarks/results/lm_record_gpu.jsonl

The QLoRA grid of record (chapters 6 and 7; on a GPU name the file ``qlora_record_gpu.jsonl``)::

    LORABOOK_MODE=record python -m lorabook.record --model lm --grid qlora --workers 8 \\
        --out benchmarks/results/qlora_record.jsonl

or its 4-bit runs at the LoRA rate of the main grid's stage 1, whose float-base LoRA runs are
the QLoRA grid's 16-bit references (the evidence reads both grids' files)::

    LORABOOK_MODE=record python -m lorabook.record --model lm --grid qlora --mixed-precision \\
        --lr-from benchmarks/results/lm_record_gpu.jsonl --only 'lm|lora|*|base=nf4|*' \\
        --out benchmarks/results/qlora_record.jsonl

A grid begun on one machine can be continued on another in the same setting: ``--lr-from``
names the first file, whose stage 1 chooses the learning rates and whose runs are not repeated;
``--only`` keeps the grid's runs whose key matches a pattern (the evidence reads both files)::

    LORABOOK_MODE=record python -m lorabook.record --model lm --mixed-precision \\
        --lr-from benchmarks/results/lm_record_gpu.jsonl \\
        --only 'lm|full|*' --only 'lm|lora|r=*|targets=all|scaling=rslora|*' \\
        --out benchmarks/results/lm_record.jsonl

Chapter 8's methods after LoRA (DoRA, rsLoRA, LoRA+, PiSSA, VeRA; QLoRA, QPiSSA, LoftQ on the LM)
go into a file of their own, with LoRA's learning rate as stage 1 chose it in the main file
(``run_variants``; LoRA itself is re-run there, so each comparison is paired within one file)::

    LORABOOK_MODE=record python -m lorabook.record --model lm --stages variants --workers 8 \\
        --lr-from benchmarks/results/lm_record_gpu.jsonl \\
        --out benchmarks/results/lm_variants_record_gpu.jsonl
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from lorabook import evidence
from lorabook.config import RunSettings, get_settings
from lorabook.results import append_record, open_results, read_results
from lorabook.sweep import RunSpec, run_one

# Candidate learning rates per (model, method), tried on the validation split at seed 0. Each
# brackets the book's earlier choice (sweep.LORA_LR, FULL_LR, ...) by about 2x either side.
LR_CANDIDATES = {
    ("lm", "full"): (2e-5, 5e-5, 1e-4),
    ("lm", "lora"): (5e-4, 1e-3, 2e-3, 4e-3),
    ("lm", "adapter"): (3e-4, 1e-3, 3e-3),
    ("lm", "prefix"): (3e-3, 1e-2, 3e-2),
    ("encoder", "full"): (5e-5, 1e-4, 2e-4),
    ("encoder", "lora"): (1e-3, 3e-3, 1e-2),
}
# The LoRA configuration at which the learning rate is chosen: rank 8 with rsLoRA's scaling
# alpha / sqrt(r) on every linear layer. rsLoRA's point is that with this scaling the best
# learning rate does not move with r, so one rate serves the whole rank series (Kalajdzievski 2023).
LR_PROBE = {"lm": dict(r=8, targets="all", scaling="rslora"),
            "encoder": dict(r=8, targets="all", scaling="rslora")}
SIZES = {"adapter": (8, 64), "prefix": (8, 32)}  # two sizes each: bottleneck width, prefix tokens
RANKS = (1, 2, 8, 64)
FIRST_SEEDS, MORE_SEEDS = (0, 1, 2), (3, 4)
# Layers whose factors A, B are kept for the subspace and amplification analysis (Figure 3,
# Table 7): first, middle and last blocks' W_q and W_v.
FACTOR_LAYERS = {"lm": ("layers.0.self_attn.q_proj", "layers.14.self_attn.q_proj",
                        "layers.29.self_attn.q_proj", "layers.0.self_attn.v_proj",
                        "layers.14.self_attn.v_proj", "layers.29.self_attn.v_proj"),
                 "encoder": ("layer.0.attention.self.query", "layer.2.attention.self.query",
                             "layer.5.attention.self.query", "layer.0.attention.self.value",
                             "layer.2.attention.self.value", "layer.5.attention.self.value")}
FACTOR_RUNS = {"lm": (("qv", 8), ("qv", 64), ("all", 8), ("all", 64)),
               "encoder": (("qv", 8), ("qv", 64))}  # (targets, r) kept at seeds 0 and 1


def lr_specs(model: str) -> list[RunSpec]:
    """Stage 1: every candidate learning rate of every method, seed 0, on the val split (chapter 4)."""
    specs = []
    for (m, method), lrs in LR_CANDIDATES.items():
        if m != model:
            continue
        for lr in lrs:
            if method == "lora":
                specs.append(RunSpec(model, "lora", seed=0, lr=lr, split="val", **LR_PROBE[model]))
            elif method in SIZES:
                specs.append(RunSpec(model, method, seed=0, lr=lr, split="val",
                                     size=SIZES[method][0]))
            else:
                specs.append(RunSpec(model, method, seed=0, lr=lr, split="val"))
    return specs


def choose_lr(records: Sequence[dict], model: str, method: str,
              variant: str | None = None) -> tuple[float, list[str]]:
    """(learning rate, keys of the runs it was chosen from): best val score, then lower val loss (chapter 4).

    Reads the stage-1 records (``split == "val"``) of ``model`` and ``method``; a diverged run
    (no record) simply does not compete. ValueError when there is none.
    """
    runs = [r for r in records if r.get("split") == "val" and r.get("model") == model
            and r.get("method") == method and r.get("variant") == variant]
    if not runs:
        what = f"{model}/{method}" + (f"/{variant}" if variant else "")
        raise ValueError(f"no validation runs of {what} among the records: run stage 1 "
                         "(the learning-rate candidates) first")
    best = max(runs, key=lambda r: (r["score"], -(r.get("loss") or 0.0), -r["lr"]))
    return float(best["lr"]), [r["key"] for r in runs]


def lr_choices(records: Sequence[dict], model: str) -> list[dict]:
    """Per method of stage 1: the chosen learning rate, its candidates, and where it lies (chapter 4).

    ``position`` is "inside" when a candidate above and one below it were tried, else "highest
    candidate" or "lowest candidate": then the best rate may lie outside the range, and a verdict
    compares the method at its best *tried* rate, not its best. A candidate with no record (not
    run, or diverged) is listed in ``missing``. ``scores`` maps each tried rate to its validation
    score. ``rising`` is True when that score rises (or holds) at every step towards an edge
    choice and ends higher than it began (then the best rate may lie beyond the range; two rates
    far from the choice that both collapse to chance "hold"). ``vs_chosen`` maps each candidate
    that kept its validation examples' scores to its difference from the chosen rate
    (``evidence.difference``, paired on the examples, one seed each); ``ties`` are the candidates
    whose interval holds 0: the choice among them is a tie within the validation noise. ``note``
    says it in one line.
    """
    methods = sorted({r["method"] for r in records if r.get("split") == "val"
                      and r.get("model") == model and r.get("variant") is None})
    out = []
    for method in methods:
        lr, keys = choose_lr(records, model, method)
        runs = {float(r["lr"]): r for r in records if r.get("key") in keys}
        candidates = sorted(set(LR_CANDIDATES.get((model, method), ())) | set(runs))
        position = ("highest candidate" if lr == candidates[-1] else
                    "lowest candidate" if lr == candidates[0] else "inside")
        missing = [c for c in candidates if c not in runs]
        scores = {c: float(runs[c]["score"]) for c in sorted(runs)}
        towards = list(scores.values()) if position == "highest candidate" else list(scores.values())[::-1]
        rising = (position != "inside" and towards[0] < towards[-1]
                  and all(x <= y for x, y in zip(towards[:-1], towards[1:], strict=True)))
        vs_chosen = {}
        if "per_example" in runs[lr]:
            chosen = evidence.score_matrix([runs[lr]])
            vs_chosen = {c: evidence.difference(evidence.score_matrix([run]), chosen)
                         for c, run in sorted(runs.items()) if c != lr and "per_example" in run}
        ties = [c for c, d in vs_chosen.items() if d.low <= 0 <= d.high]
        note = (f"{method}: {lr:g} chosen of {', '.join(f'{c:g}' for c in candidates)}: "
                + {"inside": "inside the range tried",
                   "highest candidate": "the highest tried, so a higher rate might score better",
                   "lowest candidate": "the lowest tried, so a lower rate might score better"}[position]
                + (f" (no record at {', '.join(f'{c:g}' for c in missing)})" if missing else ""))
        if position != "inside" and len(scores) > 1:
            profile = ", ".join(f"{c:g}: {v:.3f}" for c, v in scores.items())
            note += (f"; validation scores {profile}: "
                     + ("they rise (or hold) at every step towards the edge" if rising
                        else "they do not rise steadily towards the edge"))
        if ties:
            note += ("; within the validation noise of the choice (paired differences on "
                     f"{vs_chosen[ties[0]].examples} examples): "
                     + ", ".join(f"{c:g} ({vs_chosen[c]})" for c in ties))
        out.append({"method": method, "chosen": lr, "candidates": candidates,
                    "position": position, "missing": missing, "scores": scores, "rising": rising,
                    "vs_chosen": vs_chosen, "ties": ties, "note": note})
    return out


def grid_specs(model: str, lrs: dict[str, float],
               seeds: tuple[Sequence[int], ...] = (FIRST_SEEDS, MORE_SEEDS)) -> list[RunSpec]:
    """Stage 2: the grid of record in order of priority, seeds 0-2 first (chapter 4).

    ``lrs`` maps a method to its chosen learning rate. LM: zero-shot; full fine-tuning; LoRA on
    all linear layers at r in RANKS (alpha / sqrt(r)); LoRA on W_q, W_v at r in 1, 8, 64; the
    fixed-budget points of the LoRA paper's Table 5 (W_q at 8, W_q W_v at 4, attention at 2);
    the alpha / r series on all layers (the confound); adapters and prefix tuning at two sizes.
    Encoder: full fine-tuning and LoRA at r in RANKS on q, qv and all.
    """
    def lora(r: int, targets: str, scaling: str = "rslora", seed: int = 0) -> RunSpec:
        return RunSpec(model, "lora", r, targets, scaling, seed=seed, lr=lrs["lora"])

    out: list[RunSpec] = []
    for group in seeds:
        for seed in group:
            if model == "lm":
                if seed == 0:
                    out.append(RunSpec("lm", "none"))  # deterministic: one run
                out.append(RunSpec("lm", "full", seed=seed, lr=lrs["full"]))
                out += [lora(r, "all", seed=seed) for r in RANKS]
                out += [lora(r, "qv", seed=seed) for r in (1, 8, 64)]
                out += [lora(8, "q", seed=seed), lora(4, "qv", seed=seed), lora(2, "attn", seed=seed)]
                out += [lora(r, "all", "lora", seed) for r in (2, 8, 64)]
                out += [RunSpec("lm", m, seed=seed, lr=lrs[m], size=size)
                        for m in ("adapter", "prefix") for size in SIZES[m]]
            else:
                out.append(RunSpec("encoder", "full", seed=seed, lr=lrs["full"]))
                out += [lora(r, t, seed=seed) for t in ("q", "qv", "all") for r in RANKS]
    return out


# The QLoRA grid of record (chapters 6 and 7): LoRA on the LM over each storage of W0, all linear
# layers at three ranks, and attention only at r = 8 (QLoRA's section 4: attention alone falls
# short). Quality runs hold the de-quantized Q(W0) as a dense frozen weight (``dense_base``: the
# same function, bit for bit in fp32, at LoRA's cost); seed 0 of each 4-bit base at r = 8 also
# trains on the codes themselves, for memory and time per step side by side.
QLORA_BASES = ("float", "nf4", "fp4", "int4")
QLORA_RANKS = (2, 8, 64)
QLORA_ATTENTION = ("float", "nf4")  # attention-only at r = 8, on these bases


def qlora_grid_specs(lr: float, seeds: tuple[Sequence[int], ...] = (FIRST_SEEDS, MORE_SEEDS)
                     ) -> list[RunSpec]:
    """The QLoRA grid of record, in order of priority, seeds 0-2 first (chapters 6, 7).

    ``lr`` is LoRA's learning rate, chosen on the validation split as for the main grid (the
    QLoRA paper keeps 16-bit LoRA's hyperparameters). rsLoRA scaling, as the main grid.
    """
    def lora(r: int, targets: str, base: str, seed: int, dense: bool = True) -> RunSpec:
        return RunSpec("lm", "lora", r, targets, "rslora", base=base, seed=seed, lr=lr,
                       dense_base=True if dense and base != "float" else None)

    out: list[RunSpec] = []
    for group in seeds:
        for seed in group:
            out += [lora(r, "all", base, seed) for r in QLORA_RANKS for base in QLORA_BASES]
            out += [lora(8, "attn", base, seed) for base in QLORA_ATTENTION]
            if seed == 0:  # the true 4-bit path: memory and time per step
                out += [lora(8, "all", base, 0, dense=False) for base in QLORA_BASES[1:]]
    return out


def keeps_factors(spec: RunSpec) -> bool:
    """Whether a run's A, B are kept for the subspace analysis (FACTOR_RUNS, seeds 0 and 1)."""
    return (spec.method == "lora" and spec.variant is None and spec.scaling == "rslora"
            and spec.seed in (0, 1)
            and spec.split is None and (spec.targets, spec.r) in FACTOR_RUNS[spec.model])


def _factors(model: torch.nn.Module, names: Sequence[str]) -> dict:
    from lorabook.lora import _name_matches, lora_layers

    return {n: {"A": m.A.detach().to("cpu", torch.float16).clone(),
                "B": m.B.detach().to("cpu", torch.float16).clone(), "scaling": m.scaling}
            for n, m in lora_layers(model) if _name_matches(n, list(names))}


# ---------------------------------------------------------------- running the grid, in parallel


def _claim(folder: Path, key: str) -> bool:
    """Atomically claim a run for this worker (a file created with O_EXCL); False if taken."""
    name = folder / hashlib.sha1(key.encode()).hexdigest()
    try:
        os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _done_keys(out: Path) -> set[str]:
    keys = set()
    for path in [out, *sorted(out.parent.glob(out.name + ".shard*"))]:
        if path.name.endswith(".factors.pt"):  # a shard's kept A, B: not a results file
            continue
        if path.exists() and path.stat().st_size:
            keys |= {r["key"] for r in read_results(path)[1]}
    return keys


def curve_every(spec: RunSpec, settings: RunSettings) -> int:
    """Steps between the points of an LM test run's learning curve: six points per run; else 0."""
    if spec.model != "lm" or spec.split is not None or spec.method == "none":
        return 0
    return max(1, spec.resolved(settings).steps // 6)


class RunsFailed(RuntimeError):
    """Runs that raised (a bug, not a diverged learning rate): the others were stored, and the
    command exits with status 1 after its stage (``python -m lorabook.record``)."""


def worker(queue: Path, shard: Path, claims: Path, deadline: float, settings: RunSettings,
           mixed_precision: bool) -> tuple[int, list[str]]:
    """Take unclaimed specs from ``queue`` one by one until none is left or the deadline passes:
    the number of runs stored and the keys of those that raised."""
    specs = [RunSpec(**d) for d in json.loads(queue.read_text())]
    model = specs[0].model if specs else "lm"
    open_results(shard, settings)
    factors_path = shard.with_suffix(shard.suffix + ".factors.pt")
    factors = torch.load(factors_path) if factors_path.exists() else {}
    done, failed = 0, []
    for spec in specs:
        if time.time() > deadline:
            break
        key = spec.resolved(settings).key()
        if not _claim(claims, key):
            continue
        t0 = time.time()
        try:
            record, trained = run_one(spec, settings, return_model=True,
                                      mixed_precision=mixed_precision,
                                      curve_every=curve_every(spec, settings),
                                      generation=spec.model == "lm" and spec.split is None)
        except FloatingPointError as e:  # a diverged candidate learning rate: no record
            print(f"[{shard.name}] {key}: diverged ({e})", flush=True)
            continue
        except Exception:  # noqa: BLE001  one broken run must not stop this worker's others
            print(f"[{shard.name}] {key}: FAILED\n{traceback.format_exc()}", flush=True)
            failed.append(key)
            continue
        append_record(shard, record)
        if keeps_factors(spec):
            factors[key] = _factors(trained, FACTOR_LAYERS[model])
            torch.save(factors, factors_path)
        done += 1
        print(f"[{shard.name}] {key}: score {record['score']:.3f} in {time.time() - t0:.0f} s",
              flush=True)
        del trained
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return done, failed


def run_parallel(specs: Sequence[RunSpec], out: Path, workers: int, deadline: float,
                 settings: RunSettings, mixed_precision: bool,
                 done_elsewhere: frozenset[str] = frozenset()) -> None:
    """Run the specs not yet in ``out`` (or its shards, or ``done_elsewhere``) with ``workers``
    processes, then merge; raises ``RunsFailed`` after the merge if a run raised."""
    done = _done_keys(out) | done_elsewhere
    todo = [s for s in specs if s.resolved(settings).key() not in done]
    if not todo:
        return
    if workers <= 1:  # in this process: what the tests and a CPU use
        shard = out.parent / f"{out.name}.shard0"
        claims = out.parent / f".claims_{os.getpid()}_{int(time.time())}"
        claims.mkdir(parents=True)
        queue = claims / "queue.json"
        queue.write_text(json.dumps([asdict(s) for s in todo]))
        failed = worker(queue, shard, claims, deadline, settings, mixed_precision)[1]
        for f in claims.iterdir():
            f.unlink()
        claims.rmdir()
        merge_shards(out, settings)
        if failed:
            raise RunsFailed(f"{len(failed)} run(s) raised: {', '.join(failed)}")
        return
    stamp = f"{os.getpid()}_{int(time.time())}"
    queue = out.parent / f".queue_{stamp}.json"
    claims = out.parent / f".claims_{stamp}"
    claims.mkdir(parents=True)
    queue.write_text(json.dumps([asdict(s) for s in todo]))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
           "LORABOOK_PARENT_COMMAND": " ".join(sys.argv)}  # the workers' provenance names it
    procs = [subprocess.Popen([sys.executable, "-m", "lorabook.record", "--worker",
                               "--queue", str(queue), "--claims", str(claims),
                               "--out", str(out.parent / f"{out.name}.shard{i}"),
                               "--deadline", str(deadline)]
                              + (["--mixed-precision"] if mixed_precision else []), env=env)
             for i in range(min(workers, len(todo)))]
    for p in procs:
        p.wait()
    queue.unlink()
    for f in claims.iterdir():
        f.unlink()
    claims.rmdir()
    merge_shards(out, settings)
    if bad := [f"worker {i} (exit {p.returncode})" for i, p in enumerate(procs) if p.returncode]:
        raise RunsFailed(f"runs raised in {', '.join(bad)}: see its output")


def merge_shards(out: Path, settings: RunSettings) -> int:
    """Append the shards' records (and kept factors) to ``out``, then delete the shards; the count."""
    open_results(out, settings)
    done = {r["key"] for r in read_results(out)[1]}
    factors_out = out.with_suffix(".factors.pt")
    factors = torch.load(factors_out) if factors_out.exists() else {}
    added = 0
    for shard in sorted(out.parent.glob(out.name + ".shard*")):
        if shard.name.endswith(".factors.pt"):
            continue
        for record in read_results(shard)[1]:
            if record["key"] not in done:
                append_record(out, record)
                done.add(record["key"])
                added += 1
        extra = shard.with_suffix(shard.suffix + ".factors.pt")
        if extra.exists():
            factors.update(torch.load(extra))
            extra.unlink()
        shard.unlink()
    if factors:
        torch.save(factors, factors_out)
    return added


def run_record(model: str, out: Path, workers: int = 1, budget_s: float = float("inf"),
               settings: RunSettings | None = None, mixed_precision: bool | None = None,
               stages: Sequence[str] = ("lr", "grid"), max_runs: int | None = None,
               grid: str = "main", lr_from: Path | None = None,
               only: Sequence[str] = ()) -> list[dict]:
    """Both stages for one model into ``out``; resumes; stops claiming runs after budget_s (chapter 4).

    ``max_runs`` keeps only the first runs of each stage (a trial of the command, not a record).
    ``grid="qlora"`` (the LM only): LoRA's learning-rate candidates, then ``qlora_grid_specs``.
    ``lr_from``: continue the main grid of another results file (made in the same setting, e.g.
    on another machine): its stage 1 chooses the learning rates and its runs are not repeated.
    With ``grid="qlora"``, the QLoRA grid at the LoRA rate that file's stage 1 chose: its
    float-base runs are the main grid's LoRA runs (the same keys), so ``only`` keeps the 4-bit
    ones and the evidence reads the float ones from the main grid's files.
    ``only``: fnmatch patterns on the run keys; the grid keeps the runs that match one of them
    (in the grid's order of priority), e.g. ``"lm|full|*"``.
    """
    if grid not in ("main", "qlora"):
        raise ValueError(f"grid must be 'main' or 'qlora', got {grid!r}")
    if grid == "qlora" and model != "lm":
        raise ValueError(f"the QLoRA grid is the LM's, got model {model!r}")
    settings = settings or get_settings()
    if mixed_precision is None:
        mixed_precision = torch.cuda.is_available()
    deadline = time.time() + budget_s
    out.parent.mkdir(parents=True, exist_ok=True)
    if lr_from is not None:
        return _continue_grid(model, out, Path(lr_from), workers, deadline, settings,
                              mixed_precision, max_runs, only, grid)
    if grid == "qlora":
        if "lr" in stages:
            specs = [s for s in lr_specs(model) if s.method == "lora"]
            run_parallel(specs[:max_runs], out, workers, deadline, settings, mixed_precision)
        records = read_results(out)[1] if out.exists() else []
        if "grid" in stages and any(r.get("method") == "lora" and r.get("split") == "val"
                                    for r in records):  # no chosen lr yet: the grid waits
            specs = qlora_grid_specs(choose_lr(records, model, "lora")[0])
            run_parallel(specs[:max_runs], out, workers, deadline, settings, mixed_precision)
            records = read_results(out)[1]
        return records
    if "lr" in stages:
        run_parallel(lr_specs(model)[:max_runs], out, workers, deadline, settings, mixed_precision)
    records = read_results(out)[1] if out.exists() else []
    if "grid" in stages:
        specs = _matching(_chosen_grid(model, records), only, settings)
        run_parallel(specs[:max_runs], out, workers, deadline, settings, mixed_precision)
        records = read_results(out)[1]
    return records


def _chosen_grid(model: str, records: Sequence[dict]) -> list[RunSpec]:
    """The main grid with the learning rates that the stage-1 ``records`` chose; a method with
    no validation runs yet waits (its runs are left out)."""
    methods = {m for (mm, m) in LR_CANDIDATES if mm == model}
    lrs = {m: choose_lr(records, model, m)[0] for m in methods
           if any(r.get("method") == m and r.get("split") == "val" for r in records)}
    placeholders = {m: lrs.get(m, 1.0) for m in ("full", "lora", "adapter", "prefix")}
    return [s for s in grid_specs(model, placeholders) if s.method == "none" or s.method in lrs]


def _matching(specs: Sequence[RunSpec], patterns: Sequence[str],
              settings: RunSettings) -> list[RunSpec]:
    """The specs whose resolved key matches one of the fnmatch ``patterns`` (all when none)."""
    if not patterns:
        return list(specs)
    kept = [s for s in specs
            if any(fnmatch.fnmatchcase(s.resolved(settings).key(), p) for p in patterns)]
    if not kept:
        raise ValueError(f"no run of the grid matches {list(patterns)}; a key looks like "
                         f"{specs[0].resolved(settings).key()!r}" if specs else "the grid is empty")
    return kept


def _continue_grid(model: str, out: Path, source: Path, workers: int, deadline: float,
                   settings: RunSettings, mixed_precision: bool, max_runs: int | None,
                   only: Sequence[str], grid: str = "main") -> list[dict]:
    """The main grid of ``source`` continued into ``out``: same learning rates, none of its runs;
    or (``grid="qlora"``) the QLoRA grid at the LoRA rate of ``source``'s stage 1."""
    if not source.is_file():
        raise FileNotFoundError(f"--lr-from {source}: no such results file")
    header, stage1 = read_results(source)
    if header.get("settings") != asdict(settings):
        raise ValueError(f"{source} was made in the setting {header.get('settings')}, not in this "
                         f"one ({asdict(settings)}): its runs and these would not be one grid")
    if grid == "qlora":
        if not any(r.get("method") == "lora" and r.get("split") == "val" for r in stage1):
            raise ValueError(f"--lr-from {source}: no LoRA runs on the validation split to "
                             "choose the QLoRA grid's learning rate from")
        specs = qlora_grid_specs(choose_lr(stage1, model, "lora")[0])
    else:
        specs = _chosen_grid(model, stage1)
    specs = _matching(specs, only, settings)
    run_parallel(specs[:max_runs], out, workers, deadline, settings, mixed_precision,
                 frozenset(r["key"] for r in stage1))
    return read_results(out)[1] if out.exists() else []


# ---------------------------------------------------------------- chapter 8: after LoRA

# Variants with learning rates of their own, tried on the validation split at seed 0 like stage 1:
# VeRA trains scaling vectors only (its paper: 1e-2 to 4e-2); LoRA+'s lr is A's, B's is 16 x it,
# so its candidates sit below LoRA's. DoRA, PiSSA and LoftQ keep LoRA's chosen rate, as their
# papers compare them with LoRA at LoRA's learning rate.
VARIANT_LR_CANDIDATES = {
    ("lm", "vera"): (3e-3, 1e-2, 3e-2),
    ("lm", "loraplus"): (1.25e-4, 2.5e-4, 5e-4, 1e-3),
    ("encoder", "vera"): (3e-3, 1e-2, 3e-2),
    ("encoder", "loraplus"): (2e-4, 5e-4, 1e-3, 3e-3),
}
# Every variant at the point LoRA's learning rate was chosen at (LR_PROBE: r = 8, all linear
# layers, alpha / sqrt(r)), so that each differs from that LoRA run in the one thing it changes;
# VeRA at its own rank (sweep.VERA_R), with far fewer trained numbers.
VARIANT_RANK_SERIES = (8, 64)  # rsLoRA against alpha / r at two ranks


def _variant_spec(model: str, variant: str | None, lr: float, seed: int = 0,
                  split: str | None = None, base: str = "float", r: int | None = None,
                  scaling: str = "rslora") -> RunSpec:
    from lorabook.sweep import VERA_R

    r = r or (VERA_R if variant == "vera" else LR_PROBE[model]["r"])
    return RunSpec(model, "lora", r, LR_PROBE[model]["targets"], scaling, base, seed, lr=lr,
                   split=split, variant=variant)


def variant_lr_specs(model: str) -> list[RunSpec]:
    """Learning-rate candidates of VeRA and LoRA+, seed 0, on the val split (chapter 8)."""
    return [_variant_spec(model, v, lr, split="val")
            for (m, v), lrs in VARIANT_LR_CANDIDATES.items() if m == model for lr in lrs]


def variant_specs(model: str, lrs: dict[str, float],
                  seeds: Sequence[int] = FIRST_SEEDS) -> list[RunSpec]:
    """The after-LoRA grid of record, seed by seed (chapter 8).

    ``lrs``: "lora" (stage 1's choice) and "vera", "loraplus" (``variant_lr_specs``' choices).
    Both models: LoRA (the main grid's run, same key, re-run in this file so that every
    comparison is paired within it), alpha / r against rsLoRA at r in 8 and 64,
    DoRA, LoRA+, PiSSA, VeRA. The LM also on a 4-bit NF4 base: QLoRA, QPiSSA and LoftQ.
    """
    out = []
    for seed in seeds:
        lora = lrs["lora"]
        out.append(_variant_spec(model, None, lora, seed))
        out += [_variant_spec(model, None, lora, seed, r=r, scaling=sc)
                for r in VARIANT_RANK_SERIES for sc in ("lora", "rslora")]
        out += [_variant_spec(model, v, lrs.get(v, lora), seed)
                for v in ("dora", "loraplus", "pissa", "vera")]
        if model == "lm":
            out += [_variant_spec(model, v, lora, seed, base="nf4") for v in (None, "pissa", "loftq")]
    return list(dict.fromkeys(out))  # r = 8 with rslora appears twice above: keep it once


def run_variants(model: str, out: Path, workers: int = 1, budget_s: float = float("inf"),
                 settings: RunSettings | None = None, mixed_precision: bool | None = None,
                 max_runs: int | None = None, lr_from: Path | None = None) -> list[dict]:
    """Chapter 8's grid into ``out``; LoRA's learning rate as stage 1 chose it in ``lr_from``
    (default: ``out`` itself), VeRA's and LoRA+'s chosen here on the val split (chapter 8)."""
    settings = settings or get_settings()
    if mixed_precision is None:
        mixed_precision = torch.cuda.is_available()
    deadline = time.time() + budget_s
    out.parent.mkdir(parents=True, exist_ok=True)
    source = Path(lr_from) if lr_from is not None else out
    stage1 = read_results(source)[1] if source.exists() else []
    lrs = {"lora": choose_lr(stage1, model, "lora")[0]}  # raises until stage 1 has run
    run_parallel(variant_lr_specs(model)[:max_runs], out, workers, deadline, settings,
                 mixed_precision)
    records = read_results(out)[1]
    for (m, variant) in VARIANT_LR_CANDIDATES:
        if m == model and any(r.get("variant") == variant and r.get("split") == "val"
                              for r in records):
            lrs[variant] = choose_lr(records, model, "lora", variant)[0]
    specs = [s for s in variant_specs(model, lrs)
             if s.variant not in ("vera", "loraplus") or s.variant in lrs]
    run_parallel(specs[:max_runs], out, workers, deadline, settings, mixed_precision)
    return read_results(out)[1]


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m lorabook.record``: the runs of record of one model into a results file (chapter 4)."""
    parser = argparse.ArgumentParser(
        prog="python -m lorabook.record",
        description="The runs of record: learning rates chosen on a validation split, then the "
                    "grid over seeds, appended to --out as each run ends (re-run to resume). "
                    "Use LORABOOK_MODE=record.")
    parser.add_argument("--model", choices=("lm", "encoder"))
    parser.add_argument("--grid", choices=("main", "qlora"), default="main",
                        help="main: the grid of chapter 4; qlora: the QLoRA grid (LM, chapters 6-7)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--workers", type=int, default=1, help="runs at once (one GPU holds many)")
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="claim no new run after this many seconds")
    parser.add_argument("--stages", default="lr,grid", help="lr (learning rates), grid, variants (chapter 8), comma-separated")
    parser.add_argument("--max-runs", type=int, default=None,
                        help="only the first N runs of each stage: a trial, not a record")
    parser.add_argument("--lr-from", default=None,
                        help="the results file whose stage 1 chose the learning rates: for the "
                             "variants stage (default: --out), or to continue that file's main "
                             "grid into --out (its runs are not repeated)")
    parser.add_argument("--only", action="append", default=[],
                        help="keep the grid's runs whose key matches this fnmatch pattern "
                             "(repeatable), e.g. 'lm|full|*'")
    parser.add_argument("--mixed-precision", action="store_true",
                        help="fp32 weights with bf16 autocast (default on CUDA)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--queue", help=argparse.SUPPRESS)
    parser.add_argument("--claims", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    settings = get_settings()
    if args.worker:
        failed = worker(Path(args.queue), Path(args.out), Path(args.claims), args.deadline,
                        settings, args.mixed_precision)[1]
        sys.exit(1 if failed else 0)
    if args.model is None:
        parser.error("--model is required")
    if settings.mode != "record" and os.environ.get("LORABOOK_RECORD_ANY_MODE") != "1":
        parser.error(f"the runs of record use LORABOOK_MODE=record (this is {settings.mode!r})")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if not stages or set(stages) - {"lr", "grid", "variants"}:
        parser.error(f"--stages takes lr, grid and/or variants, got {args.stages!r}")
    records = []
    try:
        if set(stages) & {"lr", "grid"}:
            records = run_record(args.model, Path(args.out), args.workers, args.budget_s,
                                 settings, args.mixed_precision or None,
                                 [s for s in stages if s != "variants"], args.max_runs,
                                 args.grid, Path(args.lr_from)
                                 if args.lr_from and "variants" not in stages else None,
                                 args.only)
        if "variants" in stages:
            records = run_variants(args.model, Path(args.out), args.workers, args.budget_s,
                                   settings, args.mixed_precision or None, args.max_runs,
                                   Path(args.lr_from) if args.lr_from else None)
    except RunsFailed as e:  # the runs that ended are stored; the command must not look done
        parser.exit(1, f"FAILED: {e}. The runs that ended are stored in {args.out}.\n")
    print(f"{len(records)} records in {args.out}")


if __name__ == "__main__":
    main()
